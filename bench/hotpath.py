"""The invoke hot path (`just bench-hotpath`): small-model invocations through `wasminfer serve`
against the container-per-function baseline, and where the server's GIL time goes.

In one run, side by side, wrk at concurrency 1, 16 and 64 against:

- `baseline`: `bench/suite/baseline_server.py digits` (Starlette + uvicorn, one process for the
  function, its own ONNX Runtime session);
- `wasminfer` (1 process): `wasminfer serve`, `digits` (functions/digits, C) and `digits-py` (the
  same function in Python, bench/guests/py_digits, on the Python runtime) deployed in it;
- `wasminfer-2r`: the same with `--reuseport-replicas 2` (two processes accepting on the gateway's
  port), when this `wasminfer serve` has that option; otherwise reported as not available.

Every system starts on its own port (the wasminfer ones each on a copy of one prepared data folder)
and serves its warm-up; then, all of them up and the others idle, each load runs in turn, at
concurrency 16 in `--rounds` rounds (default 3) whose order rotates. A 5-s load of one system swings
by ±20-30% on these shared machines (digits ÷ baseline was 1.83, 1.94 and 1.38 in three single-round
runs of unchanged code), so a target's ratio is the median over the rounds of each round's ratio,
as in the throughput scenario. CPU per invocation is the user + system time of the server's
processes (and their children: the replicas) during wrk's counting window (`suite.loadgen`); each
row's `processes` gives, per process taking connections, its cores over the window and its client
connections halfway through it. Then py-spy samples the one-process server's threads *while they
hold the GIL* (`--gil`) during a concurrency-16 digits load: the top frames by self and total share
are `profile_after`.
`--profile-before PATH` profiles a server run from another copy of the package (e.g.
`/work/main/host`, the code before a change) as `profile_before`; without it the previous results
file's `profile_before` is kept.

Writes `bench/results/hotpath.json`: every run, `digits_vs_baseline_c16`,
`digits_py_vs_baseline_c16`, `replicas2_vs_1_c16`, `digits_p99_vs_baseline_c16`,
`cpu_ms_per_invocation` (per system and concurrency), the profiles, the targets and the command.

    python bench/hotpath.py            # 5 s per load
    python bench/hotpath.py --quick    # 2 s per load, 1 s warm-up
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the `suite` package

from suite import loadgen, workloads  # noqa: E402
from suite.common import machine, progress  # noqa: E402
from suite.systems import BaselineProcess, CpuWindow, free_port, settle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hotpath.json"
PY_DIGITS = ROOT / "bench" / "guests" / "py_digits"
REPLICAS_OPTION = "--reuseport-replicas"
TARGETS = {
    "digits_vs_baseline_c16": (">=", 2.0),
    "digits_py_vs_baseline_c16": (">=", 1.0),
    "replicas2_vs_1_c16": (">=", 1.5),
    "digits_p99_vs_baseline_c16": ("<=", 1.0),
}
TOP_FRAMES = 15
# Frames every stack of a thread passes through (see `top_frames`).
ENTRY = (
    "runpy",
    "/typer/",
    "wasminfer/__main__.py",
    "wasminfer/cli/",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "threading.py",
    "WorkerThread.run",
)


@dataclass
class Server:
    """A running system under test: its processes and where to send each function's requests."""

    name: str
    proc: subprocess.Popen[bytes]
    urls: dict[str, str]  # function -> invoke URL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the wasminfer side ---------------------------------------------------------------------------
def prepare_data(data: Path, log: Path, code: str | None) -> None:
    """Deploys the digits model, `digits` (C) and `digits-py` (Python) into a data folder through a
    server started on it once; every wasminfer system then loads them from the store."""
    from wasminfer import examples, pysource, toolchain
    from wasminfer.client import Client

    wasm = toolchain.build(
        ROOT / "functions" / "digits", progress=lambda m: progress(f"build {m}")
    ).read_bytes()
    manifest = json.loads((ROOT / "functions" / "digits" / "manifest.json").read_text())
    server = start_wasminfer("prepare", data, log, code=code)
    try:
        with Client(server.urls["digits"].split("/v1/")[0]) as client:
            client.put_model("digits", examples.digits_model())
            client.put_function("digits", wasm, manifest)
            progress("deploying digits-py (the Python runtime; minutes the first time on this machine)")
            client.put_function("digits-py", pysource.bundle_folder(PY_DIGITS), {"models": ["digits"]})
    finally:
        server.stop()


def start_wasminfer(name: str, data: Path, log: Path, *extra: str, code: str | None = None) -> Server:
    port = free_port()
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    with log.open("ab") as out:
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
                *extra,
            ],  # fmt: skip
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"wasminfer serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"wasminfer serve never became ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    urls = {fn: f"{base}/v1/functions/{fn}/invoke" for fn in ("digits", "digits-py")}
    return Server(name, proc, urls)


def replicas_unavailable() -> str | None:
    """Why `wasminfer serve` cannot start reuseport replicas here, or None."""
    help_text = subprocess.run(
        [sys.executable, "-m", "wasminfer", "serve", "--help"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"}, check=False,
    ).stdout  # fmt: skip
    if REPLICAS_OPTION in help_text:
        return None
    return f"`wasminfer serve` has no {REPLICAS_OPTION} option in this checkout"


# --- measuring ------------------------------------------------------------------------------------
def warm(url: str, body: bytes, content_type: str, n: int = 200) -> None:
    """Answers `n` requests, each on a new connection, and checks them; then 3 s of load at
    concurrency 16. New connections: with replicas on the port the kernel spreads connections over
    the processes, and each process learns the function's run time (the adaptive path) and grows its
    instances on its own — one kept-alive connection would warm one process only."""
    for _ in range(n):
        r = httpx.post(url, content=body, headers={"content-type": content_type}, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:500]}")
    loadgen.run(url, body, content_type, 16, 3.0, "wrk", warmup=0)


def measure(
    system: str, function: str, server_pids: list[int], url: str, body: bytes, content_type: str,
    concurrency: int, duration: float, warmup: float,
) -> dict[str, Any]:  # fmt: skip
    settle(server_pids)
    cpu = CpuWindow(server_pids, warmup, duration)
    processes = serving_processes(server_pids)
    each = {pid: CpuWindow([pid], warmup, duration, recursive=False) for pid in processes}
    port = int(url.split(":")[2].split("/")[0])
    held: dict[int, int] = {}
    sampler = threading.Timer(warmup + duration / 2, lambda: held.update(connections(processes, port)))
    sampler.start()
    load = loadgen.run(url, body, content_type, concurrency, duration, "wrk", warmup=warmup)
    sampler.join()
    cpu_s = cpu.result()
    row = {
        "system": system,
        "function": function,
        **load.to_dict(),
        "cpu_ms_per_invocation": round(cpu_s * 1000 / load.requests, 4) if load.requests else None,
        "server_cores": round(cpu_s / duration, 3),
        # Each process that takes connections: its client connections halfway through the window
        # (how the port's were spread) and its cores over the window.
        "processes": [
            {"pid": pid, "role": role, "connections": held.get(pid),
             "cores": round(each[pid].result() / duration, 3)}
            for pid, role in processes.items()
        ],
    }  # fmt: skip
    split = ""
    if len(row["processes"]) > 1:
        split = "  processes " + " ".join(f"{p['connections']}c/{p['cores']}" for p in row["processes"])
    progress(
        f"{system:13} {function:10} c={concurrency:<3} {load.per_s:8.0f}/s  p50 {load.p50_ms:7.2f} ms  "
        f"p99 {load.p99_ms:7.2f} ms  cpu {row['cpu_ms_per_invocation']} ms/inv  errors {load.errors}{split}"
    )
    return row


def serving_processes(server_pids: list[int]) -> dict[int, str]:
    """The server's processes that take connections, by pid: the server's own ("primary") and its
    `wasminfer replica` children."""
    out: dict[int, str] = {}
    for pid in server_pids:
        try:
            proc = psutil.Process(pid)
            out[pid] = "primary"
            for child in proc.children(recursive=True):
                if "replica" in child.cmdline()[3:4]:  # python -m wasminfer replica ...
                    out[child.pid] = "replica"
        except psutil.NoSuchProcess:
            continue
    return out


def connections(pids: dict[int, str], port: int) -> dict[int, int]:
    """Established client connections on `port` each process holds now."""
    held = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        held[pid] = sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)
    return held


# --- the profile ----------------------------------------------------------------------------------
def profile(pid: int, url: str, body: bytes, content_type: str, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy's samples of `pid`'s threads holding the GIL during a concurrency-16 load: the top
    frames by self and by total share of those samples."""
    if shutil.which("py-spy") is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--gil",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "-o",
            str(out),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    load = loadgen.run(url, body, content_type, 16, seconds, "wrk", warmup=0.5)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}"}
    return {**top_frames(out.read_text()), "load_per_s": round(load.per_s, 1)}


def top_frames(raw: str, n: int = TOP_FRAMES) -> dict[str, Any]:
    """From py-spy's collapsed stacks ("thread;frame;frame;... count" per line, root first): the `n`
    frames with the most samples as the innermost frame (self) and anywhere in the stack (total), in
    % of every sample. For the total, the entry frames (the interpreter, the CLI, the event loop's
    `run`, a thread's bootstrap: `ENTRY`) are left out: they hold their whole thread and say
    nothing."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames:
            continue
        k = int(count)
        samples += k
        self_n[_short(frames[-1])] += k
        for frame in {_short(f) for f in frames if not any(e in f for e in ENTRY)}:
            total_n[frame] += k

    def table(counter: collections.Counter[str]) -> list[list[Any]]:
        return (
            [[frame, round(100 * k / samples, 1)] for frame, k in counter.most_common(n)] if samples else []
        )

    return {"samples": samples, "self_pct": table(self_n), "total_pct": table(total_n)}


def _short(frame: str) -> str:
    """`function (path/to/module.py:123)` as `function (module.py)`; the line number would split
    one function's samples over its lines."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if "wasminfer" in parts else Path(path).name
    return f"{name} ({short})"


# --- the run --------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets' ratios at concurrency 16: the median over the rounds of each round's ratio
    (the systems measured side by side, as the throughput scenario does); CPU per invocation: the
    median over the rounds."""

    def values(system: str, function: str, c: int, key: str) -> dict[int, float]:
        return {
            int(r.get("round", 0)): float(r[key])
            for r in rows
            if (r["system"], r["function"], r["concurrency"]) == (system, function, c) and r[key] is not None
        }

    def paired(a: tuple[str, str], b: tuple[str, str], key: str = "per_s") -> float | None:
        va, vb = values(*a, 16, key), values(*b, 16, key)
        each = [x for rnd in sorted(va.keys() & vb.keys()) if (x := ratio(va[rnd], vb[rnd])) is not None]
        return round(statistics.median(each), 3) if each else None

    out: dict[str, Any] = {
        "digits_vs_baseline_c16": paired(("wasminfer", "digits"), ("baseline", "digits")),
        "digits_py_vs_baseline_c16": paired(("wasminfer", "digits-py"), ("baseline", "digits")),
        "replicas2_vs_1_c16": paired(("wasminfer-2r", "digits"), ("wasminfer", "digits")),
        "digits_p99_vs_baseline_c16": paired(("wasminfer", "digits"), ("baseline", "digits"), "p99_ms"),
        # The same with the two processes on the port (the probe reached 2x that way): not
        # targets of their own, the comparison a host with a spare core would see.
        "digits_2r_vs_baseline_c16": paired(("wasminfer-2r", "digits"), ("baseline", "digits")),
        "digits_py_2r_vs_baseline_c16": paired(("wasminfer-2r", "digits-py"), ("baseline", "digits")),
        "replicas2_vs_1_py_c16": paired(("wasminfer-2r", "digits-py"), ("wasminfer", "digits-py")),
        "digits_2r_p99_vs_baseline_c16": paired(("wasminfer-2r", "digits"), ("baseline", "digits"), "p99_ms"),
    }
    cpu: dict[str, dict[str, float | None]] = {}
    for r in rows:
        key, c = f"{r['system']}/{r['function']}", r["concurrency"]
        if f"c{c}" not in cpu.setdefault(key, {}):
            each = values(r["system"], r["function"], c, "cpu_ms_per_invocation").values()
            cpu[key][f"c{c}"] = round(statistics.median(each), 4) if each else None
    out["cpu_ms_per_invocation"] = cpu
    verdicts = {}
    for key, (op, target) in TARGETS.items():
        value = out[key]
        verdicts[key] = {
            "target": f"{op} {target}",
            "value": value,
            "met": None if value is None else (value >= target if op == ">=" else value <= target),
        }
    out["targets"] = verdicts
    return out


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    head = ("system", "function", "c", "inv/s", "p50 ms", "p99 ms", "cpu ms/inv", "err")
    print("\n{:14} {:10} {:>3} {:>9} {:>8} {:>8} {:>10} {:>4}".format(*head))
    for r in rows:
        cpu = r["cpu_ms_per_invocation"] or float("nan")
        print(
            f"{r['system']:14} {r['function']:10} {r['concurrency']:>3} {r['per_s']:>9.0f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {cpu:>10.3f} {r['errors']:>4}"
        )
    print()
    for key, v in summary["targets"].items():
        verdict = "n/a" if v["met"] is None else ("met" if v["met"] else "missed")
        print(f"{key:28} {v['value']!s:>7}  target {v['target']:7} {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s per load (1 s warm-up): a smoke run")
    ap.add_argument("--duration", type=float, help="seconds counted per load (default 5, quick 2)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--no-python", action="store_true", help="leave digits-py out")
    ap.add_argument(
        "--rounds", type=int, help="rounds at concurrency 16, in a rotating order (default 3, quick 1)"
    )
    ap.add_argument(
        "--profile-seconds", type=float, default=5.0, help="py-spy's sampling time (0: no profile)"
    )
    ap.add_argument(
        "--profile-before",
        metavar="PATH",
        help="also profile a server run from this copy of the package (PYTHONPATH) as profile_before",
    )
    ap.add_argument("--profile-only", action="store_true", help="only the profile(s), no loads")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument(
        "--raw-dir", type=Path, help="keep py-spy's collapsed stacks here (before.txt, after.txt)"
    )
    args = ap.parse_args()
    duration = args.duration or (2.0 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 1.0
    command = " ".join(["python", "bench/hotpath.py", *sys.argv[1:]])
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    digits = workloads.WORKLOADS["digits"]
    body, ctype = digits.body(), digits.content_type
    functions = ["digits"] if args.no_python else ["digits", "digits-py"]
    previous: dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {}
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="wasminfer-hotpath-") as tmp:
        work = Path(tmp)
        log = work / "servers.log"
        data = work / "data"
        raw = args.raw_dir or work
        raw.mkdir(parents=True, exist_ok=True)
        progress("preparing the data folder (digits model, digits and digits-py)")
        prepare_data(data, log, None)

        if args.profile_before and args.profile_seconds:
            before_data = work / "data-before"
            shutil.copytree(data, before_data, symlinks=True)
            server = start_wasminfer("before", before_data, log, code=args.profile_before)
            try:
                warm(server.urls["digits"], body, ctype)
                progress(
                    f"profiling the server of {args.profile_before} (py-spy, {args.profile_seconds:g} s)"
                )
                result["profile_before"] = {
                    "code": args.profile_before,
                    **profile(
                        server.proc.pid,
                        server.urls["digits"],
                        body,
                        ctype,
                        args.profile_seconds,
                        raw / "before.txt",
                    ),
                }
            finally:
                server.stop()

        servers: list[tuple[str, list[int], dict[str, str]]] = []  # (system, pids, fn -> url)
        started: list[Server] = []
        baseline: BaselineProcess | None = None
        why_not = replicas_unavailable()
        result["replicas2"] = "measured" if why_not is None else f"not available: {why_not}"
        try:
            if not args.profile_only:
                model = workloads.prepare(["digits"], work / "models")["digits"]
                baseline = BaselineProcess("digits", model, log)
                baseline.wait_ready()
                warm(baseline.url, body, ctype)
                servers.append(("baseline", baseline.pids, {"digits": baseline.url}))
            systems: list[tuple[str, tuple[str, ...]]] = [("wasminfer", ())]
            if why_not is None and not args.profile_only:
                systems.append(("wasminfer-2r", (REPLICAS_OPTION, "2")))
            for name, extra in systems:
                # Every system runs from a copy of the prepared folder: they are all up at once.
                copy = work / f"data-{name}"
                shutil.copytree(data, copy, symlinks=True)
                server = start_wasminfer(name, copy, log, *extra)
                started.append(server)
                for fn in functions:
                    warm(server.urls[fn], body, ctype)
                servers.append((name, [server.proc.pid], {fn: server.urls[fn] for fn in functions}))
            loads = [(name, pids, fn, url) for name, pids, urls in servers for fn, url in urls.items()]
            for c in args.concurrency if not args.profile_only else []:
                for rnd in range(rounds if c == 16 else 1):
                    shift = rnd % len(loads)
                    for name, pids, fn, url in loads[shift:] + loads[:shift]:
                        row = measure(name, fn, pids, url, body, ctype, c, duration, warmup)
                        rows.append({**row, "round": rnd})
            if args.profile_seconds:
                server = started[0]
                progress(f"profiling this checkout's server (py-spy, {args.profile_seconds:g} s)")
                result["profile_after"] = profile(
                    server.proc.pid,
                    server.urls["digits"],
                    body,
                    ctype,
                    args.profile_seconds,
                    raw / "after.txt",
                )
        finally:
            for server in started:
                server.stop()
            if baseline is not None:
                baseline.close()

    summary = summarize(rows) if rows else {}
    if rows:
        print_table(rows, summary)
    out = {
        "scenario": "hotpath",
        "command": command,
        "quick": args.quick,
        "duration_s": duration,
        "rounds_at_16": rounds,
        "machine": {
            **machine(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        **({k: v for k, v in previous.items() if k not in ("machine",)} if args.profile_only else {}),
        **summary,
        "replicas2": result["replicas2"],
        "runs": rows or previous.get("runs", []),
        "profile_before": result.get("profile_before", previous.get("profile_before")),
        "profile_after": result.get("profile_after", previous.get("profile_after")),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = args.output.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(out, indent=2) + "\n")
    tmp_path.replace(args.output)
    progress(f"wrote {args.output}")


if __name__ == "__main__":
    main()
