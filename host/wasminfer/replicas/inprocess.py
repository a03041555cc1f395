"""The in-process backend: the gateway's own `Platform` as replica `primary` (no hop at all).

It holds every deployed function warm (a deploy prewarms it here first), so the router never needs
to send it a deployment digest. Its invocations run on the gateway's worker threads, shared fairly
between tenants (`FairLimiter`), or, for functions whose invocations are short, on the event loop
itself (`InlinePolicy`) when the tenant could take one of those threads: the shares stay what they
count.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psutil

from wasminfer.replicas.base import Replica, ReplicaBackend, ReplicaStats, WarmSpec
from wasminfer.replicas.fairness import FairLimiter
from wasminfer.replicas.inline import InlinePolicy
from wasminfer.replicas.instances import InstanceController, instance_stats
from wasminfer.runtime import InvokeResult, OutputStream, blocked_ns
from wasminfer.service import Platform


class _Cost:
    """What an invocation on a worker thread cost, for `InlinePolicy.observe`."""

    __slots__ = ("measure", "ran", "cpu_us", "blocked_us")

    def __init__(self, measure: bool) -> None:
        self.measure = measure  # read the thread's CPU time (`InlinePolicy.measures`)
        self.ran = False
        self.cpu_us: float | None = None
        self.blocked_us = 0.0


class InProcessBackend(ReplicaBackend):
    kind = "in-process"

    def __init__(
        self,
        platform: Platform,
        limiter: FairLimiter,
        instances: InstanceController | None = None,
        *,
        host_max_queue: int = 256,
        inline: InlinePolicy | None = None,
    ) -> None:
        """`inline`: which invocations run on the event loop (default: none)."""
        self.platform = platform
        self.limiter = limiter
        self.instances = instances
        self.inline = inline or InlinePolicy("never")
        self.host_max_queue = host_max_queue
        self._process = psutil.Process()
        self._replica: Replica | None = None

    async def start(self, warm: Sequence[WarmSpec] = ()) -> Replica:
        return self.replica()

    def replica(self) -> Replica:
        """The one replica of this backend (made at the first call; no I/O)."""
        if self._replica is not None:
            return self._replica
        self._process.cpu_percent(None)  # the first reading only starts the measurement
        self._replica = Replica(
            "primary",
            self,
            pid=self._process.pid,
            capacity=self.limiter.total + self.host_max_queue,
            holds_all=True,
            local=True,
        )
        return self._replica

    async def stop(self, replica: Replica) -> None:
        """Nothing to stop: the gateway's owner closes the platform."""

    async def route(
        self, replica: Replica, tenant: str, name: str, deployment: str, body: bytes, content_type: str
    ) -> InvokeResult:
        fn = self.platform.deployed(name, tenant=tenant)
        result = self.route_now(tenant, name, body, content_type, fn)
        if result is not None:
            return result
        key = (tenant, name)
        inline = self.inline
        cost = _Cost(inline.measures(key))  # a thread's CPU clock is a system call: not every time
        try:
            return await self.limiter.run_sync(tenant, self._invoke, tenant, name, body, content_type, cost)
        finally:
            if cost.ran:
                inline.observe(key, fn, cost.cpu_us, blocked_us=cost.blocked_us)

    def route_now(
        self, tenant: str, name: str, body: bytes, content_type: str, fn: Any
    ) -> InvokeResult | None:
        """The invocation run inline, on the calling thread (the event loop's), when the inline policy
        says so and the tenant could take a thread of its share now (`FairLimiter.may_run`: nothing
        else runs on the loop until it returns, so it takes none); None, having done nothing, when
        it runs on a worker thread instead (`route`). Raises what `Platform.invoke` raises. `fn`:
        the function's `DeployedFunction`."""
        key = (tenant, name)
        inline = self.inline
        if not inline.decide(key, fn) or not self.limiter.may_run(tenant):
            return None
        measure = inline.measures(key)  # a thread's CPU clock is a system call: not every time
        inline.inline_total += 1
        started, blocked = time.perf_counter(), blocked_ns()
        cpu = time.thread_time() if measure else 0.0
        try:
            return self.platform.invoke(name, body, content_type, tenant=tenant)
        finally:
            inline.observe(
                key, fn, (time.thread_time() - cpu) * 1e6 if measure else None,
                (time.perf_counter() - started) * 1e6, (blocked_ns() - blocked) / 1e3,
            )

    def _invoke(
        self, tenant: str, name: str, body: bytes, content_type: str, cost: _Cost
    ) -> InvokeResult:
        # The thread's CPU time: its wall time would count every other thread's turn at the GIL.
        blocked = blocked_ns()
        started = time.thread_time() if cost.measure else 0.0
        try:
            return self.platform.invoke(name, body, content_type, tenant=tenant)
        finally:
            if cost.measure:
                cost.cpu_us = (time.thread_time() - started) * 1e6
            cost.blocked_us = (blocked_ns() - blocked) / 1e3
            cost.ran = True

    async def stream(self, tenant: str, name: str, body: bytes, content_type: str,
                     stream: OutputStream) -> InvokeResult:
        """`route` with the guest's parts going to `stream` as they come (see `Host.invoke`): always
        on a thread (a stream lasts as long as its guest)."""
        return await self.limiter.run_sync(tenant, self._stream, tenant, name, body, content_type, stream)

    def _stream(self, tenant: str, name: str, body: bytes, content_type: str,
                stream: OutputStream) -> InvokeResult:
        return self.platform.invoke(name, body, content_type, tenant=tenant, stream=stream)

    async def stats(self, replica: Replica) -> ReplicaStats:
        return ReplicaStats(
            cpu=self._process.cpu_percent(None) / 100,
            functions=instance_stats(self.platform, self.instances),
            decisions=[],  # the primary's instance decisions are in the fleet's own log
        )
