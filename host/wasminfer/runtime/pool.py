"""`InstancePool`: the warm instances of one function version inside this host.

Reuses idle instances (most recently used first: its memory is the likeliest to be in cache),
creates new ones on demand up to `max_instances`, queues callers beyond that up to `max_queue`
(past it: a fast `TooManyRequests`), and throws away every instance its user marks unhealthy.
Creation happens outside the lock, so a slow instantiate never blocks releases.

A Wasm memory never shrinks, so an instance keeps whatever its largest request made it grow. The
pool gives that memory back by *renewing* instances (a fresh instance from the module's initial
image in place of the grown one, see `GrowthPolicy`): at once when a request grew one far past its
size at rest, and once it has been idle a short while when it grew at all. Renewing is cheap (a new
store and an instantiate) but not free: the next large request must grow and fault in its memory
again, so reuse is kept where requests keep coming. An instance whose module has better code now
(`outdated`: the optimised tier swapped in behind the fast one) is renewed the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from wasminfer.errors import TooManyRequests, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class GrowthPolicy:
    """When an instance that grew is renewed (bench/RESULTS.md, "reuse or renew", has the measurements
    behind the defaults).

    - `reset_bytes`: on release, an instance grown more than this past its size at rest is renewed
      at once (None: never at release).
    - `slack_bytes`: growth within this is no growth (allocators round up; a page or two of heap is
      not worth an instantiate).
    - `shrink_idle_s`: an idle instance grown past the slack is renewed once idle this long
      (`InstancePool.shrink_idle`).
    """

    reset_bytes: int | None = 4 << 20
    slack_bytes: int = 256 << 10
    shrink_idle_s: float = 1.0


class _Waiter:
    __slots__ = ("event", "instance", "done", "closed")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.instance: object | None = None
        self.done = False
        self.closed = False


class InstancePool(Generic[T]):
    def __init__(
        self,
        name: str,
        create: Callable[[], T],
        destroy: Callable[[T], None],
        *,
        max_instances: int,
        max_queue: int = 256,
        growth: Callable[[T], int] | None = None,
        renew: Callable[[T], T] | None = None,
        policy: GrowthPolicy = GrowthPolicy(),
        outdated: Callable[[T], bool] | None = None,
    ) -> None:
        """`growth(inst)`: the bytes `inst` grew past its size at rest; `renew(inst)`: a fresh instance
        in its place (it destroys `inst`, and raises if it cannot make one); `outdated(inst)`: whether
        it runs code older than its module's (renewed at its next release, or once idle). Without
        `renew`, instances are never renewed."""
        self.name = name
        self._create = create
        self._destroy = destroy
        self._growth = growth
        self._renew = renew
        self._outdated = outdated
        self.policy = policy
        self.max_instances = max_instances
        self.max_queue = max_queue
        self._idle: list[tuple[T, float]] = []  # (instance, released at), LIFO
        self._live = 0
        self._busy = 0
        self._waiters: deque[_Waiter] = deque()
        # Taken as `with self._lock` (C), not `with self._cond` (two Python calls each time).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self.created_total = 0
        self.discarded_total = 0
        self.reaped_total = 0
        self.renewed_total = 0  # grown instances replaced by fresh ones (at release or idle)
        # The integral of demand (busy + waiting callers) over time: what the instance autoscaler
        # reads, exact between its ticks however short the invocations are.
        self._demand_area = 0.0
        self._demand_at = time.monotonic()
        self._demand_peak = 0  # the most at once since the last `demand()`

    def _account(self) -> None:
        """Adds the demand since the last change to its integral. Call under the lock, before a
        change of `_busy` or `_waiters`."""
        now = time.monotonic()
        demand = self._busy + len(self._waiters)
        self._demand_area += demand * (now - self._demand_at)
        self._demand_at = now
        if demand > self._demand_peak:
            self._demand_peak = demand

    def demand(self) -> tuple[float, float, int]:
        """`(integral, at, peak)`: the integral of demand (requests running or waiting here) over
        time in request-seconds, as of `at` (`time.monotonic()`), and the most requests there were at
        once since the previous call. The difference of two readings' integrals over the difference
        of their times is the average concurrency in between."""
        with self._lock:
            self._account()
            peak, self._demand_peak = self._demand_peak, self._busy + len(self._waiters)
            return self._demand_area, self._demand_at, peak

    def acquire(self, timeout_s: float) -> tuple[T, bool]:
        """Returns `(instance, created)`; `created` is True for a cold start.

        Callers that find every instance busy wait in FIFO order and are handed instances directly
        as they are released (no barging: tail latency stays bounded under contention).
        Raises `TooManyRequests` if `max_queue` callers already wait or none frees up within
        `timeout_s`, `Unavailable` if the pool is closed, and whatever `create` raises.
        """
        with self._lock:
            if self._closed:
                raise Unavailable(f"function {self.name!r} is being replaced or removed; retry")
            self._account()
            if self._idle:
                inst, _ = self._idle.pop()
                self._busy += 1
                return inst, False
            if self._live < self.max_instances:
                self._live += 1
                self._busy += 1
                waiter = None
            else:
                if len(self._waiters) >= self.max_queue:
                    raise TooManyRequests(
                        f"function {self.name!r}: all {self.max_instances} instances busy and "
                        f"{len(self._waiters)} requests queued (manifest keys 'max_instances', 'max_queue')"
                    )
                waiter = _Waiter()
                self._waiters.append(waiter)
        if waiter is not None:
            waiter.event.wait(timeout_s)
            with self._lock:
                if not waiter.done:
                    self._account()
                    self._waiters.remove(waiter)
                    raise TooManyRequests(
                        f"function {self.name!r}: no instance became free within {timeout_s:.1f} s "
                        f"(all {self.max_instances} busy; manifest key 'max_instances')"
                    )
                if waiter.closed:
                    raise Unavailable(f"function {self.name!r} is being replaced or removed; retry")
                if waiter.instance is not None:
                    return cast(T, waiter.instance), False
                # else: a slot was freed by a discarded instance; it was counted for us
        try:
            inst = self._create()
        except BaseException:
            with self._lock:
                self._account()
                self._live -= 1
                self._busy -= 1
                self._wake_for_slot()
            raise
        with self._lock:
            self.created_total += 1
        return inst, True

    def has_room(self) -> bool:
        """Whether `acquire` would return at once now (an idle instance, or room for a new one)
        rather than wait; another caller may take it first. Reads without the lock: a hint."""
        return bool(self._idle) or (self._live < self.max_instances and not self._closed)

    def _wake_for_slot(self) -> None:
        """A live slot became free: give it to the first waiter (it creates its own instance)."""
        if self._waiters and self._live < self.max_instances:
            w = self._waiters.popleft()
            self._live += 1
            self._busy += 1
            w.done = True
            w.event.set()

    def release(self, inst: T, healthy: bool, *, used: bool = True) -> None:
        """Gives `inst` back: to the first waiter or the idle list if `healthy`, renewed first if it
        grew past `policy.reset_bytes` or (if `used`) runs outdated code; destroyed otherwise (or if
        renewing it fails)."""
        if healthy and self._must_renew(inst, self.policy.reset_bytes, outdated=used):
            renewed = self._renewed(inst)
            if renewed is None:
                with self._lock:
                    self._account()
                    self._busy -= 1
                    self._live -= 1
                    self.discarded_total += 0 if self._closed else 1
                    if not self._closed:
                        self._wake_for_slot()
                return
            inst = renewed
        with self._lock:
            self._account()
            self._busy -= 1
            if healthy and not self._closed:
                if self._waiters:
                    w = self._waiters.popleft()
                    w.instance = inst
                    w.done = True
                    self._busy += 1
                    w.event.set()
                else:
                    self._idle.append((inst, time.monotonic()))
                return
            self._live -= 1
            self.discarded_total += 0 if self._closed else 1
            if not self._closed:
                self._wake_for_slot()
        self._destroy(inst)

    def _must_renew(self, inst: T, limit: int | None, outdated: bool = True) -> bool:
        if outdated and self._renew is not None and self._outdated is not None and self._outdated(inst):
            return True
        if limit is None or self._growth is None or self._renew is None:
            return False
        return self._growth(inst) > max(limit, self.policy.slack_bytes)

    def _renewed(self, inst: T) -> T | None:
        """A fresh instance in place of `inst`, or None if none could be made (`inst` is gone)."""
        assert self._renew is not None
        try:
            fresh = self._renew(inst)
        except Exception:  # noqa: BLE001 - the slot is freed; the next acquire says why, if it still fails
            return None
        with self._lock:
            self.renewed_total += 1
        return fresh

    def shrink_idle(self, idle_s: float | None = None) -> int:
        """Renews the idle instances that grew past the policy's slack and have been idle longer than
        `idle_s` (default: `policy.shrink_idle_s`); returns how many. An instance asked for meanwhile
        is not waited for: its caller gets a busy slot's worth of queueing at most."""
        if self._renew is None:
            return 0
        limit = self.policy.shrink_idle_s if idle_s is None else idle_s
        now = time.monotonic()
        with self._lock:
            grown = [(inst, at) for inst, at in self._idle
                     if now - at > limit and self._must_renew(inst, 0)]
            if not grown:
                return 0
            taken = {id(inst) for inst, _ in grown}
            # Still live (the slot stays taken) but neither idle nor busy: renewing is no demand.
            self._idle = [(inst, at) for inst, at in self._idle if id(inst) not in taken]
        renewed = 0
        for inst, at in grown:
            fresh = self._renewed(inst)
            with self._lock:
                if fresh is None:
                    self._live -= 1
                    if not self._closed:
                        self._wake_for_slot()
                    continue
                renewed += 1
            # An idle instance keeps its idle time (`idle_timeout_s` still counts from its last use).
            self._put_back(fresh, at)
        return renewed

    def _put_back(self, inst: T, idle_since: float) -> None:
        with self._lock:
            if self._closed:
                self._live -= 1
            elif self._waiters:
                self._account()
                w = self._waiters.popleft()
                w.instance = inst
                w.done = True
                self._busy += 1
                w.event.set()
                return
            else:
                # kept in idle-time order (the reaper and reclaim take the front as least recent)
                i = len(self._idle)
                while i > 0 and self._idle[i - 1][1] > idle_since:
                    i -= 1
                self._idle.insert(i, (inst, idle_since))
                return
        self._destroy(inst)

    def prewarm(self, count: int, create: Callable[[], T] | None = None) -> int:
        """Creates idle instances until `count` are live (bounded by `max_instances`), with `create`
        (default: the pool's own)."""
        create = create or self._create
        made = 0
        while True:
            with self._lock:
                if self._closed or self._live >= min(count, self.max_instances):
                    return made
                self._live += 1
            try:
                inst = create()
            except BaseException:
                with self._lock:
                    self._live -= 1
                raise
            self.release_new(inst)
            made += 1

    def release_new(self, inst: T) -> None:
        """Adds a freshly created (pre-warmed) instance, counted live by the caller, to the pool."""
        with self._lock:
            self.created_total += 1
            self._account()
            self._busy += 1
        # Not renewed if its code became outdated while it started: made a moment ago, it is renewed
        # after its first use instead (or once idle), not started twice before it has served.
        self.release(inst, True, used=False)

    def reap_idle(self, idle_s: float, keep: int = 0) -> int:
        """Destroys instances idle for longer than `idle_s`, keeping at least `keep` live."""
        now = time.monotonic()
        victims: list[T] = []
        with self._lock:
            survivors = []
            # oldest first: the LIFO list keeps the least recently used at the front
            for inst, at in self._idle:
                if now - at > idle_s and self._live - len(victims) > keep:
                    victims.append(inst)
                else:
                    survivors.append((inst, at))
            self._idle = survivors
            self._live -= len(victims)
            self.reaped_total += len(victims)
        for inst in victims:
            self._destroy(inst)
        return len(victims)

    def reclaim_idle(self, count: int) -> int:
        """Destroys up to `count` idle instances, least recently used first, whatever their idle
        time (to make room in the tenant's memory quota for another instance)."""
        with self._lock:
            victims = [inst for inst, _ in self._idle[:count]]
            del self._idle[:len(victims)]
            self._live -= len(victims)
            self.reaped_total += len(victims)
        for inst in victims:
            self._destroy(inst)
        return len(victims)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "live": self._live,
                "idle": len(self._idle),
                "busy": self._busy,
                "waiting": len(self._waiters),
                "max_instances": self.max_instances,
                "created_total": self.created_total,
                "discarded_total": self.discarded_total,
                "reaped_total": self.reaped_total,
                "renewed_total": self.renewed_total,
            }

    def close(self) -> None:
        """Destroys idle instances now; busy ones are destroyed when released. Idempotent."""
        with self._lock:
            self._closed = True
            victims = [inst for inst, _ in self._idle]
            self._idle.clear()
            self._live -= len(victims)
            self._account()
            while self._waiters:
                w = self._waiters.popleft()
                w.done = w.closed = True
                w.event.set()
        for inst in victims:
            self._destroy(inst)
