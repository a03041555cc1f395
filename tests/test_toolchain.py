"""`toolchain.build`: zig cc flags (memory layout, exports), the build cache, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from wasminfer import toolchain
from wasminfer.toolchain import BuildError

pytestmark = pytest.mark.slow  # the first zig run on a machine builds wasi-libc (~30 s)

HANDLER = """
#include "wasminfer.h"
static int handle(const wasminfer_request *req) { return wasminfer_output(req->body, req->body_len, "x/y"); }
WASMINFER_HANDLER(handle)
"""


def module_facts(path: Path) -> tuple[int, dict[str, str], list[str]]:
    """(initial memory in bytes, export name → kind, imports as module.name) of a built module."""
    module = wasmtime.Module(wasmtime.Engine(), path.read_bytes())
    exports = {e.name: type(e.type).__name__ for e in module.exports}
    (memory,) = [e.type for e in module.exports if isinstance(e.type, wasmtime.MemoryType)]
    return memory.limits.min * 65536, exports, [f"{i.module}.{i.name}" for i in module.imports]


@pytest.fixture
def function(tmp_path: Path) -> Path:
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "main.c").write_text(HANDLER)
    (folder / "manifest.json").write_text('{"memory_mb": 1}')
    return folder


@pytest.mark.parametrize("sdk", ["static", "module"])
def test_builds_a_small_handler_module(function: Path, tmp_path: Path, sdk: str) -> None:
    messages: list[str] = []
    out = toolchain.build(
        function, tmp_path / "fn.wasm", cache_dir=tmp_path / "cache", progress=messages.append,
        **({"sdk": "static"} if sdk == "static" else {}),  # "module" is the default
    )
    assert out == tmp_path / "fn.wasm"
    initial, exports, imports = module_facts(out)
    # The 64 KiB stack and the static data, not zig's default 16 MiB; against the SDK module, the
    # function's data starts at 128 KiB, above the SDK's (guest-sdk/ABI.md, "Building").
    assert initial <= (128 << 10 if sdk == "static" else 192 << 10)
    assert exports == {
        "memory": "MemoryType",
        "_initialize": "FuncType",
        "wasminfer_abi_v1": "FuncType",
        "wasminfer_alloc": "FuncType",
        "wasminfer_handle": "FuncType",
        "wasminfer_inbox": "FuncType",  # the request inbox (guest-sdk/ABI.md)
        "wasminfer_inbox_size": "FuncType",
    }
    # only what the function uses: from the host, or from the SDK module with its memory
    assert imports == (["wasminfer.output"] if sdk == "static"
                       else ["env.memory", *(f"wasminfer_sdk_v1.wasminfer_{name}"
                                             for name in ("alloc_request", "output", "free_request"))])
    assert out.stat().st_size < 64 << 10  # no debug info
    assert any("compiling" in m for m in messages) and any("built" in m for m in messages)


def test_a_second_build_comes_from_the_cache(function: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = toolchain.build(function, cache_dir=cache)
    messages: list[str] = []
    assert toolchain.build(function, cache_dir=cache, progress=messages.append) == first
    assert messages == [f"fn: up to date ({first.stat().st_size} bytes, cached)"]
    assert [p.name for p in cache.iterdir()] == [first.name]  # nothing half-written left behind


def test_the_cache_key_covers_sources_headers_and_flags(function: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    builds = {toolchain.build(function, cache_dir=cache)}
    builds.add(toolchain.build(function, cache_dir=cache, opt="-Os"))
    builds.add(toolchain.build(function, cache_dir=cache, stack_size=32 << 10))
    builds.add(toolchain.build(function, cache_dir=cache, sdk="static"))
    (function / "util.h").write_text("/* a header of the function */\n")
    builds.add(toolchain.build(function, cache_dir=cache))
    (function / "main.c").write_text(HANDLER + "\n/* changed */\n")
    builds.add(toolchain.build(function, cache_dir=cache))
    (function / "manifest.json").write_text('{"memory_mb": 2}')  # not part of the build
    builds.add(toolchain.build(function, cache_dir=cache))
    assert len(builds) == 6


def test_initial_memory_can_be_set(function: Path, tmp_path: Path) -> None:
    out = toolchain.build(function, cache_dir=tmp_path, initial_memory=1 << 20)
    assert module_facts(out)[0] == 1 << 20


def test_a_single_file_builds_too(tmp_path: Path) -> None:
    source = tmp_path / "one.c"
    source.write_text(HANDLER)
    assert "wasminfer_handle" in module_facts(toolchain.build(source, cache_dir=tmp_path / "c"))[1]


def test_compiler_errors_carry_stderr(function: Path, tmp_path: Path) -> None:
    (function / "main.c").write_text(HANDLER + "int broken( {\n")
    with pytest.raises(BuildError, match="compiling fn failed") as info:
        toolchain.build(function, cache_dir=tmp_path / "cache")
    assert "main.c" in info.value.stderr and "error" in info.value.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_an_initial_memory_smaller_than_the_data_is_a_build_error(function: Path, tmp_path: Path) -> None:
    (function / "table.c").write_text(
        'char table[1 << 20] = {1};\n__attribute__((export_name("t"))) int t(int i) { return table[i]; }\n'
    )
    with pytest.raises(BuildError, match="initial memory too small"):
        toolchain.build(function, cache_dir=tmp_path, initial_memory=512 << 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_memory": 100_000}, "multiple of 64 KiB"),
        ({"initial_memory": 64 << 10}, "above stack_size"),
        ({"stack_size": 1000}, "multiple of 16"),
    ],
)
def test_impossible_sizes_are_refused(function: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        toolchain.build(function, cache_dir=tmp_path, **kwargs)


def test_what_cannot_be_built(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no such file or folder"):
        toolchain.build(tmp_path / "missing", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="holds no .c or .py files"):
        toolchain.build(tmp_path / "empty", cache_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(BuildError, match="expected one of .c, .py"):
        toolchain.build(tmp_path / "notes.txt", cache_dir=tmp_path)
    (tmp_path / "py").mkdir()  # Python builds: tests/test_python_guest.py
    (tmp_path / "py" / "one.py").write_text("")
    (tmp_path / "py" / "two.py").write_text("")
    with pytest.raises(BuildError, match="which module holds the @handler"):
        toolchain.build(tmp_path / "py", cache_dir=tmp_path)


def test_the_sdk_location_can_be_overridden(
    function: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WASMINFER_GUEST_SDK", str(tmp_path / "nowhere"))
    with pytest.raises(BuildError, match="guest SDK not found"):
        toolchain.build(function, cache_dir=tmp_path)
    monkeypatch.setenv("WASMINFER_CACHE", str(tmp_path / "root"))
    assert toolchain.default_cache_dir() == tmp_path / "root" / "build"
