"""Hardening runs against a real server (`wasminfer serve` on 127.0.0.1): overload, soak, and the
long fuzz and crash runs, collected into bench/results/hardening.json.

    python bench/hardening.py overload [--seconds 20] [--factor 5]   (just overload)
    python bench/hardening.py soak [--seconds 600]                    (just soak)
    python bench/hardening.py fuzz [--examples 2000]                  (just fuzz)
    python bench/hardening.py crash [--rounds 50]                     (just crash)
    python bench/hardening.py quota [--clients 24]                    (just quota)
    python bench/hardening.py deadline [--iterations 20]              (just deadline)
    python bench/hardening.py neighbour [--seconds 8]                 (just neighbour)
    python bench/hardening.py all                                     (just hardening)

Each subcommand merges its numbers into the JSON file (keys `fuzz_cases`, `fuzz_failures`,
`crash_rounds`, `crash_losses`, `overload_p99_ms`, `soak_rss_growth_pct`, `memory_quota_held`,
`deadline_overrun_ms_p99`, `neighbour_p99_ratio`, `neighbour_stall_s_max`, and the details of each
run); `--results FILE` writes elsewhere (a short trial run that must not replace the recorded one).

Fuzz: every test of tests/test_fuzz.py with `--examples` cases each: schemathesis on every route,
request parsing, and every parser of untrusted bytes against a real server, each case within a
wall-clock bound (a hang fails it). `fuzz_cases` counts the cases run, `fuzz_failures` the failed
tests (each a falsified property: a 500, an undocumented code, a hang); the run goes on past them.

Deadline: how far past `timeout_ms` an answer comes (response time minus `timeout_ms`, over HTTP)
for guests that never finish on their own: a loop, a sleep in WASI `poll_oneoff`, a sleep in
`_initialize` (the deploy's 400), and a model that runs for ever (an ONNX `Loop` made in code).


Overload: one function whose capacity is set by its manifest (2 instances, a queue of 4, each call
spinning ~40 ms of CPU). Its capacity is measured closed-loop, then it gets an open-loop load of
`factor` times that for `seconds`. Reported: how fast refusals (429/503) come, the p99 of admitted
requests (inside the server, from its Server-Timing header, and as the client saw it), the server's
RSS before/during/after, and whether it serves normally once the load stops.
tests/test_overload.py runs the same with a few seconds of load.

Quota: a server with a small memory budget (256 MiB, 128 MiB per tenant) and two tenants. Tenant A
uploads a function with `memory_mb=4096`, one with 12 prewarmed instances of 32 MiB, then floods a
32 MiB function that touches 30 MiB of its memory on every call with `clients` concurrent calls
(each needs an instance of its own) while tenant B calls its own function. Held when: both uploads
are refused (400, nothing stored), the flood gets only 200s and 429 `memory_quota_exceeded`, B's call
succeeds, and the server's RSS never passes what it was before the flood plus the budget plus
`QUOTA_OVERHEAD_MB` (what an instance costs beyond its linear memory, the HTTP bodies, threads).

Neighbour: two tenants on one server. Tenant B probes, one request after another (an invocation of
a tiny echo function; in the stall runs also a read of its function), idle first, then while
tenant A, from another process, does each of: a flood of a ~2 ms function at 4x its measured
capacity (by `hey`, Debian's load generator, where it is installed: 64 connections held to that
rate; else an open loop from one Python process, which cannot offer thousands a second), slowloris
connections, guests asleep in `poll_oneoff` (a modest
`timeout_ms`), big module uploads, and CBOR batch bodies made to decode slowly. Reported:
`neighbour_p99_ratio` (B's p99 during the flood over B's idle p99) and `neighbour_stall_s_max` (the
longest any request of B took during any of A's attacks, as the client saw it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from suite import stats

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hardening.json"

# A handler that spins for the u32 count of iterations in its body, then answers "ok".
SPIN_WAT = (ROOT / "tests" / "guests" / "spin.wat").read_text()


# A handler whose body is two u32: pages to grow its memory by (then it writes a byte to every 4 KiB of
# them, so they are resident), and iterations to spin; it answers "ok".
TOUCH_WAT = """(module
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param i32 i32) (result i32)
    (local $i i32) (local $p i32) (local $end i32)
    (local.set $p (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.eq (memory.grow (i32.load (local.get $b))) (i32.const -1)) (then (return (i32.const 1))))
    (local.set $end (i32.mul (memory.size) (i32.const 65536)))
    (block $done (loop $touch
      (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
      (i32.store8 (local.get $p) (i32.const 1))
      (local.set $p (i32.add (local.get $p) (i32.const 4096)))
      (br $touch)))
    (local.set $i (i32.load offset=4 (local.get $b)))
    (block $done (loop $spin
      (br_if $done (i32.eqz (local.get $i)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br $spin)))
    (call $output (i32.const 16) (i32.const 2) (i32.const 0) (i32.const 0))))"""
QUOTA_OVERHEAD_MB = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)


@contextmanager
def server(data: Path, *args: str) -> Iterator[Server]:
    """`wasminfer serve` on a free loopback port, ready; stopped (SIGINT, then SIGKILL) after."""
    port = free_port()
    log = (data.parent / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasminfer", "serve", "--data", str(data), "--port", str(port),
         "--log-level", "warning", *args],
        stdout=log, stderr=log, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {(data.parent / log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.05)
        yield Server(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def deploy_spin(url: str, *, name: str = "spin", max_instances: int = 2, max_queue: int = 4,
                timeout_ms: int = 2000) -> None:
    import wasmtime

    wasm = bytes(wasmtime.wat2wasm(SPIN_WAT))
    q = f"memory_mb=1&timeout_ms={timeout_ms}&max_instances={max_instances}&max_queue={max_queue}"
    r = httpx.put(f"{url}/v1/functions/{name}?{q}", content=wasm,
                  headers={"content-type": "application/wasm"}, timeout=60)
    r.raise_for_status()
    wait_optimised(url, name)


def wait_optimised(url: str, name: str, timeout_s: float = 60.0) -> None:
    """Waits until `name` runs its optimised code: a new module answers first on fast-tier code
    (`runtime._tiers.Tiering`), a few times slower for a loop like spin's, and a calibration made
    on it would overstate the work of every later request."""
    deadline = time.monotonic() + timeout_s
    while True:
        module = httpx.get(f"{url}/v1/functions/{name}", timeout=30).json().get("module", {})
        if module.get("tier", "optimised") == "optimised" or "tier_error" in module:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} still runs fast-tier code after {timeout_s:g} s: {module}")
        time.sleep(0.05)


def spin_body(iterations: int) -> bytes:
    return int(iterations).to_bytes(4, "little")


def iterations_for(url: str, ms: float, name: str = "spin") -> int:
    """Iterations of the spin loop that take about `ms` on this machine."""
    n = 1_000_000
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(3):
            t = time.perf_counter()
            http.post(f"/v1/functions/{name}/invoke", content=spin_body(n)).raise_for_status()
            took_ms = (time.perf_counter() - t) * 1000
            n = max(1000, int(n * ms / max(took_ms, 0.1)))
    return min(n, 2**32 - 1)


# --- load ----------------------------------------------------------------------------------------------
@dataclass
class Sample:
    at: float  # seconds since the load started
    status: int  # 0: no answer (connection error or client timeout)
    latency_s: float  # as the client saw it (includes the load generator's own delays)
    server_s: float | None = None  # inside the server (its Server-Timing `total`), admitted requests


async def _one(http: httpx.AsyncClient, path: str, body: bytes, started: float, out: list[Sample]) -> None:
    t = time.perf_counter()
    server_s = None
    try:
        r = await http.post(path, content=body)
        status = r.status_code
        timing = r.headers.get("server-timing", "")
        if "total;dur=" in timing:
            server_s = float(timing.rsplit("total;dur=", 1)[1].split(",")[0]) / 1000
    except httpx.HTTPError:
        status = 0
    out.append(Sample(t - started, status, time.perf_counter() - t, server_s))


async def open_loop(url: str, path: str, body: bytes, rate: float, seconds: float,
                    connections: int = 512) -> list[Sample]:
    """Requests at a fixed `rate` per second for `seconds`, whatever the answers (open loop)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    out: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        started = time.perf_counter()
        tasks = []
        n = int(rate * seconds)
        for i in range(n):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(http, path, body, started, out)))
        await asyncio.gather(*tasks)
    return out


async def closed_loop(url: str, path: str, body: bytes, clients: int, seconds: float) -> list[Sample]:
    """`clients` clients, each sending its next request when the last one is answered."""
    out: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        started = time.perf_counter()

        async def client() -> None:
            while time.perf_counter() - started < seconds:
                await _one(http, path, body, started, out)

        await asyncio.gather(*(client() for _ in range(clients)))
    return out


def pct(values: list[float], q: float) -> float:
    return stats.pct(values, q, empty=0.0)  # 0, not NaN, for no samples: the JSON stays strict


def overload(seconds: float = 20.0, factor: float = 5.0, service_ms: float = 40.0,
             work: Path | None = None, calibrate_s: float = 4.0, after_s: float = 2.0) -> dict[str, Any]:
    """Capacity of a 2-instance function, then `factor` times that offered open-loop; see the module doc."""
    with tempfile.TemporaryDirectory(dir=work) as tmp, server(Path(tmp) / "data") as srv:
        deploy_spin(srv.url)
        body = spin_body(iterations_for(srv.url, service_ms))
        path = "/v1/functions/spin/invoke"
        base = asyncio.run(closed_loop(srv.url, path, body, clients=2, seconds=calibrate_s))
        ok = [s for s in base if s.status == 200]
        capacity = len(ok) / calibrate_s
        base_p99 = pct([s.latency_s for s in ok], 0.99)
        rss_before = srv.rss_bytes()
        rss_peak = rss_before
        samples: list[Sample] = []

        async def load_and_watch() -> None:
            nonlocal rss_peak, samples
            task = asyncio.create_task(open_loop(srv.url, path, body, capacity * factor, seconds))
            while not task.done():
                rss_peak = max(rss_peak, srv.rss_bytes())
                await asyncio.sleep(0.1)
            samples = await task

        asyncio.run(load_and_watch())
        after = asyncio.run(closed_loop(srv.url, path, body, clients=1, seconds=after_s))
        rss_after = srv.rss_bytes()
    admitted = [s.latency_s for s in samples if s.status == 200]
    refused = [s.latency_s for s in samples if s.status in (429, 503)]
    in_server = [s.server_s for s in samples if s.status == 200 and s.server_s is not None]
    other = sorted({s.status for s in samples} - {200, 429, 503})
    return {
        "seconds": seconds,
        "service_ms": service_ms,
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(len(samples) / seconds, 1),
        "factor": round(len(samples) / seconds / capacity, 2) if capacity else None,
        "requests": len(samples),
        "admitted": len(admitted),
        "refused": len(refused),
        "other_statuses": other,
        "other": sum(1 for s in samples if s.status not in (200, 429, 503)),
        "admitted_rps": round(len(admitted) / seconds, 1),
        "baseline_p99_ms": round(base_p99 * 1000, 1),
        "admitted_p50_ms": round(pct(admitted, 0.5) * 1000, 1),
        "admitted_p99_ms": round(pct(admitted, 0.99) * 1000, 1),
        "admitted_server_p99_ms": round(pct(in_server, 0.99) * 1000, 1),
        "refused_p50_ms": round(pct(refused, 0.5) * 1000, 1),
        "refused_p99_ms": round(pct(refused, 0.99) * 1000, 1),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "after_ok": sum(1 for s in after if s.status == 200),
        "after_errors": sum(1 for s in after if s.status != 200),
        "after_p50_ms": round(pct([s.latency_s for s in after if s.status == 200], 0.5) * 1000, 1),
    }


def soak(seconds: float = 600.0, load: float = 0.5, service_ms: float = 5.0, work: Path | None = None,
         progress: bool = True, calibrate_s: float = 3.0) -> dict[str, Any]:
    """Steady open-loop load at `load` times the measured capacity for `seconds`, on a spin function and
    an echo function; the server's RSS every few seconds. Growth is measured from the end of the
    first tenth (after warm-up: instances, arenas, caches) to the end."""
    import wasmtime

    with tempfile.TemporaryDirectory(dir=work) as tmp, server(Path(tmp) / "data") as srv:
        deploy_spin(srv.url, max_instances=4, max_queue=64)
        hostile = bytes(wasmtime.wat2wasm((ROOT / "tests" / "guests" / "hostile.wat").read_text()))
        httpx.put(f"{srv.url}/v1/functions/echo?memory_mb=4&max_instances=4", content=hostile,
                  headers={"content-type": "application/wasm"}, timeout=60).raise_for_status()
        body = spin_body(iterations_for(srv.url, service_ms))
        base = asyncio.run(closed_loop(srv.url, "/v1/functions/spin/invoke", body, clients=4,
                                       seconds=calibrate_s))
        capacity = sum(1 for s in base if s.status == 200) / calibrate_s
        rate = max(5.0, capacity * load)
        rss: list[tuple[float, int]] = []
        samples: list[Sample] = []

        half = rate / 2
        if shutil.which("hey"):
            # hey holds the rate however the answers come; one Python process falls behind at a few
            # hundred requests a second (its pool's bookkeeping) and a 600 s run never ends.
            runs = [hey(f"{srv.url}/v1/functions/spin/invoke", body, half, seconds, 8),
                    hey(f"{srv.url}/v1/functions/echo/invoke", b"e" + b"x" * 1000, half, seconds, 8)]
            started = time.monotonic()
            while any(r.poll() is None for r in runs):
                rss.append((time.monotonic() - started, srv.rss_bytes()))
                if progress and len(rss) % 12 == 1:
                    print(f"soak: {rss[-1][0]:.0f}/{seconds:.0f} s, RSS {rss[-1][1] / 2**20:.1f} MiB",
                          file=sys.stderr)
                time.sleep(5 if seconds > 60 else 0.5)
            results = [hey_result(r, half, 60) for r in runs]
            requests = sum(r["requests"] for r in results)
            error_statuses = sorted({int(k) for r in results for k in r["statuses"] if k != "200"})
            errors = sum(n for r in results for k, n in r["statuses"].items() if k != "200") + sum(
                r["failures"] for r in results)
            p99_ms = max((r["p99_ms"] or 0.0) for r in results)
            generator = "hey"
        else:
            async def run() -> None:
                nonlocal samples
                spin = asyncio.create_task(open_loop(srv.url, "/v1/functions/spin/invoke", body, half,
                                                     seconds))
                echo = asyncio.create_task(open_loop(srv.url, "/v1/functions/echo/invoke",
                                                     b"e" + b"x" * 1000, half, seconds))
                started = time.monotonic()
                while not (spin.done() and echo.done()):
                    rss.append((time.monotonic() - started, srv.rss_bytes()))
                    await asyncio.sleep(5 if seconds > 60 else 0.5)
                samples = (await spin) + (await echo)

            asyncio.run(run())
            bad = [s for s in samples if s.status != 200]
            requests, errors, error_statuses = len(samples), len(bad), sorted({s.status for s in bad})
            p99_ms = round(pct([s.latency_s for s in samples if s.status == 200], 0.99) * 1000, 1)
            generator = "httpx"
    warm = [r for t, r in rss if t >= seconds / 10] or [r for _, r in rss]
    start_rss, end_rss = warm[0], statistics.median(r for _, r in rss[-3:])
    return {
        "seconds": seconds,
        "generator": generator,
        "rate_rps": round(rate, 1),
        "capacity_rps": round(capacity, 1),
        "requests": requests,
        "errors": errors,
        "error_statuses": error_statuses,
        "p99_ms": p99_ms,
        "rss_start_mb": round(start_rss / 2**20, 1),
        "rss_end_mb": round(end_rss / 2**20, 1),
        "rss_max_mb": round(max(r for _, r in rss) / 2**20, 1),
        "rss_growth_pct": round((end_rss - start_rss) / start_rss * 100, 2),
        "rss_series_mb": [(round(t, 1), round(r / 2**20, 1)) for t, r in rss],
    }


# --- memory quota ----------------------------------------------------------------------------------------
def quota(clients: int = 24, budget_mb: int = 256, tenant_mb: int = 128, memory_mb: int = 32,
          spin_ms: float = 300.0, work: Path | None = None) -> dict[str, Any]:
    """Tenant A tries to pass its memory quota three ways; see the module doc."""
    import wasmtime

    wasm = bytes(wasmtime.wat2wasm(TOUCH_WAT))
    a = {"authorization": "Bearer alpha-secret"}
    b = {"authorization": "Bearer beta-secret"}
    upload = {"content-type": "application/wasm"}
    touch_pages = (memory_mb - 2) * 16  # all but 2 MiB of the limit, resident

    def body(pages: int, spin: int) -> bytes:
        return pages.to_bytes(4, "little") + spin.to_bytes(4, "little")

    with tempfile.TemporaryDirectory(dir=work) as tmp, server(
        Path(tmp) / "data", "--memory-budget-mb", str(budget_mb), "--tenant-memory-mb", str(tenant_mb),
        "--key", "alpha-secret:admin:alpha", "--key", "beta-secret:admin:beta",
    ) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        uploads = {}
        for name, query in (("fat", "memory_mb=4096"),
                            ("wide", f"memory_mb={memory_mb}&prewarm_instances=12&max_instances=12")):
            r = http.put(f"/v1/functions/{name}?{query}", content=wasm, headers={**a, **upload})
            stored = http.get(f"/v1/functions/{name}", headers=a).status_code
            uploads[name] = {"status": r.status_code, "code": r.json().get("error", {}).get("code"),
                             "stored": stored != 404}
        flood_q = f"memory_mb={memory_mb}&max_instances=64&max_queue=256&timeout_ms=20000"
        for who in (a, b):
            r = http.put(f"/v1/functions/touch?{flood_q}", content=wasm, headers={**who, **upload})
            r.raise_for_status()
        # iterations of the spin loop for ~spin_ms (one call, then scaled)
        t = time.perf_counter()
        http.post("/v1/functions/touch/invoke", content=body(0, 10_000_000), headers=a).raise_for_status()
        spin = int(10_000_000 * spin_ms / max(1.0, (time.perf_counter() - t) * 1000))
        rss_before = srv.rss_bytes()
        rss_peak = rss_before
        samples: list[Sample] = []
        neighbour: list[Sample] = []

        async def flood() -> None:
            nonlocal rss_peak
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, headers=a) as ac, \
                    httpx.AsyncClient(base_url=srv.url, timeout=60, headers=b) as bc:
                started = time.perf_counter()
                path, payload = "/v1/functions/touch/invoke", body(touch_pages, spin)
                tasks = [asyncio.create_task(_one(ac, path, payload, started, samples))
                         for _ in range(clients)]
                await asyncio.sleep(spin_ms / 3000)  # A's calls hold their instances now
                tasks.append(asyncio.create_task(_one(bc, path, payload, started, neighbour)))
                while not all(task.done() for task in tasks):
                    rss_peak = max(rss_peak, srv.rss_bytes())
                    await asyncio.sleep(0.02)
                await asyncio.gather(*tasks)

        asyncio.run(flood())
        rss_after = srv.rss_bytes()
        codes: dict[str, int] = {}
        for s in samples:
            codes[str(s.status)] = codes.get(str(s.status), 0) + 1
        memory = http.get("/v1/scaling", headers=a).json()["memory"]
    bound = rss_before + (budget_mb + QUOTA_OVERHEAD_MB) * 2**20
    ok = codes.get("200", 0)
    held = (
        all(u["status"] == 400 and u["code"] == "invalid_manifest" and not u["stored"]
            for u in uploads.values())
        and set(codes) <= {"200", "429"} and ok >= 1 and codes.get("429", 0) >= 1
        and [s.status for s in neighbour] == [200]
        and rss_peak <= bound
    )
    return {
        "held": held,
        "budget_mb": budget_mb,
        "tenant_quota_mb": tenant_mb,
        "memory_mb": memory_mb,
        "uploads": uploads,
        "flood_clients": clients,
        "flood_statuses": codes,
        "quota_refusals": memory["tenant"]["refusals"]["tenant"],
        "neighbour_statuses": [s.status for s in neighbour],
        "touched_mb_per_call": touch_pages / 16,
        "unbounded_would_touch_mb": clients * touch_pages / 16,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_bound_mb": round(bound / 2**20, 1),
        "tenant_memory": memory["tenant"],
    }


# --- neighbour: one tenant's attacks against another tenant's latency ---------------------------------
KEY_A, KEY_B = "bench-key-a", "bench-key-b"
TENANT_KEYS = ("--key", f"{KEY_A}:admin+invoke:acme", "--key", f"{KEY_B}:admin+invoke:globex")


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _deploy(url: str, key: str, name: str, wasm: bytes, query: str) -> None:
    r = httpx.put(f"{url}/v1/functions/{name}?{query}", content=wasm,
                  headers={"content-type": "application/wasm", **_auth(key)}, timeout=120)
    r.raise_for_status()


async def _probe(url: str, seconds: float, reads: bool) -> list[tuple[int, float]]:
    """Tenant B: one request after another for `seconds`; (status, latency s) of each."""
    out: list[tuple[int, float]] = []
    async with httpx.AsyncClient(base_url=url, headers=_auth(KEY_B), timeout=60) as http:
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                if reads and n % 2:
                    r = await http.get("/v1/functions/echo")
                else:
                    r = await http.post("/v1/functions/echo/invoke", content=b"e" + b"x" * 64)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            out.append((status, time.perf_counter() - t))
            n += 1
    return out


def _attack(kind: str, url: str, seconds: float, params: tuple[float, ...], done: Any) -> None:
    """Tenant A's side, in its own process (its CPU is not the probe's): runs `kind` for `seconds`
    and puts a summary on `done`."""
    param = params[0]

    async def flood() -> dict[str, Any]:
        if shutil.which("hey"):
            return _hey_flood(url, spin_body(int(param)), params[1], seconds)
        failures: dict[str, int] = {}
        samples = await open_loop_with(url, "/v1/functions/spin/invoke", spin_body(int(param)), _auth(KEY_A),
                                       rate=params[1], seconds=seconds, failures=failures)
        return {"requests": len(samples), "offered_rps": round(len(samples) / seconds, 1),
                "statuses": _count(s.status for s in samples), "failures": failures,
                "generator": "httpx (one Python process: it cannot offer thousands of requests/s)"}

    async def slowloris() -> dict[str, Any]:
        port = int(url.rsplit(":", 1)[1])
        conns = []
        for _ in range(int(param)):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/functions/spin/invoke HTTP/1.1\r\nHost: x\r\n")
                conns.append(writer)
            except OSError:
                break
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for w in conns:
                if not w.is_closing():
                    w.write(b"X-Slow: 1\r\n")
            await asyncio.sleep(1.0)
        cut = sum(1 for w in conns if w.is_closing())
        for w in conns:
            w.close()
        return {"connections": len(conns), "closed_by_server": cut}

    async def sleepers() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=url, headers=_auth(KEY_A), timeout=60,
                                     limits=httpx.Limits(max_connections=int(param))) as http:
            statuses: list[int] = []
            end = time.monotonic() + seconds

            async def one() -> None:
                while time.monotonic() < end:
                    try:
                        r = await http.post("/v1/functions/nap/invoke", content=(3000).to_bytes(4, "little"))
                        statuses.append(r.status_code)
                    except httpx.HTTPError:
                        statuses.append(0)

            await asyncio.gather(*(one() for _ in range(int(param))))
        return {"statuses": _count(statuses)}

    async def deploys() -> dict[str, Any]:
        import wasmtime

        base = bytes(wasmtime.wat2wasm(SPIN_WAT))
        pad = os.urandom(int(param) << 20)
        # a custom section (id 0) of `param` MiB: a big upload that every check must read through
        name = b"\x03pad"
        size = len(name) + len(pad)
        leb = bytearray()
        while True:
            byte, size = size & 0x7F, size >> 7
            leb.append(byte | (0x80 if size else 0))
            if not size:
                break
        wasm = base + b"\x00" + bytes(leb) + name + pad
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url, headers=_auth(KEY_A), timeout=120) as http:
            end = time.monotonic() + seconds

            async def one(i: int) -> None:
                while time.monotonic() < end:
                    r = await http.put(f"/v1/functions/big{i}?memory_mb=1", content=wasm,
                                       headers={"content-type": "application/wasm"})
                    statuses.append(r.status_code)

            await asyncio.gather(*(one(i) for i in range(4)))
        return {"module_mb": int(param), "statuses": _count(statuses)}

    async def cbor_bomb() -> dict[str, Any]:
        import cbor2

        # a decimal fraction (tag 4) over a bignum (tag 2): decoding it with the library's default
        # tag hooks is quadratic in the bignum's size, and holds the GIL throughout
        bomb = cbor2.dumps([cbor2.CBORTag(4, [0, cbor2.CBORTag(2, b"\x01" * (int(param) << 10))])])
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url, headers=_auth(KEY_A), timeout=120) as http:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                r = await http.post("/v1/functions/spin/batch", content=bomb,
                                    headers={"content-type": "application/cbor"})
                statuses.append(r.status_code)
        return {"body_kb": len(bomb) >> 10, "statuses": _count(statuses)}

    runs = {"flood": flood, "slowloris": slowloris, "sleeping_guests": sleepers, "slow_deploys": deploys,
            "cbor_bomb": cbor_bomb}
    try:
        done.put(asyncio.run(runs[kind]()))
    except Exception as exc:  # the probe's side must not wait for a summary that never comes
        done.put({"failed": repr(exc)})
        raise


def hey(url: str, body: bytes, rate: float, seconds: float, workers: int = 64,
        headers: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """Starts `hey` (Debian's load generator, in Go: unlike one Python process it can offer thousands
    of requests a second) POSTing `body` to `url` at `rate` in all over `workers` keep-alive
    connections for `seconds`; `hey_result` reads what it printed."""
    f = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)  # noqa: SIM115 - removed by hey_result
    f.write(body)
    f.close()
    command = ["hey", "-z", f"{seconds:g}s", "-c", str(workers), "-q", f"{max(1.0, rate / workers):.2f}",
               "-m", "POST", "-T", "application/octet-stream", "-D", f.name, "-t", "30"]
    for header in headers:
        command += ["-H", header]
    proc = subprocess.Popen([*command, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.body_path = f.name  # type: ignore[attr-defined]
    return proc


def hey_result(proc: subprocess.Popen[str], rate: float, timeout_s: float) -> dict[str, Any]:
    """What a `hey` run printed: statuses, requests/s, p99, failures (connection errors, timeouts)."""
    out, _ = proc.communicate(timeout=timeout_s)
    os.unlink(proc.body_path)  # type: ignore[attr-defined]
    statuses = {m.group(1): int(m.group(2)) for m in re.finditer(r"\[(\d+)\]\s+(\d+) responses", out)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    _, _, errors = out.partition("Error distribution:")
    failures = sum(int(m.group(1)) for m in re.finditer(r"\[(\d+)\]\s+\S", errors))
    return {"requests": sum(statuses.values()) + failures, "offered_rps": round(rate, 1),
            "delivered_rps": float(rps.group(1)) if rps else None, "statuses": statuses,
            "p99_ms": round(float(p99.group(1)) * 1000, 1) if p99 else None,
            "failures": failures, "failure_kinds": errors.strip()[:500], "generator": "hey"}


def _hey_flood(url: str, body: bytes, rate: float, seconds: float, workers: int = 64) -> dict[str, Any]:
    """Tenant A's flood by `hey`: `workers` keep-alive connections, `rate` in all."""
    proc = hey(f"{url}/v1/functions/spin/invoke", body, rate, seconds, workers,
               (f"Authorization: Bearer {KEY_A}",))
    return {**hey_result(proc, rate, seconds + 60), "generator": f"hey, {workers} connections"}


def _count(statuses: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return counts


async def open_loop_with(url: str, path: str, body: bytes, headers: dict[str, str], *, rate: float,
                         seconds: float, connections: int = 256,
                         failures: dict[str, int] | None = None) -> list[Sample]:
    """`open_loop` with headers (tenant A's key), that stops sending after `seconds` even when it
    could not keep up with `rate` (the offered rate is then what it managed: count the samples)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    out: list[Sample] = []
    failures = {} if failures is None else failures
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=5, headers=headers) as http:
        started = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif time.perf_counter() - started > seconds:
                break
            tasks.append(asyncio.create_task(_one_noting(http, path, body, started, out, failures)))
        await asyncio.gather(*tasks)
    return out


async def _one_noting(http: httpx.AsyncClient, path: str, body: bytes, started: float, out: list[Sample],
                      failures: dict[str, int]) -> None:
    t = time.perf_counter()
    try:
        status = (await http.post(path, content=body)).status_code
    except httpx.HTTPError as exc:  # status 0: which error, counted
        status = 0
        failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
    out.append(Sample(t - started, status, time.perf_counter() - t))


def _under_attack(url: str, kind: str, seconds: float, params: tuple[float, ...],
                  reads: bool) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    """B's probe while A runs `kind` in another process; the probe starts after A has begun."""
    ctx = multiprocessing.get_context("spawn")  # not fork: this process has threads (DNS, httpx)
    done: Any = ctx.Queue()
    attacker = ctx.Process(target=_attack, args=(kind, url, seconds + 1.0, params, done))
    attacker.start()
    time.sleep(0.5)  # A's attack under way
    probe = asyncio.run(_probe(url, seconds, reads))
    summary = done.get(timeout=seconds + 240)
    attacker.join(60)
    return probe, summary


def neighbour(seconds: float = 8.0, factor: float = 4.0, work: Path | None = None) -> dict[str, Any]:
    """Tenant B's latency while tenant A floods and attacks; see the module doc."""
    import wasmtime

    with tempfile.TemporaryDirectory(dir=work) as tmp, server(Path(tmp) / "data", *TENANT_KEYS) as srv:
        url = srv.url
        spin = bytes(wasmtime.wat2wasm(SPIN_WAT))
        nap = bytes(wasmtime.wat2wasm((ROOT / "tests" / "guests" / "sleep.wat").read_text()))
        hostile = bytes(wasmtime.wat2wasm((ROOT / "tests" / "guests" / "hostile.wat").read_text()))
        _deploy(url, KEY_A, "spin", spin, "memory_mb=1&timeout_ms=5000")
        _deploy(url, KEY_A, "nap", nap, "memory_mb=1&timeout_ms=1000")
        _deploy(url, KEY_B, "echo", hostile, "memory_mb=4")
        # A's work: ~2 ms of spinning (calibrated with A's key)
        n = 1_000_000
        with httpx.Client(base_url=url, headers=_auth(KEY_A), timeout=30) as http:
            for _ in range(3):
                t = time.perf_counter()
                http.post("/v1/functions/spin/invoke", content=spin_body(n)).raise_for_status()
                n = max(1000, int(n * 2.0 / max((time.perf_counter() - t) * 1000, 0.1)))
        capacity_samples = asyncio.run(_closed_loop_as(url, KEY_A, spin_body(n), clients=8, seconds=3.0))
        capacity = sum(1 for s in capacity_samples if s.status == 200) / 3.0
        idle = asyncio.run(_probe(url, seconds, reads=False))
        rate = capacity * factor
        flood, flood_summary = _under_attack(url, "flood", seconds, (n, rate), False)
        stalls: dict[str, Any] = {"flood": _stall(flood)}
        details: dict[str, Any] = {"flood": flood_summary}
        # slowloris connections, concurrent sleepers, upload MiB, bomb KiB
        attacks = (("slowloris", 300), ("sleeping_guests", 96), ("slow_deploys", 32), ("cbor_bomb", 96))
        for kind, param in attacks:
            probe, summary = _under_attack(url, kind, seconds, (param,), True)
            stalls[kind] = _stall(probe)
            details[kind] = summary
            print(f"neighbour: {kind}: B's longest wait {stalls[kind]['max_s']} s", file=sys.stderr)
    idle_p99 = pct([lat for st, lat in idle if st == 200], 0.99)
    flood_p99 = pct([lat for st, lat in flood if st == 200], 0.99)
    return {
        "seconds": seconds,
        "a_capacity_rps": round(capacity, 1),
        "a_offered_rps": round(rate, 1),
        "b_idle_p50_ms": round(pct([lat for st, lat in idle if st == 200], 0.5) * 1000, 2),
        "b_idle_p99_ms": round(idle_p99 * 1000, 2),
        "b_flood_p50_ms": round(pct([lat for st, lat in flood if st == 200], 0.5) * 1000, 2),
        "b_flood_p99_ms": round(flood_p99 * 1000, 2),
        "p99_ratio": round(flood_p99 / idle_p99, 2) if idle_p99 else None,
        "stalls": stalls,
        "stall_s_max": max(v["max_s"] for v in stalls.values()),
        "attacks": details,
    }


def _stall(probe: list[tuple[int, float]]) -> dict[str, Any]:
    return {
        "requests": len(probe),
        "errors": sum(1 for st, _ in probe if st not in (200,)),
        "p99_ms": round(pct([lat for _, lat in probe], 0.99) * 1000, 2),
        "max_s": round(max((lat for _, lat in probe), default=0.0), 3),
    }


async def _closed_loop_as(url: str, key: str, body: bytes, clients: int, seconds: float) -> list[Sample]:
    out: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=_auth(key)) as http:
        started = time.perf_counter()

        async def client() -> None:
            while time.perf_counter() - started < seconds:
                await _one(http, "/v1/functions/spin/invoke", body, started, out)

        await asyncio.gather(*(client() for _ in range(clients)))
    return out


# --- the long fuzz and crash runs (the test files, longer) ---------------------------------------------
def _pytest(test: str, env: dict[str, str], *args: str, check: bool = True) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-s",
           "-o", "addopts=", "--timeout=7200", *args, test]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=check).returncode


def fuzz(examples: int = 2000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = Path(tmp) / "report.json", Path(tmp) / "junit.xml"
        _pytest("tests/test_fuzz.py", {"WASMINFER_FUZZ_EXAMPLES": str(examples),
                                       "WASMINFER_FUZZ_REPORT": str(report)},
                f"--junitxml={junit}", check=False)
        if not junit.exists() or not report.exists():
            raise RuntimeError("the fuzz run did not finish (no report): see its output above")
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        failed = [case.get("name", "?") for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        return {"examples_per_test": examples, **json.loads(report.read_text()),
                "tests": int(suite.get("tests", 0)), "failures": len(failed), "failed": failed}


def crash(rounds: int = 50) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        _pytest("tests/test_server_crash.py", {"WASMINFER_CRASH_ROUNDS": str(rounds),
                                               "WASMINFER_CRASH_REPORT": report.name})
        result: dict[str, Any] = json.loads(Path(report.name).read_text())
        return result


def deadline(iterations: int = 20, timeout_ms: int = 300, work: Path | None = None) -> dict[str, Any]:
    """Response time minus `timeout_ms` for `iterations` requests of each kind (see the module doc)."""
    import numpy as np
    import wasmtime

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import NEVER, make_until_model  # the test suite's Loop model
    from wasminfer import toolchain
    from wasminfer.models.codec import encode_tensors

    guests = ROOT / "tests" / "guests"
    sleeper = (guests / "sleeper.wat").read_text()
    loop = """(module (memory (export "memory") 1) (func (export "wasminfer_abi_v1"))
      (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32)
        (loop $l (br $l)) (i32.const 0)))"""
    wasm = {
        "sleep": bytes(wasmtime.wat2wasm(sleeper.replace("INIT_MS", "0"))),
        "loop": bytes(wasmtime.wat2wasm(loop)),
        "init": bytes(wasmtime.wat2wasm(sleeper.replace("INIT_MS", "600000"))),
    }
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        wasm["model"] = toolchain.build(guests / "sdk_echo.c", cache_dir=Path(tmp) / "build").read_bytes()
        with server(Path(tmp) / "data") as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
            q = f"timeout_ms={timeout_ms}&memory_mb=16"
            http.put("/v1/models/until", content=make_until_model(),
                     headers={"content-type": "application/onnx"}).raise_for_status()
            for name in ("sleep", "loop", "model"):
                models = "&models=until" if name == "model" else ""
                http.put(f"/v1/functions/{name}?{q}{models}", content=wasm[name],
                         headers={"content-type": "application/wasm"}).raise_for_status()
            calls = {
                "sleep": lambda: http.post("/v1/functions/sleep/invoke",
                                           content=struct.pack("<II", 0, 600_000)),  # sleep 10 min
                "loop": lambda: http.post("/v1/functions/loop/invoke", content=b""),
                "model": lambda: http.post("/v1/functions/model/invoke",
                                           content=encode_tensors({"x": np.array([[NEVER]], np.float32)}),
                                           headers={"content-type": "application/cbor; model=until"}),
                "init": lambda: http.put(f"/v1/functions/init?{q}", content=wasm["init"],
                                         headers={"content-type": "application/wasm"}),
            }
            expected = {"sleep": 504, "loop": 504, "model": 504, "init": 400}
            overruns: dict[str, list[float]] = {kind: [] for kind in calls}
            statuses: dict[str, list[int]] = {kind: [] for kind in calls}
            for round_ in range(iterations + 1):
                for kind, call in calls.items():
                    t = time.perf_counter()
                    status = call().status_code
                    if round_:  # round 0 warms up: first instances, the model's first run
                        overruns[kind].append((time.perf_counter() - t) * 1000 - timeout_ms)
                        statuses[kind].append(status)
    every = [v for values in overruns.values() for v in values]
    return {
        "timeout_ms": timeout_ms,
        "iterations": iterations,
        "overrun_ms_p99": round(pct(every, 0.99), 1),
        "kinds": {
            kind: {
                "overrun_ms_p50": round(pct(values, 0.5), 1),
                "overrun_ms_p99": round(pct(values, 0.99), 1),
                "overrun_ms_max": round(max(values), 1),
                "unexpected_statuses": sorted({s for s in statuses[kind] if s != expected[kind]}),
            }
            for kind, values in overruns.items()
        },
    }


def merge(results: dict[str, Any], path: Path = RESULTS) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc.update(results)
    doc["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON file to merge into")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("overload")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--factor", type=float, default=5.0)
    p = sub.add_parser("soak")
    p.add_argument("--seconds", type=float, default=600.0)
    p = sub.add_parser("fuzz")
    p.add_argument("--examples", type=int, default=2000)
    p = sub.add_parser("crash")
    p.add_argument("--rounds", type=int, default=50)
    p = sub.add_parser("quota")
    p.add_argument("--clients", type=int, default=24)
    p = sub.add_parser("deadline")
    p.add_argument("--iterations", type=int, default=20)

    p = sub.add_parser("neighbour")
    p.add_argument("--seconds", type=float, default=8.0)
    sub.add_parser("all")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.what in ("fuzz", "all"):
        f = fuzz(getattr(args, "examples", 2000))
        out.update(fuzz_cases=f["total"], fuzz_failures=f["failures"], fuzz=f)
    if args.what in ("crash", "all"):
        c = crash(getattr(args, "rounds", 50))
        out.update(crash_rounds=c["rounds"], crash_losses=c["losses"], crash=c)
    if args.what in ("overload", "all"):
        o = overload(getattr(args, "seconds", 20.0), getattr(args, "factor", 5.0))
        # inside the server (Server-Timing): what it controls; the client's view is in the details
        out.update(overload_p99_ms=o["admitted_server_p99_ms"], overload=o)
    if args.what in ("deadline", "all"):
        d = deadline(getattr(args, "iterations", 20))
        out.update(deadline_overrun_ms_p99=d["overrun_ms_p99"], deadline=d)
    if args.what in ("soak", "all"):
        s = soak(getattr(args, "seconds", 600.0))
        out.update(soak_rss_growth_pct=s["rss_growth_pct"], soak_errors=s["errors"], soak=s)
    if args.what in ("quota", "all"):
        q = quota(getattr(args, "clients", 24))
        out.update(memory_quota_held=q["held"], memory_quota=q)
    if args.what in ("neighbour", "all"):
        nb = neighbour(getattr(args, "seconds", 8.0) if args.what == "neighbour" else 8.0)
        out.update(neighbour_p99_ratio=nb["p99_ratio"], neighbour_stall_s_max=nb["stall_s_max"], neighbour=nb)
    merge(out, args.results)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))
    for key in ("overload", "soak", "memory_quota", "deadline", "neighbour"):
        if key in out:
            print(key, json.dumps({k: v for k, v in out[key].items() if k != "rss_series_mb"}, indent=1))


if __name__ == "__main__":
    main()
