"""The canonical-ABI value codec: Python values <-> the C API's `wasmtime_component_val_t`.

Values cross the component boundary (`_component.py`) as the C API's `wasmtime_component_val_t`,
lowered and lifted here by `ValType` schemas that the ABI declares (`component.py`), not by
wasmtime-py's generic conversion: that one re-reads every type on every call and converts a
`list<u8>` one element at a time in Python (~0.4 ms for a 5-byte request here, most of it type
queries; ~60 µs with the schemas). What the schemas assume, `CompiledComponent.func_type` checks
once at upload against the component's own types (`describe`); wasmtime type-checks every value
again at the call, so a mismatch is an error, never memory unsafety.

The C API has only this dynamic value form: every byte of a `list<u8>` is a 32-byte value of its own
(here a strided copy), and wasmtime converts and lowers them one by one (~0.06 µs per byte each way,
`bench/python_guest.py`).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import wasmtime.component as wc
from wasmtime import _ffi as ffi

from wasminfer.runtime._engine import held

Val = ffi.wasmtime_component_val_t
VAL_SIZE = ctypes.sizeof(Val)  # 32
_ENTRY_SIZE = ctypes.sizeof(ffi.wasmtime_component_valrecord_entry_t)  # 48: name, then the value
_ENTRY_VAL = ffi.wasmtime_component_valrecord_entry_t.val.offset  # 16
_OF = Val.of.offset  # 8: the union after the kind byte

K_BOOL = ffi.WASMTIME_COMPONENT_BOOL.value
_K_U8 = ffi.WASMTIME_COMPONENT_U8.value
_K_U16 = ffi.WASMTIME_COMPONENT_U16.value
_K_U64 = ffi.WASMTIME_COMPONENT_U64.value
_K_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_K_LIST = ffi.WASMTIME_COMPONENT_LIST.value
_K_RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
_K_VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value
_K_ENUM = ffi.WASMTIME_COMPONENT_ENUM.value
_K_RESULT = ffi.WASMTIME_COMPONENT_RESULT.value


_vp, _sz = ctypes.c_void_p, ctypes.c_size_t
# Host-side value plumbing keeps the GIL (`held`: nanoseconds, no guest code, no blocking).
_byte_vec_new = held("wasm_byte_vec_new", None, _vp, _sz, ctypes.c_char_p)
_vallist_new_uninit = held("wasmtime_component_vallist_new_uninit", None, _vp, _sz)
_vallist_new = held("wasmtime_component_vallist_new", None, _vp, _sz, _vp)  # copies n values from ptr
_valrecord_new_uninit = held("wasmtime_component_valrecord_new_uninit", None, _vp, _sz)
_val_new = held("wasmtime_component_val_new", _vp, _vp)
val_delete = held("wasmtime_component_val_delete", None, _vp)


_ELEMENT_GRID_MIN = 4096  # list<u8> from this many elements: numpy over the C array, else bytes ops
_U8_KINDS = bytes((ffi.WASMTIME_COMPONENT_U8.value,)) * _ELEMENT_GRID_MIN
_EMPTY = b""


def _view(addr: int, size: int) -> memoryview:
    """A writable view of `size` bytes of C memory: one ctypes object for many reads and writes."""
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


def _read(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size) if size else _EMPTY


class ValueMismatch(Exception):
    """A value does not have the kind its schema expects (a bug on one side, never memory unsafety)."""


def _expect(blob: bytes | memoryview, off: int, kind: int, what: str) -> None:
    if blob[off] != kind:
        raise ValueMismatch(f"expected a {what} value, got kind {blob[off]}")


# --- schemas: Python values <-> wasmtime_component_val_t ---------------------------------------------
# A value is 32 bytes: the kind, 7 bytes of padding, then the payload (for strings, enum names and
# lists: a size and a data pointer; for variants: the case's name, then a pointer to the boxed
# payload; for results: is_ok, then that pointer). Lifting copies the bytes of a value (or of a
# whole array of them) out with one call and parses them with `struct`; lowering writes into one
# memoryview per array. Every allocation (names, strings, arrays, boxes) goes through the C API,
# because wasmtime frees them.
class ValType:
    """How one WIT type crosses. `lower_into(value, mem, off, addr)` writes a Python value into the
    uninitialised value at `addr` (= `mem[off]`); `lift_from(blob, off)` reads one back from a copy
    of its bytes (without taking ownership); `wit` names the type in the form of `describe`."""

    def lower_into(self, value: Any, mem: memoryview, off: int, addr: int) -> None:
        raise NotImplementedError

    def lift_from(self, blob: bytes, off: int) -> Any:
        raise NotImplementedError

    def wit(self) -> str:
        raise NotImplementedError

    def lower(self, value: Any, addr: int) -> None:
        self.lower_into(value, _view(addr, VAL_SIZE), 0, addr)

    def lift(self, addr: int) -> Any:
        return self.lift_from(_read(addr, VAL_SIZE), 0)


_WORDS = struct.Struct("<QQ")  # the first two words of a payload (size and data of a vector)
_WORD = struct.Struct("<Q")


class Bytes(ValType):
    """`list<u8>` <-> `bytes`: every element is a whole 32-byte value, so both directions move the
    payload bytes with strided copies (bytes slicing, or numpy for long lists)."""

    def lower_into(self, value: bytes, mem: memoryview, off: int, addr: int) -> None:
        src = memoryview(value).cast("B")  # first: nothing may fail once the list is allocated
        n = len(src)
        if not n:
            mem[off] = _K_LIST
            _vallist_new_uninit(addr + _OF, 0)
            return
        # The elements are built here and copied in with one call: 3x faster than filling the
        # array wasmtime's `vallist_new_uninit` hands out (which costs ~15 ns per element itself).
        elements: Any
        if n < _ELEMENT_GRID_MIN:
            elements = bytearray(n * VAL_SIZE)
            elements[0::VAL_SIZE] = _U8_KINDS[:n]
            elements[_OF::VAL_SIZE] = src
            data = ctypes.addressof(ctypes.c_char.from_buffer(elements))
        else:
            elements = np.zeros((n, VAL_SIZE), np.uint8)
            elements[:, 0] = _K_U8
            elements[:, _OF] = np.frombuffer(src, np.uint8)
            data = elements.ctypes.data
        mem[off] = _K_LIST
        _vallist_new(addr + _OF, n, data)

    def lift_from(self, blob: bytes, off: int) -> bytes:
        _expect(blob, off, _K_LIST, "list<u8>")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        if n < _ELEMENT_GRID_MIN:
            return _read(data, n * VAL_SIZE)[_OF::VAL_SIZE]
        return _grid(data, n)[:, _OF].tobytes()

    def wit(self) -> str:
        return "list<u8>"


def _grid(data: int, n: int) -> np.ndarray:
    """The C array of `n` values at `data` as an n × 32 byte grid: column 0 the kinds, 8 the payloads."""
    raw = memoryview((ctypes.c_uint8 * (n * VAL_SIZE)).from_address(data)).cast("B")
    return np.frombuffer(raw, np.uint8).reshape(n, VAL_SIZE)


class String(ValType):
    def lower_into(self, value: str, mem: memoryview, off: int, addr: int) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        mem[off] = _K_STRING
        _byte_vec_new(addr + _OF, len(raw), raw)

    def lift_from(self, blob: bytes, off: int) -> str:
        _expect(blob, off, _K_STRING, "string")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        return _read(data, n).decode("utf-8")

    def wit(self) -> str:
        return "string"


class U16(ValType):
    def lower_into(self, value: int, mem: memoryview, off: int, addr: int) -> None:
        struct.pack_into("<H", mem, off + _OF, value)
        mem[off] = _K_U16

    def lift_from(self, blob: bytes, off: int) -> int:
        _expect(blob, off, _K_U16, "u16")
        return int(struct.unpack_from("<H", blob, off + _OF)[0])

    def wit(self) -> str:
        return "u16"


class U64(ValType):
    def lower_into(self, value: int, mem: memoryview, off: int, addr: int) -> None:
        _WORD.pack_into(mem, off + _OF, value)
        mem[off] = _K_U64

    def lift_from(self, blob: bytes, off: int) -> int:
        _expect(blob, off, _K_U64, "u64")
        return int(_WORD.unpack_from(blob, off + _OF)[0])

    def wit(self) -> str:
        return "u64"


class Enum(ValType):
    """An enum <-> the name of its case."""

    def __init__(self, *cases: str) -> None:
        self.cases = cases
        self._raw = {c: c.encode() for c in cases}
        self._names = {c.encode(): c for c in cases}

    def lower_into(self, value: str, mem: memoryview, off: int, addr: int) -> None:
        raw = self._raw[value]
        mem[off] = _K_ENUM
        _byte_vec_new(addr + _OF, len(raw), raw)

    def lift_from(self, blob: bytes, off: int) -> str:
        _expect(blob, off, _K_ENUM, "enum")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        raw = _read(data, n)
        return self._names.get(raw) or raw.decode()

    def wit(self) -> str:
        return "enum{" + ", ".join(self.cases) + "}"


class List(ValType):
    """`list<T>` <-> a Python list."""

    def __init__(self, element: ValType) -> None:
        self.element = element

    def lower_into(self, value: Sequence[Any], mem: memoryview, off: int, addr: int) -> None:
        n = len(value)
        mem[off] = _K_LIST
        _vallist_new_uninit(addr + _OF, n)
        if not n:
            return
        data = _WORD.unpack_from(mem, off + _OF + 8)[0]
        items = _view(data, n * VAL_SIZE)
        lower = self.element.lower_into
        for i, item in enumerate(value):
            try:
                lower(item, items, i * VAL_SIZE, data + i * VAL_SIZE)
            except BaseException:
                _fill(data, i, n, VAL_SIZE, 0)
                raise

    def lift_from(self, blob: bytes, off: int) -> list[Any]:
        _expect(blob, off, _K_LIST, "list")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        items = _read(data, n * VAL_SIZE)
        lift = self.element.lift_from
        return [lift(items, i * VAL_SIZE) for i in range(n)]

    def wit(self) -> str:
        return f"list<{self.element.wit()}>"


class Record(ValType):
    """A record <-> a tuple of its fields in declaration order."""

    def __init__(self, *fields: tuple[str, ValType]) -> None:
        self.fields = fields
        self._names = [name.encode() for name, _ in fields]

    def lower_into(self, value: Sequence[Any], mem: memoryview, off: int, addr: int) -> None:
        n = len(self.fields)
        if len(value) != n:
            raise ValueMismatch(f"a record of {n} fields, given {len(value)} values")
        mem[off] = _K_RECORD
        _valrecord_new_uninit(addr + _OF, n)
        data = _WORD.unpack_from(mem, off + _OF + 8)[0]
        entries = _view(data, n * _ENTRY_SIZE)
        for i, ((_, ty), name, item) in enumerate(zip(self.fields, self._names, value, strict=True)):
            entry = data + i * _ENTRY_SIZE
            _byte_vec_new(entry, len(name), name)
            try:
                ty.lower_into(item, entries, i * _ENTRY_SIZE + _ENTRY_VAL, entry + _ENTRY_VAL)
            except BaseException:
                _fill(data, i, n, _ENTRY_SIZE, _ENTRY_VAL)
                raise

    def lift_from(self, blob: bytes, off: int) -> tuple[Any, ...]:
        _expect(blob, off, _K_RECORD, "record")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        if n != len(self.fields):
            raise ValueMismatch("record with a different number of fields")
        entries = _read(data, n * _ENTRY_SIZE)
        return tuple(ty.lift_from(entries, i * _ENTRY_SIZE + _ENTRY_VAL)
                     for i, (_, ty) in enumerate(self.fields))

    def wit(self) -> str:
        return "record{" + ", ".join(f"{name}: {ty.wit()}" for name, ty in self.fields) + "}"


class Variant(ValType):
    """A variant <-> `(case, payload)` (payload None for a case without one)."""

    def __init__(self, *cases: tuple[str, ValType | None]) -> None:
        self.cases = dict(cases)
        self._raw = {c: c.encode() for c, _ in cases}
        self._names = {c.encode(): c for c, _ in cases}

    def lower_into(self, value: tuple[str, Any], mem: memoryview, off: int, addr: int) -> None:
        case, payload = value
        raw = self._raw[case]
        boxed = _box(self.cases[case], payload)
        mem[off] = _K_VARIANT
        _byte_vec_new(addr + _OF, len(raw), raw)
        _WORD.pack_into(mem, off + _OF + 16, boxed)

    def lift_from(self, blob: bytes, off: int) -> tuple[str, Any]:
        _expect(blob, off, _K_VARIANT, "variant")
        n, data, boxed = struct.unpack_from("<QQQ", blob, off + _OF)
        raw = _read(data, n)
        case = self._names.get(raw) or raw.decode()
        ty = self.cases.get(case)
        return case, (ty.lift(boxed) if ty is not None and boxed else None)

    def wit(self) -> str:
        cases = (c if t is None else f"{c}({t.wit()})" for c, t in self.cases.items())
        return "variant{" + ", ".join(cases) + "}"


class Result(ValType):
    """`result<ok, err>` <-> `(is_ok, payload)`."""

    def __init__(self, ok: ValType | None, err: ValType | None) -> None:
        self.ok = ok
        self.err = err

    def lower_into(self, value: tuple[bool, Any], mem: memoryview, off: int, addr: int) -> None:
        is_ok, payload = value
        boxed = _box(self.ok if is_ok else self.err, payload)
        mem[off] = _K_RESULT
        mem[off + _OF] = 1 if is_ok else 0
        _WORD.pack_into(mem, off + _OF + 8, boxed)

    def lift_from(self, blob: bytes, off: int) -> tuple[bool, Any]:
        _expect(blob, off, _K_RESULT, "result")
        is_ok = bool(blob[off + _OF])
        boxed = _WORD.unpack_from(blob, off + _OF + 8)[0]
        ty = self.ok if is_ok else self.err
        return is_ok, (ty.lift(boxed) if ty is not None and boxed else None)

    def wit(self) -> str:
        return f"result<{self.ok.wit() if self.ok else '_'}, {self.err.wit() if self.err else '_'}>"


def _box(ty: ValType | None, payload: Any) -> int:
    """A heap value holding `payload` (for variant and result payloads), or 0 for none."""
    if ty is None:
        return 0
    tmp = ctypes.create_string_buffer(VAL_SIZE)  # zeroed: the value `false`
    addr = ctypes.addressof(tmp)
    try:
        ty.lower_into(payload, memoryview(tmp).cast("B"), 0, addr)
    except BaseException:
        val_delete(addr)
        raise
    return _val_new(addr) or 0  # moves tmp's contents onto wasmtime's heap


def _fill(data: int, i: int, n: int, stride: int, offset: int) -> None:
    """After element `i` of a list or record failed to lower: make the container deletable.

    Elements `i`.. become `false` (and record names after `i` empty). What element `i` itself had
    allocated leaks: lowering only fails on a bug of the ABI code, never on guest input. Every
    `lower_into` checks its input before it sets the kind and allocates, and nothing fails after.
    """
    for j in range(i, n):
        slot = data + j * stride
        if offset and j > i:
            ctypes.memset(slot, 0, offset)  # an empty name
        ctypes.memset(slot + offset, 0, VAL_SIZE)  # kind bool, false


def describe(ty: Any) -> str:
    """A wasmtime-py component type in the form of `ValType.wit` (for checks and messages)."""
    simple = {wc.Bool: "bool", wc.U8: "u8", wc.U16: "u16", wc.U32: "u32", wc.U64: "u64", wc.S8: "s8",
              wc.S16: "s16", wc.S32: "s32", wc.S64: "s64", wc.F32: "f32", wc.F64: "f64", wc.Char: "char",
              wc.String: "string"}
    if type(ty) in simple:
        return simple[type(ty)]
    if isinstance(ty, wc.ListType):
        return f"list<{describe(ty.element)}>"
    if isinstance(ty, wc.RecordType):
        return "record{" + ", ".join(f"{n}: {describe(t)}" for n, t in ty.fields) + "}"
    if isinstance(ty, wc.VariantType):
        return "variant{" + ", ".join(c if t is None else f"{c}({describe(t)})" for c, t in ty.cases) + "}"
    if isinstance(ty, wc.EnumType):
        return "enum{" + ", ".join(ty.names) + "}"
    if isinstance(ty, wc.ResultType):
        ok, err = ty.ok, ty.err
        return f"result<{describe(ok) if ok else '_'}, {describe(err) if err else '_'}>"
    if isinstance(ty, wc.OptionType):
        return f"option<{describe(ty.payload)}>"
    if isinstance(ty, wc.TupleType):
        return "tuple<" + ", ".join(describe(t) for t in ty.elements) + ">"
    return type(ty).__name__


def describe_func(ty: wc.FuncType) -> str:
    result = ty.result
    params = ", ".join(f"{n}: {describe(t)}" for n, t in ty.params)
    return f"func({params})" + (f" -> {describe(result)}" if result is not None else "")


def func_wit(params: Sequence[tuple[str, ValType]], result: ValType | None) -> str:
    text = "func(" + ", ".join(f"{n}: {t.wit()}" for n, t in params) + ")"
    return text + (f" -> {result.wit()}" if result is not None else "")

