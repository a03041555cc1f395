"""Building guest functions from source: C → wasm32-wasi handler modules with `zig cc`, Python →
components with componentize-py (against the WIT world in guest-sdk/wit/, with guest-sdk/python/).

Owns the compiler command line (the flags that make a module fit a small `memory_mb`) and the
on-disk build cache. The compiler is `ziglang` from PyPI, run as `python -m ziglang cc`, so a fresh
`pip install wasminfer[examples]` can build every example function.

The language is picked from the sources found (`_LANGUAGES`) and each has a builder in `_BUILDERS`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wasminfer._fs import atomic_write
from wasminfer.locations import SDK_MODULE_WASM, cache_root, guest_sdk_path

__all__ = ["SDK_MODULE_WASM", "BuildError", "build", "build_sdk_module", "default_cache_dir", "guest_sdk_dir"]

Progress = Callable[[str], None]

# Bump when the command line or the cache layout changes in a way the cache key does not capture.
_RECIPE = "wasminfer-build-1"
_PAGE = 64 << 10
_COMPILE_TIMEOUT_S = 900  # the very first zig run on a machine builds wasi-libc (~30 s, more when slow)
_LANGUAGES = {".c": "c", ".py": "python"}  # source suffix → language, in order of preference


# `SDK_MODULE_WASM` (locations.py) is the C SDK compiled as a module of its own, shipped with the host
# like a libc: functions built with `sdk="module"` import their SDK calls from it, and the runtime
# links it into their instances (docs/sdk-module.md). `build_sdk_module` rebuilds it; a test checks
# the shipped bytes are what the pinned zig makes of the sources.
# The memory layout the two modules agree on (zig links every module with --stack-first: a module's
# stack starts at address 0): the function's stack below SDK_BASE, the SDK's data (and its own stack,
# sdk_module.c) from SDK_BASE, the function's data from FUNCTION_BASE.
SDK_BASE = 64 << 10
FUNCTION_BASE = 128 << 10
#: The largest stack of a function built against the SDK module: what lies below the SDK's data.
SDK_MODULE_MAX_STACK = SDK_BASE
#: The SDK module's initial memory (untouched pages cost nothing).
SDK_INITIAL_MEMORY = 256 << 10


class BuildError(Exception):
    """A function could not be built. `stderr` holds the compiler's output, when there was one."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(f"{message}\n{stderr}".rstrip() if stderr else message)
        self.message = message
        self.stderr = stderr


def guest_sdk_dir() -> Path:
    """The `guest-sdk` folder: `$WASMINFER_GUEST_SDK`, else the one in this package's source tree.

    Raises `BuildError` if it does not hold `c/wasminfer.h`.
    """
    sdk = guest_sdk_path()
    if not (sdk / "c" / "wasminfer.h").is_file():
        raise BuildError(f"guest SDK not found at {sdk} (set WASMINFER_GUEST_SDK to the guest-sdk folder)")
    return sdk


def default_cache_dir() -> Path:
    """`$WASMINFER_CACHE/build`, else `~/.cache/wasminfer/build`."""
    return cache_root() / "build"


@dataclass(frozen=True)
class _Sources:
    language: str
    root: Path  # the function folder (or the single file's folder): on the include path
    files: tuple[Path, ...]  # compiled
    extra: tuple[Path, ...]  # not compiled but part of the cache key (headers)


@dataclass(frozen=True)
class _Flags:
    opt: str
    initial_memory: int | None
    stack_size: int
    exec_model: str = "reactor"  # reactor: handler modules; command: WASI programs with `_start`
    sdk: str = "static"  # static: the SDK compiled into the function; module: imported (SDK_MODULE_WASM)

    def key(self) -> str:
        key = f"{self.opt} initial-memory={self.initial_memory} stack-size={self.stack_size}"
        # reactor builds keep the cache keys they had before the option existed
        key = key if self.exec_model == "reactor" else f"{key} exec-model={self.exec_model}"
        return key if self.sdk == "static" else f"{key} sdk={self.sdk}"


def _find_sources(source: Path) -> _Sources:
    if source.is_file():
        if source.suffix not in _LANGUAGES:
            raise BuildError(f"cannot build {source}: expected one of {', '.join(_LANGUAGES)}")
        return _Sources(_LANGUAGES[source.suffix], source.parent, (source,), ())
    if not source.is_dir():
        raise BuildError(f"cannot build {source}: no such file or folder")
    for suffix, language in _LANGUAGES.items():
        files = tuple(sorted(source.glob(f"*{suffix}")))
        if files:
            extra = tuple(sorted(source.glob("*.h"))) if language == "c" else _python_extra(source, files)
            return _Sources(language, source, files, extra)
    raise BuildError(f"cannot build {source}: it holds no {' or '.join(_LANGUAGES)} files")


def _zig_version() -> str:
    try:
        return importlib.metadata.version("ziglang")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError("the C toolchain is missing: pip install ziglang==0.17.1") from None


def _c_command(src: _Sources, out: Path, sdk: Path, flags: _Flags) -> list[str]:
    # zig's default stack is 16 MiB, hence its 16 MiB initial memory: more than a small memory_mb
    # allows at instantiation. With a small stack and no --initial-memory, the linker sizes the
    # initial memory to hold just the stack and the static data.
    memory = [] if flags.initial_memory is None else [f"-Wl,--initial-memory={flags.initial_memory}"]
    if flags.sdk == "module":  # the SDK's calls are imports; its memory is the one the function uses
        memory += ["-DWASMINFER_SDK_MODULE", "-Wl,--import-memory", "-Wl,--export-memory",
                   f"-Wl,--global-base={FUNCTION_BASE}"]
    elif flags.sdk == "sdk-probe":  # the SDK module linked to read where its data ends
        memory += ["-Wl,--export-memory", f"-Wl,--global-base={SDK_BASE}"]
    elif flags.sdk == "sdk-build":  # the SDK module itself (build_sdk_module)
        # Its initial memory holds a small function's data too (digits' and image-classify's end
        # below 256 KiB): their instances need no memory.grow before the function's (~3 µs).
        memory += ["-Wl,--export-memory", f"-Wl,--global-base={SDK_BASE}",
                   f"-Wl,--initial-memory={SDK_INITIAL_MEMORY}"]
    return [
        sys.executable, "-m", "ziglang", "cc",
        "-target", "wasm32-wasi",
        # reactor: a library with exports and no _start, instances are reused (handler modules);
        # command: a program whose `_start` runs `main` once per instance (WASI command functions).
        f"-mexec-model={flags.exec_model}",
        flags.opt,
        "-I", str(sdk / "c"),
        "-I", str(src.root),
        f"-Wl,-z,stack-size={flags.stack_size}",
        *memory,
        "-s",  # no debug info: ~50 KiB instead of ~1 MiB
        *(str(f) for f in src.files),
        "-o", str(out),
    ]  # fmt: skip


def _build_c(src: _Sources, out: Path, sdk: Path, flags: _Flags, progress: Progress) -> None:
    cmd = _c_command(src, out, sdk, flags)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"compiling {src.root.name} took longer than {_COMPILE_TIMEOUT_S} s") from e
    if proc.returncode != 0 or not out.is_file():
        raise BuildError(f"compiling {src.root.name} failed (zig cc exit {proc.returncode})", proc.stderr)
    if proc.stderr.strip():
        progress(f"compiler warnings:\n{proc.stderr.rstrip()}")


def _componentize_py_version() -> str:
    try:
        return importlib.metadata.version("componentize-py")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError("the Python toolchain is missing: pip install componentize-py==0.25.1") from None


def _python_extra(folder: Path, files: tuple[Path, ...]) -> tuple[Path, ...]:
    """Every other file of a Python function's folder (its modules in subfolders, its data files such
    as a vocabulary): they go into the component and into the cache key."""
    skip = {"manifest.json", "README.md"}
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (path.is_file() and path not in files and rel.name not in skip and path.suffix != ".pyc"
                and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts)):
            found.append(path)
    return tuple(found)


def _python_module(src: _Sources) -> str:
    """The module that holds the `@handler`: the file built, else app.py or main.py of the folder."""
    names = [f.stem for f in src.files]
    if len(names) == 1:
        return names[0]
    for name in ("app", "main"):
        if name in names:
            return name
    raise BuildError(f"cannot build {src.root}: which module holds the @handler? name it app.py")


# The entry module componentize-py snapshots: the function's module, then the SDK's preparation.
_PY_ENTRY = """\
import {module}
import wasminfer_guest.export
from wasminfer_guest.export import Handler  # the export componentize-py looks up

wasminfer_guest.export.prepare({module})
"""


def _build_python(src: _Sources, out: Path, sdk: Path, flags: _Flags, progress: Progress) -> None:
    """componentize-py against the WIT world in guest-sdk/wit, with the SDK in guest-sdk/python.

    The function's files are staged alone in a temporary folder and componentize-py sees an empty
    virtualenv: the component holds what the cache key covers, never whatever the build machine
    has installed (pure-Python dependencies go into the function's folder).
    """
    module = _python_module(src)
    with tempfile.TemporaryDirectory(prefix="wasminfer-py-") as tmp_name:
        tmp = Path(tmp_name)
        app, entry, venv = tmp / "app", tmp / "entry", tmp / "venv"
        for f in (*src.files, *src.extra):
            target = app / f.relative_to(src.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        entry.mkdir()
        (entry / "wasminfer_main.py").write_text(_PY_ENTRY.format(module=module))
        (venv / "lib" / "python3" / "site-packages").mkdir(parents=True)
        cmd = [
            sys.executable, "-c", "import componentize_py; componentize_py.script()",
            "-d", str(sdk / "wit"), "-w", "function", "componentize", "wasminfer_main",
            "-p", str(entry), "-p", str(app), "-p", str(sdk / "python"), "-o", str(out),
        ]  # fmt: skip
        # No Rust backtraces in what the author reads: the Python traceback says what failed.
        env = {**os.environ, "VIRTUAL_ENV": str(venv), "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        start = time.monotonic()
        try:
            while True:
                try:
                    output, _ = proc.communicate(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    if elapsed > _COMPILE_TIMEOUT_S:
                        raise BuildError(f"componentize-py took longer than {_COMPILE_TIMEOUT_S} s") from None
                    progress(f"{src.root.name}: componentize-py still running ({elapsed:.0f} s)")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = output.decode("utf-8", "replace")
    if proc.returncode != 0 or not out.is_file():
        raise BuildError(f"building {src.root.name} failed (componentize-py exit {proc.returncode})", text)


_BUILDERS: dict[str, Callable[[_Sources, Path, Path, _Flags, Progress], None]] = {
    "c": _build_c,
    "python": _build_python,
}


def _cache_key(src: _Sources, sdk: Path, flags: _Flags) -> str:
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    part("recipe", _RECIPE.encode())
    part("language", src.language.encode())
    if src.language == "python":
        part("componentize-py", _componentize_py_version().encode())
        part("layout", "\0".join(str(f.relative_to(src.root)) for f in (*src.files, *src.extra)).encode())
        for f in sorted((sdk / "python").rglob("*.py")) + sorted((sdk / "wit").glob("*.wit")):
            part("sdk:" + str(f.relative_to(sdk)), f.read_bytes())
    else:
        part("zig", _zig_version().encode())
    part("flags", flags.key().encode())
    for f in (*src.files, *src.extra):
        part("source:" + f.name, f.read_bytes())
    for f in sorted((sdk / "c").glob("*.h")):
        part("sdk:" + f.name, f.read_bytes())
    return h.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def build(
    source: Path,
    out: Path | None = None,
    *,
    cache_dir: Path | None = None,
    opt: str = "-O2",
    initial_memory: int | None = None,
    stack_size: int = 64 << 10,
    progress: Progress | None = None,
    exec_model: str = "reactor",
    sdk: str | None = None,
) -> Path:
    """Compiles a function — one `.c` file, or every `.c` file of a folder — to a handler module;
    or a Python function — one `.py` file, or a folder with `app.py` (its other files, such as data
    files, go along) — to a component (the memory and stack options do not apply to it).

    `exec_model="command"` builds a WASI command instead (C only): a program whose `main` runs once
    per invocation through `_start` (guest-sdk/WASI-NN.md).

    `initial_memory` is the module's memory at instantiation, a multiple of 64 KiB that must hold
    the stack and the static data and fit the function's `memory_mb`. The default (None) lets the
    linker pick the smallest such size (128 KiB for the examples). Larger is only waste: the heap
    grows beyond it (zig's malloc takes every block from `memory.grow`).

    `sdk` (C only): "module" builds a handler module whose SDK calls are imports from the SDK module
    (`SDK_MODULE_WASM`, linked by the host): its own code is ~10× smaller, so a new function compiles
    that much sooner; "static" compiles the SDK into it (one module, no import). The default (None)
    is "module" for a handler module whose stack fits `SDK_MODULE_MAX_STACK`, else "static".

    Results are cached in `cache_dir` (default `default_cache_dir()`), keyed by the sources, the SDK
    (C headers; for Python the SDK and the WIT world), the flags and the toolchain's version. A
    `manifest.json` in the folder is ignored. Returns `out` if given (written atomically), else the
    cached module's path.

    Raises `BuildError` if the sources or the SDK are missing, the toolchain is not installed, or the
    compiler fails (the exception carries its stderr), or a command build of non-C sources;
    `ValueError` for impossible sizes, an unknown `exec_model` or `sdk`, or `sdk="module"` for a
    command or a stack above `SDK_MODULE_MAX_STACK`.
    """
    report = progress or (lambda _msg: None)
    if stack_size % 16 or stack_size <= 0:
        raise ValueError(f"stack_size must be a positive multiple of 16, not {stack_size}")
    if initial_memory is not None and (initial_memory % _PAGE or initial_memory <= stack_size):
        raise ValueError(
            f"initial_memory must be a multiple of 64 KiB above stack_size, not {initial_memory}"
        )
    if exec_model not in ("reactor", "command"):
        raise ValueError(f"exec_model must be 'reactor' or 'command', not {exec_model!r}")
    source = Path(source)
    src = _find_sources(source)
    if exec_model != "reactor" and src.language != "c":
        raise BuildError(f"cannot build {source} as a WASI command: only C sources build as commands")
    fits = exec_model == "reactor" and stack_size <= SDK_MODULE_MAX_STACK
    if sdk is None:
        sdk = "module" if fits and src.language == "c" else "static"
    elif sdk not in ("module", "static"):
        raise ValueError(f"sdk must be 'module' or 'static', not {sdk!r}")
    elif sdk == "module" and not fits:
        raise ValueError(f"sdk='module' builds handler modules with a stack of at most "
                         f"{SDK_MODULE_MAX_STACK} bytes, not a {exec_model} with {stack_size}")
    if src.language != "c":
        sdk = "static"
    flags = _Flags(opt, initial_memory, stack_size, exec_model, sdk)
    return _build(source, src, flags, out, cache_dir, report)


def _build(source: Path, src: _Sources, flags: _Flags, out: Path | None, cache_dir: Path | None,
           report: Progress) -> Path:
    sdk = guest_sdk_dir()
    cached = (cache_dir or default_cache_dir()) / f"{_cache_key(src, sdk, flags)}.wasm"
    if cached.is_file():
        report(f"{source.name}: up to date ({cached.stat().st_size} bytes, cached)")
    else:
        tool = (f"componentize-py {_componentize_py_version()} (embeds CPython: 10-30 s)"
                if src.language == "python" else f"zig cc {_zig_version()}")
        report(f"{source.name}: compiling {len(src.files)} {src.language} file(s) with {tool}")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="wasminfer-build-") as tmp:
            wasm = Path(tmp) / "out.wasm"
            _BUILDERS[src.language](src, wasm, sdk, flags, report)
            _write_atomically(cached, wasm.read_bytes())
        report(f"{source.name}: built {cached.stat().st_size} bytes in {time.perf_counter() - start:.1f} s")
    if out is None:
        return cached
    _write_atomically(Path(out), cached.read_bytes())
    return Path(out)


def build_sdk_module(out: Path | None = None, *, cache_dir: Path | None = None,
                     progress: Progress | None = None) -> Path:
    """Compiles guest-sdk/c/sdk_module.c to the SDK module (what `SDK_MODULE_WASM` ships): its data
    from `SDK_BASE`, its memory exported, the 16 bytes of stack zig's link gives it unused (it runs
    on its own, sdk_module.c). Cached like `build`; returns `out` if given, else the cached path.
    Raises `BuildError` if it does not build or its data does not end below `FUNCTION_BASE`."""
    source = guest_sdk_dir() / "c" / "sdk_module.c"
    src = _Sources("c", source.parent, (source,), ())
    # Its data's end, where its heap starts: linked once with no initial memory, whose minimum is
    # then just the data's size (the shipped module has `SDK_INITIAL_MEMORY`).
    probe = _build(source, src, _Flags("-O2", None, 16, "reactor", "sdk-probe"), None, cache_dir,
                   lambda _msg: None)
    pages = _memory_min_pages(probe.read_bytes())
    if pages * _PAGE > FUNCTION_BASE:
        raise BuildError(f"the SDK module needs {pages} pages of memory: its data must end below "
                         f"{FUNCTION_BASE} bytes, where functions put theirs")
    flags = _Flags("-O2", None, 16, "reactor", "sdk-build")
    path = _build(source, src, flags, out, cache_dir, progress or (lambda _msg: None))
    return path


def _memory_min_pages(wasm: bytes) -> int:
    """The minimum of the memory a module exports, in pages (0 if it exports none)."""
    from wasminfer.runtime._binary import externs

    read = externs(wasm)
    memory = read[1].get("memory") if read is not None else None
    return memory.min_pages if memory is not None else 0
