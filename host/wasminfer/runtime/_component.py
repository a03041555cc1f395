"""The one module that talks to wasmtime about components (`_wasm.py` does core modules).

It narrows `wasmtime.component` to what wasminfer uses: components compiled by the process's single
`Engine` (the one `WasmEngine` owns: epoch interruption, its ticker, its fingerprint) and cached on
disk like modules; one component `Linker` per engine with WASI 0.2 (deny-all) and the host's own
interfaces; one instance per `Store` with its memory limit, epoch deadline and stdout/stderr capture.

Values cross the boundary as the C API's `wasmtime_component_val_t`, lowered and lifted here by
`ValType` schemas that the ABI declares (`component.py`), not by wasmtime-py's generic conversion:
that one re-reads every type on every call and converts a `list<u8>` one element at a time in Python
(~0.4 ms for a 5-byte request here, most of it type queries; ~60 µs with the schemas). What the
schemas assume, `CompiledComponent.func_type` checks once at upload against the component's own
types; wasmtime type-checks every value again at the call, so a mismatch is an error, never memory
unsafety.

The C API has only this dynamic value form: every byte of a `list<u8>` is a 32-byte value of its own
(here a strided copy), and wasmtime converts and lowers them one by one (~0.06 µs per byte each way,
`bench/python_guest.py`). It also bounds what one call copies out of a component ("hostcall fuel":
about 2 Mi list elements); past it the call fails (`WasmTrap` kind `transfer`).

The rules of `_wasm.py` hold here too: a host callback never lets a Python exception escape into
ctypes (it returns a wasmtime error, which traps the guest) and keeps the exception in the per-call
state (`CallState.fault`), never in a module global; per-call state lives in a thread-local set
around each guest call.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wasmtime
import wasmtime.component as wc
from wasmtime import _bindings as bindings
from wasmtime import _ffi as ffi

from wasminfer.runtime._wasm import (
    CallState,
    ExternInfo,
    Interrupted,
    WasmEngine,
    WasmLinkError,
    WasmTrap,
    _first_line,
    _no_finalizer,
    _set_epoch_deadline,
    _tls,
    capture_output,
    compile_in_worker,
    held,
    release_output,
    watch_epoch,
)

_Val = ffi.wasmtime_component_val_t
_VAL_SIZE = ctypes.sizeof(_Val)  # 32
_ENTRY_SIZE = ctypes.sizeof(ffi.wasmtime_component_valrecord_entry_t)  # 48: name, then the value
_ENTRY_VAL = ffi.wasmtime_component_valrecord_entry_t.val.offset  # 16
_OF = _Val.of.offset  # 8: the union after the kind byte

_K_BOOL = ffi.WASMTIME_COMPONENT_BOOL.value
_K_U8 = ffi.WASMTIME_COMPONENT_U8.value
_K_U16 = ffi.WASMTIME_COMPONENT_U16.value
_K_U64 = ffi.WASMTIME_COMPONENT_U64.value
_K_STRING = ffi.WASMTIME_COMPONENT_STRING.value
_K_LIST = ffi.WASMTIME_COMPONENT_LIST.value
_K_RECORD = ffi.WASMTIME_COMPONENT_RECORD.value
_K_VARIANT = ffi.WASMTIME_COMPONENT_VARIANT.value
_K_ENUM = ffi.WASMTIME_COMPONENT_ENUM.value
_K_RESULT = ffi.WASMTIME_COMPONENT_RESULT.value


def _c(name: str, restype: Any, *argtypes: Any) -> Any:
    """Our own prototype of a C API function that runs guest code, taking plain addresses (no ctypes
    pointer objects); it releases the GIL for the call."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, bindings.dll))  # type: ignore[attr-defined]


_vp, _sz = ctypes.c_void_p, ctypes.c_size_t
# Host-side value plumbing keeps the GIL (`held`: nanoseconds, no guest code, no blocking).
_byte_vec_new = held("wasm_byte_vec_new", None, _vp, _sz, ctypes.c_char_p)
_vallist_new_uninit = held("wasmtime_component_vallist_new_uninit", None, _vp, _sz)
_vallist_new = held("wasmtime_component_vallist_new", None, _vp, _sz, _vp)  # copies n values from ptr
_valrecord_new_uninit = held("wasmtime_component_valrecord_new_uninit", None, _vp, _sz)
_val_new = held("wasmtime_component_val_new", _vp, _vp)
_val_delete = held("wasmtime_component_val_delete", None, _vp)
_error_new = held("wasmtime_error_new", _vp, ctypes.c_char_p)
# The call and its post-return run guest code.
_func_call = _c("wasmtime_component_func_call", _vp, _vp, _vp, _vp, _sz, _vp, _sz)
_post_return = _c("wasmtime_component_func_post_return", _vp, _vp, _vp)
# (env, context, type, args, nargs, results, nresults) -> error or NULL
_Callback = ctypes.CFUNCTYPE(_sz, _vp, _vp, _vp, _vp, _sz, _vp, _sz)


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
        self.lower_into(value, _view(addr, _VAL_SIZE), 0, addr)

    def lift(self, addr: int) -> Any:
        return self.lift_from(_read(addr, _VAL_SIZE), 0)


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
            elements = bytearray(n * _VAL_SIZE)
            elements[0::_VAL_SIZE] = _U8_KINDS[:n]
            elements[_OF::_VAL_SIZE] = src
            data = ctypes.addressof(ctypes.c_char.from_buffer(elements))
        else:
            elements = np.zeros((n, _VAL_SIZE), np.uint8)
            elements[:, 0] = _K_U8
            elements[:, _OF] = np.frombuffer(src, np.uint8)
            data = elements.ctypes.data
        mem[off] = _K_LIST
        _vallist_new(addr + _OF, n, data)

    def lift_from(self, blob: bytes, off: int) -> bytes:
        _expect(blob, off, _K_LIST, "list<u8>")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        if n < _ELEMENT_GRID_MIN:
            return _read(data, n * _VAL_SIZE)[_OF::_VAL_SIZE]
        return _grid(data, n)[:, _OF].tobytes()

    def wit(self) -> str:
        return "list<u8>"


def _grid(data: int, n: int) -> np.ndarray:
    """The C array of `n` values at `data` as an n × 32 byte grid: column 0 the kinds, 8 the payloads."""
    raw = memoryview((ctypes.c_uint8 * (n * _VAL_SIZE)).from_address(data)).cast("B")
    return np.frombuffer(raw, np.uint8).reshape(n, _VAL_SIZE)


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
        items = _view(data, n * _VAL_SIZE)
        lower = self.element.lower_into
        for i, item in enumerate(value):
            try:
                lower(item, items, i * _VAL_SIZE, data + i * _VAL_SIZE)
            except BaseException:
                _fill(data, i, n, _VAL_SIZE, 0)
                raise

    def lift_from(self, blob: bytes, off: int) -> list[Any]:
        _expect(blob, off, _K_LIST, "list")
        n, data = _WORDS.unpack_from(blob, off + _OF)
        items = _read(data, n * _VAL_SIZE)
        lift = self.element.lift_from
        return [lift(items, i * _VAL_SIZE) for i in range(n)]

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
    tmp = ctypes.create_string_buffer(_VAL_SIZE)  # zeroed: the value `false`
    addr = ctypes.addressof(tmp)
    try:
        ty.lower_into(payload, memoryview(tmp).cast("B"), 0, addr)
    except BaseException:
        _val_delete(addr)
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
        ctypes.memset(slot + offset, 0, _VAL_SIZE)  # kind bool, false


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


# --- host functions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentHostFunc:
    """A host function of an imported interface: `impl(state, *lifted_params) -> result value`."""

    interface: str  # e.g. "wasminfer:function/inference@0.1.0"
    name: str
    params: tuple[tuple[str, ValType], ...]
    result: ValType | None
    impl: Callable[..., Any]

    def wit(self) -> str:
        return func_wit(self.params, self.result)


def _make_callback(hf: ComponentHostFunc) -> Any:
    lifts = [ty.lift for _, ty in hf.params]
    result = hf.result
    impl = hf.impl

    def callback(_env: Any, _ctx: Any, _ty: Any, args: int, nargs: int, results: int, nresults: int) -> int:
        state = getattr(_tls, "state", None)
        try:
            if state is None:
                raise RuntimeError("called outside an invocation")
            if nargs != len(lifts) or nresults != (result is not None):
                raise ValueMismatch(f"called with {nargs} arguments and {nresults} results")
            values = [lift(args + i * _VAL_SIZE) for i, lift in enumerate(lifts)]
            out = impl(state, *values)
            if result is not None:
                result.lower(out, results)  # over wasmtime's placeholder `false`: nothing to drop
            return 0
        except BaseException as exc:  # noqa: BLE001 - must never escape into ctypes
            if state is not None and state.fault is None:
                state.fault = exc
            text = f"host import {hf.interface}#{hf.name} failed: {exc!r}"
            return _error_new(text.encode("utf-8", "replace")[:4096]) or 0

    return _Callback(callback)


class ComponentLinker:
    """The component `Linker` of one `WasmEngine`: WASI 0.2 and the host's interfaces, defined once.

    Build it with `for_engine`, which keeps one per engine.
    """

    _by_engine: weakref.WeakKeyDictionary[WasmEngine, ComponentLinker] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, engine: WasmEngine, host_funcs: Sequence[ComponentHostFunc]) -> None:
        # What it needs of the WasmEngine, not the WasmEngine itself: `for_engine` keys a weak
        # dictionary by it, and a value that held its key would keep both alive for ever.
        self.engine = engine.engine
        self.cache_dir = engine.cache_dir
        self.fingerprint = engine.fingerprint
        self.compile_timeout_s = engine.compile_timeout_s
        self.host_funcs = {(hf.interface, hf.name): hf for hf in host_funcs}
        self.interfaces = {hf.interface for hf in host_funcs}
        self.linker = wc.Linker(self.engine)
        self.linker.add_wasip2()
        self._callbacks: list[Any] = []  # alive as long as the linker
        with self.linker.root() as root:
            for interface in sorted(self.interfaces):
                with root.add_instance(interface) as inst:
                    for hf in host_funcs:
                        if hf.interface == interface:
                            self._define(inst, hf)
        if engine.cache_dir is not None:
            (engine.cache_dir / "components").mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_engine(cls, engine: WasmEngine, host_funcs: Sequence[ComponentHostFunc]) -> ComponentLinker:
        with cls._lock:
            linker = cls._by_engine.get(engine)
            if linker is None:
                linker = cls._by_engine[engine] = cls(engine, host_funcs)
            return linker

    def _define(self, inst: wc.LinkerInstance, hf: ComponentHostFunc) -> None:
        cb = _make_callback(hf)
        self._callbacks.append(cb)
        name = hf.name.encode()
        err = ffi.wasmtime_component_linker_instance_add_func(
            inst.ptr(), ctypes.create_string_buffer(name), len(name),
            ctypes.cast(cb, ffi.wasmtime_component_func_callback_t), None, _no_finalizer,
        )
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)

    def compile(self, wasm: bytes, sha256: str | None = None) -> CompiledComponent:
        """Compiles (or loads from the disk cache) a component. Compiling a componentize-py
        component takes 10-20 s (it embeds CPython); loading a cached one takes a few ms.

        Raises `WasmLinkError` if the bytes are not a valid component, or do not compile within the
        engine's `compile_timeout_s`.
        """
        sha = sha256 or hashlib.sha256(wasm).hexdigest()
        path = self._cache_path(sha)
        component: wc.Component | None = None
        from_cache = False
        if path is not None and path.exists():
            try:
                component = wc.Component.deserialize_file(self.engine, str(path))
                from_cache = True
            except wasmtime.WasmtimeError:
                path.unlink(missing_ok=True)  # stale or corrupt artefact: recompile
        if component is None:
            # In a worker process with a time limit (`_compiler.py`); served from the file like a
            # cached one: wasmtime maps its memory images from the file (copy-on-write), which every
            # instance of the component then shares.
            component = compile_in_worker(self.engine, "component", wasm, path, self.compile_timeout_s)
        return CompiledComponent(self, component, sha, from_cache)

    def is_cached(self, sha256: str) -> bool:
        path = self._cache_path(sha256)
        return path is not None and path.exists()

    def _cache_path(self, sha: str) -> Path | None:
        cache = self.cache_dir
        return None if cache is None else cache / "components" / f"{sha}-{self.fingerprint}.cwasm"


class CompiledComponent:
    """A compiled component, its imports and exports, and the export indices looked up once."""

    def __init__(self, linker: ComponentLinker, component: wc.Component, sha256: str,
                 from_cache: bool) -> None:
        self.linker = linker
        self.engine = linker.engine
        self.component = component
        self.sha256 = sha256
        self.from_cache = from_cache
        ty = component.type
        engine = self.engine
        self._imports = ty.imports(engine)
        self._exports = ty.exports(engine)
        self.imports = [ExternInfo(name, "", _item_kind(ext)) for name, ext in self._imports.items()]
        self.exports = {name: ExternInfo("", name, _item_kind(ext)) for name, ext in self._exports.items()}
        self._indices: dict[tuple[str, str], Any] = {}

    def unknown_imports(self, provided: Callable[[str], bool]) -> list[str]:
        """Imported interfaces the host does not provide (`provided(name)` is False), as names."""
        return [name for name in self._imports if name not in self.linker.interfaces and not provided(name)]

    def import_types(self) -> dict[tuple[str, str], str]:
        """`(interface, function) -> type` of every function the component imports from the host's
        own interfaces (for checks against `ComponentHostFunc.wit`)."""
        out = {}
        for name, ext in self._imports.items():
            if name in self.linker.interfaces:
                item = ext.ty
                if isinstance(item, wc.ComponentInstanceType):
                    for fname, fext in item.exports(self.engine).items():
                        fty = fext.ty
                        if isinstance(fty, wc.FuncType):
                            out[(name, fname)] = describe_func(fty)
        return out

    def func_type(self, interface: str, func: str) -> str | None:
        """The type of function `func` of exported instance `interface`, None if there is none."""
        ext = self._exports.get(interface)
        if ext is None:
            return None
        item = ext.ty
        if not isinstance(item, wc.ComponentInstanceType):
            return None
        fext = item.exports(self.engine).get(func)
        fty = fext.ty if fext is not None else None
        return describe_func(fty) if isinstance(fty, wc.FuncType) else None

    def export_index(self, interface: str, func: str) -> Any:
        key = (interface, func)
        index = self._indices.get(key)
        if index is None:
            outer = self.component.get_export_index(interface)
            inner = self.component.get_export_index(func, outer) if outer is not None else None
            if inner is None:
                raise WasmLinkError(f"the component exports no {interface}#{func}")
            index = self._indices[key] = inner
        return index

    def instantiate(self, *, memory_bytes: int, timeout_ms: int,
                    exports: Sequence[ComponentFunc],
                    output: Callable[[str, bytes], None] | None = None) -> ComponentInstance:
        return ComponentInstance(self, memory_bytes, timeout_ms, exports, output)


def _item_kind(ext: Any) -> str:
    item = ext.ty
    if isinstance(item, wc.ComponentInstanceType):
        return "instance"
    if isinstance(item, wc.FuncType):
        return "func"
    return type(item).__name__


@dataclass(frozen=True)
class ComponentFunc:
    """An exported function the host calls, with the schemas of its parameters and result."""

    interface: str
    name: str
    params: tuple[tuple[str, ValType], ...]
    result: ValType | None

    def wit(self) -> str:
        return func_wit(self.params, self.result)


# Enough for a componentize-py component (a dozen core instances, one memory per instance at most).
_MAX_INSTANCES = 100
_MAX_TABLES = 100
_MAX_MEMORIES = 100
_MAX_TABLE_ELEMENTS = 1_000_000


class ComponentInstance:
    """One live instance of a component in its own `Store`. Idempotent `close()`."""

    def __init__(self, compiled: CompiledComponent, memory_bytes: int, timeout_ms: int,
                 exports: Sequence[ComponentFunc], output: Callable[[str, bytes], None] | None) -> None:
        engine = compiled.engine
        self.compiled = compiled
        self.memory_limit = memory_bytes
        self.closed = False
        self.store = wasmtime.Store(engine)
        # The memory limit applies to each linear memory; a componentize-py component puts CPython's
        # heap and everything else in one.
        self.store.set_limits(memory_size=memory_bytes, table_elements=_MAX_TABLE_ELEMENTS,
                              instances=_MAX_INSTANCES, tables=_MAX_TABLES, memories=_MAX_MEMORIES)
        start_state = CallState()
        start_state.deadline_ns = time.monotonic_ns() + timeout_ms * 1_000_000
        self.store.set_epoch_deadline(start_state.slice_ticks())
        watch_epoch(self.store)
        wasi = wasmtime.WasiConfig()  # deny-all: no args, env, files, network; stdin empty
        # not WasiConfig.stdout_custom: see `_wasm.capture_output`
        self._output_ids = capture_output(wasi, output) if output is not None else ()
        self.store.set_wasi(wasi)
        self._ctx = self.store._context()
        self._ctx_addr = ctypes.cast(self._ctx, ctypes.c_void_p).value
        self._funcs: dict[str, tuple[Any, ComponentFunc]] = {}
        outer = getattr(_tls, "state", None)
        _tls.state = start_state
        try:
            self._instance = compiled.linker.linker.instantiate(self.store, compiled.component)
        except wasmtime.WasmtimeError as exc:
            self.close()
            if isinstance(start_state.fault, Interrupted):
                raise WasmTrap(start_state.fault.kind, str(start_state.fault)) from None
            raise _error(exc, None) from None
        finally:
            _tls.state = outer
        for ef in exports:
            raw = ffi.wasmtime_component_func_t()
            found = ffi.wasmtime_component_instance_get_func(
                ctypes.byref(self._instance._instance), self._ctx,
                compiled.export_index(ef.interface, ef.name).ptr(), ctypes.byref(raw))
            if not found:
                self.close()
                raise WasmLinkError(f"the component exports no function {ef.interface}#{ef.name}")
            self._funcs[ef.name] = (raw, ef)
        self._args = (_Val * 4)()
        self._result = _Val()

    def call(self, name: str, args: Sequence[Any], state: CallState, timeout_ms: int) -> Any:
        """Calls exported function `name` with `args` (lowered by its schemas); returns its lifted
        result. The deadline (`state.deadline_ns`) is reset to `timeout_ms` from now.

        Raises `WasmTrap` if the guest traps (kind `timeout` at the deadline, `cancelled` after
        `state.cancel`, `host` when a host import failed: `state.fault` holds that exception) or
        exits. A WASI 0.2 sleep (`wasi:io/poll`) blocks inside wasmtime, where neither the deadline
        nor a cancel reaches it: the call traps when the guest runs again (see SECURITY.md).
        """
        raw, ef = self._funcs[name]
        argv = self._args
        base = ctypes.addressof(argv)
        touched = 0
        try:
            for i, ((_, ty), value) in enumerate(zip(ef.params, args, strict=True)):
                # A slot whose lowering failed is `false` or a complete value: deletable either way.
                touched += 1
                ty.lower(value, base + i * _VAL_SIZE)
            res = ctypes.addressof(self._result)
            ctypes.memset(res, _K_BOOL, 1)  # wasmtime drops the previous value of a result before writing it
            state.deadline_ns = time.monotonic_ns() + timeout_ms * 1_000_000
            try:
                _set_epoch_deadline(self._ctx, state.slice_ticks())
            except Interrupted as exc:
                raise WasmTrap(exc.kind, str(exc)) from None
            func = ctypes.addressof(raw)
            _tls.state = state
            try:
                err = _func_call(func, self._ctx_addr, base, len(ef.params), res,
                                 1 if ef.result is not None else 0)
            finally:
                _tls.state = None
        finally:
            for i in range(touched):
                _val_delete(base + i * _VAL_SIZE)
                ctypes.memset(base + i * _VAL_SIZE, _K_BOOL, 1)
        if err:
            raise _error(_take_error(err), state)
        try:
            value = ef.result.lift(res) if ef.result is not None else None
        finally:
            _val_delete(res)
            ctypes.memset(res, _K_BOOL, 1)
        err = _post_return(func, self._ctx_addr)
        if err:
            raise _error(_take_error(err), state)
        return value

    def at_memory_limit(self) -> bool:
        # The component API shows no memories to the host: the ABI tells memory failures apart
        # from the guest's own report (a MemoryError) instead.
        return False

    def near_memory_limit(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._funcs = {}
            self.store.close()
            release_output(self._output_ids)


def _take_error(err: int) -> wasmtime.WasmtimeError:
    return wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))


def _error(exc: wasmtime.WasmtimeError, state: CallState | None) -> Exception:
    """A wasmtime error of a call or an instantiation as `WasmTrap` (or `WasmLinkError`)."""
    if isinstance(exc, wasmtime.ExitTrap):
        return WasmTrap("exit", f"the function exited with status {exc.code}")
    text = str(exc)
    if state is not None and isinstance(state.fault, Interrupted):
        return WasmTrap(state.fault.kind, str(state.fault))
    if state is not None and state.fault is not None:
        return WasmTrap("host", str(state.fault))
    if "wasm trap: interrupt" in text:
        return WasmTrap("timeout", "interrupted at its deadline")
    if "fuel allocated for hostcalls has been exhausted" in text:
        # wasmtime's bound on what one call may copy out of a component (~2 Mi list elements)
        return WasmTrap("transfer", "more data passed from the component to the host in one call than "
                                    "wasmtime allows")
    for marker, kind in (("wasm trap: call stack exhausted", "stack_overflow"),
                         ("wasm trap: wasm `unreachable`", "unreachable"),
                         ("wasm trap: out of bounds memory access", "memory"),
                         ("wasm trap:", "other")):
        if marker in text:
            return WasmTrap(kind, _first_line(text))
    return WasmLinkError(_first_line(text)) if state is None else WasmTrap("other", _first_line(text))


__all__ = [
    "Bytes",
    "ComponentFunc",
    "ComponentHostFunc",
    "ComponentInstance",
    "ComponentLinker",
    "CompiledComponent",
    "Enum",
    "List",
    "Record",
    "Result",
    "String",
    "U16",
    "U64",
    "ValType",
    "ValueMismatch",
    "Variant",
    "describe",
]
