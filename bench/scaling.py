"""Hybrid scaling benchmark (`just bench-scaling`): the digits example through a real server on
loopback, `wasminfer serve --max-replicas 2` with the default autoscaler knobs (only the replica
scale-down window is shortened, so that the run ends in minutes).

1. Step load: concurrency 1, then 16, then 1 again, from a load generator in a process of its own
   (keep-alive HTTP/1.1 on asyncio streams, one coroutine per connection). A sampler polls
   `GET /v1/scaling`. Writes `bench/results/scaling.json` — `time_to_first_extra_instance_s` (from
   the step to the first request that had to make an instance: Server-Timing `start` > 0),
   `time_to_first_extra_replica_s` (to the second replica serving), `p99_ms_before`, `p99_ms_during`,
   `p99_ms_after`, `requests_failed` — and `scaling.png` (load, instances, replicas, p99 over time).
2. `--compare` (on by default): invocations/s at concurrency 16 with 1 and 2 replicas, and with or
   without the gateway's own process serving as a replica, rounds interleaved (`wrk` if installed).
3. `--bursts`: the instance autoscaler's windows against bursts of load (1 s on, 7 s off): cold
   starts per burst and instances kept between bursts, for the default policy and a thesis-like one
   (one reading every 5 s, no panic window).

The machine has 2 cores shared by the generator, the gateway and the workers: every figure is for
that machine, and is as noisy as whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as platform_module
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from suite import stats
from wasminfer import examples, toolchain
from wasminfer.client import Client
from wasminfer.manifest import Manifest

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PATH = "/v1/functions/digits/invoke"
# (from second, clients, think time in ms between a client's requests): low is one client pausing
# 5 ms between requests (~150/s, a small share of the machine); high is 16 clients back to back.
STEP = [(0.0, 1, 5.0), (10.0, 16, 0.0), (40.0, 1, 5.0)]
STEP_END = 90.0
BENCH_SCALING = ["--scaling", "replica_down_window_s=10"]


# --- the server -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(data: Path, port: int, log: Path, args: list[str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wasminfer", "serve", "--data", str(data), "--port", str(port), *args],
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server never became ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def digits() -> tuple[bytes, bytes, Manifest, bytes]:
    example = next(e for e in examples.EXAMPLES if e.name == "digits")
    wasm = toolchain.build(example.folder).read_bytes()
    sample = [float(v) for v in examples.digits_split()[1][0]]
    body = json.dumps({"pixels": sample}).encode()
    return wasm, examples.digits_model(), Manifest.from_dict(example.manifest()), body


def deploy(port: int, wasm: bytes, model: bytes, manifest: Manifest) -> None:
    with Client(f"http://127.0.0.1:{port}") as client:
        client.put_model("digits", model)
        client.put_function("digits", wasm, manifest)


def scaling(port: int) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/v1/scaling", timeout=10).json()
    return data


def wait_serving(port: int, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while scaling(port)["serving"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} replicas never served")
        time.sleep(0.1)


# --- the load generator (a process of its own) ------------------------------------------------------
_LENGTH = re.compile(rb"(?i)content-length: *(\d+)")
_START = re.compile(rb"start;dur=([0-9.]+)")


async def _generate(
    port: int, body: bytes, schedule: list[tuple[float, int, float]], end: float
) -> dict[str, Any]:
    """Runs the schedule of (from second, clients, think ms); returns every request as [sent at
    (s from t0), latency s, status, start ms (Server-Timing: > 0 when it made an instance)]."""
    request = (
        f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    records: list[tuple[float, float, int, float]] = []
    t0 = time.perf_counter()
    wall0 = time.time()

    def phase(t: float) -> tuple[int, float]:
        return next((c, think) for start, c, think in reversed(schedule) if t >= start)

    async def connection(i: int) -> None:
        perf = time.perf_counter
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        last = perf()
        while True:
            now = perf() - t0
            if now >= end:
                break
            clients, think_ms = phase(now)
            if clients <= i:
                await asyncio.sleep(0.005)
                continue
            if think_ms:
                await asyncio.sleep(think_ms / 1000)
            if writer is not None and perf() - last > 4.0:
                writer.close()  # the server closes keep-alive connections idle for 5 s: a new one
                reader = writer = None
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                sent = perf()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                last = perf()
                m = _LENGTH.search(head)
                await reader.readexactly(int(m.group(1)) if m else 0)
                done = perf()
                start = _START.search(head)
                records.append(
                    (sent - t0, done - sent, int(head[9:12]), float(start.group(1)) if start else 0.0)
                )
            except (OSError, asyncio.IncompleteReadError):
                records.append((perf() - t0, 0.0, 0, 0.0))
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
        if writer is not None:
            writer.close()

    top = max(c for _, c, _ in schedule)
    await asyncio.gather(*(connection(i) for i in range(top)))
    return {"t0_wall": wall0, "records": records}


def run_generator(
    port: int, body: bytes, schedule: list[tuple[float, int, float]], end: float, out: Path
) -> Any:
    """Starts the generator in its own process (it would share the sampler's GIL otherwise)."""
    spec = json.dumps(
        {"port": port, "body": body.decode(), "schedule": schedule, "end": end, "out": str(out)}
    )
    return subprocess.Popen([sys.executable, __file__, "--generate", spec], cwd=ROOT)


# --- 1. the step load ---------------------------------------------------------------------------------
def sample_until(port: int, stop: threading.Event, samples: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        while not stop.is_set():
            try:
                snap = client.get("/v1/scaling").json()
            except httpx.HTTPError:
                continue
            instances = {
                r["id"]: r["functions"].get("default/digits", {}).get("live", 0) for r in snap["replicas"]
            }
            samples.append(
                {
                    "at": time.time(),
                    "serving": snap["serving"],
                    "starting": snap["starting"],
                    "instances": instances,
                    "queue_ms_p90": snap["load"]["queue_ms_p90"],
                    "cpu": snap["load"]["cpu"],
                    "decisions": snap["decisions"],
                }
            )
            stop.wait(0.2)


def pct(values: list[float], q: float) -> float:
    return stats.pct(values, q, empty=0.0)  # 0, not NaN, for no samples: the JSON stays strict


def step_load(work: Path, wasm: bytes, model: bytes, manifest: Manifest, body: bytes) -> dict[str, Any]:
    port = free_port()
    args = ["--max-replicas", "2", "--log-level", "warning", *BENCH_SCALING]
    proc = start_server(work / "step-data", port, work / "step.log", args)
    samples: list[dict[str, Any]] = []
    try:
        # idle instances go after 5 s (the default is 300 s), so the plot shows them reaped
        deploy(port, wasm, model, manifest.replace(idle_timeout_s=5))
        stop = threading.Event()
        sampler = threading.Thread(target=sample_until, args=(port, stop, samples))
        sampler.start()
        out = work / "step-records.json"
        print(
            f"step load: clients {' -> '.join(str(c) for _, c, _ in STEP)} over {STEP_END:.0f} s …",
            file=sys.stderr,
        )
        gen = run_generator(port, body, STEP, STEP_END, out)
        gen.wait()
        stop.set()
        sampler.join()
        final = scaling(port)
    finally:
        stop_server(proc)
    data = json.loads(out.read_text())
    t0 = data["t0_wall"]
    records = data["records"]
    step_at, back_at = STEP[1][0], STEP[2][0]
    ok = [r for r in records if r[2] == 200]
    failed = len(records) - len(ok)
    before = [r[1] * 1e3 for r in ok if 2.0 <= r[0] < step_at]
    during = [r[1] * 1e3 for r in ok if step_at <= r[0] < back_at]
    after = [r[1] * 1e3 for r in ok if r[0] >= back_at]
    first_cold = next((r[0] + r[1] for r in ok if r[0] >= step_at and r[3] > 0), None)
    replica_up = next(
        (s["at"] - t0 for s in samples if s["serving"] >= 2 and s["at"] - t0 >= step_at),
        None,
    )
    drained = next((s["at"] - t0 for s in samples if s["at"] - t0 > back_at and s["serving"] == 1), None)
    decisions = [d for d in final["decisions"] if d["scope"] == "replicas"]
    return {
        "time_to_first_extra_instance_s": None if first_cold is None else round(first_cold - step_at, 4),
        "time_to_first_extra_replica_s": None if replica_up is None else round(replica_up - step_at, 2),
        "time_to_drain_after_load_s": None if drained is None else round(drained - back_at, 2),
        "p99_ms_before": round(pct(before, 0.99), 2),
        "p99_ms_during": round(pct(during, 0.99), 2),
        "p99_ms_after": round(pct(after, 0.99), 2),
        "p50_ms_before": round(pct(before, 0.5), 2),
        "p50_ms_during": round(pct(during, 0.5), 2),
        "p50_ms_after": round(pct(after, 0.5), 2),
        "requests": len(records),
        "requests_failed": failed,
        "replica_decisions": [
            {
                "at_s": round(d["at"] - t0, 2),
                "before": d["before"],
                "after": d["after"],
                "reason": d["reason"],
            }
            for d in decisions
        ],
        "_series": _series(records, samples, t0),
    }


def _series(records: list[Any], samples: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Per second: requests/s, p99; per sample: instances per replica, replicas serving."""
    bins: dict[int, list[float]] = {}
    for sent, latency, status, _ in records:
        if status == 200:
            bins.setdefault(int(sent), []).append(latency * 1e3)
    seconds = sorted(bins)
    return {
        "second": seconds,
        "per_s": [len(bins[s]) for s in seconds],
        "p99_ms": [round(pct(bins[s], 0.99), 2) for s in seconds],
        "sample_at": [round(s["at"] - t0, 2) for s in samples],
        "queue_ms_p90": [s["queue_ms_p90"] for s in samples],
        "cpu": [s["cpu"] for s in samples],
        "serving": [s["serving"] for s in samples],
        "instances": [s["instances"] for s in samples],
    }


# --- 2. 1 vs 2 replicas -----------------------------------------------------------------------------
CONFIGS = {
    "1 replica: the gateway's process": [],
    "2 replicas: the gateway's process + 1 worker": ["--min-replicas", "2", "--max-replicas", "2"],
    "1 replica: 1 worker behind the gateway": ["--scaling", "primary_replica=false"],
    "2 replicas: 2 workers behind the gateway": [
        "--min-replicas", "2", "--max-replicas", "2", "--scaling", "primary_replica=false",
    ],
}  # fmt: skip


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by the server's process, and by its worker processes together."""
    import psutil

    server = psutil.Process(pid)
    own = server.cpu_times()
    workers = 0.0
    for child in server.children(recursive=True):
        try:
            t = child.cpu_times()
            workers += t.user + t.system
        except psutil.Error:
            pass
    return own.user + own.system, workers


def _wrk(port: int, body: bytes, concurrency: int, duration: float, work: Path) -> dict[str, float]:
    script = work / "post.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = {json.dumps(body.decode())}\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    cmd = [
        "wrk",
        f"-t{min(2, concurrency)}",
        f"-c{concurrency}",
        f"-d{round(duration)}s",
        "--latency",
        "-s",
        str(script),
    ]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True, check=True
    ).stdout
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * units[m.group(2)] if m else float("nan")

    m = re.search(r"(\d+) requests in ([0-9.]+)(ms|s)", out)
    assert m is not None, out
    seconds = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "per_s": int(m.group(1)) / seconds,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": int(errors.group(1)) if errors else 0,
    }


def _asyncio_fixed(port: int, body: bytes, concurrency: int, duration: float, work: Path) -> dict[str, float]:
    out = work / "fixed.json"
    run_generator(port, body, [(0.0, concurrency, 0.0)], duration, out).wait()
    records = json.loads(out.read_text())["records"]
    ok = [r[1] * 1e3 for r in records if r[2] == 200]
    return {
        "per_s": len(ok) / duration,
        "p50_ms": pct(ok, 0.5),
        "p99_ms": pct(ok, 0.99),
        "errors": len(records) - len(ok),
    }


def compare(work: Path, wasm: bytes, model: bytes, manifest: Manifest, body: bytes, rounds: int,
            duration: float, concurrency: int) -> dict[str, Any]:  # fmt: skip
    load = _wrk if shutil.which("wrk") else _asyncio_fixed
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for r in range(rounds):
        for name, args in CONFIGS.items():
            port = free_port()
            proc = start_server(work / f"cmp-{r}-{len(runs[name])}-{abs(hash(name))}", port, work / "cmp.log",
                                [*args, "--log-level", "warning"])  # fmt: skip
            try:
                deploy(port, wasm, model, manifest)
                wait_serving(port, 2 if "2 replicas" in name else 1)
                load(port, body, concurrency, 2.0, work)  # warm-up: instances, connections, caches
                gateway, workers = _cpu_seconds(proc.pid)
                run = load(port, body, concurrency, duration, work)
                gateway2, workers2 = _cpu_seconds(proc.pid)
                requests = run["per_s"] * duration
                # CPU per request is what caps throughput on 2 cores, and it is much less noisy on a
                # shared machine than throughput itself
                run["gateway_cpu_ms_per_request"] = (gateway2 - gateway) * 1e3 / requests
                run["workers_cpu_ms_per_request"] = (workers2 - workers) * 1e3 / requests
                # one client: what the hop to a worker adds to an invocation's latency
                run["p50_ms_one_client"] = load(port, body, 1, 3.0, work)["p50_ms"]
            finally:
                stop_server(proc)
            runs[name].append(run)
            print(
                f"  round {r + 1}: {name:<48} {run['per_s']:7.0f}/s  p99 {run['p99_ms']:7.1f} ms  "
                f"CPU ms/request: gateway {run['gateway_cpu_ms_per_request']:.3f}, "
                f"workers {run['workers_cpu_ms_per_request']:.3f}",
                file=sys.stderr,
            )
    summary = {
        name: {
            "per_s_median": round(statistics.median(x["per_s"] for x in rs), 1),
            "p50_ms_median": round(statistics.median(x["p50_ms"] for x in rs), 2),
            "p99_ms_median": round(statistics.median(x["p99_ms"] for x in rs), 2),
            "per_s_rounds": [round(x["per_s"], 1) for x in rs],
            "errors": sum(int(x["errors"]) for x in rs),
            "p50_ms_one_client_median": round(statistics.median(x["p50_ms_one_client"] for x in rs), 3),
            "gateway_cpu_ms_per_request": round(
                statistics.median(x["gateway_cpu_ms_per_request"] for x in rs), 3
            ),
            "workers_cpu_ms_per_request": round(
                statistics.median(x["workers_cpu_ms_per_request"] for x in rs), 3
            ),
        }
        for name, rs in runs.items()
    }
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "rounds": rounds,
        "generator": load.__name__.strip("_"),
        "configs": summary,
    }


# --- 3. the instance autoscaler against bursts --------------------------------------------------------
POLICIES = {
    "default (tick 0.5 s, stable 30 s, panic 3 s)": [],
    "thesis-like (one reading every 5 s, no panic)": [
        "--scaling", "instance_tick_s=5", "--scaling", "instance_panic_window_s=5",
        "--scaling", "instance_stable_window_s=5", "--scaling", "instance_panic_threshold=1000",
    ],
}  # fmt: skip


BURSTS, PERIOD = 5, 8.0


def bursts(work: Path, wasm: bytes, model: bytes, manifest: Manifest, body: bytes) -> dict[str, Any]:
    schedule: list[tuple[float, int, float]] = []
    for k in range(BURSTS):
        schedule += [(k * PERIOD, 16, 0.0), (k * PERIOD + 1.0, 0, 0.0)]
    out: dict[str, Any] = {}
    # idle instances are reaped after 2 s (not the default 300 s) so that the windows, not the idle
    # timeout, decide what stays warm between bursts
    quick = manifest.replace(idle_timeout_s=2)
    for name, args in POLICIES.items():
        port = free_port()
        proc = start_server(
            work / f"burst-{len(out)}", port, work / "burst.log", [*args, "--log-level", "warning"]
        )
        try:
            deploy(port, wasm, model, quick)
            stop = threading.Event()
            samples: list[dict[str, Any]] = []
            sampler = threading.Thread(target=sample_until, args=(port, stop, samples))
            sampler.start()
            path = work / "burst.json"
            run_generator(port, body, schedule, BURSTS * PERIOD, path).wait()
            stop.set()
            sampler.join()
        finally:
            stop_server(proc)
        data = json.loads(path.read_text())
        ok = [r for r in data["records"] if r[2] == 200]
        per_burst = [
            sum(1 for r in ok if k * PERIOD <= r[0] < k * PERIOD + 1 and r[3] > 0) for k in range(BURSTS)
        ]
        t0 = data["t0_wall"]
        between = [
            s["instances"].get("primary", 0)
            for s in samples
            if (s["at"] - t0) % PERIOD > PERIOD - 1 and s["at"] - t0 > PERIOD
        ]
        out[name] = {
            "cold_starts_per_burst": per_burst,
            "cold_starts_after_the_first_burst": sum(per_burst[1:]),
            "instances_between_bursts_median": statistics.median(between) if between else None,
            "p99_ms": round(pct([r[1] * 1e3 for r in ok], 0.99), 2),
            "requests_failed": len(data["records"]) - len(ok),
        }
        print(f"  {name}: {out[name]}", file=sys.stderr)
    return out


# --- the plot -----------------------------------------------------------------------------------------
def plot(step: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'wasminfer[bench]'): no scaling.png", file=sys.stderr)
        return
    s = step["_series"]
    fig, axes = plt.subplots(
        4, 1, figsize=(9, 9), sharex=True, gridspec_kw={"height_ratios": [1.2, 1, 0.7, 1.2]}
    )
    ax = axes[0]
    ax.step([t for t, _, _ in STEP] + [STEP_END], [c for _, c, _ in STEP] + [STEP[-1][1]], where="post",
            color="k", label="clients")  # fmt: skip
    ax.set_ylabel("concurrency")
    ax2 = ax.twinx()
    ax2.plot(s["second"], s["per_s"], color="tab:blue", lw=1, label="invocations/s")
    ax2.set_ylabel("invocations/s", color="tab:blue")
    ax.set_title("digits over HTTP, serve --max-replicas 2: a step from 1 to 16 clients and back")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    replicas = sorted({r for inst in s["instances"] for r in inst})
    for rid in replicas:
        ax.plot(
            s["sample_at"], [inst.get(rid, 0) for inst in s["instances"]], lw=1.2, label=f"instances in {rid}"
        )
    ax.set_ylabel("live instances")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    ax.step(s["sample_at"], s["serving"], where="post", color="tab:green")
    ax.set_ylabel("replicas")
    ax.set_yticks([0, 1, 2])
    ax.set_ylim(0, 2.5)
    ax = axes[3]
    ax.plot(s["second"], s["p99_ms"], color="tab:red", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("p99 per second (ms)")
    ax.set_xlabel("seconds")
    for d in step["replica_decisions"]:
        for a in axes:
            a.axvline(
                d["at_s"], color="tab:green" if d["after"] > d["before"] else "tab:orange", ls="--", lw=0.8
            )
    axes[2].text(
        0.01,
        0.85,
        "dashed: replica decisions (green up, orange down)",
        transform=axes[2].transAxes,
        fontsize=8,
    )
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    ap.add_argument("--no-step", action="store_true", help="skip the step load")
    ap.add_argument("--no-compare", action="store_true", help="skip 1 vs 2 replicas")
    ap.add_argument("--bursts", action="store_true", help="also: instance autoscaler policies vs bursts")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the comparison")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per comparison run")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if args.generate:
        spec = json.loads(args.generate)
        result = asyncio.run(
            _generate(spec["port"], spec["body"].encode(), [tuple(x) for x in spec["schedule"]], spec["end"])
        )
        Path(spec["out"]).write_text(json.dumps(result))
        return

    print("building functions/digits …", file=sys.stderr)
    wasm, model, manifest, body = digits()
    path = RESULTS / "scaling.json"
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:  # after every part: a later part that fails loses nothing
        results["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform_module.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        }
        path.write_text(json.dumps(results, indent=2) + "\n")

    def load_average() -> list[float]:
        return [round(x, 2) for x in os.getloadavg()]

    with tempfile.TemporaryDirectory(prefix="wasminfer-bench-scaling-") as tmp:
        work = Path(tmp)
        if not args.no_step:
            before = load_average()
            step = step_load(work, wasm, model, manifest, body)
            plot(step, RESULTS / "scaling.png")
            results.update(step)
            results["series"] = results.pop("_series")
            results["step"] = {
                "schedule": STEP,
                "end_s": STEP_END,
                "server_args": ["--max-replicas", "2", *BENCH_SCALING],
                "load_average_before_after": [before, load_average()],
            }
            save()
        if not args.no_compare:
            print(f"1 vs 2 replicas at concurrency {args.concurrency} …", file=sys.stderr)
            before = load_average()
            results["replicas_throughput"] = compare(
                work, wasm, model, manifest, body, args.rounds, args.duration, args.concurrency
            )
            results["replicas_throughput"]["load_average_before_after"] = [before, load_average()]
            save()
        if args.bursts:
            print("instance autoscaler policies against bursts …", file=sys.stderr)
            results["instance_policies"] = bursts(work, wasm, model, manifest, body)
            save()
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict | list)}, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
