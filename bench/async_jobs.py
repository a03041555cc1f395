"""Asynchronous bulk invocation against synchronous requests (`just bench-async`).

The digits example (built from source, its model made in code), behind a real server on 127.0.0.1
(a subprocess; this process is the load generator). The inputs are 10,000 fixed digit images
(scikit-learn's `load_digits`, in order, repeated), each `{"pixels": [64 numbers]}`.

1. `sync_items_per_s`: the items as synchronous `POST /invoke` requests, from `wrk` (C, keep-alive
   connections, a Lua script cycling through the items) at concurrency 1, 4, 16 and 64: the best.
2. `bulk_items_per_s`: the same items as one `POST /batch` (JSON Lines), from the POST until the job
   has finished (upload, parse, durable store, run, commit); `bulk_run_items_per_s` from the job's
   own timings (first item to last commit). Every label is checked against the synchronous answer.
3. `sync_p99_ms_idle`: a paced probe (one keep-alive connection, `--rate` requests/s for `--probe-s`
   seconds, the next request at its time or at once if late) on the otherwise idle server.
4. `sync_p99_ms_during_bulk`: the same probe while a bulk job runs (one sized to outlast the probe);
   also the bulk's items/s during the probe (what async work got of the capacity the probe left).
   Idle and during-bulk probes alternate for `--rounds` rounds; the p99s are over all their
   requests (each round's are in the JSON too).

The digits model is loaded with dynamic batching (`--max-batch-size`, default 32; 0: off), so
concurrent infer calls can be stacked into batched runs; the server writes the job runner's and
the model's batching counters (cumulative over the run) when it stops: `server_stats` in the
JSON. On a 2-core machine the generator, the server's event loop and its workers share the cores.
Writes `bench/results/async.json` (and `async.png` if matplotlib is there).
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
import time
from pathlib import Path
from typing import Any

import httpx

from suite.stats import pct

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
INVOKE = "/v1/functions/digits/invoke"
TARGET_RATIO = 1.5


def progress(message: str) -> None:
    print(f"[bench-async] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the server (a subprocess running this file with --serve) -------------------------------------
def serve(data: Path, port: int, wasm: Path, max_batch_size: int) -> None:
    import uvicorn

    from wasminfer import examples
    from wasminfer.gateway import create_app
    from wasminfer.manifest import Manifest
    from wasminfer.service import Platform

    platform = Platform(data)
    platform.start()
    model = examples.digits_model()
    platform.put_model("digits", model)
    manifest = json.loads((examples.functions_dir() / "digits" / "manifest.json").read_text())
    platform.put_function("digits", wasm.read_bytes(), Manifest.from_dict(manifest))
    if max_batch_size > 1:  # the registry's batching knobs (not exposed over HTTP here)
        platform.host().deploy_model("digits", model, max_batch_size=max_batch_size)
    app = create_app(platform)
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    finally:
        # What the job runner and the sync gate counted, for the report.
        stats: dict[str, Any] = {"jobs": app.state.wasminfer.jobs.stats()}
        batching = platform.host().models.stats("digits").batching
        if batching is not None:  # cumulative over the whole run: sync and bulk phases together
            stats["digits_batching"] = {
                k: v for k, v in batching.to_dict().items() if not k.endswith(("buckets", "sum"))
            }
        (data.parent / "job-stats.json").write_text(json.dumps(stats))
        platform.close()


def start_server(
    data: Path, wasm: Path, max_batch_size: int, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = data.parent / "server.log"
    cmd = [sys.executable, __file__, "--serve", str(data), str(port), str(wasm), str(max_batch_size)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **env})
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server never became ready:\n{log.read_text()}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- synchronous load: wrk ------------------------------------------------------------------------
_LUA = """
local bodies, n, i = {}, 0, 0
init = function(args)
  for line in io.lines(args[1]) do n = n + 1; bodies[n] = line end
  i = math.random(n)
end
request = function()
  i = i % n + 1
  return wrk.format("POST", nil, {["content-type"] = "application/json"}, bodies[i])
end
"""


def wrk(port: int, items_file: Path, concurrency: int, duration: float) -> dict[str, Any]:
    script = items_file.parent / "items.lua"
    script.write_text(_LUA)
    cmd = [
        "wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s", "--latency",
        "-s", str(script), f"http://127.0.0.1:{port}{INVOKE}", "--", str(items_file),
    ]  # fmt: skip
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors = sum(int(m) for m in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    errors += sum(int(m) for m in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))

    def latency(q: str) -> float:
        m = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", text)
        assert m is not None, text
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": max(1, round(duration)),
        "items_per_s": round(requests / max(1, round(duration)), 1),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": errors,
    }


# --- the paced latency probe ----------------------------------------------------------------------
async def _probe(
    port: int, bodies: list[bytes], rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    """Round-trip latencies, and the server's own time (its Server-Timing `total`), in seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies: list[float] = []
    server: list[float] = []
    start = time.perf_counter()
    try:
        for k in range(int(rate * seconds)):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies[k % len(bodies)]
            request = (
                f"POST {INVOKE} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            ).encode() + body
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            latencies.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"probe request failed: {head[:80]!r}")
            total = re.search(rb"total;dur=([\d.]+)", head)
            if total:
                server.append(float(total.group(1)) / 1e3)
    finally:
        writer.close()
    return latencies, server


def probe(port: int, bodies: list[bytes], rate: float, seconds: float) -> tuple[list[float], list[float]]:
    return asyncio.run(_probe(port, bodies, rate, seconds))


def summary(latencies: tuple[list[float], list[float]]) -> dict[str, Any]:
    trip, server = latencies
    return {
        "requests": len(trip),
        "p50_ms": round(pct(trip, 0.50) * 1e3, 3),
        "p99_ms": round(pct(trip, 0.99) * 1e3, 3),
        "max_ms": round(max(trip) * 1e3, 3),
        # The gateway's own time (Server-Timing `total`): without the client's share of the delays.
        "server_p50_ms": round(pct(server, 0.50) * 1e3, 3) if server else None,
        "server_p99_ms": round(pct(server, 0.99) * 1e3, 3) if server else None,
    }


# --- bulk -----------------------------------------------------------------------------------------
def submit(http: httpx.Client, body: bytes) -> dict[str, Any]:
    r = http.post("/v1/functions/digits/batch", content=body, headers={"content-type": "application/jsonl"})
    r.raise_for_status()
    job: dict[str, Any] = r.json()
    return job


def wait(http: httpx.Client, job_id: str, poll_s: float = 0.02) -> dict[str, Any]:
    while True:
        view: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        time.sleep(poll_s)


def bulk(http: httpx.Client, body: bytes, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    started = time.perf_counter()
    job = submit(http, body)
    accepted = time.perf_counter() - started
    view = wait(http, job["id"])
    elapsed = time.perf_counter() - started
    fetch = time.perf_counter()
    lines = [json.loads(line) for line in http.get(f"/v1/jobs/{job['id']}/result").text.splitlines()]
    fetched = time.perf_counter() - fetch
    assert view["status"] == "succeeded" and view["items"]["succeeded"] == n, view
    t = view["timings"]
    return {
        "items": n,
        "input_bytes": len(body),
        "accepted_s": round(accepted, 3),
        "seconds": round(elapsed, 3),
        "bulk_items_per_s": round(n / elapsed, 1),
        "run_s": t["run_s"],
        "run_items_per_s": round(n / t["run_s"], 1),
        "results_fetch_s": round(fetched, 3),
    }, lines


def _plot(result: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sync = result["sync_runs"]
    a.bar([f"sync c={r['concurrency']}" for r in sync] + ["bulk"],
          [r["items_per_s"] for r in sync] + [result["bulk_items_per_s"]],
          color=["#8aa"] * len(sync) + ["#c63"])  # fmt: skip
    a.set_ylabel("items/s")
    a.set_title(f"{result['items']} digits items")
    b.bar(["idle", "during bulk"], [result["sync_p99_ms_idle"], result["sync_p99_ms_during_bulk"]],
          color=["#8aa", "#c63"])  # fmt: skip
    b.axhline(result["sync_p99_ms_idle"] * TARGET_RATIO, ls="--", c="k", lw=1, label=f"{TARGET_RATIO}x idle")
    b.set_ylabel("sync p99, ms")
    b.set_title(f"sync p99 of a paced probe, {result['probe']['rate_per_s']:.0f} requests/s")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "async.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="digits model batching (0: off)")
    parser.add_argument("--workers", type=int, default=None, help="async workers (default: the server's)")
    parser.add_argument("--rate", type=float, default=100.0, help="probe requests/s")
    parser.add_argument("--probe-s", type=float, default=5.0, help="seconds per probe")
    parser.add_argument("--rounds", type=int, default=6, help="idle/during-bulk probe pairs")
    parser.add_argument("--sync-s", type=float, default=5.0, help="seconds per sync concurrency")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--output", type=Path, default=RESULTS / "async.json")
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    from wasminfer import examples, toolchain

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")
    progress("building functions/digits")
    wasm = toolchain.build(examples.functions_dir() / "digits")
    from sklearn.datasets import load_digits

    x_all = load_digits().data
    bodies = [
        json.dumps({"pixels": [int(v) for v in x_all[i % len(x_all)]]}, separators=(",", ":")).encode()
        for i in range(args.items)
    ]
    jsonl = b"\n".join(bodies) + b"\n"
    env = {} if args.workers is None else {"WASMINFER_ASYNC_WORKERS": str(args.workers)}
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        items_file = Path(tmp) / "items.jsonl"
        items_file.write_bytes(jsonl)
        proc, port = start_server(Path(tmp) / "data", wasm, args.max_batch_size, env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
                progress("warming up")
                for body in bodies[:500]:
                    http.post(INVOKE, content=body, headers={"content-type": "application/json"})
                expected = [
                    http.post(INVOKE, content=b, headers={"content-type": "application/json"}).json()["label"]
                    for b in bodies[:1797]
                ]
                sync_runs = []
                for c in (int(v) for v in args.concurrency.split(",")):
                    progress(f"sync, concurrency {c}, {args.sync_s:g} s")
                    sync_runs.append(wrk(port, items_file, c, args.sync_s))
                best = max(sync_runs, key=lambda r: r["items_per_s"])
                progress(f"bulk of {args.items} items")
                bulk_stats, lines = bulk(http, jsonl, args.items)
                labels = [line["output"]["label"] for line in lines]
                mismatched = sum(label != expected[i % len(expected)] for i, label in enumerate(labels))
                # A bulk job that outlasts a probe: its items/s times the probe time, and some.
                n_during = int(
                    min(300_000, max(args.items, bulk_stats["run_items_per_s"] * (args.probe_s + 5)))
                )
                reps = -(-n_during // args.items)
                # Idle and during-bulk probes alternate, so that both see the same machine (other
                # processes' load drifts over minutes on a shared one).
                idle_all: tuple[list[float], list[float]] = ([], [])
                during_all: tuple[list[float], list[float]] = ([], [])
                rounds = []
                for r in range(args.rounds):
                    progress(f"round {r + 1}/{args.rounds}: probe on the idle server, {args.rate:g}/s")
                    lat_idle = probe(port, bodies, args.rate, args.probe_s)
                    progress(
                        f"round {r + 1}/{args.rounds}: probe during a bulk job of {reps * args.items} items"
                    )
                    job = submit(http, jsonl * reps)
                    while http.get(f"/v1/jobs/{job['id']}").json()["items"]["done"] == 0:
                        time.sleep(0.01)
                    time.sleep(0.3)
                    before = http.get(f"/v1/jobs/{job['id']}").json()["items"]["done"]
                    t0 = time.perf_counter()
                    lat_during = probe(port, bodies, args.rate, args.probe_s)
                    t1 = time.perf_counter()
                    after = http.get(f"/v1/jobs/{job['id']}").json()
                    http.delete(f"/v1/jobs/{job['id']}")
                    during_round = summary(lat_during)
                    during_round["bulk_items_per_s"] = round((after["items"]["done"] - before) / (t1 - t0), 1)
                    during_round["bulk_outlasted_probe"] = after["status"] == "running"
                    rounds.append({"idle": summary(lat_idle), "during_bulk": during_round})
                    for pooled, lat in ((idle_all, lat_idle), (during_all, lat_during)):
                        pooled[0].extend(lat[0])
                        pooled[1].extend(lat[1])
                    time.sleep(1.0)  # the cancelled job's started chunks finish
                idle, during = summary(idle_all), summary(during_all)
                during["bulk_items_per_s"] = round(
                    statistics.median(r["during_bulk"]["bulk_items_per_s"] for r in rounds), 1
                )
        finally:
            stop_server(proc)
        stats_file = Path(tmp) / "job-stats.json"
        server_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}

    result = {
        "items": args.items,
        "bulk_items_per_s": bulk_stats["bulk_items_per_s"],
        "sync_items_per_s": best["items_per_s"],
        "sync_best_concurrency": best["concurrency"],
        "sync_p99_ms_idle": idle["p99_ms"],
        "sync_p99_ms_during_bulk": during["p99_ms"],
        "p99_ratio_during_over_idle": round(during["p99_ms"] / idle["p99_ms"], 2),
        "server_p99_ms_idle": idle["server_p99_ms"],
        "server_p99_ms_during_bulk": during["server_p99_ms"],
        "target_ratio": TARGET_RATIO,
        "bulk_over_sync": round(bulk_stats["bulk_items_per_s"] / best["items_per_s"], 2),
        "bulk": bulk_stats,
        "label_mismatches": mismatched,
        "sync_runs": sync_runs,
        "probe": {
            "idle": idle,
            "during_bulk": during,
            "rounds": rounds,
            "rate_per_s": args.rate,
            "seconds_per_round": args.probe_s,
        },
        "config": {
            "max_batch_size": args.max_batch_size,
            "workers": args.workers,
            "generator": "wrk (sync throughput), asyncio paced probe (latency)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform_module.python_version(),
            # Other processes on a shared machine: 1-, 5-, 15-minute load averages.
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "server_stats": server_stats,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.output == RESULTS / "async.json":
        _plot(result)
    print(f"{'sync items/s (best c=' + str(best['concurrency']) + ')':<34}{best['items_per_s']:>10,.0f}")
    print(f"{'bulk items/s (end to end)':<34}{bulk_stats['bulk_items_per_s']:>10,.0f}")
    print(f"{'bulk items/s (run)':<34}{bulk_stats['run_items_per_s']:>10,.0f}")
    print(f"{'sync p99 idle, ms':<34}{idle['p99_ms']:>10.2f}")
    ratio = result["p99_ratio_during_over_idle"]
    print(f"{'sync p99 during bulk, ms':<34}{during['p99_ms']:>10.2f}  ({ratio}x idle)")
    server = f"{idle['server_p99_ms']:>10.2f} / {during['server_p99_ms']:.2f}"
    print(f"{'server-side p99 idle / during, ms':<34}{server}")
    print(f"{'bulk items/s during the probe':<34}{during['bulk_items_per_s']:>10,.0f}")
    print(f"label mismatches: {mismatched}; wrote {args.output}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
