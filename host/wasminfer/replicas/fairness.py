"""`FairLimiter`: worker threads shared between tenants, each tenant with its own queue.

A plain capacity limiter is one FIFO: 64 stuck calls of one tenant take every thread, and a flood
of one tenant puts hundreds of its requests in front of another tenant's. Here each tenant waits in
its own queue, holds at most `wasminfer.shares.tenant_cap` threads (all but a reserve when it is
alone, its share of the `contended` threads when others are active), and a freed thread goes to the
waiting tenant that holds the fewest. A tenant counts as active while it holds or waits for a
thread, and for `recent_s` after its last call: a client that sends its next request as soon as the
last one is answered is never seen as gone, so the flood stays at its share between its requests.

Everything runs on the event loop (no lock): `acquire` and `release` never `await` between reading
and changing the counts.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from wasminfer.shares import default_reserve, tenant_cap

T = TypeVar("T")


class _Tenant:
    __slots__ = ("held", "waiters", "seen")

    def __init__(self, now: float) -> None:
        self.held = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.seen = now  # when it last asked for or gave back a thread


class FairLimiter:
    """`total` worker threads shared fairly between tenants (see the module doc)."""

    def __init__(
        self,
        total: int,
        *,
        contended: int | None = None,
        reserve: int | None = None,
        recent_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`contended` (default `total`): the threads shared out when more than one tenant is
        active; `reserve` (default an eighth): what a tenant alone leaves free. Raises
        `ValueError` for a `total` under 1."""
        if total < 1:
            raise ValueError("FairLimiter: total must be at least 1")
        self.total = total
        self.contended = min(total, contended or total)
        self.reserve = default_reserve(total) if reserve is None else min(reserve, total - 1)
        self.recent_s = recent_s
        self._clock = clock
        self._threads = anyio.CapacityLimiter(total)  # never contended: this class admits ≤ total
        self._tenants: dict[str, _Tenant] = {}
        self._in_use = 0
        self._waiting = 0
        self._timer: asyncio.TimerHandle | None = None
        self.waits_total = 0  # acquisitions that had to queue
        self._alone_cap = tenant_cap(total, 1, self.contended, self.reserve)

    @property
    def total_tokens(self) -> int:
        return self.total

    async def run_sync(self, tenant: str, func: Callable[..., T], *args: object) -> T:
        """Runs `func(*args)` on a worker thread once `tenant` may have one. Raises what `func`
        raises."""
        if not self.try_acquire(tenant):
            await self._wait(tenant)
        try:
            return await anyio.to_thread.run_sync(functools.partial(func, *args), limiter=self._threads)
        finally:
            self.release(tenant)

    def try_acquire(self, tenant: str) -> bool:
        """Takes a thread for `tenant` if it may have one now without waiting (nobody of its own
        waits before it); False otherwise, and nothing changed but the tenant's last-seen time."""
        t = self._may_run(tenant)
        if t is None:
            return False
        t.held += 1
        self._in_use += 1
        return True

    def may_run(self, tenant: str) -> bool:
        """Whether `tenant` could take a thread now (`try_acquire`'s test, which marks it active),
        without taking one: for a call that runs to its end on the event loop before anything
        else moves (an inline invocation), so that nobody could see the thread held."""
        return self._may_run(tenant) is not None

    def _may_run(self, tenant: str) -> _Tenant | None:
        now = self._clock()
        tenants = self._tenants
        t = tenants.get(tenant)
        if t is None:
            t = tenants[tenant] = _Tenant(now)
        t.seen = now
        if t.waiters or self._in_use >= self.total:
            return None
        # A tenant alone (the usual case) has the cap of one: no pass over the tenants for it.
        cap = self._alone_cap if len(tenants) == 1 else self._cap(now)
        return t if t.held < cap else None

    async def acquire(self, tenant: str) -> None:
        """Waits until `tenant` may hold one more thread, and takes it."""
        if not self.try_acquire(tenant):
            await self._wait(tenant)

    async def _wait(self, tenant: str) -> None:
        t = self._tenants[tenant]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        t.waiters.append(waiter)
        self._waiting += 1
        self.waits_total += 1
        self._dispatch()  # a reserved thread may be free for it right now
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(tenant)  # handed a thread just as its caller went away
            elif waiter in t.waiters:
                t.waiters.remove(waiter)
                self._waiting -= 1
            raise

    def release(self, tenant: str) -> None:
        """Gives back a thread `tenant` held and hands it to whoever should have it next."""
        t = self._tenants[tenant]
        t.held -= 1
        self._in_use -= 1
        t.seen = self._clock()
        if self._waiting:
            self._dispatch()

    def _cap(self, now: float) -> int:
        """What one tenant may hold now (the same for all); forgets tenants gone quiet."""
        active, quiet = 0, []
        for name, t in self._tenants.items():
            if t.held or t.waiters or now - t.seen < self.recent_s:
                active += 1
            else:
                quiet.append(name)
        for name in quiet:
            del self._tenants[name]
        return tenant_cap(self.total, active, self.contended, self.reserve)

    def _dispatch(self) -> None:
        now = self._clock()
        while self._waiting and self._in_use < self.total:
            cap = self._cap(now)
            best: _Tenant | None = None
            for t in self._tenants.values():
                if t.waiters and t.held < cap and (best is None or t.held < best.held):
                    best = t
            if best is None:
                break
            waiter = best.waiters.popleft()
            self._waiting -= 1
            if waiter.done():  # its caller went away: it removes nothing now
                continue
            best.held += 1
            self._in_use += 1
            waiter.set_result(None)
        if self._waiting and self._in_use < self.total:
            # Held back by a share only: a quiet tenant's `recent_s` ending raises the share.
            ends = [t.seen + self.recent_s for t in self._tenants.values() if not (t.held or t.waiters)]
            if ends and self._timer is None:
                delay = max(0.0, min(ends) - now) + 1e-3
                self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def stats(self) -> dict[str, object]:
        """Threads in use, callers waiting, and per tenant what it holds and how many of it wait."""
        return {
            "threads": self.total,
            "in_use": self._in_use,
            "waiting": self._waiting,
            "waits_total": self.waits_total,
            "tenants": {n: {"held": t.held, "waiting": len(t.waiters)} for n, t in self._tenants.items()},
        }
