"""Ray replica benchmark (`just bench-ray`): invocations/s of the digits function with 1, 2 and 4 host
replicas as Ray actors, against as many local worker processes and against the gateway's own process,
and what the Ray hop costs per request. Writes `bench/results/ray.json` (and `ray.png` with matplotlib).
(Not `bench/ray.py`: run as a script, that would shadow the `ray` package.)

It drives the fleet — the gateway's router, admission and backends — from this process, as the
gateway does, with closed-loop clients at concurrency 1 (latency: every path is bound by its hops)
and 16 (throughput). The HTTP part of a request is the same whatever the backend (`bench/gateway.py`
measures it). Every backend gets the same function and model from the same data folder; each
replica is warmed before it is measured; `primary_replica=false` for the local and Ray runs, so every
request crosses to a replica.

The hop is measured first, in `--hop-rounds` interleaved rounds (the gateway's own process, one
local worker, one Ray actor, in turn, at concurrency 1), so that a burst of load from elsewhere on
the machine hits all three alike: per request (the median over rounds of the Ray p50 minus the
other two), and as a bare round trip (an actor method that returns its argument; a local worker's
`/readyz` over its unix socket).

Ray binds to the machine's external interface whatever it is told: the script re-runs itself in a
network namespace with only loopback up (as root: `unshare -n`; else `unshare -rn`) and a private
`RAY_TMPDIR`, starts a one-node Ray there (`num_cpus` 4, so four actors of one CPU fit), and records
that nothing listened outside loopback. The machine has 2 cores: every replica, Ray's own processes
and this load generator share them (and whatever else runs there: the JSON records the load
average before the benchmark and after each run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as platform_module
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from suite.stats import pct

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
REPLICAS = (1, 2, 4)


@dataclass
class Run:
    backend: str  # in-process | local | ray
    replicas: int
    concurrency: int
    invocations: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    loadavg: float  # the machine's 1-minute load average after the run (it is shared)

    @property
    def per_s(self) -> float:
        return self.invocations / self.seconds


def _loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _reexec_in_namespace() -> None:
    """Runs this script again inside a network namespace with only `lo` up, and exits with it."""
    if shutil.which("unshare") is None:
        sys.exit("bench/ray_replicas.py needs unshare (util-linux) to keep Ray on loopback")
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    ray_tmp = tempfile.mkdtemp(prefix="wir-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [*unshare, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    try:
        code = subprocess.run(command, env=env, check=False).returncode
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    sys.exit(code)


# --- load -------------------------------------------------------------------------------------------
async def drive(fleet: Any, body: bytes, concurrency: int, duration: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0

    async def client(deadline: float) -> None:
        nonlocal errors
        perf = time.perf_counter
        while True:
            t0 = perf()
            try:
                await fleet.invoke("default", "digits", body, "application/json")
            except Exception:
                errors += 1
            t1 = perf()
            latencies.append(t1 - t0)
            if t1 > deadline:
                return

    await asyncio.gather(*(client(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
    latencies.clear()
    errors = 0
    await asyncio.gather(*(client(time.perf_counter() + duration) for _ in range(concurrency)))
    return latencies, errors


async def started_fleet(platform: Any, backend: str, replicas: int, body: bytes) -> Any:
    """A fleet of `replicas` of `backend` (or the gateway's own process only), every replica serving
    and holding the function."""
    from wasminfer.replicas import Fleet
    from wasminfer.scaling import ScalingConfig
    from wasminfer.service import deployment_digest

    if backend == "in-process":
        config = ScalingConfig()
    else:
        config = ScalingConfig(
            backend=backend, primary_replica=False, min_replicas=replicas, max_replicas=replicas
        )
    fleet = Fleet(platform, config)
    await fleet.start()
    deadline = time.monotonic() + 120
    while len(fleet._serving) < replicas:
        if time.monotonic() > deadline:
            await fleet.aclose()
            raise SystemExit(f"{backend}: {replicas} replicas did not start within 120 s")
        await asyncio.sleep(0.05)
    digest = deployment_digest(platform.deployed("digits"))
    for r in fleet._serving:  # every replica loads the function before it is measured
        if not r.holds_all:
            await r.backend.route(r, "default", "digits", digest, body, "application/json")
            r.warm.add(("default", "digits"))
    return fleet


async def measure(
    platform: Any, backend: str, replicas: int, body: bytes, args: argparse.Namespace
) -> list[Run]:
    fleet = await started_fleet(platform, backend, replicas, body)
    runs = []
    try:
        for c in args.concurrency:
            started = time.perf_counter()
            latencies, errors = await drive(fleet, body, c, args.duration)
            elapsed = time.perf_counter() - started
            run = Run(backend, replicas, c, len(latencies), elapsed, pct(latencies, 0.5) * 1e3,
                      pct(latencies, 0.99) * 1e3, errors, round(os.getloadavg()[0], 1))  # fmt: skip
            runs.append(run)
            print(
                f"{backend:>10} x{replicas} c={c:<3} {run.per_s:8.0f}/s  p50 {run.p50_ms:7.3f} ms  "
                f"p99 {run.p99_ms:7.3f} ms  errors {errors}  (load {run.loadavg})",
                file=sys.stderr,
            )
    finally:
        await fleet.aclose()
    return runs


async def hop_rounds(platform: Any, body: bytes, rounds: int, duration: float) -> dict[str, Any]:
    """The cost of the hop, robust to a busy machine: the gateway's own process, one local worker and
    one Ray actor measured in turn at concurrency 1, `rounds` times; the medians of the per-round
    differences of their p50s, and of the bare round trips."""
    fleets = {b: await started_fleet(platform, b, 1, body) for b in ("in-process", "local", "ray")}
    p50: dict[str, list[float]] = {b: [] for b in fleets}
    bare: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        for n in range(rounds):
            for backend, fleet in fleets.items():
                latencies, _ = await drive(fleet, body, 1, duration)
                p50[backend].append(pct(latencies, 0.5) * 1e3)
                if backend in bare:
                    bare[backend].append(await bare_round_trip(fleet._serving[0], 500))
            print(
                f"hop round {n + 1}/{rounds}: p50 "
                + ", ".join(f"{b} {v[-1]:.3f} ms" for b, v in p50.items()),
                file=sys.stderr,
            )
    finally:
        for fleet in fleets.values():
            await fleet.aclose()

    def median_of(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    def minus(other: str) -> float:
        return median_of([r - o for r, o in zip(p50["ray"], p50[other], strict=True)])

    return {
        "rounds": rounds,
        "p50_ms_by_round": {b: [round(x, 3) for x in v] for b, v in p50.items()},
        "ray_minus_in_process_ms_p50": minus("in-process"),
        "ray_minus_local_ms_p50": minus("local"),
        "bare_round_trip_ms_p50": {b: median_of(v) for b, v in bare.items()},
        "note": "per request at concurrency 1, one replica: the Ray backend's p50 minus that of the "
        "gateway's own process (the default path: no hop) and of one local worker process, median over "
        "rounds; the bare round trip is an actor method returning its argument, or a worker's /readyz "
        "on its socket",
    }


async def bare_round_trip(replica: Any, n: int = 2000) -> float:
    """The hop alone: an actor method returning its argument, or a worker's /readyz over its socket."""
    times = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        if replica.kind == "ray":
            await replica.handle.handle.ping.remote(b"")
        elif hasattr(replica.handle, "http"):  # the local backend's own keep-alive client
            await replica.handle.http.request("GET", "/readyz")
        else:
            await replica.handle.client.get("/readyz")
        if i >= 200:
            times.append(time.perf_counter() - t0)
    return pct(times, 0.5) * 1e3


# --- main ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--replicas", type=int, nargs="+", default=list(REPLICAS))
    ap.add_argument("--hop-rounds", type=int, default=5, help="rounds of the interleaved hop measurement")
    args = ap.parse_args()
    if not _loopback_only():
        _reexec_in_namespace()
    loadavg = os.getloadavg()

    import ray

    from wasminfer import examples, toolchain
    from wasminfer.manifest import Manifest
    from wasminfer.service import Platform

    print("building functions/digits …", file=sys.stderr)
    example = next(e for e in examples.EXAMPLES if e.name == "digits")
    wasm = toolchain.build(example.folder).read_bytes()
    sample = [float(v) for v in examples.digits_split()[1][0]]
    body = json.dumps({"pixels": sample}).encode()

    started = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start_s = time.perf_counter() - started
    data = Path(tempfile.mkdtemp(prefix="wasminfer-bench-ray-"))
    platform = Platform(data / "data")
    runs: list[Run] = []
    hop: dict[str, Any] = {}
    try:
        platform.start()
        platform.put_model("digits", examples.digits_model())
        platform.put_function("digits", wasm, Manifest.from_dict(example.manifest()))
        assert json.loads(platform.invoke("digits", body, "application/json").body)["label"] >= 0

        async def everything() -> None:
            hop.update(await hop_rounds(platform, body, args.hop_rounds, 1.0))
            runs.extend(await measure(platform, "in-process", 1, body, args))
            for backend in ("local", "ray"):
                for n in args.replicas:
                    runs.extend(await measure(platform, backend, n, body, args))

        asyncio.run(everything())
        listening = subprocess.run(["ss", "-ltnuH"], capture_output=True, text=True).stdout.splitlines()
    finally:
        platform.close()
        ray.shutdown()
        shutil.rmtree(data, ignore_errors=True)

    addresses = sorted({line.split()[4].rsplit(":", 1)[0] for line in listening if line.strip()})
    results = {
        "function": "digits (functions/digits, C handler ABI; the scikit-learn digits model in ONNX)",
        "hop": hop,
        "runs": [{**asdict(r), "invocations_per_s": round(r.per_s, 1)} for r in runs],
        "duration_s": args.duration,
        "ray": {
            "version": ray.__version__,
            "start_s": round(ray_start_s, 2),
            "listening_addresses": addresses,
            "only_loopback": all(a.strip("[]").startswith(("127.", "::1", "::ffff:127.")) for a in addresses),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in loadavg],
            "python": platform_module.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["hop"], indent=2), file=sys.stderr)
    _plot(runs)
    print(f"wrote {RESULTS / 'ray.json'}", file=sys.stderr)


def _plot(runs: list[Run]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'wasminfer[bench]'): no ray.png", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    concurrencies = sorted({r.concurrency for r in runs})
    for ax, c, what in ((axes[0], concurrencies[-1], "per_s"), (axes[1], concurrencies[0], "p50_ms")):
        for offset, backend in ((-0.2, "local"), (0.2, "ray")):
            mine = [r for r in runs if r.backend == backend and r.concurrency == c]
            ax.bar([r.replicas + offset for r in mine], [getattr(r, what) for r in mine], 0.4, label=backend)
        base = [r for r in runs if r.backend == "in-process" and r.concurrency == c]
        if base:
            ax.axhline(getattr(base[0], what), color="grey", linestyle="--", label="gateway's own process")
        ax.set_xticks(sorted({r.replicas for r in runs if r.backend != "in-process"}))
        ax.set_xlabel("replicas")
        ax.set_ylabel("invocations / s" if what == "per_s" else "p50 latency (ms)")
        ax.set_title(f"concurrency {c}")
        ax.legend(fontsize=8)
    fig.suptitle("digits through the fleet: local worker processes vs Ray actors (2 cores)")
    fig.tight_layout()
    tmp = RESULTS / "ray.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, RESULTS / "ray.png")


if __name__ == "__main__":
    main()
