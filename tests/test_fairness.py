"""Fairness between tenants: the invocation threads, the admin threads and the job workers are
shared so that one tenant's flood or stuck calls leave the others their share.

`FairLimiter` is driven with calls that block on a `threading.Event` (they hold their thread until
the test lets them go); the gateway and the job runner with a real guest that sleeps through WASI
`poll_oneoff` (tests/guests/sleep.wat). Every wait is on state (what the limiter says each tenant
holds), never on time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import wasmtime
from starlette.testclient import TestClient

from wasminfer.gateway import Settings, create_app
from wasminfer.jobs import JobSettings
from wasminfer.replicas import FairLimiter
from wasminfer.service import Platform, parse_keys
from wasminfer.shares import default_reserve, tenant_cap

GUESTS = Path(__file__).resolve().parent / "guests"
WASM = {"content-type": "application/wasm"}
A = {"authorization": "Bearer key-a"}
B = {"authorization": "Bearer key-b"}


def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.002)


def sleep_body(ms: int) -> bytes:
    return ms.to_bytes(4, "little")


# --- the rule ---------------------------------------------------------------------------------------
def test_a_tenant_alone_may_hold_all_but_the_reserve() -> None:
    assert default_reserve(64) == 8 and default_reserve(8) == 1 and default_reserve(2) == 1
    assert default_reserve(1) == 0  # one slot cannot be split: the tenant may have it
    assert tenant_cap(64, 1, 4, 8) == 56
    assert tenant_cap(1, 1, 1, 0) == 1


def test_with_others_active_each_tenant_gets_its_share_of_the_contended_slots() -> None:
    assert tenant_cap(64, 2, 4, 8) == 2
    assert tenant_cap(64, 3, 4, 8) == 1  # never under one
    assert tenant_cap(8, 2, 8, 1) == 4
    assert tenant_cap(4, 2, 100, 1) == 2  # `contended` above `total` counts as `total`
    with pytest.raises(ValueError, match="total must be at least 1"):
        tenant_cap(0, 1, 1, 0)


# --- FairLimiter ------------------------------------------------------------------------------------
class Blocked:
    """Calls run through a `FairLimiter` that hold their thread until `release` is set."""

    def __init__(self, limiter: FairLimiter) -> None:
        self.limiter = limiter
        self.release = threading.Event()
        self.done: list[str] = []

    def call(self, tenant: str, block: bool = True) -> asyncio.Task[None]:
        async def run() -> None:
            await self.limiter.run_sync(tenant, self._body, block)
            self.done.append(tenant)

        return asyncio.get_running_loop().create_task(run())

    def _body(self, block: bool) -> None:
        if block:
            assert self.release.wait(30), "never released"

    def held(self, tenant: str) -> tuple[int, int]:
        t = self.limiter.stats()["tenants"]
        assert isinstance(t, dict)
        entry = t.get(tenant, {"held": 0, "waiting": 0})
        return entry["held"], entry["waiting"]


async def settle(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.001)


def test_stuck_calls_of_one_tenant_leave_another_a_thread() -> None:
    async def main() -> None:
        calls = Blocked(FairLimiter(8))
        stuck = [calls.call("a") for _ in range(10)]
        await settle(lambda: calls.held("a") == (7, 3), "a holds all but the reserve, 3 wait")
        await calls.call("b", block=False)  # runs on the reserved thread while a's are stuck
        assert calls.done == ["b"] and calls.held("a") == (7, 3)
        calls.release.set()
        await asyncio.gather(*stuck)
        assert calls.done.count("a") == 10

    asyncio.run(main())


def test_a_tenant_alone_gets_every_thread_but_the_reserve_obeyed() -> None:
    async def main() -> None:
        calls = Blocked(FairLimiter(8))
        tasks = [calls.call("a") for _ in range(7)]
        await settle(lambda: calls.held("a") == (7, 0), "a holds 7 of 8, none waits")
        calls.release.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_flooding_tenant_is_held_to_its_share_while_another_is_active() -> None:
    async def main() -> None:
        calls = Blocked(FairLimiter(8, contended=4))
        b = calls.call("b")
        await settle(lambda: calls.held("b") == (1, 0), "b holds one")
        flood = [calls.call("a") for _ in range(5)]
        # two tenants active: each may hold 4 // 2 = 2, though 7 threads are free
        await settle(lambda: calls.held("a") == (2, 3), "a holds its share, the rest waits")
        more_b = calls.call("b")
        await settle(lambda: calls.held("b") == (2, 0), "b takes its second thread at once")
        calls.release.set()
        await asyncio.gather(b, more_b, *flood)
        assert sorted(calls.done) == ["a"] * 5 + ["b"] * 2

    asyncio.run(main())


def test_a_freed_thread_goes_to_the_tenant_holding_fewest() -> None:
    async def main() -> None:
        limiter = FairLimiter(2, contended=2, reserve=0)
        first, second = threading.Event(), threading.Event()
        done: list[str] = []

        async def call(tenant: str, until_set: threading.Event) -> None:
            await limiter.run_sync(tenant, until_set.wait, 30)
            done.append(tenant)

        def held(tenant: str) -> tuple[int, int]:
            entry = limiter.stats()["tenants"].get(tenant, {"held": 0, "waiting": 0})  # type: ignore[attr-defined]
            return entry["held"], entry["waiting"]

        loop = asyncio.get_running_loop()
        a1, a2 = loop.create_task(call("a", first)), loop.create_task(call("a", second))
        await settle(lambda: held("a") == (2, 0), "a holds both (alone)")
        a3, b1 = loop.create_task(call("a", second)), loop.create_task(call("b", second))
        await settle(lambda: held("a")[1] == 1 and held("b")[1] == 1, "one call of each waits")
        first.set()  # a's first call ends: its thread goes to b, who holds none, though a asked first
        await a1
        await settle(lambda: held("b") == (1, 0), "b got the freed thread")
        assert held("a") == (1, 1) and done == ["a"]
        second.set()
        await asyncio.gather(a2, a3, b1)
        assert sorted(done) == ["a", "a", "a", "b"]

    asyncio.run(main())


def test_a_caller_that_goes_away_while_waiting_gives_its_place_back() -> None:
    async def main() -> None:
        calls = Blocked(FairLimiter(2, reserve=0))
        held = [calls.call("a"), calls.call("a")]
        await settle(lambda: calls.held("a") == (2, 0), "a holds both")
        gone = calls.call("a")
        await settle(lambda: calls.held("a") == (2, 1), "one waits")
        gone.cancel()
        await settle(lambda: calls.held("a") == (2, 0), "the cancelled waiter left the queue")
        calls.release.set()
        await asyncio.gather(*held)
        assert calls.limiter.stats()["in_use"] == 0 and calls.limiter.stats()["waiting"] == 0

    asyncio.run(main())


# --- through the gateway: a real guest asleep in poll_oneoff --------------------------------------
@pytest.fixture(scope="module")
def sleep_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm((GUESTS / "sleep.wat").read_text()))


@pytest.fixture
def two_tenants(tmp_path: Path, sleep_wasm: bytes, hostile_wasm: bytes) -> Iterator[tuple[TestClient, Any]]:
    keys = parse_keys("key-a:admin+invoke:acme,key-b:admin+invoke:globex")
    platform = Platform(tmp_path / "data", keys=keys)
    app = create_app(
        platform,
        Settings(invoke_threads=4, admin_threads=2),
        job_settings=JobSettings(workers=2, chunk_items=4, poll_s=0.05),
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            until(lambda: c.get("/readyz").status_code == 200, "ready")
            query = "memory_mb=1&timeout_ms=60000"
            r = c.put(f"/v1/functions/nap?{query}", content=sleep_wasm, headers={**WASM, **A})
            assert r.status_code == 201, r.text
            r = c.put("/v1/functions/echo?memory_mb=4", content=hostile_wasm, headers={**WASM, **B})
            assert r.status_code == 201, r.text
            yield c, c.app.state.wasminfer  # type: ignore[attr-defined]
    finally:
        platform.close()


def test_sleeping_guests_of_one_tenant_leave_another_tenants_invoke_a_thread(
    two_tenants: tuple[TestClient, Any],
) -> None:
    c, state = two_tenants
    limiter: FairLimiter = state.invoke_limiter
    results: list[int] = []

    def held(tenant: str) -> Any:
        return limiter.stats()["tenants"].get(tenant)  # type: ignore[attr-defined]

    def nap(ms: int) -> None:
        results.append(c.post("/v1/functions/nap/invoke", content=sleep_body(ms), headers=A).status_code)

    # Tenant acme alone may hold 3 of the 4 threads; a 4th call of it waits.
    sleepers = [threading.Thread(target=nap, args=(4000,)) for _ in range(3)]
    sleepers.append(threading.Thread(target=nap, args=(1,)))
    for t in sleepers[:3]:
        t.start()
    until(lambda: held("acme") == {"held": 3, "waiting": 0}, "acme holds 3 threads")
    sleepers[3].start()
    until(lambda: held("acme") == {"held": 3, "waiting": 1}, "acme's 4th call waits")
    r = c.post("/v1/functions/echo/invoke", content=b"e-from-globex", headers=B)
    assert (r.status_code, r.content) == (200, b"e-from-globex")
    # globex passed while acme still held its share and had a call waiting behind it
    assert held("acme") == {"held": 3, "waiting": 1}
    for t in sleepers:
        t.join(60)
    assert results == [200] * 4


def test_sleeping_async_items_of_one_tenant_leave_another_tenants_job_a_worker(
    two_tenants: tuple[TestClient, Any],
) -> None:
    c, state = two_tenants
    runner = state.jobs.runner
    batch = cbor2.dumps([sleep_body(4000)] * 2)
    r = c.post("/v1/functions/nap/batch", content=batch, headers={"content-type": "application/cbor", **A})
    assert r.status_code == 202, r.text
    big = r.json()
    # Alone, acme may hold 1 of the 2 workers: the other stays free for another tenant (without the
    # cap both would sleep, and globex's job would wait for them).
    until(lambda: runner.stats()["items_in_flight"] == 1, "one of acme's items sleeps")
    r = c.post("/v1/functions/echo/invoke?async=1", content=b"e-later", headers=B)
    assert r.status_code == 202, r.text
    location = r.json()["location"]
    until(lambda: c.get(location, headers=B).json()["status"] == "succeeded", "globex's job is done")
    assert c.get(f"{location}/result", headers=B).content == b"e-later"
    # ...while acme's batch is still asleep on its one worker
    view = c.get(big["location"], headers=A).json()
    assert view["status"] == "running" and view["items"]["done"] == 0, view
