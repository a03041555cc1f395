"""`Host`: the in-process API of one wasminfer host (what the gateway and the replicas call).

Deploy models and functions, invoke functions with bytes, read logs and stats. One `Host` holds
one `WasmEngine` (compiled modules cached on disk), one `ModelRegistry` (one ONNX Runtime session
per model), and per function an `InstancePool` of warm instances. `invoke` is synchronous and
thread-safe: callers run it on worker threads (Wasm and ONNX Runtime both run without the GIL).

Over 500 lines and one concept: a host with the functions deployed in it (`DeployedFunction` is its
per-function state: pool, counters, calls in flight), whose deploy, invoke, delete and memory
accounting each work across both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasminfer.errors import (
    Conflict,
    FunctionNotFound,
    GuestError,
    GuestTrap,
    InvalidManifest,
    InvalidModule,
    InvocationCancelled,
    MemoryLimitExceeded,
    ModelNotFound,
    Unavailable,
    WasminferError,
)
from wasminfer.manifest import Manifest
from wasminfer.models import ModelInfo, ModelRegistry
from wasminfer.runtime import command, component, handler, python, wasi_nn
from wasminfer.runtime._malloc import trim as release_freed_memory
from wasminfer.runtime._traps import WasmLinkError, WasmTrap
from wasminfer.runtime._wasm import CompiledModule, WasmEngine, WasmInstance
from wasminfer.runtime.logs import LogBuffer, LogLine, StreamSplitter, Tail
from wasminfer.runtime.memory import MEMORY_REFUSALS, MemoryBudget, Reservation, TenantMemory, model_bytes
from wasminfer.runtime.pool import GrowthPolicy, InstancePool
from wasminfer.runtime.streams import OutputStream

# The ABIs of core modules, in detection order. Each is a module with NAME, HOST_FUNCS,
# detect(compiled), validate(compiled), instantiate(compiled, manifest, state, output) and
# invoke(instance, body, content_type, state) -> reusable.
CORE_ABIS: list[Any] = [handler, command]
# wasi_ephemeral_nn is no ABI of its own: handler and command modules may both import it.
# The Python runtime's door is linked for every module: it faults unless the runtime's own calls it.
HOST_FUNCS = [hf for abi in CORE_ABIS for hf in abi.HOST_FUNCS] + [*wasi_nn.HOST_FUNCS, *python.HOST_FUNCS]
ABIS_BY_NAME: dict[str, Any] = {abi.NAME: abi for abi in (*CORE_ABIS, component, python)}


@dataclass
class InvokeResult:
    body: bytes
    content_type: str
    queue_us: float  # waiting for a free instance
    start_us: float  # creating an instance (0 when a warm one was reused)
    run_us: float  # running the guest, including its infer calls
    infer_us: float  # inside ModelRegistry.infer
    cold: bool
    invocation_id: str
    boundary_bytes: int = 0  # tensors and frames that crossed the guest's boundary (its infer calls)

    def server_timing(self, total_ms: float) -> bytes:
        """The `Server-Timing` header's value, with the whole request's `total_ms`."""
        return _SERVER_TIMING % (self.queue_us / 1000, self.start_us / 1000, self.run_us / 1000,
                                 self.infer_us / 1000, total_ms)


_SERVER_TIMING = b"queue;dur=%.3f, start;dur=%.3f, run;dur=%.3f, infer;dur=%.3f, total;dur=%.3f"


@dataclass(frozen=True)
class ModuleInfo:
    """What inspection of uploaded bytes found: ABI, imports, exports, sizes."""

    sha256: str
    abi: str
    imports: list[str]
    exports: list[str]
    size_bytes: int
    initial_memory_bytes: int
    uses_wasi_nn: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "abi": self.abi, "imports": self.imports, "exports": self.exports,
                "size_bytes": self.size_bytes, "initial_memory_bytes": self.initial_memory_bytes,
                "uses_wasi_nn": self.uses_wasi_nn}


class _Instance:
    """A pooled instance, its captured stdout/stderr, the memory reserved for it, and what it needs at
    rest (its linear memory once started) to tell how much its requests made it grow."""

    __slots__ = ("wasm", "stdout", "stderr", "memory", "rest_bytes", "traffic_bytes")

    def __init__(self, wasm: WasmInstance, stdout: StreamSplitter, stderr: StreamSplitter,
                 memory: Reservation) -> None:
        self.wasm = wasm
        self.stdout = stdout
        self.stderr = stderr
        self.memory = memory
        self.rest_bytes = _memory_size(wasm)
        self.traffic_bytes = 0  # the largest request or response since it started

    def outdated(self) -> bool:
        """Whether the optimised code of its module came after it started (see `_tiers.Code`)."""
        return isinstance(self.wasm, WasmInstance) and self.wasm.outdated()

    def growth(self) -> int:
        """Bytes this instance grew past its size at rest. A component shows the host no memory: there,
        the largest request or response it has carried stands for it (its guest copies each into its
        heap at least once). A command slot holds no instance between calls: 0."""
        if self.rest_bytes is None:
            return self.traffic_bytes
        return max(0, self.wasm.memory_size() - self.rest_bytes) if self.rest_bytes >= 0 else 0


def _memory_size(wasm: Any) -> int | None:
    """What `_Instance.rest_bytes` holds: its memory's size, None for a component (which shows none),
    -1 for a command slot (no memory between calls)."""
    if isinstance(wasm, WasmInstance):
        return wasm.memory_size()
    return -1 if isinstance(wasm, command.CommandSlot) else None


@dataclass
class Counters:
    invocations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cold_starts: int = 0
    run_us_total: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"invocations": self.invocations, "errors": dict(self.errors), "cold_starts": self.cold_starts,
                "run_us_total": round(self.run_us_total, 1)}


class DeployedFunction:
    def __init__(self, host: Host, name: str, compiled: CompiledModule, manifest: Manifest, abi: Any,
                 logs: LogBuffer, version: str) -> None:
        self.host = host
        self.name = name
        self.compiled = compiled
        self.manifest = manifest
        self.abi_impl = abi
        self.abi: str = abi.NAME
        self.logs = logs
        self.version = version
        # What a replica compares to know that its copy of the function is this one (the module and
        # the manifest; the models it names are compared by their own sha256).
        self.digest = hashlib.sha256(
            f"{version}\n{json.dumps(manifest.to_dict(), sort_keys=True)}".encode()
        ).hexdigest()[:16]
        self.deployed_at = time.time()
        self.counters = Counters()
        self._lock = threading.Lock()
        # The states of the guest calls in flight (invocations and instance starts): what `cancel`
        # ends when the function is deleted.
        self._running: set[handler.InvocationState] = set()
        self._cancelled: WasminferError | None = None
        #: What an instance's memory reservation names when it is refused.
        self._reserving = f"an instance of function {name!r} (manifest key 'memory_mb' {manifest.memory_mb})"
        self.pool: InstancePool[_Instance] = InstancePool(
            name, self._create, self._destroy,
            max_instances=manifest.max_instances, max_queue=manifest.max_queue,
            growth=_Instance.growth, renew=self._renew, policy=host.growth_policy,
            outdated=_Instance.outdated,
        )

    def _create(self, reclaim: bool = True) -> _Instance:
        """Raises `MemoryQuotaExceeded` or `HostMemoryExhausted` when its `memory_mb` does not fit
        (after reclaiming the tenant's idle instances if `reclaim`), and what instantiating raises."""
        memory = self.host.memory.reserve(self.manifest.memory_mb << 20, "instances", self._reserving,
                                          reclaim=reclaim)
        try:
            return self._instantiate(memory)
        except BaseException:
            memory.release()
            raise

    def _instantiate(self, memory: Reservation) -> _Instance:
        out = StreamSplitter(self.logs, "stdout", "info")
        err = StreamSplitter(self.logs, "stderr", "warn")

        def write(stream: str, data: bytes) -> None:
            (out if stream == "stdout" else err).write(data)

        state = handler.InvocationState(self.name, self.manifest, self.host.models.infer, self.logs, "init",
                                        self.host.models)
        self.begin(state)
        try:
            wasm = self.abi_impl.instantiate(self.compiled, self.manifest, state, write)
        except WasmTrap as trap:
            raise handler._trap_error(trap, _NoInstance(), state) from None
        finally:
            self.end(state)
        return _Instance(wasm, out, err, memory)

    def _renew(self, inst: _Instance) -> _Instance:
        """A fresh instance in place of `inst` (destroyed), under the same memory reservation: its
        module's initial image again. Raises what instantiating raises (the reservation is then
        released)."""
        inst.stdout.flush()
        inst.stderr.flush()
        inst.wasm.close()
        try:
            return self._instantiate(inst.memory)
        except BaseException:
            inst.memory.release()
            raise

    def begin(self, state: handler.InvocationState) -> None:
        """Tracks a guest call about to run, so that `cancel` can end it (or cancels it at once)."""
        with self._lock:
            self._running.add(state)
            cancelled = self._cancelled
        if cancelled is not None:
            state.cancel(cancelled)

    def end(self, state: handler.InvocationState) -> None:
        with self._lock:
            self._running.discard(state)

    def finish(self, state: handler.InvocationState, error: WasminferError | None, cold: bool,
               run_us: float) -> None:
        """`end` and `count` of an invocation, under one hold of the lock."""
        with self._lock:
            self._running.discard(state)
            c = self.counters
            c.invocations += 1
            c.cold_starts += int(cold)
            c.run_us_total += run_us
            if error is not None:
                c.errors[error.code] = c.errors.get(error.code, 0) + 1

    def cancel(self, error: WasminferError) -> int:
        """Ends every guest call of this function in flight, and any started later, with `error`
        (see `CallState.cancel`). Returns how many were in flight."""
        with self._lock:
            self._cancelled = error
            running = list(self._running)
        for state in running:
            state.cancel(error)
        return len(running)

    @staticmethod
    def _destroy(inst: _Instance) -> None:
        inst.stdout.flush()
        inst.stderr.flush()
        inst.wasm.close()
        inst.memory.release()

    def prewarm(self, count: int) -> int:
        """Pre-warms instances up to `count` live, as many as the tenant's memory quota and the
        host's budget leave room for (the autoscaler's way: it never reclaims idle instances of
        other functions for headroom, nor fails for want of memory). Returns how many it made."""
        stats = self.pool.stats()
        room = self.host.memory.available_bytes() // (self.manifest.memory_mb << 20)
        try:
            return self.pool.prewarm(min(count, stats["live"] + room), lambda: self._create(reclaim=False))
        except MEMORY_REFUSALS:  # another reservation took the room meanwhile
            return max(0, self.pool.stats()["live"] - stats["live"])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "abi": self.abi,
            "manifest": self.manifest.to_dict(),
            "deployed_at": self.deployed_at,
            "counters": self.counters.to_dict(),
            "instances": self.pool.stats(),
            "module": {"sha256": self.compiled.sha256, "from_cache": self.compiled.from_cache,
                       "uses_wasi_nn": wasi_nn.uses_wasi_nn(self.compiled.imports), **self._tier()},
        }

    def _tier(self) -> dict[str, Any]:
        """`tier`: "fast" while its first answers run quickly compiled code, then "optimised"
        (`tier_error` says why it stayed fast). Only core modules have tiers."""
        if not isinstance(self.compiled, CompiledModule):
            return {}
        code = self.compiled.code
        return {"tier": code.tier} if code.error is None else {"tier": code.tier, "tier_error": code.error}


def _with_guest_words(error: WasminferError, abi: str, stderr: Tail) -> None:
    """Ends the message of a trap (a C `abort()`, a Rust panic), or of a component's failure (an
    uncaught Python exception), with what the guest last wrote to stderr: its own account of what
    went wrong. Only the function's own tenant can invoke it, so only that tenant reads it."""
    words = stderr.suffix()
    if not words or "; stderr: " in error.message:
        return
    if type(error) is GuestTrap or (type(error) is GuestError and abi == "component"):
        error.message += words
        error.args = (error.message,)


class _NoInstance:
    """Stands in for an instance that failed during creation (its memory state is unknown)."""

    def at_memory_limit(self) -> bool:
        return False

    def near_memory_limit(self) -> bool:
        return False


class Host:
    """One wasminfer host: models, functions, instances. Idempotent `close()`; a context manager."""

    def __init__(self, cache_dir: Path | None = None, *, models: ModelRegistry | None = None,
                 log_capacity: int = 2000, engine: WasmEngine | None = None,
                 memory: TenantMemory | None = None, growth_policy: GrowthPolicy | None = None) -> None:
        """`engine`: share one engine (and its epoch ticker and compile cache) between hosts of one
        process, e.g. one host per tenant; made with `Host.new_engine`, closed by its owner.
        `memory`: the tenant's account of a `MemoryBudget` that instances and models reserve from
        (default: no budget). `growth_policy`: when instances that grew are renewed (`pool.py`)."""
        self.growth_policy = growth_policy if growth_policy is not None else GrowthPolicy()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else self.new_engine(self.cache_dir)
        self.models = models if models is not None else ModelRegistry()
        self._functions: dict[str, DeployedFunction] = {}
        self._preparing: set[DeployedFunction] = set()  # starting instances: `close` cancels them
        self._logs: dict[str, LogBuffer] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._log_capacity = log_capacity
        self._closed = False
        self.memory = memory if memory is not None else MemoryBudget.unlimited().tenant("default")
        self.memory.reclaimer = self._reclaim_idle
        self._model_memory: dict[str, Reservation] = {}

    @staticmethod
    def new_engine(cache_dir: Path | None = None, *, pool_slots: int | None = None) -> WasmEngine:
        """An engine with every host interface (handler ABI, WASI-NN) linked in; `pool_slots`: its
        instance pool's slots (`runtime/_pooling.py`; default `WASMINFER_INSTANCE_POOL`, 0: none)."""
        return WasmEngine(HOST_FUNCS, Path(cache_dir) if cache_dir is not None else None,
                          pool_slots=pool_slots)

    # --- models -------------------------------------------------------------------------------
    def deploy_model(self, name: str, model: bytes | Path, **options: Any) -> ModelInfo:
        """Loads (or replaces) a model. Raises `InvalidModel` if ONNX Runtime cannot load it,
        `PayloadTooLarge` if it could never fit in the tenant's memory quota, `MemoryQuotaExceeded`
        or `HostMemoryExhausted` if it does not fit now (see `runtime.memory`)."""
        nbytes = model_bytes(model.stat().st_size if isinstance(model, Path) else len(model))
        old = self._model_memory.get(name)
        growth = self.memory.reserve_model(name, nbytes, old.nbytes if old is not None else 0)
        try:
            info = self.models.load(name, model, **options)
        except BaseException:
            growth.release()
            raise
        if old is None:
            self._model_memory[name] = growth
        else:  # the version replaced gives its bytes to this one
            old.resize(nbytes)
            growth.release()
        return info

    def remove_model(self, name: str) -> None:
        """Raises `Conflict` while a deployed function's manifest names the model."""
        users = [f.name for f in self._functions.values() if name in f.manifest.models]
        if users:
            raise Conflict(f"model {name!r} is used by function(s) {', '.join(sorted(users))}; "
                           "remove it from their manifests or delete them first")
        self.models.unload(name)
        with self._lock:
            memory = self._model_memory.pop(name, None)
        if memory is not None:
            memory.release()

    # --- functions ----------------------------------------------------------------------------
    def inspect(self, wasm: bytes) -> tuple[ModuleInfo, CompiledModule]:
        """Compiles and classifies a module or component. Raises `InvalidModule` with the reason."""
        if wasm[:4] == python.MAGIC:  # a Python function: its files, zipped (wasminfer.pysource)
            sha = hashlib.sha256(wasm).hexdigest()
            fn = python.inspect(self.engine, wasm, sha)
            return ModuleInfo(
                sha256=sha, abi=python.NAME, imports=[], exports=[], size_bytes=len(wasm),
                initial_memory_bytes=fn.initial_memory_bytes(),
            ), fn  # type: ignore[return-value]
        if wasm[:4] != b"\0asm":
            raise InvalidModule("not a WebAssembly binary (missing the \\0asm magic)")
        if wasm[4:8] == component.BINARY_VERSION:  # the component ABI (Python functions)
            sha = hashlib.sha256(wasm).hexdigest()
            comp = component.compile_component(self.engine, wasm, sha)
            return ModuleInfo(
                sha256=sha, abi=component.NAME, imports=[i.module for i in comp.imports],
                exports=sorted(comp.exports), size_bytes=len(wasm), initial_memory_bytes=0,
            ), comp  # type: ignore[return-value]
        if wasm[4:8] != b"\x01\x00\x00\x00":
            raise InvalidModule(
                "an unknown WebAssembly binary version: upload a core module (version 1) or a component"
            )
        sha = hashlib.sha256(wasm).hexdigest()
        try:
            compiled = self.engine.compile(wasm, sha)
        except WasmLinkError as exc:
            raise InvalidModule(f"invalid WebAssembly module: {exc}") from None
        unknown = compiled.unknown_imports()
        if unknown:
            raise InvalidModule(
                "the module imports what this host does not provide: " + ", ".join(unknown[:10])
                + ("…" if len(unknown) > 10 else "")
                + " (available: the 'wasminfer' handler imports, wasi_snapshot_preview1 and "
                "wasi_ephemeral_nn, see guest-sdk/WASI-NN.md)"
            )
        abi = self.detect_abi(compiled)
        info = ModuleInfo(
            sha256=sha, abi=abi.NAME,
            imports=[f"{i.module}.{i.name}" for i in compiled.imports],
            exports=sorted(compiled.exports),
            size_bytes=len(wasm),
            initial_memory_bytes=compiled.initial_memory_bytes(),
            uses_wasi_nn=wasi_nn.uses_wasi_nn(compiled.imports),
        )
        return info, compiled

    @staticmethod
    def detect_abi(compiled: CompiledModule) -> Any:
        """The ABI module of a core module. Raises `InvalidModule` if it follows none or breaks one."""
        if component.detect(compiled):  # checked at compile time
            return component
        for abi in CORE_ABIS:
            if abi.detect(compiled):
                try:
                    abi.validate(compiled)
                except WasmLinkError as exc:
                    raise InvalidModule(f"not a valid {abi.NAME} module: {exc}") from None
                return abi
        raise InvalidModule(
            "not a wasminfer function: export 'wasminfer_handle' and 'wasminfer_alloc' "
            "(handler ABI v1, see guest-sdk/ABI.md), or '_start' (a WASI command, see guest-sdk/WASI-NN.md)"
        )

    def deploy_function(self, name: str, wasm: bytes, manifest: Manifest | Mapping[str, Any] | None = None,
                        *, prewarm: int | None = None,
                        inspected: tuple[ModuleInfo, Any] | None = None) -> dict[str, Any]:
        """Validates, compiles and deploys (or replaces) a function; returns its description.

        Raises `InvalidModule` (not a module, unknown imports, wrong exports, traps or times out
        while initialising), `InvalidManifest` (limits the module cannot meet) or `ModelNotFound`
        (the manifest names a model that is not deployed). A failed deploy leaves the previous
        version serving.
        """
        return self.install_function(
            self.prepare_function(name, wasm, manifest, prewarm=prewarm, inspected=inspected)
        )

    def prepare_function(self, name: str, wasm: bytes, manifest: Manifest | Mapping[str, Any] | None = None,
                         *, prewarm: int | None = None,
                         inspected: tuple[ModuleInfo, Any] | None = None) -> DeployedFunction:
        """The first half of `deploy_function`: validates, compiles and prewarms (runs the guest's
        `_initialize`, each under the manifest's `timeout_ms`) without touching what is deployed.
        Give the result to `install_function`, or `discard_function`. Raises what `deploy_function`
        raises."""
        m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest or {})
        info, compiled = inspected if inspected is not None else self.inspect(wasm)
        abi = ABIS_BY_NAME[info.abi]  # detected and validated by inspect
        if abi is python and m.memory_mb == Manifest.memory_mb:
            # The default is a compiled guest's; an interpreter with numpy needs more.
            m = dataclasses.replace(m, memory_mb=python.DEFAULT_MEMORY_MB)
        if m.abi not in ("auto", info.abi):
            raise InvalidManifest.for_key("abi", f"says {m.abi!r}, but the module is a {info.abi!r} module")
        if info.initial_memory_bytes > m.memory_mb << 20:
            raise InvalidManifest.for_key(
                "memory_mb",
                f"is {m.memory_mb}, less than the {info.initial_memory_bytes / (1 << 20):.2f} MiB of initial "
                "memory the module needs: raise it or link with a smaller --initial-memory",
            )
        for model in m.models:
            if model not in self.models:
                raise ModelNotFound(model)
        count = max(1, m.min_instances, m.prewarm_instances) if prewarm is None else prewarm
        self.memory.check_deploy(m, count)
        with self._lock:
            logs = self._logs.setdefault(name, LogBuffer(self._log_capacity))
        fn = DeployedFunction(self, name, compiled, m, abi, logs, info.sha256)
        with self._lock:
            if self._closed:
                raise Unavailable("the host is closed")
            self._preparing.add(fn)
        try:
            fn.pool.prewarm(count)
        except MEMORY_REFUSALS:
            fn.pool.close()
            raise
        except WasminferError as exc:
            fn.pool.close()
            raise InvalidModule(f"the module failed to start: {exc.message}") from None
        except WasmLinkError as exc:
            fn.pool.close()
            raise InvalidModule(f"the module failed to instantiate: {exc}") from None
        finally:
            with self._lock:
                self._preparing.discard(fn)
        return fn

    def install_function(self, fn: DeployedFunction) -> dict[str, Any]:
        """Serves `fn` (from `prepare_function`) in place of the function of its name, whose calls in
        flight finish on their instances. Returns its description."""
        with self._lock:
            old = self._functions.get(fn.name)
            self._functions[fn.name] = fn
            self._logs[fn.name] = fn.logs
        if old is not None:
            old.pool.close()
        fn.logs.append("host", f"deployed version {fn.version[:12]} ({fn.abi} ABI)", "info")
        return fn.describe()

    @staticmethod
    def discard_function(fn: DeployedFunction) -> None:
        """Drops a prepared function that will not be installed."""
        fn.pool.close()

    def remove_function(self, name: str) -> None:
        """Stops serving `name`; its invocations in flight end at once with `InvocationCancelled`
        (503). Raises `FunctionNotFound`."""
        with self._lock:
            fn = self._functions.pop(name, None)
            self._logs.pop(name, None)
        if fn is None:
            raise FunctionNotFound(name)
        fn.cancel(InvocationCancelled(f"function {name!r} was deleted while this invocation ran"))
        fn.pool.close()

    def function(self, name: str) -> DeployedFunction:
        fn = self._functions.get(name)
        if fn is None:
            raise FunctionNotFound(name)
        return fn

    def functions(self) -> list[DeployedFunction]:
        return list(self._functions.values())

    def invoke(self, name: str, body: bytes, content_type: str = "application/octet-stream", *,
               stream: OutputStream | None = None) -> InvokeResult:
        """Runs one request through function `name`. With `stream`, the parts the guest writes go
        to it as they come, and the result's body is only what the guest set last with `output`.

        Raises `FunctionNotFound`, `TooManyRequests` (all instances busy and the queue full),
        `Timeout`, and the `GuestError` family (guest error status, trap, limits), or the infer
        error the guest failed on (`ModelNotAllowed`, `InvalidTensor`, …).
        """
        fn = self.function(name)
        try:
            return self._invoke_once(fn, name, body, content_type, stream)
        except MemoryLimitExceeded as exc:
            # A warm instance's heap may be too fragmented for a body a fresh instance takes (zig's
            # wasm malloc never merges freed blocks): the request never reached the handler, so it
            # is retried once; its instance was discarded.
            if not getattr(exc, "alloc_failed_warm", False):
                raise
            return self._invoke_once(fn, name, body, content_type, stream)

    def _invoke_once(self, fn: DeployedFunction, name: str, body: bytes, content_type: str,
                     stream: OutputStream | None = None) -> InvokeResult:
        m = fn.manifest
        invocation_id = f"{next(self._ids):x}"
        t0 = time.perf_counter_ns()
        inst, cold = fn.pool.acquire(timeout_s=m.timeout_ms / 1000)
        t1 = time.perf_counter_ns()
        state = handler.InvocationState(name, m, self.models.infer, fn.logs, invocation_id, self.models)
        state.memory = self.memory
        inst.stdout.invocation = inst.stderr.invocation = invocation_id
        inst.stderr.tail.clear()
        healthy = False
        error: WasminferError | None = None
        fn.begin(state)
        if stream is not None:
            state.stream = stream
            stream.invocation_id = invocation_id
            stream.attach(state)
        try:
            healthy = fn.abi_impl.invoke(inst.wasm, body, content_type, state)
            if inst.rest_bytes is None:
                inst.traffic_bytes = max(inst.traffic_bytes, len(body), len(state.output or b""))
        except WasminferError as exc:
            error = exc
            _with_guest_words(exc, fn.abi, inst.stderr.tail)
            healthy = not state.discard and not inst.wasm.at_memory_limit()
            if state.alloc_failed and not cold:
                exc.alloc_failed_warm = True  # type: ignore[attr-defined]
            raise
        except BaseException:
            healthy = False
            raise
        finally:
            t2 = time.perf_counter_ns()
            run_us = (t2 - t1) / 1000
            fn.finish(state, error, cold, run_us)
            if stream is not None:
                stream.detach()
            if state.decoders is not None:  # the invocation's decoder states end with it
                state.decoders.close()
            inst.stdout.flush()
            inst.stderr.flush()
            fn.pool.release(inst, healthy)
            if error is not None:
                fn.logs.append("host", f"invocation failed: {error.code}: {error.message}", "error",
                               invocation_id)
        start_us = 0.0
        queue_us = (t1 - t0) / 1000
        if cold:
            start_us, queue_us = queue_us, 0.0
        answer, answer_type = state.answer()
        return InvokeResult(
            body=answer, content_type=answer_type, queue_us=queue_us, start_us=start_us,
            run_us=run_us, infer_us=state.infer_ns / 1000, cold=cold, invocation_id=invocation_id,
            boundary_bytes=state.boundary_bytes,
        )

    def logs(self, name: str, n: int = 200, since: float | None = None) -> list[LogLine]:
        buf = self._logs.get(name)
        if buf is None:
            raise FunctionNotFound(name)
        return buf.tail(n, since)

    def stats(self) -> dict[str, Any]:
        return {
            "functions": {f.name: f.describe() for f in self.functions()},
            "models": [{**m.to_dict(), "stats": self._model_stats(m.name)} for m in self.models.list()],
        }

    def _model_stats(self, name: str) -> dict[str, Any] | None:
        try:
            return self.models.stats(name).to_dict()
        except ModelNotFound:  # unloaded since it was listed
            return None

    def _reclaim_idle(self, nbytes: int) -> int:
        """Destroys idle instances of this host's functions (least recently used first within each)
        until `nbytes` of memory are freed, or none is left; returns the bytes freed."""
        freed = 0
        for fn in self.functions():
            if freed >= nbytes:
                break
            each = fn.manifest.memory_mb << 20
            freed += fn.pool.reclaim_idle(-(-(nbytes - freed) // each)) * each
        return freed

    def shrink_idle(self) -> int:
        """Renews idle instances that grew (see `GrowthPolicy`), then gives what the C allocator
        kept of them back to the system (`release_freed_memory`); returns how many."""
        renewed = sum(f.pool.shrink_idle() for f in self.functions())
        if renewed:
            release_freed_memory()
        return renewed

    def reap_idle(self) -> int:
        """Destroys instances idle past their function's `idle_timeout_s` (keeping `min_instances`),
        then gives what the C allocator kept of them back (`release_freed_memory`)."""
        reaped = sum(f.pool.reap_idle(f.manifest.idle_timeout_s, f.manifest.min_instances)
                     for f in self.functions())
        if reaped:
            release_freed_memory()
        return reaped

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            fns = [*self._functions.values(), *self._preparing]
            self._functions.clear()
        for f in fns:
            f.cancel(Unavailable("the server is shutting down"))
            f.pool.close()
        if self._owns_engine:
            self.engine.close()
        self.models.close()
        with self._lock:
            held, self._model_memory = list(self._model_memory.values()), {}
        for memory in held:
            memory.release()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
