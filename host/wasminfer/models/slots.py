"""Run slots: how many `session.run` calls run at once, per model and for the whole process.

ORT allows concurrent `run` calls on one session, and the registry puts no lock around them; but 16
runs of a ResNet-50 at once on 2 cores thrash the caches and each one's latency grows with all the
others (bench/RESULTS.md: 0.69x the throughput of ORT called directly with as many runs as cores,
p50 1,180 ms against 44 ms). So a model runs at most its `slots` runs at once (its
`max_concurrent_runs`, chosen at load by `tuning.py` unless set), and the process at most
`capacity` *thread units* at once (the cores it may use; a run takes as many units as it has
intra-op threads). The others wait in their model's FIFO queue.

**Fair between models.** When a run ends, the units it frees go to the models that wait in round
robin, one run per model per turn, not to whichever model queued the most: a model with a long
queue cannot keep another model's requests waiting behind all of its own. A request arriving while
anyone waits queues too (no barging). A model held by its own `slots` is skipped; one that needs
more units than are free stops the turn, so a run of many threads is not starved by runs of one.

**Deadlines hold while queued.** A waiting request gives up at its deadline with `Timeout` (504);
one whose model's queue already holds `max_queue` requests is refused at once with
`TooManyRequests` (429) and a Retry-After estimated from the queue and the model's run time.

The process has one pool (`RUN_SLOTS`), shared by every registry (one per tenant) in it; host
replicas in other processes have theirs. An uncontended acquire is one lock and two additions.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque

from wasminfer.errors import Timeout, TooManyRequests

__all__ = ["RUN_SLOTS", "DEFAULT_MAX_QUEUE", "ModelSlots", "RunSlots", "usable_cores"]

#: Requests one model may hold waiting for a run slot before more are refused with 429.
DEFAULT_MAX_QUEUE = 1024


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _Waiter:
    __slots__ = ("wake", "granted")

    def __init__(self) -> None:
        # A bare lock, taken now and released by whoever grants the slot: the cheapest wait CPython has.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.granted = False


class ModelSlots:
    """The run slots of one loaded model: `acquire()` before `session.run`, `release()` after.

    `slots` runs of the model at once (0: no bound of its own, and the process pool is not used
    either -- every caller runs at once, as before run slots), each taking `units` of the process'
    `RunSlots`. `mean_run_s` (kept by the caller) feeds the Retry-After of a refusal.
    """

    __slots__ = ("name", "slots", "units", "pool", "in_flight", "waiters", "peak", "mean_run_s")

    def __init__(self, pool: RunSlots, name: str, slots: int, units: int) -> None:
        self.pool = pool
        self.name = name
        self.slots = slots
        self.units = max(1, min(units, pool.capacity))
        self.in_flight = 0
        self.peak = 0  # the most runs in flight at once since load
        self.waiters: deque[_Waiter] = deque()
        self.mean_run_s = 0.0

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def acquire(self, deadline_ns: int | None = None) -> None:
        """Wait for a run slot, until `deadline_ns` (`time.monotonic_ns()`) at most.

        Raises `Timeout` when the deadline passes first, `TooManyRequests` (with a Retry-After) when
        `max_queue` requests of the model wait already.
        """
        if self.slots == 0:
            return
        pool = self.pool
        with pool.lock:
            if self.in_flight < self.slots and not pool.waiting and pool.used + self.units <= pool.capacity:
                self._take()
                return
            if len(self.waiters) >= pool.max_queue:
                raise self._refusal()
            waiter = _Waiter()
            self.waiters.append(waiter)
            if len(self.waiters) == 1:
                pool.waiting.append(self)
            pool.dispatch()  # a slot may be free while others wait only for theirs
        if waiter.granted:
            return
        if deadline_ns is None:
            waiter.wake.acquire()
            return
        left = (deadline_ns - time.monotonic_ns()) / 1e9
        if left > 0 and waiter.wake.acquire(timeout=left):
            return
        with pool.lock:
            if waiter.granted:  # granted as the wait ended: the slot is ours
                return
            self.waiters.remove(waiter)
            if not self.waiters:
                pool.waiting.remove(self)
        raise Timeout(
            f"model {self.name!r} was not run: the invocation's deadline passed while it waited for a "
            f"run slot ({self.slots} run(s) of the model at once, option max_concurrent_runs)"
        )

    def release(self) -> None:
        """A run of the model ended: its slot goes to the next model waiting in turn."""
        if self.slots == 0:
            return
        pool = self.pool
        with pool.lock:
            self.in_flight -= 1
            pool.used -= self.units
            if pool.waiting:
                pool.dispatch()

    def _take(self) -> None:
        """Under the pool's lock."""
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.pool.used += self.units

    def _refusal(self) -> TooManyRequests:
        waits = math.ceil((len(self.waiters) + 1) / max(1, self.slots)) * self.mean_run_s
        return TooManyRequests(
            f"model {self.name!r}: {self.in_flight} run(s) in flight and {len(self.waiters)} requests "
            f"waiting for a run slot (the most a model may queue, {self.pool.max_queue}); retry",
            retry_after_s=max(1.0, math.ceil(waits)),
        )


class RunSlots:
    """The process' thread units for model runs (`capacity`: by default its cores) and the models
    waiting for them, served in round robin."""

    def __init__(self, capacity: int | None = None, *, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        self.capacity = capacity if capacity is not None else usable_cores()
        if self.capacity < 1 or max_queue < 0:
            raise ValueError(f"capacity must be 1 or more, max_queue 0 or more, not {capacity}, {max_queue}")
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.used = 0
        self.waiting: deque[ModelSlots] = deque()  # models with requests waiting, in turn order

    def model(self, name: str, slots: int, threads: int) -> ModelSlots:
        """The slots of a model loaded with `slots` runs at once (0: unbounded) of `threads` intra-op
        threads each (0: ORT's pool, a thread per core)."""
        return ModelSlots(self, name, slots, threads if threads > 0 else self.capacity)

    def dispatch(self) -> None:
        """Under the lock: grant free units to waiting models, one run per model per turn."""
        waiting = self.waiting
        i = 0
        while i < len(waiting):
            model = waiting[i]
            if model.in_flight >= model.slots:  # held by its own bound: it keeps its place, others go
                i += 1
                continue
            if self.used + model.units > self.capacity:
                return  # its turn: nobody passes it, or a wide run would wait forever
            waiter = model.waiters.popleft()
            model._take()
            waiter.granted = True
            waiter.wake.release()
            del waiting[i]
            if model.waiters:  # to the back of the turn
                waiting.append(model)


#: The process' one pool.
RUN_SLOTS = RunSlots()
