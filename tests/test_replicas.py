"""Host replicas: the fleet's routing, admission and draining over a fake backend; the instance
controller over a real platform; replicas learning of deploys from the store; a real worker process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import pytest

from wasminfer.errors import (
    FunctionNotFound,
    GuestError,
    InvocationCancelled,
    NotDelivered,
    Timeout,
    TooManyRequests,
    Unavailable,
)
from wasminfer.manifest import Manifest
from wasminfer.replicas import (
    Fleet,
    InstanceController,
    LocalBackend,
    Replica,
    ReplicaBackend,
    ReplicaStats,
    WarmSpec,
)
from wasminfer.runtime import InvokeResult
from wasminfer.scaling import DecisionLog, FakeClock, InstancePolicy, ScalingConfig
from wasminfer.service import Platform, deployment_digest

T = TypeVar("T")
MANIFEST = Manifest(models=("add",), memory_mb=4, timeout_ms=2000, max_instances=8)


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


@pytest.fixture
def platform(tmp_path: Path, add_model: bytes, hostile_wasm: bytes) -> Iterator[Platform]:
    p = Platform(tmp_path / "data")
    p.start()
    p.put_model("add", add_model)
    p.put_function("hostile", hostile_wasm, MANIFEST)
    yield p
    p.close()


class FakeBackend(ReplicaBackend):
    """Replicas that answer after `delay_s` (echoing the body), as told."""

    kind = "fake"

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.count = 0
        self.started: list[tuple[str, list[WarmSpec]]] = []
        self.stopped: list[tuple[str, int]] = []  # (id, outstanding when stopped)
        self.routed: list[tuple[str, str]] = []  # (replica, deployment)
        self.delay_s = 0.0
        self.hold: asyncio.Event | None = None
        self.undeliverable: set[str] = set()
        self.dead: set[str] = set()
        self.cpu = 0.0

    async def start(self, warm: Sequence[WarmSpec] = ()) -> Replica:
        self.count += 1
        replica = Replica(f"fake-{self.count}", self, capacity=self.capacity)
        replica.warm.update((t, n) for t, n, _ in warm)
        self.started.append((replica.id, list(warm)))
        return replica

    async def stop(self, replica: Replica) -> None:
        self.stopped.append((replica.id, replica.outstanding))

    async def route(
        self, replica: Replica, tenant: str, name: str, deployment: str, body: bytes, content_type: str
    ) -> InvokeResult:
        if replica.id in self.undeliverable:
            raise NotDelivered(f"{replica.id} is unreachable")
        self.routed.append((replica.id, deployment))
        if self.hold is not None:
            await self.hold.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return InvokeResult(body, content_type, 0.0, 0.0, 5.0, 0.0, False, replica.id)

    async def stats(self, replica: Replica) -> ReplicaStats:
        return ReplicaStats(alive=replica.id not in self.dead, cpu=self.cpu, exit_code=9)


def waiting(fleet: Fleet, name: str) -> int:
    """Requests of function `name` queued at its `max_concurrency` gate."""
    gate = fleet._gates.get(("default", name))
    return 0 if gate is None else len(gate.waiters)


def fleet_of(platform: Platform, backend: FakeBackend, **config: Any) -> Fleet:
    """A fleet of no replica of its own (add them with `add_replicas`), up to 4."""
    options = {"primary_replica": False, "min_replicas": 1, "max_replicas": 4, **config}
    fleet = Fleet(platform, ScalingConfig.from_mapping(options), backend=backend)
    return fleet


async def settle(condition: Callable[[], bool], what: str) -> None:
    """Lets the event loop run until `condition` holds: the tests wait on the fleet's state, never
    on a duration (the bound only keeps a broken fleet from hanging the suite)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.001)


async def add_replicas(fleet: Fleet, backend: FakeBackend, n: int) -> list[Replica]:
    replicas = [await backend.start() for _ in range(n)]
    for r in replicas:
        fleet._serve(r)
    return replicas


# --- routing -------------------------------------------------------------------------------------------
def test_least_outstanding_by_two_choices(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend)
        a, b = await add_replicas(fleet, backend, 2)
        a.warm.add(("default", "hostile"))
        b.warm.add(("default", "hostile"))
        a.outstanding = 5  # busy elsewhere
        for _ in range(20):
            await fleet.invoke("default", "hostile", b"eping", "text/plain")
        assert {rid for rid, _ in backend.routed} == {b.id}
        a.outstanding = 0
        backend.hold = asyncio.Event()
        tasks = [asyncio.create_task(fleet.invoke("default", "hostile", b"e", "t")) for _ in range(10)]
        await settle(lambda: a.outstanding + b.outstanding == 10, "ten requests in flight")
        assert (a.outstanding, b.outstanding) == (5, 5)  # concurrent requests spread evenly
        backend.hold.set()
        await asyncio.gather(*tasks)
        assert a.outstanding == b.outstanding == 0

    run(main)


def test_a_replica_holding_the_function_is_preferred_and_gets_the_digest(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend, cold_penalty=4)
        warm, cold = await add_replicas(fleet, backend, 2)
        warm.warm.add(("default", "hostile"))
        warm.outstanding = 3  # still better than a cold start (3 < 0 + 4)
        await fleet.invoke("default", "hostile", b"e", "t")
        digest = deployment_digest(platform.deployed("hostile"))
        assert backend.routed == [(warm.id, digest)]
        warm.outstanding = 5  # now the cold one wins, and holds the function from then on
        await fleet.invoke("default", "hostile", b"e", "t")
        assert backend.routed[-1][0] == cold.id and ("default", "hostile") in cold.warm

    run(main)


def test_at_low_load_the_gateways_own_process_serves(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend, hop_penalty=1)
        here, there = await add_replicas(fleet, backend, 2)
        here.local = True
        here.warm.add(("default", "hostile"))
        there.warm.add(("default", "hostile"))
        for _ in range(20):  # one client: never over the hop
            await fleet.invoke("default", "hostile", b"e", "t")
        assert {rid for rid, _ in backend.routed} == {here.id}
        here.outstanding = 2  # busier by more than the hop: the other replica takes it
        await fleet.invoke("default", "hostile", b"e", "t")
        assert backend.routed[-1][0] == there.id

    run(main)


def test_unknown_function_is_not_routed(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend)
        await add_replicas(fleet, backend, 1)
        with pytest.raises(FunctionNotFound):
            await fleet.invoke("default", "nope", b"", "t")
        assert backend.routed == []

    run(main)


def test_an_unreachable_replica_is_skipped_once(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend)
        a, b = await add_replicas(fleet, backend, 2)
        backend.undeliverable.add(a.id)
        for _ in range(10):
            assert (await fleet.invoke("default", "hostile", b"e", "t")).invocation_id == b.id
        backend.undeliverable.add(b.id)
        with pytest.raises(Unavailable):
            await fleet.invoke("default", "hostile", b"e", "t")
        assert a.outstanding == b.outstanding == 0

    run(main)


def test_primary_replica_serves_in_process_with_no_digest(platform: Platform) -> None:
    async def main() -> None:
        fleet = Fleet(platform)  # the default: the gateway's own process only, no backend
        assert fleet.backend is None and [r.id for r in fleet.replicas] == ["primary"]
        result = await fleet.invoke("default", "hostile", b"ehello", "text/plain")
        assert result.body == b"ehello" and result.content_type == "text/plain"
        with pytest.raises(GuestError, match="bad things happened"):
            await fleet.invoke("default", "hostile", b"s", "t")
        await fleet.aclose()

    run(main)


# --- admission ------------------------------------------------------------------------------------------
def test_max_concurrency_queues_then_rejects_with_retry_after(
    platform: Platform, hostile_wasm: bytes
) -> None:
    platform.put_function(
        "limited", hostile_wasm, MANIFEST.replace(max_concurrency=2, max_queue=1, timeout_ms=5000)
    )

    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend)
        await add_replicas(fleet, backend, 2)
        backend.hold = asyncio.Event()
        running = [asyncio.create_task(fleet.invoke("default", "limited", b"e", "t")) for _ in range(3)]
        await settle(lambda: waiting(fleet, "limited") == 1, "the third request queued")
        assert len(backend.routed) == 2  # the third waits its turn in the function's queue
        with pytest.raises(TooManyRequests, match="max_concurrency") as info:
            await fleet.invoke("default", "limited", b"e", "t")
        assert info.value.retry_after_s >= 1 and fleet.rejected["max_concurrency"] == 1
        # other functions are not held back by it
        backend.hold.set()
        await asyncio.gather(*running)
        assert len(backend.routed) == 3
        gate = fleet._gates[("default", "limited")]
        assert gate.active == 0 and not gate.waiters

    run(main)


def test_a_client_that_goes_away_while_queued_frees_its_place(
    platform: Platform, hostile_wasm: bytes
) -> None:
    platform.put_function("one", hostile_wasm, MANIFEST.replace(max_concurrency=1, max_queue=4))

    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend)
        await add_replicas(fleet, backend, 1)
        backend.hold = asyncio.Event()
        first = asyncio.create_task(fleet.invoke("default", "one", b"e", "t"))
        queued = asyncio.create_task(fleet.invoke("default", "one", b"e", "t"))
        await settle(lambda: len(backend.routed) == 1 and waiting(fleet, "one") == 1, "one runs, one waits")
        queued.cancel()
        await settle(queued.done, "the cancelled request gone")
        assert waiting(fleet, "one") == 0 and len(backend.routed) == 1
        backend.hold.set()
        await first
        await fleet.invoke("default", "one", b"e", "t")  # the slot came back
        gate = fleet._gates[("default", "one")]
        assert gate.active == 0 and not gate.waiters

    run(main)


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_every_host_at_its_limit_is_a_fast_429(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend(capacity=2)
        fleet = fleet_of(platform, backend)
        await add_replicas(fleet, backend, 2)
        backend.hold = asyncio.Event()
        held = [asyncio.create_task(fleet.invoke("default", "hostile", b"e", "t")) for _ in range(4)]
        await settle(lambda: len(backend.routed) == 4, "both replicas at their capacity")
        started = time.perf_counter()
        with pytest.raises(TooManyRequests, match="host_max_queue"):
            await fleet.invoke("default", "hostile", b"e", "t")
        assert time.perf_counter() - started < 0.05
        backend.hold.set()
        await asyncio.gather(*held)
        assert fleet.rejected["host_queue"] == 1

    run(main)


# --- the replica autoscaler loop, draining -------------------------------------------------------------
def test_saturation_adds_a_warmed_replica_and_calm_drains_it_without_losing_requests(
    platform: Platform,
) -> None:
    options = {
        "primary_replica": False, "min_replicas": 1, "max_replicas": 2, "replica_tick_s": 1.0,
        "replica_up_window_s": 2.0,
        "replica_down_window_s": 3.0, "replica_up_queue_ms": 10.0, "replica_down_queue_ms": 2.0,
    }  # fmt: skip

    async def main() -> None:
        clock = FakeClock()
        backend = FakeBackend()
        fleet = Fleet(platform, ScalingConfig.from_mapping(options), backend=backend, clock=clock)
        (first,) = await add_replicas(fleet, backend, 1)

        async def tick(load: int) -> None:
            await asyncio.gather(*(fleet.invoke("default", "hostile", b"e", "t") for _ in range(load)))
            clock.advance(1.0)
            await fleet.tick()
            await settle(lambda: fleet._starting == 0, "the replica it decided to start, started")

        backend.delay_s = 0.015  # every request waits 15 ms: over the 10 ms threshold
        await tick(8)
        assert len(backend.started) == 1  # only the one made above
        await tick(8)  # the 2 s window is full of saturation
        assert len(backend.started) == 2
        rid, warm = backend.started[1]
        assert warm == [("default", "hostile", deployment_digest(platform.deployed("hostile")))]
        assert [r.id for r in fleet._serving] == [first.id, rid]
        up = fleet.decisions.recent()[-1]
        assert (up.scope, up.before, up.after) == ("replicas", 1, 2) and "saturated" in up.reason

        # calm now, but a request is in flight on the new replica when it is chosen to drain
        backend.delay_s = 0.0
        new = fleet._serving[1]
        backend.hold = asyncio.Event()
        first.outstanding += 100  # steer the next request to the new replica
        in_flight = asyncio.create_task(fleet.invoke("default", "hostile", b"elate", "t"))
        await settle(lambda: new.outstanding == 1, "the request on the new replica")
        first.outstanding -= 100
        assert new.outstanding == 1
        for _ in range(3):
            clock.advance(1.0)
            await fleet.tick()
        await settle(lambda: new.state == "draining", "the new replica draining")
        assert new not in fleet._serving and backend.stopped == []
        backend.hold.set()
        assert (await in_flight).body == b"elate"  # finished where it ran
        await settle(lambda: new.state == "stopped", "the drained replica stopped")
        assert backend.stopped == [(rid, 0)]
        down = fleet.decisions.recent()[-1]
        assert (down.before, down.after) == (2, 1) and f"draining {rid}" in down.reason
        snap = fleet.snapshot("default")
        assert snap["serving"] == 1 and [r["id"] for r in snap["replicas"]] == [first.id]
        await fleet.aclose()

    run(main)


def test_a_replica_that_dies_is_dropped_and_replaced_up_to_min(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        clock = FakeClock()
        fleet = Fleet(
            platform,
            ScalingConfig.from_mapping({"primary_replica": False, "min_replicas": 1, "max_replicas": 2}),
            backend=backend,
            clock=clock,
        )
        await fleet.tick()  # below min_replicas: starts one
        await settle(lambda: fleet._starting == 0, "the first replica started")
        assert [r.id for r in fleet._serving] == ["fake-1"]
        backend.dead.add("fake-1")
        await fleet.tick()
        await settle(lambda: fleet._starting == 0, "the replacement started")
        assert [r.id for r in fleet._serving] == ["fake-2"]
        reasons = [d.reason for d in fleet.decisions.recent()]
        assert any("fake-1 exited" in r for r in reasons)
        await fleet.aclose()
        assert [rid for rid, _ in backend.stopped] == ["fake-1", "fake-2"]

    run(main)


def test_close_drains_every_replica(platform: Platform) -> None:
    async def main() -> None:
        backend = FakeBackend()
        fleet = fleet_of(platform, backend)
        a, b = await add_replicas(fleet, backend, 2)
        backend.hold = asyncio.Event()
        flying = [asyncio.create_task(fleet.invoke("default", "hostile", b"e", "t")) for _ in range(4)]
        await settle(lambda: a.outstanding + b.outstanding == 4, "four requests in flight")
        closing = asyncio.create_task(fleet.aclose())
        # Both replicas out of the routing and draining: each waits for its requests in flight.
        await settle(lambda: a.state == b.state == "draining" and not fleet._serving, "both draining")
        assert backend.stopped == [] and not closing.done()
        backend.hold.set()
        await closing
        assert all(r.body == b"e" for r in await asyncio.gather(*flying))
        assert sorted(backend.stopped) == [(a.id, 0), (b.id, 0)]

    run(main)


# --- the instance controller -----------------------------------------------------------------------
def test_instance_controller_prewarms_ahead_of_demand_and_reaps_down_to_min(
    platform: Platform, hostile_wasm: bytes
) -> None:
    platform.put_function(
        "elastic", hostile_wasm, MANIFEST.replace(min_instances=1, idle_timeout_s=0, max_instances=16)
    )
    pool = platform.host().function("elastic").pool
    clock = FakeClock()
    decisions = DecisionLog()
    policy = InstancePolicy(tick_s=1.0, stable_window_s=4.0, panic_window_s=2.0)
    controller = InstanceController(platform, policy, decisions, "primary", clock)
    held = [pool.acquire(1.0)[0] for _ in range(4)]  # 4 requests in flight for the whole tick
    controller.tick()  # starts tracking
    time.sleep(0.05)  # the demand integral runs on the real clock
    clock.advance(1.0)
    controller.tick()
    stats = pool.stats()
    assert (stats["live"], stats["idle"]) == (6, 2)  # ceil(4 / 0.7) = 6: headroom, pre-warmed
    up = [d for d in decisions.recent() if d.subject == "default/elastic@primary"][-1]
    assert (up.before, up.after) == (4, 6) and "4.00 concurrent" in up.reason and "pre-warmed 2" in up.reason
    for inst in held:
        pool.release(inst, True)
    for _ in range(30):  # idle: the stable window empties, panic ends, the reaper takes them
        clock.advance(1.0)
        controller.tick()
    assert pool.stats()["live"] == 1  # min_instances
    assert "reaped" in decisions.recent()[-1].reason
    assert controller.snapshot()[("default", "elastic")]["desired"] == 1


def test_scale_to_zero_keeps_the_module_and_models(platform: Platform, hostile_wasm: bytes) -> None:
    platform.put_function("zero", hostile_wasm, MANIFEST.replace(idle_timeout_s=0))
    clock = FakeClock()
    controller = InstanceController(platform, InstancePolicy(1.0, 2.0, 1.0), DecisionLog(), clock=clock)
    for _ in range(4):
        controller.tick()
        clock.advance(1.0)
    assert platform.host().function("zero").pool.stats()["live"] == 0
    assert platform.invoke("zero", b"eback").body == b"eback"  # instantiated in microseconds
    assert "add" in platform.host().models


# --- replicas learn of deploys from the store ------------------------------------------------------
def test_a_replica_platform_syncs_to_the_digest_it_is_sent(
    tmp_path: Path, platform: Platform, hostile_wasm: bytes, add_model: bytes
) -> None:
    replica = Platform(platform.data_dir)
    replica.start(load=False)
    try:
        digest = deployment_digest(platform.deployed("hostile"))
        replica.sync("hostile", digest)
        assert deployment_digest(replica.deployed("hostile")) == digest
        assert replica.invoke("hostile", b"eone").body == b"eone"
        # a new manifest: a new digest; the replica reloads only what changed
        platform.put_function("hostile", hostile_wasm, MANIFEST.replace(max_instances=3))
        new = deployment_digest(platform.deployed("hostile"))
        assert new != digest
        replica.sync("hostile", new)
        assert replica.deployed("hostile").manifest.max_instances == 3
        assert deployment_digest(replica.deployed("hostile")) == new
        # the same model name with other weights: the digest changes too
        import onnx

        model = onnx.load_from_string(add_model)
        model.doc_string = "v2"
        platform.put_model("add", model.SerializeToString())
        newer = deployment_digest(platform.deployed("hostile"))
        assert newer != new
        replica.sync("hostile", newer)
        assert deployment_digest(replica.deployed("hostile")) == newer
        platform.delete_function("hostile")
        with pytest.raises(FunctionNotFound):
            replica.sync("hostile", "anything-else")
    finally:
        replica.close()


# --- a real worker process --------------------------------------------------------------------------
@pytest.mark.slow
def test_local_backend_runs_a_worker_process(platform: Platform, hostile_wasm: bytes) -> None:
    # The loop holds the worker's one instance for 3 s: the window in which the second request must
    # find it busy (300 ms was narrower than a stats round trip to the worker on a loaded machine).
    platform.put_function(
        "busy", hostile_wasm, MANIFEST.replace(max_instances=1, max_queue=0, timeout_ms=3000)
    )

    async def main() -> None:
        backend = LocalBackend(platform.data_dir, ScalingConfig(max_replicas=2), threads=4)
        digest = deployment_digest(platform.deployed("hostile"))
        replica = await backend.start([("default", "hostile", digest)])
        try:
            assert replica.pid and ("default", "hostile") in replica.warm
            stats = await backend.stats(replica)
            assert stats.alive and stats.functions["default/hostile"]["live"] >= 1  # warmed before use
            result = await backend.route(replica, "default", "hostile", digest, b"ehi", "text/plain")
            assert result.body == b"ehi" and result.content_type == "text/plain" and result.run_us > 0
            assert result.invocation_id.startswith(f"{replica.id}.")
            with pytest.raises(GuestError, match="bad things happened") as info:
                await backend.route(replica, "default", "hostile", digest, b"s", "t")
            assert info.value.status == 500 and info.value.code == "guest_error"
            # a function it has never seen: loaded from the store by its digest
            busy = deployment_digest(platform.deployed("busy"))
            slow = asyncio.create_task(backend.route(replica, "default", "busy", busy, b"l", "t"))
            # Synchronise on the worker's state, not on a sleep: its one instance is busy with the loop.
            deadline = time.monotonic() + 30
            while (await backend.stats(replica)).functions.get("default/busy", {}).get("busy") != 1:
                assert time.monotonic() < deadline and not slow.done(), "the loop never started in the worker"
                await asyncio.sleep(0.01)
            with pytest.raises(TooManyRequests) as busy_error:
                await backend.route(replica, "default", "busy", busy, b"e", "t")
            assert busy_error.value.retry_after_s >= 1
            with pytest.raises(Timeout, match="timeout_ms"):
                await slow
            many = await asyncio.gather(
                *(backend.route(replica, "default", "hostile", digest, b"e%d" % i, "t") for i in range(20))
            )
            assert [r.body for r in many] == [b"e%d" % i for i in range(20)]
        finally:
            await backend.stop(replica)
            await backend.aclose()
        assert replica.handle.process.returncode == 0  # a graceful exit on SIGTERM
        assert not (await backend.stats(replica)).alive

    run(main)


@pytest.mark.slow
def test_a_request_that_cannot_reach_a_dead_worker_goes_once_more_elsewhere(
    platform: Platform, hostile_wasm: bytes
) -> None:
    """`NotDelivered`: the worker's socket refuses the connection, so the request certainly never
    ran there, and the fleet sends it to another replica (before its next tick notices the death)."""
    # The loop holds the primary until the function is deleted (which cancels it): the worker stays
    # the less busy replica however long the steps below take.
    platform.put_function("slow", hostile_wasm, MANIFEST.replace(timeout_ms=60_000))

    async def main() -> None:
        backend = LocalBackend(platform.data_dir, ScalingConfig(max_replicas=2), threads=4)
        # The gateway's own process (primary) and one worker; no hop penalty, so a worker holding
        # the function wins over a primary with a request in flight.
        fleet = Fleet(
            platform, ScalingConfig.from_mapping({"max_replicas": 2, "hop_penalty": 0}), backend=backend
        )
        digest = deployment_digest(platform.deployed("hostile"))
        worker = await backend.start([("default", "hostile", digest)])
        fleet._serve(worker)
        try:
            (primary,) = (r for r in fleet.replicas if r.holds_all)
            looping = asyncio.create_task(fleet.invoke("default", "slow", b"l", "t"))  # on the primary
            await settle(lambda: primary.outstanding == 1, "the loop in flight on the primary")
            assert worker.outstanding == 0

            os.kill(worker.pid, signal.SIGKILL)
            await anyio.to_thread.run_sync(worker.handle.process.wait)
            # The kept-alive connection of its warm-up sees the end of stream, as the gateway's
            # event loop would have seen it by the next request.
            await settle(lambda: all(reader.at_eof() for reader, _ in worker.handle.http._idle),
                         "the end of stream on the worker's idle connection")
            with pytest.raises(NotDelivered, match=f"cannot connect to {worker.id}") as info:
                await backend.route(worker, "default", "hostile", digest, b"e", "t")
            assert (info.value.status, info.value.code) == (503, "not_delivered")

            result = await fleet.invoke("default", "hostile", b"ehi", "text/plain")
            assert result.body == b"ehi" and not result.invocation_id.startswith(worker.id)
            assert worker in fleet._serving  # not noticed yet: it was tried first, then skipped
            platform.delete_function("slow")
            with pytest.raises(InvocationCancelled):
                await looping
        finally:
            await fleet.aclose()

    run(main)


# --- through the gateway ----------------------------------------------------------------------------
def test_scaling_route_shows_the_callers_functions_and_metrics_count_429s(
    platform: Platform, hostile_wasm: bytes
) -> None:
    from starlette.testclient import TestClient

    from wasminfer.gateway import create_app

    platform.put_function("other", hostile_wasm, Manifest(memory_mb=4), tenant="acme")
    platform.put_function(
        "one", hostile_wasm, MANIFEST.replace(max_concurrency=1, max_queue=0, timeout_ms=60_000)
    )
    with TestClient(create_app(platform), raise_server_exceptions=False) as client:
        snap = client.get("/v1/scaling").json()
        assert snap["serving"] == 1 and snap["backend"] is None
        (primary,) = snap["replicas"]
        assert primary["id"] == "primary" and primary["kind"] == "in-process"
        assert set(primary["functions"]) == {"default/hostile", "default/one"}  # not acme's
        assert primary["functions"]["default/hostile"]["live"] >= 1

        import threading

        # The loop holds the function's one slot until the function is deleted (which cancels it):
        # however slow the machine, the second request finds the slot taken.
        slow: list[Any] = []
        looping = threading.Thread(
            target=lambda: slow.append(client.post("/v1/functions/one/invoke", content=b"l"))
        )
        looping.start()
        deadline = time.monotonic() + 30
        while platform.host().function("one").pool.stats()["busy"] == 0:
            assert time.monotonic() < deadline, "the loop never took the instance"
            time.sleep(0.005)
        r = client.post("/v1/functions/one/invoke", content=b"e")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "max_concurrency" in r.json()["error"]["message"]
        assert client.delete("/v1/functions/one").status_code == 204
        looping.join(30)
        assert [(r.status_code, r.json()["error"]["code"]) for r in slow] == [(503, "invocation_cancelled")]
        metrics = client.get("/metrics").text
        assert 'wasminfer_admission_rejected_total{limit="max_concurrency"} 1.0' in metrics
        assert 'wasminfer_replicas{state="serving"} 1.0' in metrics
