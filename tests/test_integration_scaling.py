"""Hybrid scaling on a real server: `wasminfer serve --max-replicas 2` on 127.0.0.1, with small
windows. A load step makes the instances rise first and then a second replica (a process taking
connections on the same port) start, and the kept-alive clients spread over both; when the load
stops the fleet drains back to one replica; not one request fails. With `primary_replica=false`
(every invocation forwarded to worker processes): SIGTERM of the server finishes every invocation
in flight, also those forwarded to a worker; a worker killed with a request in flight fails it with
a 503 and is replaced; workers exit when their gateway dies. (tests/test_reuseport.py: replicas on
the port in detail.)"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import wasmtime

from live_server import live_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
WASM = {"content-type": "application/wasm"}


# A guest that sleeps for the milliseconds its body holds (u32 LE; WASI poll_oneoff on the monotonic
# clock), then answers "ok": a request of a known length that takes no CPU, so the timings of these
# tests do not depend on what else the machine runs.
SLEEP_WAT = r"""
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (data (i32.const 32) "text/plain")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param $c i32) (param $cl i32) (result i32)
    ;; one clock subscription at 256: userdata 0, tag 0 (clock), id 1 (monotonic), timeout in ns
    (i64.store (i32.const 256) (i64.const 0))
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.mul (i64.extend_i32_u (i32.load (local.get $b))) (i64.const 1000000)))
    (i64.store (i32.const 288) (i64.const 0))
    (i32.store16 (i32.const 296) (i32.const 0))
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
    (drop (call $output (i32.const 16) (i32.const 2) (i32.const 32) (i32.const 10)))
    (i32.const 0)))
"""


SCALING = {
    "replica_tick_s": 0.25,
    "replica_up_window_s": 1.0,
    "replica_down_window_s": 2.0,
    "replica_up_queue_ms": 5,
    "replica_up_cpu": 5,  # CPU is not what this test saturates (the queue is)
    "instance_tick_s": 0.25,
    "instance_stable_window_s": 2,
    "instance_panic_window_s": 0.5,
}


@contextmanager
def server(data: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with live_server(data, log, *args) as running:
        yield running


def deploy_sleep(url: str, **manifest: int) -> None:
    wasm = bytes(wasmtime.wat2wasm(SLEEP_WAT))
    query = "&".join(f"{k}={v}" for k, v in {"memory_mb": 1, "timeout_ms": 60000, **manifest}.items())
    r = httpx.put(
        f"{url}/v1/functions/sleep?{query}", content=wasm, headers={"content-type": "application/wasm"}
    )
    assert r.status_code == 201, r.text


def sleeps(ms: int) -> bytes:
    return struct.pack("<I", ms)


class Load:
    """`concurrency` clients invoking in a loop, each on its own keep-alive connection."""

    def __init__(self, url: str, body: bytes, concurrency: int) -> None:
        self.url, self.body = url, body
        self.ok = 0
        self.failed: list[str] = []
        self.invocations: list[str] = []  # x-invocation-id of each answer ("<replica>.<n>" from a worker)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(concurrency)]
        for t in self._threads:
            t.start()

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/v1/functions/sleep/invoke", content=self.body)
                except httpx.HTTPError as exc:
                    self.failed.append(repr(exc))
                    continue
                if r.status_code == 200 and r.content == b"ok":
                    self.ok += 1
                    self.invocations.append(r.headers["x-invocation-id"])
                else:
                    self.failed.append(f"{r.status_code} {r.text[:200]}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def scaling(url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/v1/scaling", timeout=5).json()
    return data


def wait_for(url: str, predicate: Any, timeout: float, what: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    while True:
        snap = scaling(url)
        if predicate(snap):
            return time.monotonic() - started, snap
        assert time.monotonic() - started < timeout, f"{what} did not happen within {timeout} s: {snap}"
        time.sleep(0.05)


def live(snap: dict[str, Any], replica: str = "primary") -> int:
    for r in snap["replicas"]:
        if r["id"] == replica:
            return int(r["functions"].get("default/sleep", {}).get("live", 0))
    return 0


def test_load_step_adds_instances_then_a_replica_and_drains_back(tmp_path: Path) -> None:
    options = [a for k, v in SCALING.items() for a in ("--scaling", f"{k}={v}")]
    log = tmp_path / "server.log"
    with server(tmp_path / "data", log, "--max-replicas", "2", "--log-level", "info", *options) as (url, _):
        deploy_sleep(url, max_instances=2, idle_timeout_s=1)
        body = sleeps(20)
        _, idle = wait_for(url, lambda s: s["serving"] == 1 and live(s) <= 1, 15, "an idle server")
        assert idle["backend"] == "reuseport"

        load_started = time.time()
        load = Load(url, body, concurrency=8)  # 8 at once against 2 instances: requests queue
        try:
            wait_for(url, lambda s: live(s) == 2, 10, "a second instance")  # pools grow on demand
            _, grown = wait_for(url, lambda s: s["serving"] == 2, 20, "a second replica")
            worker = next(r for r in grown["replicas"] if r["kind"] == "reuseport")
            assert worker["pid"] and worker["state"] == "serving"
            # the new replica takes a share of the load (it was warmed with the function; the
            # clients' kept-alive connections were closed once, and some reconnected to it)
            wait_for(url, lambda s: live(s, worker["id"]) >= 1, 10, "instances on the new replica")
            deadline = time.monotonic() + 30
            while sum(i.startswith(f"{worker['id']}.") for i in load.invocations) < 5:
                assert time.monotonic() < deadline, f"no share for the new replica: {load.invocations[-20:]}"
                time.sleep(0.05)
        finally:
            load.stop()
        # Instances rise before a replica is added: the pool grows at the first queued request, while
        # the fleet adds a replica only once the queueing median over its up window is high, so at
        # least half a window after the load began. A lower bound on one clock: a loaded machine
        # only delays the decision. (Timing the test's own poll against the decision measured the
        # poll: on a loaded machine it saw the second instance a second late.)
        ups = [d for d in grown["decisions"] if d["scope"] == "replicas" and d["after"] > d["before"]]
        window = SCALING["replica_up_window_s"]
        assert ups and ups[0]["at"] >= load_started + window / 2, (load_started, ups)

        t_drain, after = wait_for(url, lambda s: s["serving"] == 1 and len(s["replicas"]) == 1, 20, "drain")
        assert [r["id"] for r in after["replicas"]] == ["primary"]
        assert load.failed == [] and load.ok > 50
        decisions = [(d["scope"], d["direction"], d["reason"]) for d in after["decisions"]]
        assert any(s == "replicas" and d == "up" and "saturated" in r for s, d, r in decisions), decisions
        assert any(s == "replicas" and d == "down" and "calm" in r for s, d, r in decisions), decisions
        assert any(s == "instances" for s, _, _ in decisions), decisions
        metrics = httpx.get(f"{url}/metrics").text
        assert 'wasminfer_scaling_decisions_total{direction="up",scope="replicas"} 1.0' in metrics
        assert 'wasminfer_replicas{state="serving"} 1.0' in metrics
    text = log.read_text()
    assert "replicas replicas: 1 -> 2 (saturated" in text  # decisions are in the log
    assert "Traceback" not in text


def test_sigterm_finishes_the_invocations_in_flight(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    args = ["--min-replicas", "2", "--max-replicas", "2", "--scaling", "primary_replica=false"]
    args += ["--scaling", "replica_tick_s=0.2", "--scaling", "cold_penalty=0"]  # spread evenly
    with server(tmp_path / "data", log, *args) as (url, proc):
        deploy_sleep(url, max_instances=16)
        wait_for(url, lambda s: s["serving"] == 2, 20, "two replicas")
        body = sleeps(1500)
        results: list[int] = []
        together = threading.Barrier(6)

        def call() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                client.get("/healthz")  # connected first: then all six requests go out at once
                together.wait()
                results.append(client.post("/v1/functions/sleep/invoke", content=body).status_code)

        clients = [threading.Thread(target=call) for _ in range(6)]
        for t in clients:
            t.start()
        wait_for(
            url,
            lambda s: (
                sum(r["outstanding"] for r in s["replicas"]) == 6
                and all(r["outstanding"] > 0 for r in s["replicas"])
            ),
            10,
            "six requests in flight, on both replicas",
        )
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join()
        assert proc.wait(timeout=30) == 0
    assert results == [200] * 6
    assert "Traceback" not in log.read_text()


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie no one reaped yet has exited too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_a_killed_worker_fails_its_request_with_503_is_replaced_and_workers_die_with_the_gateway(
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    # No primary: the one replica is a worker process, so every invocation goes through it.
    args = ["--min-replicas", "1", "--max-replicas", "1", "--scaling", "primary_replica=false"]
    args += ["--scaling", "replica_tick_s=0.2"]
    with live_server(tmp_path / "data", log, *args, stop=signal.SIGKILL) as (url, gateway):
        _, snap = wait_for(url, lambda s: s["serving"] == 1, 30, "a worker")
        (worker,) = snap["replicas"]
        assert worker["kind"] == "local" and worker["pid"] != gateway.pid
        deploy_sleep(url, max_instances=4)
        # A guest's content type with CR/LF in it passes the worker and the gateway as no header.
        inject = wasmtime.wat2wasm((ROOT / "tests" / "guests" / "header_inject.wat").read_text())
        r = httpx.put(f"{url}/v1/functions/inject?memory_mb=1", content=bytes(inject), headers=WASM)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{url}/v1/functions/inject/invoke", content=b"")
        assert (r.status_code, r.content) == (200, b"te")
        assert r.headers["content-type"] == "application/octet-stream"
        assert "set-cookie" not in r.headers

        answers: list[httpx.Response] = []
        call = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/functions/sleep/invoke", content=sleeps(60_000), timeout=90)
            )
        )
        call.start()
        wait_for(
            url,
            lambda s: s["replicas"][0]["functions"].get("default/sleep", {}).get("busy") == 1,
            20,
            "the request running in the worker",
        )
        os.kill(worker["pid"], signal.SIGKILL)
        call.join(timeout=30)
        (r,) = answers
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "unavailable" and worker["id"] in error["message"], error
        assert error["message"].endswith("; retry"), error

        _, snap = wait_for(
            url, lambda s: [r["pid"] for r in s["replicas"]] not in ([], [worker["pid"]]), 30, "a new worker"
        )
        (new,) = snap["replicas"]
        assert new["state"] == "serving" and new["id"] != worker["id"]
        reasons = [d["reason"] for d in snap["decisions"] if d["scope"] == "replicas"]
        assert f"replica {worker['id']} exited (status -9); its requests in flight failed" in reasons
        r = httpx.post(f"{url}/v1/functions/sleep/invoke", content=sleeps(0))
        assert (r.status_code, r.content) == (200, b"ok")

        gateway.kill()
        gateway.wait()
        deadline = time.monotonic() + 20  # the worker looks for its parent every 0.5 s
        while not gone(new["pid"]):
            assert time.monotonic() < deadline, f"worker {new['pid']} outlived its gateway"
            time.sleep(0.05)
