"""HTTP gateway benchmark (`just bench-gateway`): the digits function through a real server on
loopback, next to `Host.invoke` of the same function in-process.

Builds `functions/digits` from source, starts `wasminfer serve` (uvicorn) on 127.0.0.1 with a
temporary data folder, deploys the function and its model with `wasminfer.Client`, then measures
invocations/s, p50 and p99 at concurrency 1 and 16 with a load generator:

- `wrk` (Debian's package, C, keep-alive connections) when it is installed — the default;
- `asyncio`: keep-alive HTTP/1.1 connections written by hand on asyncio streams, one coroutine per
  connection (about 4x cheaper per request than httpx);
- `httpx`: an `httpx.AsyncClient` pool (shows what a Python generator costs: it saturates a core).

The machine has 2 cores shared by the generator, the server's event loop and its worker threads, so
the generator's own CPU counts against the server at concurrency 16; at concurrency 1 every path is
latency-bound. Prints a table and writes `bench/results/gateway.json` with `http_overhead_ms_p50`
(the HTTP p50 minus the in-process p50, at concurrency 1), and `gateway.png` if matplotlib is there.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from suite.stats import pct
from wasminfer import examples, toolchain
from wasminfer.client import Client
from wasminfer.manifest import Manifest
from wasminfer.runtime import Host

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD_MS = 0.5
PATH = "/v1/functions/digits/invoke"


@dataclass
class Run:
    path: str  # in-process | http
    concurrency: int
    invocations: int
    seconds: float
    p50_ms: float
    p99_ms: float
    generator: str = ""
    server_total_p50_ms: float | None = None  # the gateway's own time (Server-Timing total), HTTP only
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.invocations / self.seconds


# --- in-process -----------------------------------------------------------------------------------
def in_process(host: Host, body: bytes, concurrency: int, duration: float) -> Run:
    for _ in range(200):
        host.invoke("digits", body, "application/json")
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    deadline = time.perf_counter() + duration

    def worker(out: list[float]) -> None:
        invoke, perf = host.invoke, time.perf_counter
        while True:
            t0 = perf()
            invoke("digits", body, "application/json")
            t1 = perf()
            out.append(t1 - t0)
            if t1 > deadline:
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(latencies[i],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for xs in latencies for x in xs]
    return Run("in-process", concurrency, len(flat), elapsed, pct(flat, 0.5) * 1e3, pct(flat, 0.99) * 1e3)


# --- load generators ------------------------------------------------------------------------------
_TOTAL = re.compile(rb"total;dur=([0-9.]+)")


async def _asyncio_load(port: int, body: bytes, concurrency: int, duration: float) -> Run:
    request = (
        f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    server_ms: list[float] = []
    errors = 0

    async def connection(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        perf = time.perf_counter
        try:
            while True:
                t0 = perf()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                t1 = perf()
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                latencies.append(t1 - t0)
                m = _TOTAL.search(head)
                if m:
                    server_ms.append(float(m.group(1)))
                if t1 > deadline:
                    return
        finally:
            writer.close()

    await asyncio.gather(*(connection(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
    latencies.clear()
    server_ms.clear()
    started = time.perf_counter()
    await asyncio.gather(*(connection(started + duration) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return Run(
        "http",
        concurrency,
        len(latencies),
        elapsed,
        pct(latencies, 0.5) * 1e3,
        pct(latencies, 0.99) * 1e3,
        "asyncio",
        statistics.median(server_ms) if server_ms else None,
        errors,
    )


async def _httpx_load(port: int, body: bytes, concurrency: int, duration: float) -> Run:
    url = f"http://127.0.0.1:{port}{PATH}"
    latencies: list[float] = []
    server_ms: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker(deadline: float) -> None:
            nonlocal errors
            headers = {"content-type": "application/json"}
            while True:
                t0 = time.perf_counter()
                r = await client.post(url, content=body, headers=headers)
                t1 = time.perf_counter()
                errors += r.status_code != 200
                latencies.append(t1 - t0)
                m = _TOTAL.search(r.headers.get("server-timing", "").encode())
                if m:
                    server_ms.append(float(m.group(1)))
                if t1 > deadline:
                    return

        await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(concurrency)))
        latencies.clear()
        server_ms.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + duration) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Run(
        "http",
        concurrency,
        len(latencies),
        elapsed,
        pct(latencies, 0.5) * 1e3,
        pct(latencies, 0.99) * 1e3,
        "httpx",
        statistics.median(server_ms) if server_ms else None,
        errors,
    )


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_load(port: int, body: bytes, concurrency: int, duration: float, workdir: Path) -> Run:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    threads = min(2, concurrency)
    url = f"http://127.0.0.1:{port}{PATH}"
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    subprocess.run([*cmd[:3], "-d1s", *cmd[4:]], capture_output=True, check=True)  # warm-up
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise RuntimeError(f"cannot read wrk's {label}% latency:\n{out}")
        return float(m.group(1)) * _WRK_UNITS[m.group(2)]

    requests = int(re.search(r"(\d+) requests in ([0-9.]+)(ms|s)", out).group(1))  # type: ignore[union-attr]
    seconds_match = re.search(r"\d+ requests in ([0-9.]+)(ms|s)", out)
    assert seconds_match is not None
    seconds = float(seconds_match.group(1)) / (1000 if seconds_match.group(2) == "ms" else 1)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Run(
        "http",
        concurrency,
        requests,
        seconds,
        latency("50"),
        latency("99"),
        "wrk",
        errors=int(non2xx.group(1)) if non2xx else 0,
    )


# --- the server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(data: Path, port: int, log: Path, stack: list[str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wasminfer",
                "serve",
                "--data",
                str(data),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server never became ready:\n{log.read_text()}")
        time.sleep(0.1)


def server_stack() -> dict[str, str]:
    """What uvicorn picks with its defaults (`http="auto"`, `loop="auto"`)."""
    import importlib.util

    return {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds at concurrency 1")
    ap.add_argument(
        "--server",
        choices=["auto", "pure"],
        default="auto",
        help="auto: uvicorn's defaults (httptools and uvloop when installed); pure: h11 and asyncio",
    )
    ap.add_argument(
        "--generator",
        choices=["auto", "wrk", "asyncio", "httpx", "all"],
        default="auto",
        help="auto: wrk if installed, else asyncio; all: every one available",
    )
    args = ap.parse_args()
    generators = {
        "auto": ["wrk" if shutil.which("wrk") else "asyncio"],
        "all": [g for g in ("wrk", "asyncio", "httpx") if g != "wrk" or shutil.which("wrk")],
    }.get(args.generator, [args.generator])

    print("building functions/digits …", file=sys.stderr)
    example = next(e for e in examples.EXAMPLES if e.name == "digits")
    wasm = toolchain.build(example.folder).read_bytes()
    model = examples.digits_model()
    manifest = Manifest.from_dict(example.manifest())
    sample = [float(v) for v in examples.digits_split()[1][0]]
    body = json.dumps({"pixels": sample}).encode()

    runs: list[Run] = []
    overheads: list[float] = []  # per round: HTTP p50 - in-process p50 at concurrency 1 (first generator)
    with (
        tempfile.TemporaryDirectory(prefix="wasminfer-bench-") as tmp,
        Host(cache_dir=Path(tmp) / "hc") as host,
    ):
        work = Path(tmp)
        host.deploy_model("digits", model)
        host.deploy_function("digits", wasm, manifest)
        port = free_port()
        stack = ["--http", "h11", "--loop", "asyncio"] if args.server == "pure" else []
        proc = start_server(work / "data", port, work / "server.log", stack)
        try:
            with Client(f"http://127.0.0.1:{port}") as client:
                client.put_model("digits", model)
                client.put_function("digits", wasm, manifest)
                assert json.loads(client.invoke("digits", body, "application/json").body)["label"] >= 0

            def http(generator: str, c: int) -> Run:
                print(f"http ({generator}), concurrency {c} …", file=sys.stderr)
                if generator == "wrk":
                    return _wrk_load(port, body, c, args.duration, work)
                if generator == "asyncio":
                    return asyncio.run(_asyncio_load(port, body, c, args.duration))
                return asyncio.run(_httpx_load(port, body, c, args.duration))

            for c in args.concurrency:
                # In-process and HTTP alternate, round by round, so a noisy neighbour on a shared
                # machine hits both alike; the overhead is the median of the rounds' differences.
                for _ in range(args.rounds if c == 1 else 1):
                    print(f"in-process, concurrency {c} …", file=sys.stderr)
                    base = in_process(host, body, c, args.duration)
                    runs.append(base)
                    for i, generator in enumerate(generators):
                        run = http(generator, c)
                        runs.append(run)
                        if c == 1 and i == 0:
                            overheads.append(run.p50_ms - base.p50_ms)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    overhead = round(statistics.median(overheads), 3) if overheads else None
    print()
    print(f"{'path':<24}{'conc':>5}{'inv/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'gateway p50':>13}{'errors':>8}")
    for r in runs:
        label = r.path if r.path == "in-process" else f"http ({r.generator})"
        gw = f"{r.server_total_p50_ms:.3f}" if r.server_total_p50_ms is not None else "-"
        print(
            f"{label:<24}{r.concurrency:>5}{r.per_s:>10.0f}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}{gw:>13}{r.errors:>8}"
        )
    if overhead is not None:
        verdict = "within" if overhead <= TARGET_OVERHEAD_MS else "over"
        rounds = ", ".join(f"{o:.3f}" for o in overheads)
        print(
            f"\nHTTP overhead at concurrency 1 (p50, {generators[0]}): {overhead:.3f} ms, the median of "
            f"rounds [{rounds}] ({verdict} the {TARGET_OVERHEAD_MS} ms target)"
        )

    results = {
        "http_overhead_ms_p50": overhead,
        "target_ms": TARGET_OVERHEAD_MS,
        "http_overhead_ms_p50_rounds": [round(o, 3) for o in overheads],
        "overhead_generator": generators[0],
        "runs": [
            {**{k: v for k, v in asdict(r).items() if k != "extra"}, "invocations_per_s": round(r.per_s, 1)}
            for r in runs
        ],
        "server": {"http": "h11", "loop": "asyncio"} if args.server == "pure" else server_stack(),
        "duration_s": args.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform_module.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gateway.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(runs)
    print(f"wrote {RESULTS / 'gateway.json'}", file=sys.stderr)


def _plot(runs: list[Run]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'wasminfer[bench]'): no gateway.png", file=sys.stderr)
        return
    labels = [f"{r.path if r.path == 'in-process' else r.generator}\nc={r.concurrency}" for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(runs))
    ax1.bar([i - 0.2 for i in x], [r.p50_ms for r in runs], 0.4, label="p50")
    ax1.bar([i + 0.2 for i in x], [r.p99_ms for r in runs], 0.4, label="p99")
    ax1.set_xticks(list(x), labels, fontsize=8)
    ax1.set_ylabel("latency (ms)")
    ax1.legend()
    ax2.bar(list(x), [r.per_s for r in runs])
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel("invocations / s")
    fig.suptitle("digits: in-process Host.invoke vs HTTP on loopback")
    fig.tight_layout()
    tmp = RESULTS / "gateway.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, RESULTS / "gateway.png")


if __name__ == "__main__":
    main()
