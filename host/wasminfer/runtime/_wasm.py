"""The one module that talks to wasmtime about core modules (`_component.py` does components).

It narrows wasmtime-py to what wasminfer uses for core modules: one linker on the process's `Engine`
(`_engine.py`: epoch interruption, its ticker, the compile cache of `_cache.py`) and one alike on each
of its other engines (the instance pool's, `_pooling.py`; the Python runtime's, `_wide.py`),
`InstancePre` so a new instance is a fresh store plus an instantiate (both through the C API itself,
`_store_new`), and
host imports and guest calls through the C API's *unchecked* entry points
(`wasmtime_linker_define_func_unchecked`, `wasmtime_func_call_unchecked`). wasmtime-py's safe paths
cost ~17 µs per crossing; these cost ~1.5 µs. What the safe paths check for us we check ourselves,
once, at compile time: every export we call has the exact signature we call it with
(`CompiledModule.require_func`).

Two rules keep the unchecked paths safe:
- A host import never lets a Python exception escape into ctypes (which would print it and return
  0, i.e. "no trap"): every callback catches `BaseException` and returns a trap. The exception
  itself is kept in the per-call state (`CallState.fault`), never in a module global, because many
  threads call guests at once.
- Per-call state lives in a thread-local (`_engine.tls`) that is set around each guest call: an
  instance runs on one thread at a time, and host imports run on the thread that called the guest.

Over 500 lines and one concept, the boundary with core modules: host imports in, guest calls out,
guest memory and instances, which hold those two rules together (WASI's blocking calls that we
implement ourselves are in `_wasi.py`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _bindings as bindings
from wasmtime import _ffi as ffi

from wasminfer.locations import SDK_MODULE_WASM
from wasminfer.runtime import _binary, _compiler, _pooling, _sdk
from wasminfer.runtime._cache import load_fast
from wasminfer.runtime._engine import (
    DLL,
    CallState,
    Engine,
    ExternInfo,
    engine_address,
    held,
    no_finalizer,
    set_epoch_deadline,
    watch_epoch,
)
from wasminfer.runtime._engine import tls as _tls
from wasminfer.runtime._output import OutputFn, capture_output, release_output
from wasminfer.runtime._sdk import export_get as _export_get
from wasminfer.runtime._sdk import pre_instantiate as _pre_instantiate
from wasminfer.runtime._tiers import Code
from wasminfer.runtime._traps import GuestFault, Interrupted, WasmExit, WasmLinkError, WasmTrap, first_line
from wasminfer.runtime._wasi import poll_oneoff
from wasminfer.runtime._wide import WideEngine

log = logging.getLogger(__name__)

WASM_PAGE = 65536
#: Elements one table of an instance may hold (declared or grown to); past it `table.grow` fails.
MAX_TABLE_ELEMENTS = 100_000

_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()
_VALTYPES = {"i32": _I32, "i64": _I64}
_U32 = 0xFFFFFFFF
# The raw ctypes functions behind wasmtime._ffi's wrappers: one Python frame less per crossing.
_call_unchecked = bindings._wasmtime_func_call_unchecked
# Host callbacks take plain addresses (c_void_p): ctypes builds no pointer objects per crossing.
_RawCallback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_size_t)
# Our own handle on wasmtime_memory_data returning a plain address (wasmtime-py's returns a pointer
# object, and its restype is shared with wasmtime-py, so it is not ours to change).
_memory_data = held("wasmtime_memory_data", ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)
_memory_data_size = held("wasmtime_memory_data_size", ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)

# A new instance through the C API itself: wasmtime-py's `Store`, `set_limits`, `WasiConfig`,
# `set_wasi` and `InstancePre.instantiate` wrap one foreign call each in Python layers (type checks,
# pointer objects, a context manager) that cost more than the calls; a new digits instance spent
# ~15 µs of its ~55 in them. None of these run guest code, so they keep the GIL; the instantiation
# does run it (a start function) and releases the GIL like every call into the guest.
_store_new = held("wasmtime_store_new", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_store_context = held("wasmtime_store_context", ctypes.c_void_p, ctypes.c_void_p)
_store_context_ptr = held("wasmtime_store_context", ctypes.POINTER(ffi.wasmtime_context_t), ctypes.c_void_p)
_store_limiter = held("wasmtime_store_limiter", None, ctypes.c_void_p, *(ctypes.c_int64,) * 5)
_store_delete = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(("wasmtime_store_delete", DLL))  # unmaps: lets go
_wasi_config_new = held("wasi_config_new", ctypes.c_void_p)
_set_wasi = held("wasmtime_context_set_wasi", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)

# ctypes.memmove releases the GIL around every copy (a `CFUNCTYPE`), so each write into a guest's
# memory from a host import was a hand-off of the GIL to another thread and a wait to get it back,
# for copies of a few bytes (`held`'s reason). This one keeps it, for copies up to `HELD_COPY_BYTES`
# (~0.1 ms at most); longer ones let go of it while they copy.
_memmove_held = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes.cast(ctypes.memmove, ctypes.c_void_p).value or 0)
HELD_COPY_BYTES = 1 << 20

_EXTERN_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value


_TRAP_KINDS = {
    ffi.wasmtime_trap_code_enum.WASMTIME_TRAP_CODE_INTERRUPT.value: "timeout",
    ffi.wasmtime_trap_code_enum.WASMTIME_TRAP_CODE_STACK_OVERFLOW.value: "stack_overflow",
    ffi.wasmtime_trap_code_enum.WASMTIME_TRAP_CODE_UNREACHABLE_CODE_REACHED.value: "unreachable",
    ffi.wasmtime_trap_code_enum.WASMTIME_TRAP_CODE_MEMORY_OUT_OF_BOUNDS.value: "memory",
}



class GuestMemory:
    """Bounds-checked access to an instance's linear memory, inside a host import or outside.

    Where the memory lies and its size are read once per stretch of host code (`WasmInstance.span`:
    forgotten when a host import starts and after every guest call, the times guest code may have
    grown the memory): a host import makes several accesses, each of which used to cost two foreign
    calls.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: WasmInstance) -> None:
        self._owner = owner

    def _base(self, ptr: int, length: int) -> int:
        if length < 0 or ptr < 0:
            raise GuestFault(f"negative pointer or length ({ptr}, {length})")
        owner = self._owner
        data, size = owner._span or owner.span()
        if ptr + length > size:
            raise GuestFault(f"range [{ptr}, {ptr + length}) is outside guest memory of {size} bytes")
        return data + ptr

    def read(self, ptr: int, length: int) -> bytes:
        addr = self._base(ptr, length)
        return ctypes.string_at(addr, length) if length else b""

    def write(self, ptr: int, data: bytes) -> None:
        n = len(data)
        addr = self._base(ptr, n)
        if n:
            (_memmove_held if n <= HELD_COPY_BYTES else ctypes.memmove)(addr, data, n)

    def copy_in(self, ptr: int, source: int, length: int) -> None:
        """Copies `length` bytes from host address `source` (e.g. a numpy array's data) to `ptr`:
        what `write` does without first making the bytes an object of their own."""
        addr = self._base(ptr, length)
        if length:
            (_memmove_held if length <= HELD_COPY_BYTES else ctypes.memmove)(addr, source, length)

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, (value & _U32).to_bytes(4, "little"))

    def size(self) -> int:
        owner = self._owner
        return (owner._span or owner.span())[1]

    def exported(self) -> bool:
        """Whether the module exports a memory at all (every other method traps without one)."""
        return self._owner._mem_ref is not None


# --- host imports ---------------------------------------------------------------------------------
HostImpl = Callable[..., int | None]


@dataclass(frozen=True)
class HostFunc:
    """A host import: `impl(state, memory, *i32_args) -> int | None`, called with the guest's args."""

    module: str
    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    impl: HostImpl


def _new_trap(message: str) -> int:
    data = message.encode("utf-8", "replace")[:4096]
    trap = ffi.wasmtime_trap_new(ctypes.create_string_buffer(data), len(data))
    return int(ctypes.cast(trap, ctypes.c_void_p).value or 0)


def _make_callback(hf: HostFunc) -> Any:
    nparams = len(hf.params)
    has_result = bool(hf.results)
    impl = hf.impl
    # Each `wasmtime_val_raw_t` slot is 16 bytes with the value in its low bytes (little-endian).
    # A ctypes array laid over the slots reads them without a foreign call per crossing (ctypes'
    # string_at/memmove are foreign calls of ~0.7 µs each). i32 values are unsigned here (pointers
    # and lengths); i64 values are signed.
    slots = (ctypes.c_uint32 * (4 * max(nparams, 1)))
    slots64 = (ctypes.c_int64 * (2 * max(nparams, 1)))
    kinds = [(i, p == "i64") for i, p in enumerate(hf.params)]
    any64 = any(k for _, k in kinds)
    result_slot = ctypes.c_int64
    stop = 4 * nparams

    def callback(_env: Any, caller: Any, args: Any, _nargs: int) -> int:
        state = _tls.state
        try:
            inst: WasmInstance = _tls.instance  # type: ignore[assignment]  # set for the call's length
            inst._span = None  # the guest may have grown its memory since the last host import
            memory = GuestMemory(inst)
            if not nparams:
                result = impl(state, memory)
            elif not any64:
                raw = slots.from_address(args)
                result = impl(state, memory, *raw[0:stop:4])  # a strided slice: one C call
            else:
                raw = slots.from_address(args)
                raw64 = slots64.from_address(args)
                result = impl(state, memory, *[raw64[2 * i] if is64 else raw[4 * i] for i, is64 in kinds])
            if has_result:
                result_slot.from_address(args).value = result or 0
            return 0
        except BaseException as exc:  # noqa: BLE001 - must never escape into ctypes
            if state is not None and state.fault is None:
                state.fault = exc
            message = str(exc) if isinstance(exc, GuestFault) else f"host import {hf.name} failed: {exc!r}"
            return _new_trap(message)

    return _RawCallback(callback)


#: WASI functions of ours that shadow wasmtime's (`WasmEngine` defines them over `define_wasi`).
WASI_OVERRIDES = (
    HostFunc("wasi_snapshot_preview1", "poll_oneoff", ("i32",) * 4, ("i32",), poll_oneoff),
)


# --- engine ---------------------------------------------------------------------------------------
class WasmEngine(Engine):
    """The process's `Engine` with the linker of core modules: WASI preview 1 (with our own
    `poll_oneoff`) and the host imports, defined once per wasmtime engine (the process's, the
    instance pool's, the Python runtime's `wide`). Idempotent `close()`; a context manager."""

    def __init__(self, host_funcs: Sequence[HostFunc], cache_dir: Path | None = None, *,
                 pool_slots: int | None = None,
                 pool_keep_resident: int = _pooling.KEEP_RESIDENT_BYTES) -> None:
        """`pool_slots`: slots of the instance pool (`_pooling.py`; default `WASMINFER_INSTANCE_POOL`,
        0: every instance on demand); `pool_keep_resident`: see `_pooling.pooled_config`."""
        super().__init__(cache_dir)
        try:
            self.cache.prepare("module")
            slots = _pooling.slots_from_env() if pool_slots is None else pool_slots
            if slots > 0 and not _pooling.room_for(slots):
                log.warning("no instance pool of %d slots: the process is near vm.max_map_count; "
                            "every instance is made on demand", slots)
                slots = 0
            #: The instance pool, None without one.
            self.pool = (_pooling.SlotPool(slots, MAX_TABLE_ELEMENTS, pool_keep_resident)
                         if slots > 0 else None)
            if self.pool is not None:
                self.epoch_engines.append(self.pool.engine)
            #: Addresses of the engines (`engine` and the pool's) for the C API.
            self.address = engine_address(self.engine)
            self.pool_address = engine_address(self.pool.engine) if self.pool is not None else 0
            self.linker = wasmtime.Linker(self.engine)
            self._callbacks: list[Any] = []  # keep ctypes callbacks alive for the engine's lifetime
            self.host_modules = {hf.module for hf in host_funcs} | {"wasi_snapshot_preview1"}
            self.host_imports = {(hf.module, hf.name): hf for hf in host_funcs}
            for linker in (self.linker, *((self.pool.linker,) if self.pool is not None else ())):
                self._link(linker)
            self._wide: WideEngine | None = None
            self._wide_lock = threading.Lock()
            self._sdk: CompiledModule | None = None
            self._sdk_lock = threading.Lock()
        except BaseException:
            self.close()  # the ticker
            raise

    def _link(self, linker: wasmtime.Linker) -> None:
        linker.define_wasi()
        for hf in self.host_imports.values():
            self._define(linker, hf)
        linker.allow_shadowing = True
        for hf in WASI_OVERRIDES:
            self._define(linker, hf)
        linker.allow_shadowing = False

    def wide(self) -> WideEngine:
        """The Python runtime's engine (`_wide.py`), made on the first call: its linker defines what
        this one's does, and the epoch ticker drives it from then on."""
        with self._wide_lock:
            if self._wide is None:
                wide = WideEngine()
                self._link(wide.linker)
                self.epoch_engines.append(wide.engine)
                self._wide = wide
            return self._wide

    def sdk(self) -> CompiledModule:
        """The SDK module (`_sdk.py`) compiled in this engine, on the first call: the code every
        function built against it links to, compiled once per engine (and cached on disk as any
        module's code). Each new instance of such a function asks: no lock once it is there."""
        sdk = self._sdk
        if sdk is not None:
            return sdk
        with self._sdk_lock:
            if self._sdk is None:
                self._sdk = self.compile(SDK_MODULE_WASM.read_bytes())
            return self._sdk

    def warm_up(self) -> None:
        """Does now what a new server's first upload would otherwise wait for, or meet: compiles the
        SDK module (`sdk`), and starts the compile worker of the optimised tier (`Tiering`).
        Raises what compiling the SDK module raises."""
        _compiler.compiler().prestart_background()
        self.sdk()

    def _define(self, linker: wasmtime.Linker, hf: HostFunc) -> None:
        ty = wasmtime.FuncType([_VALTYPES[p] for p in hf.params], [_VALTYPES[r] for r in hf.results])
        cb = _make_callback(hf)
        self._callbacks.append((cb, ty))
        mod = hf.module.encode()
        name = hf.name.encode()
        err = ffi.wasmtime_linker_define_func_unchecked(
            linker.ptr(),
            ctypes.create_string_buffer(mod), len(mod),
            ctypes.create_string_buffer(name), len(name),
            ty.ptr(), ctypes.cast(cb, ffi.wasmtime_func_unchecked_callback_t), None, no_finalizer,
        )
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)

    def compile(self, wasm: bytes, sha256: str | None = None) -> CompiledModule:
        """The compiled core module of `wasm`: its code is the one already held for the same bytes
        (`SharedCode`), else loaded from the disk cache, else compiled: in the fast tier, with the
        optimised code swapped in behind it (`Tiering`), unless `tiered` is off.

        Raises `WasmLinkError` if the bytes are not a valid module or use a feature the engine
        refuses, or do not compile within `compile_timeout_s`.
        """
        def load(sha: str) -> tuple[Code, str, bool]:
            cached = self.cache.cached(self.engine, "module", sha)
            if cached is not None:
                return Code(cached, "optimised"), sha, True
            if not self.tiered:
                module, _, _ = self.cache.load(self.engine, "module", wasm, sha, self.compile_timeout_s)
                return Code(module, "optimised"), sha, False
            started = time.monotonic()
            code = Code(load_fast(self.engine, "module", wasm, self.compile_timeout_s), "fast")
            self.tiering.submit(code, "module", wasm, sha, time.monotonic() - started, self.compile_timeout_s)
            return code, sha, False

        code, sha, from_cache = self.shared.get("module", wasm, sha256, load)
        return CompiledModule(self, code, sha, from_cache, wasm=wasm)

    def is_cached(self, sha256: str) -> bool:
        return self.cache.is_cached("module", sha256)



def _extern_info(module: str, name: str, ty: Any) -> ExternInfo:
    if isinstance(ty, wasmtime.FuncType):
        return ExternInfo(module, name, "func", tuple(str(p) for p in ty.params),
                          tuple(str(r) for r in ty.results))
    if isinstance(ty, wasmtime.MemoryType):
        return ExternInfo(module, name, "memory", min_pages=int(ty.limits.min))
    if isinstance(ty, wasmtime.TableType):
        return ExternInfo(module, name, "table")
    return ExternInfo(module, name, "global")


class CompiledModule:
    """A deployed core module: its code (`Code`, shared by every deploy of the same bytes, which also
    holds the `InstancePre` of its current tier: imports resolved once per tier) and what was read
    from it once (imports, exports).

    `wide`: the code was compiled for and loaded into `engine.wide()` (the Python runtime), where its
    instances are made; None: the process's engine (or its pool)."""

    def __init__(self, engine: WasmEngine, module: wasmtime.Module | Code, sha256: str,
                 from_cache: bool, *, wide: WideEngine | None = None, wasm: bytes | None = None) -> None:
        self.engine = engine
        self.wide = wide
        self.code = module if isinstance(module, Code) else Code(module, "optimised")
        self.sha256 = sha256
        self.from_cache = from_cache
        if wasm is not None:
            # From the bytes (`_binary.py`): ~10x cheaper than wasmtime-py's types, and safe: the
            # wasmtime-py build the host runs aborts the process when it describes a v128 value
            # type, which any upload may declare. What the reader does not take is refused.
            read = _binary.externs(wasm)
            if read is None:
                raise WasmLinkError("the module uses an encoding this host does not take (memory64, "
                                    "GC types or exception tags)")
            self.imports, self.exports = read
        else:  # the host's own modules (the Python runtime's)
            first = self.code.module
            self.imports = [_extern_info(i.module, i.name or "", i.type) for i in first.imports]
            self.exports = {e.name: _extern_info("", e.name, e.type) for e in first.exports}
        #: How its imports are met when it is built against the SDK module (`_sdk.py`), else None.
        self.sdk_plan = _sdk.Plan(self.imports) if _sdk.imports_sdk(self.imports) else None

    @property
    def module(self) -> wasmtime.Module:
        """The code new instances run: the optimised tier's once it is there (see `Code`)."""
        module: wasmtime.Module = self.code.module
        return module

    @property
    def tier(self) -> str:
        return self.code.tier

    def unknown_imports(self) -> list[str]:
        """Imports the host does not provide, as `module.name` strings."""
        out = []
        if self.sdk_plan is not None:
            out += _sdk.unknown_sdk_imports(self.imports, self.engine.sdk().exports)
        for imp in self.imports:
            if imp.module == "wasi_snapshot_preview1":
                continue
            if self.sdk_plan is not None and _sdk.from_sdk(imp):  # checked above
                continue
            hf = self.engine.host_imports.get((imp.module, imp.name))
            if hf is None or imp.kind != "func" or imp.params != hf.params or imp.results != hf.results:
                out.append(f"{imp.module}.{imp.name}")
        return out

    def require_func(self, name: str, params: tuple[str, ...], results: tuple[str, ...]) -> None:
        """Raises `WasmLinkError` unless the module exports `name` with exactly this signature.

        This is what makes the unchecked call path safe.
        """
        ext = self.exports.get(name)
        if ext is None or ext.kind != "func":
            raise WasmLinkError(f"missing export function {name!r}")
        if ext.params != params or ext.results != results:
            raise WasmLinkError(
                f"export {name!r} has type {list(ext.params)} -> {list(ext.results)}, "
                f"expected {list(params)} -> {list(results)}"
            )

    def initial_memory_bytes(self) -> int:
        mem = self.exports.get("memory")
        return (mem.min_pages if mem else 0) * WASM_PAGE

    def pre(self) -> tuple[wasmtime.Module, wasmtime.InstancePre]:
        """The code new instances run and its `InstancePre` (one per code, shared by every deploy of
        the same bytes: one linker per engine)."""
        code = self.code
        module = code.module
        pre: tuple[wasmtime.Module, wasmtime.InstancePre] | None = code.derived
        if pre is None or pre[0] is not module:
            linker = self.engine.linker if self.wide is None else self.wide.linker
            try:
                pre = (module, linker.instantiate_pre(module))
            except wasmtime.WasmtimeError as exc:
                raise WasmLinkError(first_line(str(exc))) from None
            if code.module is module:  # not swapped meanwhile: never keep the fast code's
                code.derived = pre
        return pre

    def pooled_pre(self) -> tuple[wasmtime.Module, wasmtime.InstancePre] | None:
        """Like `pre`, for the engine's instance pool: the code new instances run (the key `outdated`
        compares) and the `InstancePre` of its copy in the pooled engine. None without a pool, or
        when the module does not fit a slot (found once per code, when its copy fails to load), or
        belongs to the wide engine."""
        pool = self.engine.pool
        if pool is None or self.wide is not None or self.sdk_plan is not None:
            return None
        code = self.code
        module = code.module
        held: tuple[wasmtime.Module, wasmtime.InstancePre | None] | None = code.pooled
        if held is None or held[0] is not module:
            # From the cache's file when the code is the one cached there: wasmtime maps it, so both
            # engines' copies share its pages; else (the fast tier, no cache) from its bytes.
            path = self.engine.cache.path("module", self.sha256) if code.tier == "optimised" else None
            try:
                if path is not None and path.exists():
                    copy = wasmtime.Module.deserialize_file(pool.engine, str(path))
                else:
                    copy = wasmtime.Module.deserialize(pool.engine, module.serialize())
                held = (module, pool.linker.instantiate_pre(copy))
            except wasmtime.WasmtimeError:  # more memories or tables than a slot holds, or bigger
                held = (module, None)
            if code.module is module:
                code.pooled = held
        return None if held[1] is None else (module, held[1])

    def instantiate(
        self,
        *,
        memory_bytes: int,
        timeout_ms: int,
        calls: Sequence[tuple[str, int]] = (),
        output: OutputFn | None = None,
        wasi: WasiOptions | None = None,
    ) -> WasmInstance:
        return WasmInstance(self, memory_bytes, timeout_ms, calls, output, wasi)


@dataclass
class WasiOptions:
    """What a WASI context sees. The default is deny-all: no args, env, files or stdin."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin_path: str | None = None
    stdin_bytes: bytes | None = None  # instead of stdin_path: copied into the WASI context
    preopens: list[tuple[str, str]] = field(default_factory=list)  # (host dir, guest path), read-only


def _wasi_config(options: WasiOptions) -> wasmtime.WasiConfig:
    wasi = wasmtime.WasiConfig()
    if options.args:
        wasi.argv = options.args
    if options.env:
        wasi.env = list(options.env.items())
    if options.stdin_path:
        wasi.stdin_file = options.stdin_path
    elif options.stdin_bytes:
        vec = ffi.wasm_byte_vec_t()
        ffi.wasm_byte_vec_new(ctypes.byref(vec), len(options.stdin_bytes),
                              ctypes.cast(ctypes.c_char_p(options.stdin_bytes),
                                          ctypes.POINTER(ctypes.c_ubyte)))
        ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))  # takes the vector
    for host_dir, guest_dir in options.preopens:
        wasi.preopen_dir(host_dir, guest_dir, fs_mutable=False) if _preopen_has_mutable() \
            else wasi.preopen_dir(host_dir, guest_dir)
    return wasi


class _Store:
    """A wasmtime store made and dropped through the C API (see `_store_new`): what `WasmInstance`
    runs in. Idempotent `close()`, also on garbage collection."""

    __slots__ = ("address", "context", "context_ptr", "engine")

    def __init__(self, engine: wasmtime.Engine, engine_address: int) -> None:
        self.engine = engine  # outlives the store
        self.address: int = _store_new(engine_address, None, None)
        self.context: int = _store_context(self.address)
        #: The context as the pointer object wasmtime-py's prototypes (`_call_unchecked`) take.
        self.context_ptr = _store_context_ptr(self.address)

    def close(self) -> None:
        address, self.address = self.address, 0
        if address:
            _store_delete(address)

    def __del__(self) -> None:
        self.close()


def _error(address: int) -> wasmtime.WasmtimeError:
    """The error (or `ExitTrap`) a C API call returned, owned by the object from now on."""
    return wasmtime.WasmtimeError._from_ptr(ctypes.cast(address, ctypes.POINTER(ffi.wasmtime_error_t)))


class WasmInstance:
    """One live instance in its own store, with its memory limit. Idempotent `close()`."""

    def __init__(
        self,
        compiled: CompiledModule,
        memory_bytes: int,
        timeout_ms: int,
        calls: Sequence[tuple[str, int]],
        output: OutputFn | None,
        wasi_options: WasiOptions | None,
    ) -> None:
        self.compiled = compiled
        self.memory_limit = memory_bytes
        self.closed = False
        # Per-instance state of host interfaces (e.g. wasi-nn graph handles), keyed by interface and
        # created lazily by them; values with a `close()` are closed with the instance.
        self.host_state: dict[str, Any] = {}
        #: A handler module's request inbox, `(address, capacity)` (handler.instantiate); None: each
        #: request is written where `wasminfer_alloc` says.
        self.inbox: tuple[int, int] | None = None
        self._mem_ref = None
        self._output_ids: tuple[int, ...] = ()
        #: Whether it holds a slot of the engine's instance pool (`_pooling.py`), given back by `close`.
        self.pooled = False
        engine = compiled.engine
        pool = engine.pool if compiled.wide is None else None
        instance = None
        if pool is not None and memory_bytes <= _pooling.SLOT_MEMORY_BYTES and pool.take():
            try:
                pre = compiled.pooled_pre()
                self.pooled = pre is not None
                if pre is not None:
                    instance = self._start(pool.engine, engine.pool_address, pre, timeout_ms, output,
                                           wasi_options)
            except BaseException:
                self.pooled = False
                raise
            finally:
                if not self.pooled:  # not for a slot, the slot was taken meanwhile, or it failed
                    pool.give()
        if instance is None:  # on demand: no pool, not for a slot, or the pool is full
            home = compiled.wide or engine
            instance = self._start(home.engine, home.address, None, timeout_ms, output, wasi_options)
        self._instance = instance
        ctx = self._ctx_addr = self.store.context
        handle = ctypes.addressof(instance)
        # The exports it uses, looked up once into one array (the memory first): the funcs' handles
        # live in it for the instance's life.
        externs: Any = (ffi.wasmtime_extern_t * (1 + len(calls)))()
        self._externs = externs
        base = ctypes.addressof(externs)
        found = [_export_at(ctx, handle, name, base + i * _EXTERN_SIZE)
                 for i, name in enumerate(("memory", *(name for name, _ in calls)))]
        self._mem: Any = externs[0].of.memory if found[0] and externs[0].kind == _EXTERN_MEMORY else None
        self._mem_ref = ctypes.addressof(self._mem) if self._mem is not None else None
        #: (address, size) of the linear memory, None once guest code may have moved or grown it.
        self._span: tuple[int, int] | None = None
        self._args = (ffi.wasmtime_val_raw_t * 8)()
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)
        funcs: dict[str, Any] = {}
        self._funcs = funcs
        for i, (name, _) in enumerate(calls, 1):
            if found[i] and externs[i].kind == _EXTERN_FUNC:
                funcs[name] = externs[i].of.func
        self._func_refs = {name: ctypes.byref(f) for name, f in funcs.items()}

    def _start(self, engine: wasmtime.Engine, address: int,
               pooled: tuple[wasmtime.Module, wasmtime.InstancePre] | None, timeout_ms: int,
               output: OutputFn | None, wasi_options: WasiOptions | None) -> Any:
        """Makes the store in `engine` (at `address`) and instantiates the module in it: `pooled`
        (from `CompiledModule.pooled_pre`), else `CompiledModule.pre()`. Returns the instance
        (a `wasmtime_instance_t`), or None when a pooled instantiation found no slot left (`pooled`
        is then False and the caller starts it on demand).
        Raises `WasmTrap` (a start function trapped or timed out) or `WasmLinkError`."""
        store = self.store = _Store(engine, address)
        _store_limiter(store.address, self.memory_limit, MAX_TABLE_ELEMENTS, 4, 4, 1)
        #: When the guest's WASI monotonic clock read 0 (to within microseconds): `poll_oneoff`'s
        #: absolute monotonic times count from it.
        self.clock_base_ns = now = time.monotonic_ns()
        # Start functions run at instantiation: under the same deadline as a call (see `call`).
        start_state = CallState()
        start_state.deadline_ns = self.deadline_ns = now + timeout_ms * 1_000_000
        start_state.instance = self
        ctx = store.context
        set_epoch_deadline(ctx, start_state.slice_ticks())
        watch_epoch(store.address)
        if wasi_options is None:  # deny-all: nothing to set but the output
            config = _wasi_config_new()
            if output is not None:
                self._output_ids = capture_output(config, output)
            error = _set_wasi(ctx, config)  # takes the config
        else:
            wasi = _wasi_config(wasi_options)
            if output is not None:
                self._output_ids = capture_output(wasi, output)
            error = _set_wasi(ctx, ctypes.cast(wasi._consume(), ctypes.c_void_p))
        self._ctx = store.context_ptr
        tls = _tls
        outer = tls.state, tls.instance
        tls.state, tls.instance = start_state, self
        instance = ffi.wasmtime_instance_t()
        trap = ctypes.c_void_p()
        try:
            if error:
                raise _error(error)
            plan = self.compiled.sdk_plan
            if plan is not None:  # two instances: the SDK's, then the function's
                #: The code this instance runs (`CompiledModule.module` may be better by now).
                self.module = self.compiled.module
                _sdk.instantiate(ctx, self.compiled.engine.sdk().pre()[1], self.module, plan,
                                 self.compiled.engine.linker, instance)
                return instance
            self.module, instance_pre = pooled if pooled is not None else self.compiled.pre()
            error = _pre_instantiate(instance_pre.ptr(), ctx, ctypes.addressof(instance),
                                     ctypes.addressof(trap))
            if error:
                raise _error(error)
            if trap.value:
                raise wasmtime.Trap._from_ptr(ctypes.cast(trap, ctypes.POINTER(ffi.wasm_trap_t)))
            return instance
        except wasmtime.Trap as exc:
            # Closed at once: a failed start still holds its instance (a pool slot) until then.
            store.close()
            self._drop_outputs()
            if isinstance(start_state.fault, Interrupted):
                raise WasmTrap(start_state.fault.kind, str(start_state.fault)) from None
            raise _to_wasm_trap(exc.trap_code, exc.message) from None
        except wasmtime.WasmtimeError as exc:
            store.close()
            self._drop_outputs()
            if isinstance(start_state.fault, Interrupted):
                raise WasmTrap(start_state.fault.kind, str(start_state.fault)) from None
            if self.pooled and _pooling.is_pool_full(exc):
                self.pooled = False
                return None
            raise WasmLinkError(first_line(str(exc))) from None
        finally:
            tls.state, tls.instance = outer

    def has(self, name: str) -> bool:
        return name in self._funcs

    def outdated(self) -> bool:
        """Whether its module has better code now than this instance runs (see `Code`)."""
        return self.module is not self.compiled.module

    def start_deadline(self, state: CallState, timeout_ms: int) -> None:
        """The deadline of `state`'s guest calls on this instance: `timeout_ms` from now (what `call`
        with a timeout does before it calls)."""
        state.deadline_ns = self.deadline_ns = time.monotonic_ns() + timeout_ms * 1_000_000

    def call(self, name: str, args: Sequence[int], state: CallState, timeout_ms: int | None = None,
             nresults: int = 1) -> int:
        """Calls export `name` (whose signature `require_func` checked) with i32 args.

        With `timeout_ms`, the deadline (`state.deadline_ns`, which the epoch and blocking host
        calls hold the guest to) is reset to that many ms from now; otherwise the state's deadline
        keeps running, or the instance's last one: one deadline covers a whole invocation.
        Returns the first i32 result (0 if none). Raises `WasmTrap` if the guest traps, times out
        (kind "timeout") or is cancelled (kind "cancelled", see `CallState.cancel`); `state.fault`
        then holds the host-side exception that caused it, if any.
        """
        func_ref = self._func_refs.get(name)
        if func_ref is None:
            raise WasmLinkError(f"missing export function {name!r}")
        buf = self._args
        for i, a in enumerate(args):
            buf[i].i32 = a
        if timeout_ms is not None:
            self.start_deadline(state, timeout_ms)
        elif state.deadline_ns is None:
            state.deadline_ns = self.deadline_ns
        try:
            set_epoch_deadline(self._ctx_addr, state.slice_ticks())
        except Interrupted as exc:
            raise WasmTrap(exc.kind, str(exc)) from None
        tls = _tls
        # A host import may call back into its guest (the Python runtime's door allocates its
        # answer with the guest's allocator): the outer call's state comes back afterwards.
        outer = tls.state, tls.instance
        tls.state = state
        tls.instance = self
        state.instance = self
        try:
            err = _call_unchecked(self._ctx, func_ref, buf, max(len(args), nresults), self._trap_ref)
        finally:
            tls.state, tls.instance = outer
            self._span = None  # the guest may have grown its memory (each host import forgets it too)
        if err or self._trap:
            self._raise_trap(err, state)
        return int(buf[0].i32) if nresults else 0

    def _raise_trap(self, err: Any, state: CallState) -> None:
        message = ""
        code = None
        if err:
            error = wasmtime.WasmtimeError._from_ptr(err)
            if isinstance(error, wasmtime.ExitTrap):
                raise WasmExit(error.code)
            message = str(error)
        if self._trap:
            trap = wasmtime.Trap._from_ptr(self._trap)
            self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
            self._trap_ref = ctypes.byref(self._trap)
            code = trap.trap_code
            message = trap.message
        if isinstance(state.fault, Interrupted):
            raise WasmTrap(state.fault.kind, str(state.fault))
        if state.fault is not None:
            raise WasmTrap("host", str(state.fault))
        raise _to_wasm_trap(code, message)

    # direct memory access from the host side, outside import calls
    def memory(self) -> GuestMemory:
        if self._mem_ref is None:
            raise WasmLinkError("module exports no memory")
        return GuestMemory(self)

    def span(self) -> tuple[int, int]:
        """(address, size) of the linear memory, read again once guest code may have run (a host
        import's accesses and those after a call reuse it). Raises `GuestFault` if the module
        exports no memory."""
        mem = self._mem_ref
        if mem is None:
            raise GuestFault("the module exports no memory")
        ctx = self._ctx_addr
        span = self._span = (int(_memory_data(ctx, mem)), int(_memory_data_size(ctx, mem)))
        return span

    def memory_size(self) -> int:
        """The linear memory's size in bytes (0 if it exports none)."""
        if self._mem_ref is None:
            return 0
        return (self._span or self.span())[1]

    def at_memory_limit(self) -> bool:
        """True when the next `memory.grow` of even one page would be refused by the limit."""
        return self.memory_size() + WASM_PAGE > self.memory_limit

    def near_memory_limit(self) -> bool:
        """True when memory is within 1/8 of its limit.

        wasmtime's C API does not tell when the limiter refused a `memory.grow`, and allocators
        grow in chunks, so a guest that failed for lack of memory usually stops short of the exact
        limit. A failure this close to the limit is reported as a memory-limit failure.
        """
        return self.memory_size() + max(WASM_PAGE, self.memory_limit // 8) > self.memory_limit

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._funcs.clear()
            self._func_refs.clear()
            host_state, self.host_state = self.host_state, {}
            for value in host_state.values():
                close = getattr(value, "close", None)
                if close is not None:
                    close()
            self.store.close()
            self._drop_outputs()
            if self.pooled:  # wasmtime has reset the slot's memory with the store's close
                self.pooled = False
                pool = self.compiled.engine.pool
                assert pool is not None
                pool.give()

    def _drop_outputs(self) -> None:
        release_output(self._output_ids)
        self._output_ids = ()


_NAMES: dict[str, bytes] = {}  # export names, encoded once


_EXTERN_SIZE = ctypes.sizeof(ffi.wasmtime_extern_t)


def _export_at(ctx: int, instance: int, name: str, address: int) -> bool:
    """Looks export `name` up into the `wasmtime_extern_t` at `address`; whether there is one."""
    raw = _NAMES.get(name)
    if raw is None:
        raw = _NAMES.setdefault(name, name.encode())
    return bool(_export_get(ctx, instance, raw, len(raw), address))


def _preopen_has_mutable() -> bool:
    import inspect

    return "fs_mutable" in inspect.signature(wasmtime.WasiConfig.preopen_dir).parameters


def _to_wasm_trap(code: Any, message: str) -> WasmTrap:
    value = getattr(code, "value", None)
    kind = _TRAP_KINDS.get(value, "other") if value is not None else "other"
    return WasmTrap(kind, first_line(message))


def now_ns() -> int:
    return time.perf_counter_ns()
