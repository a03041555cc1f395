"""Replica processes that take connections on the gateway's port themselves (`serve
--reuseport-replicas 2`, SO_REUSEPORT), on a real server on 127.0.0.1: both processes answer
invocations, with the gateway's auth and scopes; a deploy through either reaches both; `/metrics`
from either counts the whole host; a replica that drains (SIGTERM) finishes what it has in flight
while the port keeps answering; a killed one is replaced.

Which process the kernel gives a connection is a hash of its ports: a test that needs a request on
the replica opens connections until one lands there and keeps it (a kept-alive connection stays
with its process)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import wasmtime
from prometheus_client.parser import text_string_to_metric_families

from live_server import live_server
from test_integration_scaling import SLEEP_WAT, deploy_sleep, gone, sleeps, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads: Linux"),
]

KEYS = "adm-7f3e9c51:admin,inv-2b8d4160:invoke,rd-91ce07aa:read"
ADMIN = {"authorization": "Bearer adm-7f3e9c51"}
INVOKER = {"authorization": "Bearer inv-2b8d4160"}
READER = {"authorization": "Bearer rd-91ce07aa"}
INVOKE = "/v1/functions/sleep/invoke"
TRIES = 200  # fresh connections before giving up on the kernel sending one to a given process: 2^-200


def sleep_wasm(answer: bytes) -> bytes:
    """The sleeping guest of test_integration_scaling, answering `answer` (two bytes) instead of ok."""
    assert len(answer) == 2
    return bytes(wasmtime.wat2wasm(SLEEP_WAT.replace('"ok"', f'"{answer.decode()}"')))


def snapshot(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/v1/scaling", headers=headers, timeout=5).json()
    return data


def replicas(snap: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in snap["replicas"] if r["kind"] == "reuseport"]


def pinned(url: str, replica: str, headers: dict[str, str], answered: Counter[str]) -> httpx.Client:
    """A keep-alive client whose connection the kernel gave to process `replica` and that process
    keeps (found by invoking on fresh connections; every answer is counted in `answered` by
    process). A process holding more than its share of the port's connections closes some: a test
    that keeps several connections on one process keeps as many on the other."""
    for _ in range(TRIES):
        client = httpx.Client(base_url=url, timeout=60)
        r = client.post(INVOKE, content=sleeps(0), headers=headers)
        assert r.status_code == 200, r.text
        answered[r.headers["wasminfer-replica"]] += 1
        if r.headers["wasminfer-replica"] == replica and r.headers.get("connection") != "close":
            return client
        client.close()
    raise AssertionError(f"no connection of {TRIES} went to {replica}")


def invocations_ok(url: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "wasminfer_invocations_total" and s.labels == {
                "tenant": "default",
                "function": "sleep",
                "outcome": "ok",
            }:
                return float(s.value)
    return 0.0


def test_two_processes_answer_with_the_gateways_auth_and_follow_deploys(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    args = ["--reuseport-replicas", "2", "--scaling", "replica_tick_s=0.2"]
    with live_server(tmp_path / "data", log, *args, env={"WASMINFER_API_KEYS": KEYS}) as (url, _):
        snap = snapshot(url, ADMIN)
        assert snap["serving"] == 2 and snap["min_replicas"] == snap["max_replicas"] == 2
        (replica,) = replicas(snap)
        rid = replica["id"]
        # Keys reach the replica in its environment, never on its command line (public to every user).
        assert not any("7f3e9c51" in a or "2b8d4160" in a for a in psutil.Process(replica["pid"]).cmdline())

        r = httpx.put(
            f"{url}/v1/functions/sleep?memory_mb=1&timeout_ms=60000&max_instances=8",
            content=sleep_wasm(b"ok"),
            headers={**ADMIN, "content-type": "application/wasm"},
        )
        assert r.status_code == 201, r.text

        answered: Counter[str] = Counter()
        for _ in range(TRIES):  # fresh connections: the kernel spreads them over both processes
            r = httpx.post(f"{url}{INVOKE}", content=sleeps(0), headers=INVOKER)
            assert (r.status_code, r.content) == (200, b"ok"), r.text
            timing = r.headers["server-timing"]
            assert timing.startswith("queue;dur=") and "total;dur=" in timing, timing
            who = r.headers["wasminfer-replica"]
            answered[who] += 1
            # invocation ids count per process: the replica's carry its id
            assert r.headers["x-invocation-id"].startswith(f"{rid}.") == (who == rid), r.headers
            if len(answered) == 2 and answered.total() >= 20:
                break
        assert set(answered) == {"primary", rid}, answered

        # a connection the replica accepted
        with contextlib.closing(pinned(url, rid, INVOKER, answered)) as client:
            r = client.post(INVOKE, content=sleeps(0), headers={"authorization": "Bearer wrong-key"})
            assert r.status_code == 401 and r.headers["wasminfer-replica"] == rid, r.text
            assert r.json()["error"] == {"code": "unauthorized", "message": "invalid or revoked API key"}
            r = client.post(INVOKE, content=sleeps(0))
            assert r.status_code == 401 and r.headers["wasminfer-replica"] == rid, r.text
            assert "an API key is required" in r.json()["error"]["message"]
            r = client.post(INVOKE, content=sleeps(0), headers=READER)
            assert r.status_code == 403 and r.headers["wasminfer-replica"] == rid, r.text
            assert r.json()["error"]["code"] == "forbidden" and "lacks the 'invoke' scope" in r.text
            r = client.post("/v1/functions/nope/invoke", content=b"", headers=INVOKER)
            assert (r.status_code, r.json()["error"]["code"]) == (404, "function_not_found"), r.text

            # A deploy on the replica's connection is forwarded to the gateway's process, the writer.
            r = client.put(
                "/v1/functions/sleep?memory_mb=1&timeout_ms=60000&max_instances=8",
                content=sleep_wasm(b"v2"),
                headers={**ADMIN, "content-type": "application/wasm"},
            )
            assert r.status_code == 201 and r.json()["version"] == 2, r.text
            assert r.headers["wasminfer-replica"] == "primary"
            # …and the replica runs it from the next request on (the store's change mark moved).
            r = client.post(INVOKE, content=sleeps(0), headers=INVOKER)
            assert (r.status_code, r.content, r.headers["wasminfer-replica"]) == (200, b"v2", rid), r.text
            answered[rid] += 1

        on_v2: set[str] = set()
        for _ in range(TRIES):
            r = httpx.post(f"{url}{INVOKE}", content=sleeps(0), headers=INVOKER)
            assert (r.status_code, r.content) == (200, b"v2"), r.text
            on_v2.add(r.headers["wasminfer-replica"])
            answered[r.headers["wasminfer-replica"]] += 1
            if len(on_v2) == 2:
                break
        assert on_v2 == {"primary", rid}

        # /metrics, whichever process the scrape lands on, counts every process' invocations.
        assert answered[rid] > 0
        for _ in range(4):
            assert invocations_ok(url, ADMIN) == answered.total()

        # An asynchronous invocation is a write (a job): the replica forwards it.
        with contextlib.closing(pinned(url, rid, INVOKER, answered)) as client:
            r = client.post(f"{INVOKE}?async=1", content=sleeps(0), headers=INVOKER)
            assert r.status_code == 202 and r.headers["wasminfer-replica"] == "primary", r.text
    assert "Traceback" not in log.read_text()


def busy(snap: dict[str, Any], replica: str) -> int:
    for r in snap["replicas"]:
        if r["id"] == replica:
            return int(r["functions"].get("default/sleep", {}).get("busy", 0))
    return 0


def listening(pid: int, port: int) -> bool:
    try:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in psutil.Process(pid).net_connections(kind="tcp")
        )
    except psutil.NoSuchProcess:
        return False


def test_a_draining_replica_finishes_in_flight_and_a_killed_one_is_replaced(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    args = ["--reuseport-replicas", "2", "--scaling", "replica_tick_s=0.2"]
    with live_server(tmp_path / "data", log, *args) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        deploy_sleep(url, max_instances=8)
        (old,) = replicas(snapshot(url))
        answered: Counter[str] = Counter()
        clients, others = [], []
        for _ in range(3):  # as many on each process: neither has connections to give up
            clients.append(pinned(url, old["id"], {}, answered))
            others.append(pinned(url, "primary", {}, answered))
        slow: list[httpx.Response] = []

        def call(client: httpx.Client) -> None:
            slow.append(client.post(INVOKE, content=sleeps(1500)))

        threads = [threading.Thread(target=call, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        wait_for(url, lambda s: busy(s, old["id"]) == 3, 20, "three requests running in the replica")
        os.kill(old["pid"], signal.SIGTERM)  # what the fleet's drain sends

        deadline = time.monotonic() + 10
        while listening(old["pid"], port):  # it closes its listening socket first…
            assert time.monotonic() < deadline, "the draining replica kept its listening socket"
            time.sleep(0.02)
        for _ in range(10):  # …and the kernel sends new connections to the other process
            r = httpx.post(f"{url}{INVOKE}", content=sleeps(0))
            assert (r.status_code, r.content) == (200, b"ok"), r.text
            assert r.headers["wasminfer-replica"] != old["id"]
            answered[r.headers["wasminfer-replica"]] += 1
        for t in threads:
            t.join()
        # What it had in flight is answered, each on a connection it then closes.
        assert [(r.status_code, r.content, r.headers["wasminfer-replica"]) for r in slow] == [
            (200, b"ok", old["id"])
        ] * 3
        assert [r.headers.get("connection") for r in slow] == ["close"] * 3
        answered[old["id"]] += 3
        for c in clients + others:
            c.close()

        _, snap = wait_for(
            url, lambda s: s["serving"] == 2 and [r["id"] for r in replicas(s)] not in ([], [old["id"]]), 60,
            "a replica in place of the drained one",
        )  # fmt: skip
        reasons = [d["reason"] for d in snap["decisions"] if d["scope"] == "replicas"]
        assert f"replica {old['id']} exited (status 0); its requests in flight failed" in reasons
        # The drained replica's counts stay in the host's totals.
        assert invocations_ok(url) == answered.total()

        (new,) = replicas(snap)
        os.kill(new["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not gone(new["pid"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        resets = 0
        for _ in range(10):  # the port keeps answering
            try:
                r = httpx.post(f"{url}{INVOKE}", content=sleeps(0))
            except httpx.ReadError:
                # Seen once in 5 runs of the whole suite on 2 busy cores: a connection reset right
                # after the kill (SO_REUSEPORT: a connection the kernel had given the dead socket
                # before it was gone from the port's group). A client retries; more than one is a bug.
                resets += 1
                assert resets == 1, "more than one connection reset after the replica died"
                r = httpx.post(f"{url}{INVOKE}", content=sleeps(0))
            assert (r.status_code, r.content) == (200, b"ok"), r.text
            assert r.headers["wasminfer-replica"] == "primary"
        _, snap = wait_for(
            url, lambda s: s["serving"] == 2 and [r["id"] for r in replicas(s)] not in ([], [new["id"]]), 60,
            "a replica in place of the killed one",
        )  # fmt: skip
        (third,) = replicas(snap)
        seen = set()
        for _ in range(TRIES):
            r = httpx.post(f"{url}{INVOKE}", content=sleeps(0))
            assert r.status_code == 200, r.text
            seen.add(r.headers["wasminfer-replica"])
            if len(seen) == 2:
                break
        assert seen == {"primary", third["id"]}
    assert "Traceback" not in log.read_text()


# Serial: the processes share their counts every 0.1 s, and beside other tests on a loaded machine
# the count a close is decided on lags further behind the connections (closes past the bound seen once).
@pytest.mark.serial
def test_kept_alive_connections_piled_on_one_process_even_out(tmp_path: Path) -> None:
    """Six connections kept on the gateway's process, none on the replica (as the kernel's hash may
    leave a load generator's): the fuller process closes its surplus after a response, the clients
    reconnect, and the port's connections end up three and three."""
    log = tmp_path / "server.log"
    args = ["--reuseport-replicas", "2", "--scaling", "replica_tick_s=0.2"]
    with live_server(tmp_path / "data", log, *args) as (url, _):
        deploy_sleep(url, max_instances=8)
        (replica,) = replicas(snapshot(url))
        answered: Counter[str] = Counter()
        clients = [pinned(url, "primary", {}, answered) for _ in range(6)]
        closes: Counter[str] = Counter()
        # Where each client's connection was last answered, and whether that answer closed it. A
        # client answered elsewhere with no close before is a connection the server dropped idle
        # (uvicorn's keep-alive timeout, passed while the other clients were being pinned on a
        # loaded machine): it moved too, by the kernel's hash, with no close to count.
        last = ["primary"] * len(clients)
        reopened = [False] * len(clients)
        dropped_idle = 0
        rounds = 0
        try:
            while True:  # a round: one request on every connection
                rounds += 1
                spread: Counter[str] = Counter()
                closed = 0
                for i, client in enumerate(clients):
                    r = client.post(INVOKE, content=sleeps(0))
                    assert (r.status_code, r.content) == (200, b"ok"), r.text
                    who = r.headers["wasminfer-replica"]
                    spread[who] += 1
                    if who != last[i] and not reopened[i]:
                        dropped_idle += 1
                    last[i], reopened[i] = who, r.headers.get("connection") == "close"
                    if reopened[i]:
                        closes[who] += 1
                        closed += 1
                if spread == {"primary": 3, replica["id"]: 3} and not closed:
                    break
                assert rounds < 3000, f"still {dict(spread)} after {rounds} rounds; closed {dict(closes)}"
        finally:
            for client in clients:
                client.close()
        # Three had to move, each by a close on the gateway's process (or dropped idle); a spread
        # already even closes nothing, so the closes stop once it is (a reconnection lands by hash:
        # a few more than 3).
        assert closes["primary"] + dropped_idle >= 3, (closes, dropped_idle)
        assert closes["primary"] >= 1, closes
        assert closes.total() < 60, closes
    assert "Traceback" not in log.read_text()
