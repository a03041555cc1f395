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
from wasminfer.runtime._tiers import Tiering
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
#: How long past such a deadline (ticks) the ticker keeps ticking every ms: the call's epoch deadline
#: lies up to a tick after its deadline, and a ticker gone lazy at the deadline itself brought that
#: tick a slice (50 ms) late (overshoots of ~50 ms, seen under load in CI).
URGENT_PAST_TICKS = 2
DLL = bindings.dll  # type: ignore[attr-defined]


def engine_address(engine: wasmtime.Engine) -> int:
    """The address of `engine` for the C API's prototypes of our own (`held`)."""
    return int(ctypes.cast(engine.ptr(), ctypes.c_void_p).value or 0)


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
class _Blocked(threading.local):
    # A class attribute as the default: `getattr(local, name, 0)` on a thread that never set it
    # raises and catches an AttributeError inside (~0.4 us, twice per inline invocation).
    ns = 0


_blocked = _Blocked()


def blocked_ns() -> int:
    """Nanoseconds the calling thread has spent, in all, blocked in guests' host calls (WASI sleeps,
    `CallState.sleep_until`): what a guest waited without computing. The inline policy
    (`replicas/inline.py`) reads it before and after an invocation: a guest that waits must never
    run on the event loop, however little CPU it uses."""
    return _blocked.ns


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
            urgency.until(deadline + URGENT_PAST_TICKS * _TICK_NS)
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


class _CallLocal(threading.local):
    """The thread's guest call: its `CallState` and, for core modules, its `WasmInstance` (None
    outside a call; class attributes as defaults, read without a `getattr` that raises inside)."""

    state: CallState | None = None
    instance: WasmInstance | None = None


tls = _CallLocal()
_wake_lock = threading.Lock()  # orders `cancel` against the first sleep's making of `_wake`


@_EpochCallback  # type: ignore[untyped-decorator]
def _on_epoch_deadline(_ctx: Any, _env: Any, delta: Any, _kind: Any) -> int:
    """A guest call's epoch deadline passed: trap (its deadline passed, or it was cancelled) or
    grant the next slice. Runs on the thread of the call, so its state is the thread's; the engine's
    epoch is the only thing another thread may safely touch, hence the slices (see `SLICE_TICKS`)."""
    state = tls.state
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
        #: Every engine whose stores this one's ticker drives (`_wasm.WasmEngine` adds its pool's and
        #: the Python runtime's, `_wide.py`).
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
