"""Reading a core module's binary: its sections, and its imports and exports with their types.

Why not wasmtime-py's `Module.imports` / `.exports`:
- each item is a handful of wrapper objects (`ImportType`, `FuncType`, one `ValType` per parameter)
  made through ctypes: for digits built against the SDK module (17 imports, 7 exports) 231 µs,
  against 49 µs here (timeit), on the way to a new function's first answer (~4.4 ms in-process);
- the wasmtime-py build the host runs aborts the whole process when it describes a v128 value type
  (`support for v128 is not implemented`), and any upload may declare one.
The bytes read are those wasmtime has just compiled, so they are well formed; what this reader does
not take (GC types, memory64, tags, ...) makes `externs` return None, and the host refuses the
upload (`_wasm.CompiledModule`).
"""

from __future__ import annotations

from collections.abc import Iterator

from wasminfer.runtime._engine import ExternInfo

_VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref",
             0x6F: "externref"}
_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global"}
_TYPE, _IMPORT, _FUNCTION, _MEMORY, _EXPORT = 1, 2, 3, 5, 7


class Unknown(Exception):
    """An encoding this reader does not take."""


def leb(data: bytes | memoryview, i: int) -> tuple[int, int]:
    """The unsigned LEB128 at `data[i]` and the offset after it."""
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def name(data: bytes | memoryview, i: int) -> tuple[str, int]:
    """The name (length-prefixed UTF-8) at `data[i]` and the offset after it."""
    n, i = leb(data, i)
    return bytes(data[i:i + n]).decode("utf-8"), i + n


def sections(wasm: bytes) -> Iterator[tuple[int, int, int]]:
    """(section id, start of its payload, payload length) of every section of a core module.
    Raises `ValueError` if `wasm` is not one."""
    if wasm[:8] != b"\0asm\x01\x00\x00\x00":
        raise ValueError("not a core WebAssembly module")
    i = 8
    while i < len(wasm):
        sid = wasm[i]
        size, i = leb(wasm, i + 1)
        yield sid, i, size
        i += size


def _limits(wasm: bytes, i: int) -> tuple[int, int]:
    """(minimum, offset after) of memory or table limits of 32-bit indices."""
    flags = wasm[i]
    if flags & ~0x3:
        raise Unknown("memory64 or custom page sizes")
    minimum, i = leb(wasm, i + 1)
    if flags & 1:
        _, i = leb(wasm, i)
    return minimum, i


def _valtype(wasm: bytes, i: int) -> str:
    vt = _VALTYPES.get(wasm[i])
    if vt is None:
        raise Unknown(f"value type 0x{wasm[i]:02x}")
    return vt


def externs(wasm: bytes) -> tuple[list[ExternInfo], dict[str, ExternInfo]] | None:
    """(imports in order, exports by name) of a core module as `_wasm._extern_info` reports them;
    None if it uses an encoding this reader does not take."""
    try:
        return _externs(wasm)
    except (Unknown, IndexError, UnicodeDecodeError, ValueError):
        return None


def _externs(wasm: bytes) -> tuple[list[ExternInfo], dict[str, ExternInfo]]:
    types: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    funcs: list[int] = []  # type index of every function, imported ones first
    memories: list[int] = []  # minimum pages of every memory, imported ones first
    imports: list[ExternInfo] = []
    exported: list[tuple[str, int, int]] = []
    for sid, start, _size in sections(wasm):
        if sid not in (_TYPE, _IMPORT, _FUNCTION, _MEMORY, _EXPORT):
            continue
        count, i = leb(wasm, start)
        for _ in range(count):
            if sid == _TYPE:
                if wasm[i] != 0x60:
                    raise Unknown("a type other than a function type")
                n, i = leb(wasm, i + 1)
                params = tuple(_valtype(wasm, i + k) for k in range(n))
                n, i = leb(wasm, i + n)
                results = tuple(_valtype(wasm, i + k) for k in range(n))
                types.append((params, results))
                i += n
            elif sid == _IMPORT:
                module, i = name(wasm, i)
                field, i = name(wasm, i)
                kind = wasm[i]
                i += 1
                if kind == 0:
                    index, i = leb(wasm, i)
                    funcs.append(index)
                    params, results = types[index]
                    imports.append(ExternInfo(module, field, "func", params, results))
                elif kind == 1:
                    _valtype(wasm, i)
                    _, i = _limits(wasm, i + 1)
                    imports.append(ExternInfo(module, field, "table"))
                elif kind == 2:
                    minimum, i = _limits(wasm, i)
                    memories.append(minimum)
                    imports.append(ExternInfo(module, field, "memory", min_pages=minimum))
                elif kind == 3:
                    _valtype(wasm, i)
                    i += 2
                    imports.append(ExternInfo(module, field, "global"))
                else:
                    raise Unknown(f"import kind {kind}")
            elif sid == _FUNCTION:
                index, i = leb(wasm, i)
                funcs.append(index)
            elif sid == _MEMORY:
                minimum, i = _limits(wasm, i)
                memories.append(minimum)
            else:
                field, i = name(wasm, i)
                kind = wasm[i]
                index, i = leb(wasm, i + 1)
                if kind not in _KINDS:
                    raise Unknown(f"export kind {kind}")
                exported.append((field, kind, index))
    exports = {}
    for field, kind, index in exported:
        if kind == 0:
            params, results = types[funcs[index]]
            exports[field] = ExternInfo("", field, "func", params, results)
        elif kind == 2:
            exports[field] = ExternInfo("", field, "memory", min_pages=memories[index])
        else:
            exports[field] = ExternInfo("", field, _KINDS[kind])
    return imports, exports
