"""The one module that talks to wasmtime about components (`_wasm.py` does core modules).

It narrows `wasmtime.component` to what wasminfer uses: components compiled by the process's single
`Engine` (`_engine.py`: epoch interruption, its ticker, its fingerprint) and cached on disk like
modules (`_cache.py`); one component `Linker` per engine with WASI 0.2 (deny-all) and the host's own
interfaces; one instance per `Store` with its memory limit, epoch deadline and stdout/stderr capture
(`_output.py`).

Values cross the boundary as the C API's `wasmtime_component_val_t`, lowered and lifted by the
`ValType` schemas of `_component_values.py`. wasmtime bounds what one call copies out of a component
("hostcall fuel": about 2 Mi list elements); past it the call fails (`WasmTrap` kind `transfer`).

The rules of `_wasm.py` hold here too: a host callback never lets a Python exception escape into
ctypes (it returns a wasmtime error, which traps the guest) and keeps the exception in the per-call
state (`CallState.fault`), never in a module global; per-call state lives in a thread-local set
around each guest call.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime
import wasmtime.component as wc
from wasmtime import _bindings as bindings
from wasmtime import _ffi as ffi

from wasminfer.runtime._component_values import (
    K_BOOL,
    VAL_SIZE,
    Val,
    ValType,
    ValueMismatch,
    describe_func,
    func_wit,
    val_delete,
)
from wasminfer.runtime._engine import (
    CallState,
    Engine,
    ExternInfo,
    error_new,
    no_finalizer,
    set_epoch_deadline,
    tls,
    watch_epoch,
)
from wasminfer.runtime._output import capture_output, release_output
from wasminfer.runtime._traps import Interrupted, WasmLinkError, WasmTrap, first_line


def _c(name: str, restype: Any, *argtypes: Any) -> Any:
    """Our own prototype of a C API function that runs guest code, taking plain addresses (no ctypes
    pointer objects); it releases the GIL for the call."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, bindings.dll))  # type: ignore[attr-defined]


_vp, _sz = ctypes.c_void_p, ctypes.c_size_t
# The call and its post-return run guest code.
_func_call = _c("wasmtime_component_func_call", _vp, _vp, _vp, _vp, _sz, _vp, _sz)
_post_return = _c("wasmtime_component_func_post_return", _vp, _vp, _vp)
# (env, context, type, args, nargs, results, nresults) -> error or NULL
_Callback = ctypes.CFUNCTYPE(_sz, _vp, _vp, _vp, _vp, _sz, _vp, _sz)


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
        state = tls.state
        try:
            if state is None:
                raise RuntimeError("called outside an invocation")
            if nargs != len(lifts) or nresults != (result is not None):
                raise ValueMismatch(f"called with {nargs} arguments and {nresults} results")
            values = [lift(args + i * VAL_SIZE) for i, lift in enumerate(lifts)]
            out = impl(state, *values)
            if result is not None:
                result.lower(out, results)  # over wasmtime's placeholder `false`: nothing to drop
            return 0
        except BaseException as exc:  # noqa: BLE001 - must never escape into ctypes
            if state is not None and state.fault is None:
                state.fault = exc
            text = f"host import {hf.interface}#{hf.name} failed: {exc!r}"
            return error_new(text.encode("utf-8", "replace")[:4096]) or 0

    return _Callback(callback)


class ComponentLinker:
    """The component `Linker` of one `Engine`: WASI 0.2 and the host's interfaces, defined once.

    Build it with `for_engine`, which keeps one per engine.
    """

    _by_engine: weakref.WeakKeyDictionary[Engine, ComponentLinker] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, engine: Engine, host_funcs: Sequence[ComponentHostFunc]) -> None:
        # What it needs of the Engine, not the Engine itself: `for_engine` keys a weak
        # dictionary by it, and a value that held its key would keep both alive for ever.
        self.engine = engine.engine
        self.cache = engine.cache
        self.shared = engine.shared
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
        self.cache.prepare("component")

    @classmethod
    def for_engine(cls, engine: Engine, host_funcs: Sequence[ComponentHostFunc]) -> ComponentLinker:
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
            ctypes.cast(cb, ffi.wasmtime_component_func_callback_t), None, no_finalizer,
        )
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)

    def compile(self, wasm: bytes, sha256: str | None = None) -> CompiledComponent:
        """Compiles (or loads from the disk cache) a component. Compiling a componentize-py
        component takes 10-20 s (it embeds CPython); loading a cached one takes a few ms.

        Raises `WasmLinkError` if the bytes are not a valid component, or do not compile within the
        engine's `compile_timeout_s`.
        """
        def load(sha: str) -> tuple[Any, str, bool]:
            return self.cache.load(self.engine, "component", wasm, sha, self.compile_timeout_s)

        component, sha, from_cache = self.shared.get("component", wasm, sha256, load)
        return CompiledComponent(self, component, sha, from_cache)

    def is_cached(self, sha256: str) -> bool:
        return self.cache.is_cached("component", sha256)


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
        # not WasiConfig.stdout_custom: see `_output.py`
        self._output_ids = capture_output(wasi, output) if output is not None else ()
        self.store.set_wasi(wasi)
        self._ctx = self.store._context()
        self._ctx_addr = ctypes.cast(self._ctx, ctypes.c_void_p).value
        self._funcs: dict[str, tuple[Any, ComponentFunc]] = {}
        outer = tls.state
        tls.state = start_state
        try:
            self._instance = compiled.linker.linker.instantiate(self.store, compiled.component)
        except wasmtime.WasmtimeError as exc:
            self.close()
            if isinstance(start_state.fault, Interrupted):
                raise WasmTrap(start_state.fault.kind, str(start_state.fault)) from None
            raise _error(exc, None) from None
        finally:
            tls.state = outer
        for ef in exports:
            raw = ffi.wasmtime_component_func_t()
            found = ffi.wasmtime_component_instance_get_func(
                ctypes.byref(self._instance._instance), self._ctx,
                compiled.export_index(ef.interface, ef.name).ptr(), ctypes.byref(raw))
            if not found:
                self.close()
                raise WasmLinkError(f"the component exports no function {ef.interface}#{ef.name}")
            self._funcs[ef.name] = (raw, ef)
        self._args = (Val * 4)()
        self._result = Val()

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
                ty.lower(value, base + i * VAL_SIZE)
            res = ctypes.addressof(self._result)
            ctypes.memset(res, K_BOOL, 1)  # wasmtime drops the previous value of a result before writing it
            state.deadline_ns = time.monotonic_ns() + timeout_ms * 1_000_000
            try:
                set_epoch_deadline(self._ctx, state.slice_ticks())
            except Interrupted as exc:
                raise WasmTrap(exc.kind, str(exc)) from None
            func = ctypes.addressof(raw)
            tls.state = state
            try:
                err = _func_call(func, self._ctx_addr, base, len(ef.params), res,
                                 1 if ef.result is not None else 0)
            finally:
                tls.state = None
        finally:
            for i in range(touched):
                val_delete(base + i * VAL_SIZE)
                ctypes.memset(base + i * VAL_SIZE, K_BOOL, 1)
        if err:
            raise _error(_take_error(err), state)
        try:
            value = ef.result.lift(res) if ef.result is not None else None
        finally:
            val_delete(res)
            ctypes.memset(res, K_BOOL, 1)
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
            return WasmTrap(kind, first_line(text))
    return WasmLinkError(first_line(text)) if state is None else WasmTrap("other", first_line(text))


__all__ = [
    "ComponentFunc",
    "ComponentHostFunc",
    "ComponentInstance",
    "ComponentLinker",
    "CompiledComponent",
]
