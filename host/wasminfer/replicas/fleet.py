"""`Fleet`: the host replicas behind one gateway — routing, admission, draining, and the replica
autoscaler that grows and shrinks them.

Routing: least outstanding requests by the power of two choices (two replicas drawn at random, the
one with fewer requests in flight wins), where a replica that does not hold the function loaded yet
counts `cold_penalty` requests more (the gateway's own process holds every function; a worker holds
what was routed or warmed to it), and one a hop away `hop_penalty` more (at low load the gateway's
own process serves everything: a tie sent half the requests of one client over the hop, doubling
its p50 latency). The request carries the function's deployment digest, so a
replica with a stale copy reloads it from the store first.

Admission, fast and before any work: a function's manifest `max_concurrency` bounds its requests in
flight across the fleet (the rest wait in FIFO order up to `max_queue`, then 429); each replica
takes at most its threads plus `host_max_queue` requests *of each tenant* (past that on every
replica: 429 for that tenant only, so one tenant's flood never fills a host's queue for the others).
Inside a host the threads are shared fairly between tenants (`replicas.fairness.FairLimiter`) and
the pool bounds each function again (`max_instances`, `max_queue`). Every 429 says `Retry-After`.

Replicas that take their own connections (`replicas.reuseport`) are never routed to: the fleet
starts, watches, drains and stops them, and reads the load they report.

Draining: a replica leaving is taken out of the routing first, then stopped once the requests it
has are answered; so is every replica when the fleet closes (after the gateway's graceful shutdown
finished what was in flight). Everything here runs on the gateway's event loop: picking a replica
and counting the request on it happen with no `await` between, so a replica is never stopped with
a request on its way to it.

Over 500 lines and one concept, the replica set: routing, admission, draining and the autoscaler
all read and change the same replicas and counts, with no `await` between a read and its change;
split, each part would reach into the others' private state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any

import anyio

from wasminfer.digests import deployment_digest
from wasminfer.errors import MemoryQuotaExceeded, NotDelivered, TooManyRequests, Unavailable, WasminferError
from wasminfer.manifest import Manifest
from wasminfer.replicas.base import Replica, ReplicaBackend, WarmSpec
from wasminfer.replicas.fairness import FairLimiter
from wasminfer.replicas.follow import StoreFollower
from wasminfer.replicas.inline import InlinePolicy
from wasminfer.replicas.inprocess import InProcessBackend
from wasminfer.replicas.instances import InstanceController, instance_stats
from wasminfer.runtime import InvokeResult, OutputStream
from wasminfer.scaling import MONOTONIC, Clock, DecisionLog, ReplicaAutoscaler, ReplicaLoad, ScalingConfig
from wasminfer.service import Platform

log = logging.getLogger("wasminfer.scaling")

Key = tuple[str, str]  # (tenant, function)


class _Gate:
    """A function's `max_concurrency` across the fleet, with a FIFO queue of `max_queue`."""

    __slots__ = ("active", "waiters")

    def __init__(self) -> None:
        self.active = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, name: str, m: Manifest) -> None:
        if self.active < m.max_concurrency and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= m.max_queue:
            raise TooManyRequests(
                f"function {name!r}: {self.active} requests in flight (manifest key 'max_concurrency' "
                f"{m.max_concurrency}) and {len(self.waiters)} queued ('max_queue' {m.max_queue})"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), m.timeout_ms / 1000)
        except TimeoutError:
            if waiter.done():  # handed over just as the wait ended: it is ours
                return
            waiter.cancel()
            self.waiters.remove(waiter)
            raise TooManyRequests(
                f"function {name!r}: no slot within its timeout of {m.timeout_ms} ms (manifest key "
                f"'max_concurrency' {m.max_concurrency})"
            ) from None
        except asyncio.CancelledError:  # the client went away
            if waiter.done():
                self.release()
            else:
                waiter.cancel()
                self.waiters.remove(waiter)
            raise

    def try_acquire(self, m: Manifest) -> bool:
        """A slot if one is free and nobody is queued for one (no waiting, no refusal)."""
        if self.active < m.max_concurrency and not self.waiters:
            self.active += 1
            return True
        return False

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next in line: `active` stays
                return
        self.active -= 1


class Fleet:
    """The replicas behind a gateway. `start()` and `aclose()` run on the gateway's event loop."""

    def __init__(
        self,
        platform: Platform,
        config: ScalingConfig | None = None,
        *,
        backend: ReplicaBackend | None = None,
        limiter: FairLimiter | None = None,
        threads: int = 64,
        clock: Clock = MONOTONIC,
        inline: InlinePolicy | None = None,
        follow_store: bool = False,
    ) -> None:
        """`backend` makes the replicas beyond the gateway's own process (default: `LocalBackend`,
        or `RayBackend` for `config.backend` "ray", when `config.max_replicas` allows any);
        `limiter` bounds the gateway's own worker threads; `inline` says which of the gateway's own
        invocations run on its event loop (default: none). `follow_store`: a replica process that
        takes its own connections (`replicas.follow`)."""
        self.platform = platform
        self.config = config = config or ScalingConfig()
        self.decisions = DecisionLog()
        self.instances = InstanceController(platform, config.instance_policy(), self.decisions, "primary")
        self._primary: InProcessBackend | None = None
        extra = config.max_replicas - (1 if config.primary_replica else 0)
        if backend is None and extra > 0 and config.backend == "ray":
            from wasminfer.replicas.ray_backend import RayBackend  # imports Ray only when it is used

            backend = RayBackend(platform, config, threads=threads)
        elif backend is None and extra > 0:
            from wasminfer.replicas.local import LocalBackend

            backend = LocalBackend(platform.data_dir, config, threads=threads)
        self.backend = backend
        self.autoscaler = ReplicaAutoscaler(config.replica_policy(), clock)
        self.replicas: list[Replica] = []  # every replica: starting, serving, draining
        self._serving: list[Replica] = []  # the ones requests go to (replaced, never mutated)
        self._gates: dict[Key, _Gate] = {}
        self._waits_us: list[float] = []  # queueing delays of this tick's requests
        self._in_flight_s = 0.0  # the time this tick's requests took, summed: / tick = concurrency
        self._tick_at = time.monotonic()
        self._hot: collections.Counter[Key] = collections.Counter()  # this tick's requests per function
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self.last_load = ReplicaLoad(0)
        self.rejected: collections.Counter[str] = collections.Counter()  # 429s by reason
        self.inline = inline or InlinePolicy("never")
        self.follower = StoreFollower(platform) if follow_store else None
        #: Set once `min_replicas` serve (or a start failed): until then the server is not ready.
        self.filled = False
        if config.primary_replica:  # serves from the start, even before `start()` (no I/O to make)
            self._primary = InProcessBackend(
                platform,
                limiter or FairLimiter(threads),
                self.instances,
                host_max_queue=config.host_max_queue,
                inline=self.inline,
            )
            self._serve(self._primary.replica())

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the instance autoscaler, the primary replica and the control loop (which starts
        the other `min_replicas`)."""
        self.instances.start()
        self._loop_task = asyncio.create_task(self._control_loop(), name="wasminfer-replicas")

    async def aclose(self) -> None:
        """Stops scaling, drains every replica (waits for what is in flight) and stops them."""
        if self._closed:
            return
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._serving = []
        await asyncio.gather(*(self._stop(r) for r in list(self.replicas)), return_exceptions=True)
        if self.backend is not None:
            await self.backend.aclose()
        await anyio.to_thread.run_sync(self.instances.close)

    # --- requests -----------------------------------------------------------------------------------
    async def invoke(self, tenant: str, name: str, body: bytes, content_type: str) -> InvokeResult:
        """Runs one invocation on a replica. Raises what `Platform.invoke` raises; `TooManyRequests`
        past admission; `Unavailable` with no replica serving, or one lost with the request."""
        if self.follower is not None:
            await self.follower.follow(tenant, name)
        fn = self.platform.deployed(name, tenant=tenant)
        m = fn.manifest
        key = (tenant, name)
        if not m.max_concurrency:
            return await self._route(key, fn, body, content_type)
        gate = self._gate(key)
        try:
            await gate.acquire(name, m)
        except TooManyRequests:
            self.rejected["max_concurrency"] += 1
            raise
        try:
            return await self._route(key, fn, body, content_type)
        finally:
            gate.release()

    async def stream(self, tenant: str, name: str, body: bytes, content_type: str,
                     stream: OutputStream) -> InvokeResult:
        """Runs one invocation whose parts go to `stream` as the guest writes them. Streams run on
        the gateway's own replica (a part cannot cross a replica's hop as it comes), under the same
        admission as `invoke`. Raises what `invoke` raises; `Unavailable` without an own replica."""
        primary = self._primary
        if primary is None:
            raise Unavailable("streamed invocations run on the gateway's own replica, which this server "
                              "does not have (scaling key 'primary_replica'); invoke without streaming")
        fn = self.platform.deployed(name, tenant=tenant)
        m = fn.manifest
        gate: _Gate | None = None
        if m.max_concurrency:
            gate = self._gate((tenant, name))
            try:
                await gate.acquire(name, m)
            except TooManyRequests:
                self.rejected["max_concurrency"] += 1
                raise
        replica = primary.replica()
        if replica.tenants[tenant] >= replica.capacity:
            if gate is not None:
                gate.release()
            raise self._host_full()
        self._enter(replica, tenant)
        try:
            return await primary.stream(tenant, name, body, content_type, stream)
        finally:
            self._leave(replica, tenant)
            if gate is not None:
                gate.release()

    def invoke_now(self, tenant: str, name: str, body: bytes, content_type: str) -> InvokeResult | None:
        """`invoke` run to its end on the calling thread, the event loop's, without waiting for
        anything (the express lane, `gateway.express`): when the gateway's own replica is the only
        one requests go to, this process' copy of the function is current, its `max_concurrency`
        has a slot free with nobody queued, the tenant is under the replica's capacity, and the
        inline policy runs the function inline. Otherwise None, having done nothing: `invoke`
        then decides (it queues, refuses or routes). Counted as `invoke` counts. Raises what
        `invoke` raises once the invocation runs."""
        primary = self._primary
        serving = self._serving
        if primary is None or len(serving) != 1:
            return None
        replica = serving[0]
        if replica.backend is not primary or replica.tenants.get(tenant, 0) >= replica.capacity:
            return None
        if self.follower is not None and not self.follower.fresh(tenant, name):
            return None
        try:
            fn = self.platform.deployed(name, tenant=tenant)
        except WasminferError:  # (no such function, the store still loading): `invoke` raises it
            return None
        m = fn.manifest
        key = (tenant, name)
        gate: _Gate | None = None
        if m.max_concurrency:
            gate = self._gate(key)
            if not gate.try_acquire(m):
                return None
        self._enter(replica, tenant)
        started = time.perf_counter()
        try:
            result = primary.route_now(tenant, name, body, content_type, fn)
        except TooManyRequests as exc:
            self._refused(exc, started)
            raise
        finally:
            self._leave(replica, tenant)
            if gate is not None:
                gate.release()
        if result is not None:
            self._routed(key, replica, started, result)
        return result

    async def _route(self, key: Key, fn: Any, body: bytes, content_type: str) -> InvokeResult:
        tenant, name = key
        tried: Replica | None = None
        while True:
            replica = self._pick(key, tried)
            self._enter(replica, tenant)
            started = time.perf_counter()
            try:
                deployment = "" if replica.holds_all else deployment_digest(fn)
                result = await replica.backend.route(replica, tenant, name, deployment, body, content_type)
            except NotDelivered:
                # (`replica` may have left the serving list meanwhile: a lost one that had the request)
                if tried is not None or not any(r is not replica for r in self._serving):
                    raise
                tried = replica  # it never got the request: once more, elsewhere
                continue
            except TooManyRequests as exc:
                self._refused(exc, started)
                raise
            finally:
                self._leave(replica, tenant)
            self._routed(key, replica, started, result)
            return result

    def _gate(self, key: Key) -> _Gate:
        """The `max_concurrency` gate of function `key`, made at its first use."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        return gate

    @staticmethod
    def _enter(replica: Replica, tenant: str) -> None:
        replica.outstanding += 1
        tenants = replica.tenants  # (dict.get: a Counter's missing key is a Python `__missing__`)
        tenants[tenant] = tenants.get(tenant, 0) + 1

    @staticmethod
    def _leave(replica: Replica, tenant: str) -> None:
        replica.outstanding -= 1
        tenants = replica.tenants
        left = tenants[tenant] - 1
        if left:
            tenants[tenant] = left
        else:
            tenants.pop(tenant)  # (dict.pop: Counter's own __delitem__ is Python)

    def _refused(self, exc: TooManyRequests, started: float) -> None:
        """Counts a 429 of an invocation started at `started` as a wait of a saturated host, unless
        it is a tenant at its own memory quota: no saturation of the host (another replica would
        only hand it a fresh budget)."""
        if not isinstance(exc, MemoryQuotaExceeded):
            self._waits_us.append((time.perf_counter() - started) * 1e6)

    def _routed(self, key: Key, replica: Replica, started: float, result: InvokeResult) -> None:
        """Counts an invocation `replica` answered, started at `started` (`time.perf_counter()`)."""
        elapsed_us = (time.perf_counter() - started) * 1e6
        self._in_flight_s += elapsed_us / 1e6
        # Everything but running: thread hand-off, waiting for an instance, the hop to a replica.
        self._waits_us.append(max(0.0, elapsed_us - result.run_us - result.start_us))
        self._hot[key] += 1
        if not replica.holds_all:
            replica.warm.add(key)

    def _pick(self, key: Key, avoid: Replica | None = None) -> Replica:
        tenant = key[0]
        serving = self._serving
        n = len(serving)
        if n == 1 and avoid is None:
            only = serving[0]
            if only.tenants.get(tenant, 0) < only.capacity:
                return only
            raise self._host_full()
        if avoid is not None:
            serving = [r for r in serving if r is not avoid]
            n = len(serving)
        if n == 0:
            raise Unavailable("no host replica is serving yet; retry")
        if n == 1:
            a = b = serving[0]
        else:
            i = random.randrange(n)
            j = random.randrange(n - 1)
            a, b = serving[i], serving[j + (j >= i)]
        cold, hop = self.config.cold_penalty, self.config.hop_penalty
        score_a = a.outstanding + (0 if a.holds(key) else cold) + (0 if a.local else hop)
        score_b = b.outstanding + (0 if b.holds(key) else cold) + (0 if b.local else hop)
        first, second = (a, b) if score_a <= score_b else (b, a)
        if first.tenants[tenant] < first.capacity:
            return first
        if second.tenants[tenant] < second.capacity:
            return second
        for r in serving:
            if r.tenants[tenant] < r.capacity:
                return r
        raise self._host_full()

    def _host_full(self) -> TooManyRequests:
        self.rejected["host_queue"] += 1
        return TooManyRequests(
            "your requests are at their limit on every host replica (its worker threads plus the host "
            f"queue, per tenant; scaling key 'host_max_queue' {self.config.host_max_queue}); retry"
        )

    # --- the replica autoscaler ---------------------------------------------------------------------
    async def _control_loop(self) -> None:
        tick = self.config.replica_tick_s
        while True:
            await asyncio.sleep(tick)
            try:
                await self.tick()
            except Exception:  # a bug must not stop scaling for good
                log.exception("replica autoscaler tick failed")

    async def tick(self) -> None:
        """One round: read every replica, feed the autoscaler, act on its decision."""
        waits, self._waits_us = self._waits_us, []
        hot, self._hot = self._hot, collections.Counter()
        in_flight_s, self._in_flight_s = self._in_flight_s, 0.0
        now = time.monotonic()
        elapsed, self._tick_at = now - self._tick_at, now
        for replica in list(self.replicas):
            if replica.state in ("serving", "draining"):
                replica.stats = await replica.backend.stats(replica)
                if not replica.stats.alive:
                    self._lost(replica)
        serving = [r for r in self.replicas if r.state == "serving"]
        cpu = sum(r.stats.cpu for r in serving) / len(serving) if serving else 0.0
        # Replicas taking their own connections report their load; the worst process' delay counts.
        own = [r.stats for r in serving if r.accepts]
        load = ReplicaLoad(
            replicas=len(serving),
            starting=self._starting,
            queue_ms=max([_p90(waits) / 1000, *(st.queue_ms for st in own)]),
            cpu=cpu,
            requests=len(waits) + sum(st.requests for st in own),
            concurrency=(in_flight_s / elapsed if elapsed > 0 else 0.0) + sum(st.concurrency for st in own),
        )
        self.last_load = load
        if self._closed or not self.platform.ready:
            return
        decision = self.autoscaler.observe(load)
        if decision.delta > 0 and self.backend is not None:
            n = len(serving)
            # Below the minimum (at start, after a loss) every missing replica starts at once.
            for i in range(max(1, self.config.min_replicas - n - self._starting)):
                self._starting += 1
                self.decisions.record("replicas", "replicas", n + i, n + i + 1, decision.reason)
                self._spawn(self._add(self._warm_specs(hot)))
        elif decision.delta < 0:
            victims = [r for r in serving if not r.holds_all]
            if victims:
                victim = max(victims, key=lambda r: r.created_at)  # the newest goes first
                n = len(serving)
                self.decisions.record(
                    "replicas", "replicas", n, n - 1, f"{decision.reason}; draining {victim.id}"
                )
                self._spawn(self._drain(victim))

    def _warm_specs(self, hot: collections.Counter[Key]) -> list[WarmSpec]:
        specs: list[WarmSpec] = []
        for (tenant, name), _ in hot.most_common(self.config.warm_functions):
            try:
                specs.append((tenant, name, deployment_digest(self.platform.deployed(name, tenant=tenant))))
            except WasminferError:
                continue  # deleted meanwhile
        if not specs and self.backend is not None and self.backend.takes_connections:  # any function may come
            hosts = self.platform.hosts().items()
            specs = [(t, fn.name, deployment_digest(fn)) for t, h in hosts for fn in h.functions()]
            specs = specs[: self.config.warm_functions]
        return specs

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("replica task failed", exc_info=task.exception())

    async def _add(self, warm: list[WarmSpec]) -> None:
        assert self.backend is not None
        try:
            replica = await self.backend.start(warm)
        except Exception as exc:
            message = exc.message if isinstance(exc, WasminferError) else repr(exc)
            log.error("could not start a replica: %s", message)
            self.filled = True  # readiness waits for the replicas that start, not forever
            n = self._count_serving()
            self.decisions.record(
                "replicas", "replicas", n + 1, n, f"the new replica failed to start: {message}"
            )
            return
        finally:
            self._starting -= 1
        if self._closed:
            await self._stop(replica)
            return
        self._serve(replica)

    def _serve(self, replica: Replica) -> None:
        replica.state = "serving"
        replica.serving_at = time.time()
        self.replicas.append(replica)
        if not replica.accepts:  # (one that takes its own connections is never routed to)
            self._serving = [*self._serving, replica]
        self.filled = self.filled or self._count_serving() >= self.config.min_replicas
        self.autoscaler.reset()

    def _count_serving(self) -> int:
        return sum(r.state == "serving" for r in self.replicas)
    async def _drain(self, replica: Replica) -> None:
        replica.state = "draining"
        self._serving = [r for r in self._serving if r is not replica]
        while replica.outstanding:
            await asyncio.sleep(0.01)
        await self._stop(replica)

    async def _stop(self, replica: Replica) -> None:
        replica.state = "draining"
        while replica.outstanding:
            await asyncio.sleep(0.01)
        try:
            await replica.backend.stop(replica)
        finally:
            replica.state = "stopped"
            if replica in self.replicas:
                self.replicas.remove(replica)

    def _lost(self, replica: Replica) -> None:
        n = self._count_serving()
        self._serving = [r for r in self._serving if r is not replica]
        if replica in self.replicas:
            self.replicas.remove(replica)
        replica.state = "stopped"
        self.decisions.record(
            "replicas",
            "replicas",
            n,
            self._count_serving(),
            f"replica {replica.id} exited (status {replica.stats.exit_code}); its requests in flight failed",
        )
        self._spawn(replica.backend.stop(replica))

    async def counters(self) -> list[list[Any]]:
        """Invocation counters of the replicas that count their own (`ReplicaBackend.counters`)."""
        return [] if self.backend is None else await self.backend.counters()

    # --- what /v1/scaling shows ---------------------------------------------------------------------
    def snapshot(self, tenant: str | None = None) -> dict[str, Any]:
        """Replicas with their instances per function, the last tick's load, recent decisions;
        with `tenant`, only that tenant's functions and instance decisions."""

        def mine(subject: str) -> bool:
            return tenant is None or subject.startswith(f"{tenant}/")

        def functions(r: Replica) -> dict[str, Any]:
            # this process' own pools are read now; other replicas' as of the last tick
            return instance_stats(self.platform, self.instances) if r.holds_all else r.stats.functions

        replicas = []
        decisions = [d.to_dict() for d in self.decisions.recent()]
        for r in self.replicas:
            replicas.append(
                {
                    "id": r.id,
                    "kind": r.kind,
                    "state": r.state,
                    "pid": r.pid,
                    "outstanding": r.outstanding,
                    "cpu": round(r.stats.cpu, 3),
                    "created_at": round(r.created_at, 3),
                    "serving_at": None if r.serving_at is None else round(r.serving_at, 3),
                    "functions": {k: v for k, v in functions(r).items() if mine(k)},
                }
            )
            decisions += r.stats.decisions
        load = self.last_load
        return {
            "serving": self._count_serving(),
            "starting": self._starting,
            "min_replicas": self.config.min_replicas,
            "max_replicas": self.config.max_replicas,
            "backend": None if self.backend is None else self.backend.kind,
            "replicas": replicas,
            "load": {
                "queue_ms_p90": round(load.queue_ms, 3),
                "in_flight": round(load.concurrency, 3),
                "cpu": round(load.cpu, 3),
                "requests": load.requests,
            },
            "rejected": dict(self.rejected),
            "inline": self.inline.stats(tenant),
            "decisions": sorted(
                (d for d in decisions if d["scope"] == "replicas" or mine(d["subject"])),
                key=lambda d: d["at"],
            )[-100:],
        }


def _p90(values: list[float]) -> float:
    if not values:
        return 0.0
    values.sort()
    return values[min(len(values) - 1, int(0.9 * len(values)))]
