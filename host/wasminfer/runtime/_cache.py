"""The compile cache: compiled core modules and components on disk, keyed by their sha256 and the
engine's fingerprint, compiled on a miss in a worker process (`_compiler.py`).

    <cache_dir>/modules/<sha256>-<fingerprint>.cwasm       core modules
    <cache_dir>/components/<sha256>-<fingerprint>.cwasm    components

An artefact that no longer loads (a stale or corrupt file) is deleted and compiled again.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from pathlib import Path
from typing import Any

import wasmtime
import wasmtime.component

from wasminfer.runtime import _compiler
from wasminfer.runtime._traps import WasmLinkError, first_line

WASMTIME_VERSION = "50.0.1"
#: The cache's folder for each kind of artefact.
_FOLDERS = {"module": "modules", "component": "components"}


def fingerprint(wide: bool = False) -> str:
    """What an artefact's loading engine must share with the one that compiled it: the wasmtime
    version and the engine configuration (`_compiler.engine_config`, `wide` or not)."""
    config = _compiler.WIDE_CONFIG_FINGERPRINT if wide else _compiler.CONFIG_FINGERPRINT
    return hashlib.sha256(f"wasmtime={WASMTIME_VERSION};{config}".encode()).hexdigest()[:16]


class CompileCache:
    """Compiled artefacts of one engine configuration, in `cache_dir` (None: no cache, every compile
    goes to a temporary file)."""

    def __init__(self, cache_dir: Path | None, fingerprint: str) -> None:
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint

    def prepare(self, kind: str) -> None:
        """Makes the folder of `kind` ("module" or "component")."""
        if self.cache_dir is not None:
            (self.cache_dir / _FOLDERS[kind]).mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, sha256: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / _FOLDERS[kind] / f"{sha256}-{self.fingerprint}.cwasm"

    def is_cached(self, kind: str, sha256: str) -> bool:
        path = self.path(kind, sha256)
        return path is not None and path.exists()

    def load(self, engine: wasmtime.Engine, kind: str, wasm: bytes, sha256: str | None,
             timeout_s: float) -> tuple[Any, str, bool]:
        """`(artefact, sha256, from_cache)`: the compiled core module (`kind="module"`) or component
        of `wasm`, loaded from the cache, else compiled in a worker within `timeout_s` (and cached).

        Raises `WasmLinkError` if the bytes do not compile, or not within `timeout_s`.
        """
        sha = sha256 or hashlib.sha256(wasm).hexdigest()
        cached = self.cached(engine, kind, sha)
        if cached is not None:
            return cached, sha, True
        # Served from the file like a cached one: wasmtime maps its memory images from the file
        # (copy-on-write), which every instance then shares.
        return compile_in_worker(engine, kind, wasm, self.path(kind, sha), timeout_s), sha, False

    def cached(self, engine: wasmtime.Engine, kind: str, sha256: str) -> Any | None:
        """The cached artefact of `sha256`, loaded, or None (a stale or corrupt one is deleted)."""
        path = self.path(kind, sha256)
        if path is not None and path.exists():
            try:
                return _deserialize(engine, kind, path)
            except wasmtime.WasmtimeError:
                path.unlink(missing_ok=True)  # stale or corrupt artefact: recompile
        return None

    def optimise(self, engine: wasmtime.Engine, kind: str, wasm: bytes, sha256: str, timeout_s: float,
                 cancel: threading.Event) -> Any:
        """Compiles `wasm` (already compiled in the fast tier) in the optimised tier, into the cache,
        in the background: in the worker kept for that, at the lowest priority.

        Raises `_compiler.CompileError` (`CompilerCrashed` if the worker died) or `WasmtimeError`.
        """
        with tempfile.TemporaryDirectory(prefix="wasminfer-compile-") if self.cache_dir is None \
                else contextlib.nullcontext("") as folder:
            path = self.path(kind, sha256) or Path(folder) / "artefact.cwasm"
            _compiler.compiler().compile(kind, wasm, path, timeout_s, cancel, background=True)
            return _deserialize(engine, kind, path)


def load_fast(engine: wasmtime.Engine, kind: str, wasm: bytes, timeout_s: float) -> Any:
    """`wasm` compiled in the fast tier in a worker and loaded from the bytes it sends back (nothing
    is written: the fast tier is never cached). Raises `WasmLinkError` as `compile_in_worker`."""
    try:
        artefact = _compiler.compiler().compile_fast(kind, wasm, timeout_s)
        if kind == "component":
            return wasmtime.component.Component.deserialize(engine, artefact)
        return wasmtime.Module.deserialize(engine, artefact)
    except (_compiler.CompileError, wasmtime.WasmtimeError) as exc:
        raise WasmLinkError(first_line(str(exc))) from None


def _deserialize(engine: wasmtime.Engine, kind: str, path: Path) -> Any:
    if kind == "component":
        return wasmtime.component.Component.deserialize_file(engine, str(path))
    return wasmtime.Module.deserialize_file(engine, str(path))


def compile_in_worker(engine: wasmtime.Engine, kind: str, wasm: bytes, out: Path | None,
                      timeout_s: float, *, wide: bool = False) -> Any:
    """Compiles a core module (`kind="module"`) or a component in a worker process and loads it
    into `engine`, whose configuration is `_compiler.engine_config(wide=wide)`.

    Compiling cannot be interrupted: the worker bounds its time and memory (`_compiler.py`) and
    writes the artefact to `out` (the cache; a temporary file if None), which is then loaded like
    a cache hit. Raises `WasmLinkError` if the bytes do not compile, or not within `timeout_s`.
    """
    with tempfile.TemporaryDirectory(prefix="wasminfer-compile-") if out is None \
            else contextlib.nullcontext(str(out.parent)) as folder:
        path = out if out is not None else Path(folder) / "artefact.cwasm"
        try:
            _compiler.compiler().compile(kind, wasm, path, timeout_s, wide=wide)
            return _deserialize(engine, kind, path)
        except (_compiler.CompileError, wasmtime.WasmtimeError) as exc:
            raise WasmLinkError(first_line(str(exc))) from None
