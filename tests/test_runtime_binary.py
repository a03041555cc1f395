"""`runtime/_binary.py`: a module's imports and exports read from its bytes are what wasmtime reports
(the runtime reads them that way because wasmtime-py's wrappers cost ~60 µs per import)."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from wasminfer import toolchain
from wasminfer.errors import InvalidModule
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime._binary import externs
from wasminfer.runtime._engine import ExternInfo
from wasminfer.runtime._wasm import _extern_info

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "tests" / "guests"


def _by_wasmtime(wasm: bytes) -> tuple[list, dict]:
    """What wasmtime-py reports, with its name of externref ("anyref") made the binary format's."""
    module = wasmtime.Module(wasmtime.Engine(), wasm)

    def info(module_name: str, name: str, ty: object) -> ExternInfo:
        e = _extern_info(module_name, name, ty)
        fix = lambda types: tuple("externref" if t == "anyref" else t for t in types)  # noqa: E731
        return ExternInfo(e.module, e.name, e.kind, fix(e.params), fix(e.results), e.min_pages)

    return ([info(i.module, i.name or "", i.type) for i in module.imports],
            {e.name: info("", e.name, e.type) for e in module.exports})


WATS = sorted(p.name for p in GUESTS.glob("*.wat") if p.name != "sleeper.wat")  # sleeper: a template


@pytest.mark.parametrize("wat", WATS)
def test_hand_written_modules_read_as_wasmtime_reads_them(wat: str) -> None:
    wasm = bytes(wasmtime.wat2wasm((GUESTS / wat).read_text()))
    assert externs(wasm) == _by_wasmtime(wasm)


def test_every_kind_of_import_and_export() -> None:
    wasm = bytes(wasmtime.wat2wasm("""(module
      (type $t (func (param i32 i64 f32 f64) (result f64)))
      (import "a" "f" (func (type $t)))
      (import "a" "m" (memory 3 9))
      (import "a" "t" (table 2 funcref))
      (import "a" "g" (global (mut i32)))
      (import "a" "v" (func (param externref) (result i32 i64)))
      (memory (export "mem") 7)
      (table (export "tab") 1 externref)
      (global (export "glob") f32 (f32.const 1))
      (func (export "f0") (type $t) (f64.const 0))
      (func $f1 (result i32) (i32.const 1))
      (export "f1" (func $f1))
      (export "again" (func 0))
      (export "imported_memory" (memory 0)))"""))
    read = externs(wasm)
    assert read == _by_wasmtime(wasm)
    assert read is not None and read[1]["imported_memory"].min_pages == 3 and read[1]["mem"].min_pages == 7


def test_an_encoding_it_does_not_take_is_refused_at_deploy(tmp_path: Path) -> None:
    wasm = bytes(wasmtime.wat2wasm('(module (memory i64 1) (export "m" (memory 0)))'))
    assert externs(wasm) is None  # memory64
    with Host(cache_dir=tmp_path) as host, pytest.raises(InvalidModule, match="memory64"):
        host.deploy_function("m64", wasm, Manifest())


V128 = """(module (import "wasminfer" "x" (func (param v128)))
  (memory (export "memory") 1)
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 0))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) (i32.const 0)))"""


def test_a_v128_import_is_refused_not_a_crash(tmp_path: Path) -> None:
    # wasmtime-py aborts the process when it describes a v128 value type: the host, which read
    # imports through it, died on such an upload. Read from the bytes, it is an unknown import.
    wasm = bytes(wasmtime.wat2wasm(V128))
    assert externs(wasm) == ([ExternInfo("wasminfer", "x", "func", ("v128",), ())], {
        "memory": ExternInfo("", "memory", "memory", min_pages=1),
        "wasminfer_alloc": ExternInfo("", "wasminfer_alloc", "func", ("i32",), ("i32",)),
        "wasminfer_handle": ExternInfo("", "wasminfer_handle", "func", ("i32",) * 4, ("i32",))})
    with Host(cache_dir=tmp_path) as host:
        with pytest.raises(InvalidModule, match=r"wasminfer\.x"):
            host.deploy_function("v", wasm, Manifest())
        exported = V128.replace('(import "wasminfer" "x" (func (param v128)))', "").replace(
            "(param i32 i32 i32 i32) (result i32) (i32.const 0)", "(param v128) (result i32) (i32.const 0)")
        with pytest.raises(InvalidModule, match="wasminfer_handle"):
            host.deploy_function("v", bytes(wasmtime.wat2wasm(exported)), Manifest())


@pytest.mark.slow  # zig builds
@pytest.mark.parametrize("sdk", ["module", "static"])
def test_built_functions_read_as_wasmtime_reads_them(sdk: str, tmp_path: Path) -> None:
    for folder in ("digits", "image-classify"):  # the C examples
        wasm = toolchain.build(ROOT / "functions" / folder, cache_dir=tmp_path, sdk=sdk).read_bytes()
        assert externs(wasm) == _by_wasmtime(wasm), folder
    sdk_module = toolchain.SDK_MODULE_WASM.read_bytes()
    assert externs(sdk_module) == _by_wasmtime(sdk_module)
