"""Who runs next: `SyncGate` (synchronous invocations before async work) and `FairQueue` (fair
shares between tenants, then between each tenant's jobs). Plain logic with locks, no threads."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SyncGate:
    """How many async items may run at once right now: what synchronous traffic leaves.

    The gateway brackets every synchronous invocation with `enter()`/`exit()`, from its request to
    its response; an async worker takes a slot with `acquire(cap)` before each item and gives it
    back with `release()`. Three regimes:

    - no synchronous invocation for `recent_s`: async work may run `cap` items at once (enough
      to fill a batching model's batches);
    - synchronous traffic within `recent_s`: at most `recent_cap` items (default half the cores,
      at least one). Items already running when a request comes cannot be stopped, and every
      one of them competes with it for the cores and the GIL: few in flight, short wait;
    - a synchronous invocation in flight, and for `hold_s` after the last one (a client's next
      request, sent as soon as the answer arrives, finds the host as quiet as the last): each one
      takes `reserve_cores` of the host's `cores` from async work (on 2 cores one takes it all).

    Only new items wait. Pool queueing is the other half (`JobRunner` never starts an item on a
    function whose instances are all busy).
    """

    def __init__(
        self,
        cores: int,
        reserve_cores: float = 2.0,
        hold_s: float = 0.001,
        recent_s: float = 0.25,
        recent_cap: int | None = None,
    ) -> None:
        self.cores = max(1, cores)
        self.reserve_cores = reserve_cores
        self.hold_s = hold_s
        self.recent_s = recent_s
        self.recent_cap = max(1, self.cores // 2) if recent_cap is None else recent_cap
        # Taken as `with self._lock` (C), not `with self._cond` (two Python calls each time).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sync = 0
        self._async = 0
        self._cap = 1  # the `cap` of the last `acquire`
        self._quiet_at = 0.0  # monotonic time from which the last sync invocation no longer holds
        self._last_sync = -1e9  # monotonic time the last sync invocation ended
        self._closed = False
        self.sync_total = 0
        self.yields_total = 0  # times an async worker waited because of sync traffic

    # --- the synchronous side ---------------------------------------------------------------------
    def enter(self) -> None:
        with self._lock:
            self._sync += 1
            self.sync_total += 1

    def exit(self) -> None:
        with self._lock:
            self._sync -= 1
            if self._sync == 0:
                self._last_sync = time.monotonic()
                self._quiet_at = self._last_sync + self.hold_s
                # Only as many workers as may run next wake (to wait out the hold): waking them all
                # would have them fight for the GIL while this request's response is being sent.
                self._cond.notify(self.recent_cap)

    @contextmanager
    def sync(self) -> Any:
        self.enter()
        try:
            yield
        finally:
            self.exit()

    # --- the asynchronous side --------------------------------------------------------------------
    def allowance(self, cap: int, now: float | None = None) -> tuple[int, float]:
        """`(items async work may run at once, seconds until that may grow; 0: only a sync exit
        changes it)`. Call with the lock held or accept a racy answer."""
        sync, wait = self._sync, 0.0
        if sync == 0:
            now = time.monotonic() if now is None else now
            left = self._quiet_at - now
            if left <= 0:
                recent = self._last_sync + self.recent_s - now
                return (min(cap, self.recent_cap), recent) if recent > 0 else (cap, 0.0)
            sync, wait = 1, left
        free = self.cores - self.reserve_cores * sync
        allowed = int(cap * free / self.cores) if free > 0 else 0
        return min(allowed, self.recent_cap), wait

    def acquire(self, cap: int) -> bool:
        """Waits until one more async item may run and takes its slot; False once closed."""
        with self._lock:
            waited = False
            self._cap = cap
            while not self._closed:
                allowed, wait = self.allowance(cap)
                if self._async < allowed:
                    self._async += 1
                    self.yields_total += waited
                    return True
                waited = True
                # wait 0: only a sync exit changes the allowance (it notifies); the timeout is a net.
                self._cond.wait(wait if wait > 0 else 0.05)
            return False

    def release(self) -> None:
        with self._lock:
            self._async -= 1
            # The releasing worker takes its slot again at once; wake another only if there is room
            # for both (waking one per item to find no room would cost a thread switch per item).
            if self._async + 1 < self.allowance(self._cap)[0]:
                self._cond.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "sync_in_flight": self._sync,
                "async_in_flight": self._async,
                "sync_total": self.sync_total,
                "async_yields_total": self.yields_total,
            }


class Lane(Generic[T]):
    """The unstarted items of one job, in order, and what its items have cost so far."""

    __slots__ = ("key", "tenant", "items", "served", "cost", "not_before")

    def __init__(self, key: str, tenant: str, initial_cost: float = 0.001) -> None:
        self.key = key
        self.tenant = tenant
        self.items: deque[T] = deque()
        self.served = 0.0  # seconds of work its items were charged
        self.cost = initial_cost  # running average of an item's seconds
        self.not_before = 0.0  # monotonic time before which it is not picked (backoff)


class _Tenant:
    __slots__ = ("served", "lanes")

    def __init__(self) -> None:
        self.served = 0.0
        self.lanes: list[Lane[Any]] = []


class FairQueue(Generic[T]):
    """Start-time fair queueing of items across tenants, then across each tenant's jobs (lanes).

    Every tenant, and every lane within its tenant, is charged the seconds its items ran. The next
    item comes from the backlogged tenant charged least, and within it from the lane charged least.
    A tenant (or lane) that becomes backlogged starts level with the least-charged backlogged one,
    so idle time banks no credit: a tenant with a million queued items and one with ten share the
    workers evenly while both have work, and the small job finishes in about twice its solo time
    instead of after the big one. Costs are measured, not counted: a tenant whose items take 10 ms
    gets a tenth of the items of one whose items take 1 ms, and the same time.

    An item is charged its lane's running average cost when it is picked and corrected with its
    measured time by `charge`, so workers picking at once spread over tenants. Not thread-safe:
    the runner calls it under its own lock.
    """

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}
        self._vtime = 0.0  # charge of the tenant picked last: where a newly backlogged one starts

    def add(self, lane: Lane[T]) -> None:
        tenant = self._tenants.setdefault(lane.tenant, _Tenant())
        if lane not in tenant.lanes:
            tenant.lanes.append(lane)

    def remove(self, lane: Lane[T]) -> list[T]:
        """Forgets `lane` and returns its unstarted items."""
        tenant = self._tenants.get(lane.tenant)
        if tenant is not None and lane in tenant.lanes:
            tenant.lanes.remove(lane)
            if not tenant.lanes:
                del self._tenants[lane.tenant]
        left = list(lane.items)
        lane.items.clear()
        return left

    def push(self, lane: Lane[T], items: Iterable[T], front: bool = False) -> None:
        """Queues `items` on `lane` (added with `add`); `front`: before its other items (a retry)."""
        tenant = self._tenants[lane.tenant]
        if not lane.items:
            backlogged = [other for other in tenant.lanes if other.items]
            if not backlogged:
                others = [t.served for t in self._tenants.values() if t is not tenant and _backlogged(t)]
                tenant.served = max(tenant.served, min(others, default=self._vtime))
            lane.served = max(lane.served, min((o.served for o in backlogged), default=lane.served))
        if front:
            lane.items.extendleft(reversed(list(items)))
        else:
            lane.items.extend(items)

    def pick(
        self, runnable: Callable[[Lane[T]], bool], now: float | None = None
    ) -> tuple[Lane[T], T, float] | None:
        """`(lane, item, charged seconds)` of the next item to run, skipping lanes in backoff and
        lanes `runnable` refuses (their function has no free instance); None if nothing may run."""
        now = time.monotonic() if now is None else now
        for tenant in sorted((t for t in self._tenants.values() if _backlogged(t)), key=_served):
            for lane in sorted((ln for ln in tenant.lanes if ln.items), key=_served):
                if lane.not_before > now or not runnable(lane):
                    continue
                self._vtime = tenant.served
                estimate = lane.cost
                lane.served += estimate
                tenant.served += estimate
                return lane, lane.items.popleft(), estimate
        return None

    def charge(self, lane: Lane[T], seconds: float, estimate: float) -> None:
        """Corrects the charge of an item that ran for `seconds` (charged `estimate` at `pick`)."""
        delta = seconds - estimate
        lane.served += delta
        tenant = self._tenants.get(lane.tenant)
        if tenant is not None:
            tenant.served += delta
        lane.cost += 0.2 * (seconds - lane.cost)

    def backlog(self) -> int:
        return sum(len(ln.items) for t in self._tenants.values() for ln in t.lanes)

    def backlogged(self) -> set[str]:
        """The tenants with items waiting."""
        return {name for name, t in self._tenants.items() if _backlogged(t)}


def _backlogged(tenant: _Tenant) -> bool:
    return any(lane.items for lane in tenant.lanes)


def _served(x: _Tenant | Lane[Any]) -> float:
    return x.served
