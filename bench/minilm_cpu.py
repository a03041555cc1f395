"""Where minilm's CPU per invocation goes, wasminfer against the limit (issue 22): side by side in
one process, then (with `--server`) over HTTP against the baseline.

    python bench/minilm_cpu.py [--callers 2,16|none] [-n 320] [--slices 5] [--stand-in]
                               [--server [--slots auto,0] [--rounds 3] [--seconds 4]]

In one process, alternating blocks (so that a noisy neighbour does not land on one path only), each
path serving the benchmark's request `-n` times from `callers` threads:
- `limit`: the limit's pipeline (suite/workloads.py: the function's own wordpiece.py natively, then
  `session.run` on a session of the bench's, 1 intra-op thread), no bound on concurrent runs;
- `registry`: `ModelRegistry.infer` of the limit's input tensors under a deadline, as the Python
  runtime's infer calls it (run slots, the run timer), on the model deployed as the server deploys it
  (threads and slots measured at load);
- `python`: `Host.invoke` of bench/functions/minilm-classify on the Python runtime.

CPU per invocation: the process' (`getrusage`: every thread), the callers' own (`time.thread_time`),
of which inside `session.run` (the registry's `_Model._run`, the limit's `run`), and for `python`
inside `InvocationState.run_model` (the registry's whole infer, slots and checks included).
`outside`: the callers' CPU outside the infer (`python`: the guest and both sides of its crossings,
the pool, the invocation's state) or outside the run (`limit`: tokenizing and the answer;
`registry`: its checks, slots and timer). `others` is the process'
minus the callers' (the epoch ticker, the run timer: ORT has no threads of its own at one intra-op
thread); `ticker` the epoch ticker thread's CPU per second of wall clock (`/proc/.../schedstat`);
`ctx` voluntary context switches per invocation. `--stand-in` serves a model of the same inputs that
does next to nothing (the guest's own cost, without the transformer's cache pressure).

`--server` then measures `wasminfer serve` against the baseline (the same numpy pipeline behind
Starlette, suite/baseline_server.py) at concurrency 16 with the benchmark's load generator, in
alternating rounds: CPU per invocation of the server process, its event loop thread apart from the
others, the event loop's voluntary context switches per invocation (its waits, for the GIL among
them), and, where `perf` samples the process, the split by shared object (ONNX Runtime, the host's
CPython, the guest's compiled code, the kernel, libc; left out when perf missed threads).
`--slots auto,0`: one model and function per `max_concurrent_runs` setting in the same server
("auto": chosen at load, as `just bench` deploys it; 0: no bound), measured in turn.

Writes `bench/results/minilm_cpu.json` (`minilm_cpu_stand_in.json` with `--stand-in`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import loadgen, minilm, systems, workloads  # noqa: E402
from suite.common import RESULTS, progress  # noqa: E402

WORKLOAD = workloads.WORKLOADS["minilm"]


# --- thread CPU, counted where it is spent -----------------------------------------------------------
class Meter:
    """Thread CPU seconds spent inside wrapped calls, summed over every thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - t0
                with self._lock:
                    self.seconds += spent

        return wrapped


def schedstat_s(tid: int) -> float:
    """CPU seconds of thread `tid` of this process (ns precision, unlike /proc/.../stat's ticks)."""
    try:
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def ticker_tid() -> int | None:
    for t in threading.enumerate():
        if t.name == "wasminfer-epoch":
            return t.native_id
    return None


# --- in one process ---------------------------------------------------------------------------------
def paths(host: Any, work: Path, stand_in: bool) -> tuple[dict[str, Callable[[], object]], Meter, Meter]:
    """The three ways to serve the request, and the meters of `session.run` and of the registry's whole
    infer (wrapped for the process' life)."""
    import numpy as np

    from wasminfer import pysource
    from wasminfer.models import registry
    from wasminfer.runtime import handler

    model = workloads.prepare(["minilm"], work / "models")["minilm"]
    if stand_in:
        model = work / "models" / "minilm-stand-in.onnx"
        model.write_bytes(minilm.stand_in_model())
    info = host.deploy_model("minilm", model.read_bytes())
    plan = info.run_plan
    progress(f"minilm deployed: {info.intra_op_threads} intra-op thread(s), "
             f"{info.max_concurrent_runs} run slot(s) ({plan.chosen_by if plan else '?'})")
    folder = WORKLOAD.build_source(work / "staged")
    host.deploy_function("minilm-classify", pysource.bundle_folder(folder), WORKLOAD.manifest())

    run_meter, infer_meter = Meter(), Meter()
    seen: dict[str, Any] = {}
    model_run = registry._Model._run

    def shapes_seen(self: Any, feed: Any, deadline_ns: int | None) -> Any:
        seen.update({k: (list(v.shape), str(v.dtype)) for k, v in feed.items()})
        return model_run(self, feed, deadline_ns)

    registry._Model._run = run_meter.wrap(shapes_seen)  # type: ignore[method-assign]
    handler.InvocationState.run_model = infer_meter.wrap(handler.InvocationState.run_model)  # type: ignore[method-assign]

    session = workloads.session(model)
    session.run = run_meter.wrap(session.run)
    limit = WORKLOAD.handler(session)
    source = workloads.BENCH_FUNCTIONS / "minilm-classify" / "wordpiece.py"
    tok = workloads._load_module("bench_wordpiece", source)
    vocab = tok.load_vocabulary(minilm.package_dir() / "vocab.txt")
    body, ctype = WORKLOAD.body(), WORKLOAD.content_type
    ids = np.asarray([tok.encode(body.decode(), vocab, minilm.MAX_LENGTH)], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    infer = host.models.infer
    calls: dict[str, Callable[[], object]] = {
        "limit": lambda: limit(body, ctype),
        "registry": lambda: infer("minilm", feeds, deadline_ns=time.monotonic_ns() + 10**10),
        "python": lambda: host.invoke("minilm-classify", body, ctype),
    }
    answer = json.loads(host.invoke("minilm-classify", body, ctype).body)
    reference = json.loads(limit(body, ctype))
    if answer["label"] != reference["label"]:
        raise RuntimeError(f"the function answers {answer}, the limit {reference}")
    # The model's cost grows with the sequence: the guest must feed what the limit feeds (no padding).
    limit_feeds = {k: (list(v.shape), str(v.dtype)) for k, v in feeds.items()}
    if seen != limit_feeds:
        raise RuntimeError(f"the function fed the model {seen}, the limit {limit_feeds}")
    progress(f"the function and the limit feed the model the same tensors: {limit_feeds}")
    return calls, run_meter, infer_meter


def block(fn: Callable[[], object], callers: int, n: int, run: Meter, infer: Meter) -> dict[str, float]:
    """`n` calls of `fn` from `callers` threads: CPU per call, split (see the module doc)."""
    per = max(1, n // callers)
    thread_s = [0.0] * callers

    def caller(i: int) -> None:
        t0 = time.thread_time()
        for _ in range(per):
            fn()
        thread_s[i] = time.thread_time() - t0

    tid = ticker_tid()
    run.seconds = infer.seconds = 0.0
    k0 = schedstat_s(tid) if tid else 0.0
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - w0
    k1 = schedstat_s(tid) if tid else 0.0
    total = per * callers
    process = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    own = sum(thread_s)
    ms = 1e3 / total
    return {
        "process_ms": process * ms,
        "callers_ms": own * ms,
        "run_ms": run.seconds * ms,
        "infer_ms": infer.seconds * ms,
        "outside_ms": (own - (infer.seconds or run.seconds)) * ms,
        "others_ms": (process - own) * ms,
        "ticker_ms_per_s": (k1 - k0) / wall * 1e3,
        "ctx": (r1.ru_nvcsw - r0.ru_nvcsw) / total,
        "per_s": total / wall,
    }


def in_process(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from wasminfer.runtime import Host

    out: dict[str, Any] = {}
    with Host(cache_dir=Path.home() / ".cache" / "wasminfer" / "bench-engine") as host:
        calls, run, infer = paths(host, work, args.stand_in)
        for callers in args.callers:
            for fn in calls.values():  # every instance the callers need made before counting
                block(fn, callers, callers * 4, run, infer)
            samples: dict[str, list[dict[str, float]]] = {p: [] for p in calls}
            for i in range(args.slices):
                progress(f"{callers} callers: slice {i + 1}/{args.slices}")
                for p, fn in calls.items():
                    samples[p].append(block(fn, callers, args.n, run, infer))
            out[str(callers)] = {
                p: {k: round(statistics.median(s[k] for s in xs), 3) for k in xs[0]} | {
                    "process_ms_slices": [round(s["process_ms"], 3) for s in xs]
                }
                for p, xs in samples.items()
            }
            stats = host.function("minilm-classify").pool.stats()
            out[str(callers)]["python"]["instances_created"] = stats["created_total"]
    return out


def print_in_process(result: dict[str, Any]) -> None:
    cols = ("process_ms", "callers_ms", "run_ms", "infer_ms", "outside_ms", "others_ms",
            "ticker_ms_per_s", "ctx", "per_s")
    heads = [c.replace("_ms", "").replace("_per_s", "/s") for c in cols]
    print(f"{'callers':<8}{'path':<10}" + "".join(f"{h:>15}" for h in heads))
    for callers, rows in result.items():
        for p, row in rows.items():
            print(f"{callers:<8}{p:<10}" + "".join(f"{row[c]:>15.3f}" for c in cols))


# --- over HTTP --------------------------------------------------------------------------------------
PERF_HZ = 1000
_DSOS = {
    "onnxruntime_pybind11_state": "onnxruntime",
    "libpython": "cpython (host)",
    "runtime.cwasm": "guest (wasm)",
    "[kernel.kallsyms]": "kernel",
    "libc.so": "libc",
}


def _dso_split(data: Path, cpu_ms: float, cpu_s: float) -> dict[str, float] | None:
    """The process' CPU per invocation split by shared object, or None when perf sampled less than
    half of the CPU time the process used (it sometimes misses threads: a split of a few samples
    would mislead)."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio"],
                            capture_output=True, text=True, check=False).stdout
    m = re.search(r"# Samples: (\d+)([KM]?)", report)
    samples = int(m.group(1)) * {"": 1, "K": 1000, "M": 1000_000}[m.group(2)] if m else 0
    if samples < 0.5 * cpu_s * PERF_HZ:
        return None
    split: collections.defaultdict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)", line)
        if m:
            name = next((v for k, v in _DSOS.items() if k in m.group(2)), "other")
            split[name] += float(m.group(1)) / 100 * cpu_ms
    return {k: round(v, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def _switches(pid: int) -> int:
    """Voluntary context switches of the process' main thread (its event loop, for a server)."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def _threads_s(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return out


def _perf_usable() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def _round(label: str, url: str, pid: int, seconds: float, use_perf: bool, work: Path) -> dict[str, Any]:
    systems.settle([pid])
    window = systems.CpuWindow([pid], loadgen.WARMUP_S, seconds)
    snaps: dict[str, dict[int, float]] = {}
    switches = [0, 0]

    def snap() -> None:
        time.sleep(loadgen.WARMUP_S)
        snaps["a"], switches[0] = _threads_s(pid), _switches(pid)
        time.sleep(seconds)
        snaps["b"], switches[1] = _threads_s(pid), _switches(pid)

    data = work / f"perf-{label}.data"
    perf = None
    if use_perf:
        perf = subprocess.Popen(
            ["bash", "-c", f"sleep {loadgen.WARMUP_S}; exec perf record -e cpu-clock -F {PERF_HZ} -p {pid} "
             f"-o {data} -- sleep {seconds}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    sampler = threading.Thread(target=snap)
    sampler.start()
    load = loadgen.run(url, WORKLOAD.body(), WORKLOAD.content_type, 16, seconds, "wrk")
    cpu = window.result()
    sampler.join()
    if perf is not None:
        perf.wait()
    n = max(load.requests, 1)
    loop = snaps["b"].get(pid, 0.0) - snaps["a"].get(pid, 0.0)
    others = sum(t - snaps["a"].get(tid, 0.0) for tid, t in snaps["b"].items() if tid != pid)
    row: dict[str, Any] = {
        "system": label,
        "per_s": round(load.per_s, 1),
        "p50_ms": round(load.p50_ms, 2),
        "errors": load.errors,
        "cpu_ms": round(cpu / n * 1e3, 3),
        "event_loop_ms": round(loop / n * 1e3, 3),
        "other_threads_ms": round(others / n * 1e3, 3),
        "event_loop_switches": round((switches[1] - switches[0]) / n, 2),
        "load_average": round(os.getloadavg()[0], 2),
    }
    if perf is not None and data.is_file():
        split = _dso_split(data, cpu / n * 1e3, cpu)
        if split is not None:
            row["by_object_ms"] = split
    return row


def over_http(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from wasminfer import pysource

    model = workloads.prepare(["minilm"], work / "models")["minilm"]
    use_perf = _perf_usable()
    rows: list[dict[str, Any]] = []
    plans: dict[str, Any] = {}
    targets: list[tuple[str, str, int]] = []
    engine_cache = Path.home() / ".cache" / "wasminfer" / "bench-engine"
    with systems.WasminferServer(work / "server", engine_cache) as server:
        for slots in args.slots:
            # A model and a function per run-slot setting ("auto": chosen at load, as `just bench`
            # deploys it), in the same server, measured in turn.
            name = "minilm" if slots == "auto" else f"minilm-slots{slots}"
            options = {} if slots == "auto" else {"intra_op_threads": 1, "max_concurrent_runs": int(slots)}
            plans[name] = server.client.put_model(name, model.read_bytes(), **options).get("run_plan")
            staged = WORKLOAD.build_source(work / f"staged-{slots}")
            app = staged / "app.py"
            app.write_text(app.read_text().replace('MODEL = "minilm"', f'MODEL = "{name}"'))
            manifest = WORKLOAD.manifest() | {"models": [name]}
            server.client.put_function(name, pysource.bundle_folder(staged), manifest)
            url = server.invoke_url(name)
            loadgen.run(url, WORKLOAD.body(), WORKLOAD.content_type, 16, 2.0, "wrk")  # its instances made
            targets.append((f"wasminfer (slots {slots})", url, server.proc.pid))
        baseline = systems.BaselineProcess("minilm", model, work / "baseline.log")
        try:
            baseline.wait_ready()
            targets.append(("baseline", baseline.url, baseline.proc.pid))
            for i in range(args.rounds):
                progress(f"over HTTP: round {i + 1}/{args.rounds}")
                for label, target, pid in targets:
                    rows.append(_round(label, target, pid, args.seconds, use_perf, work) | {"round": i})
        finally:
            baseline.close()
    return {"run_plans": plans, "perf": use_perf, "rounds": rows}


def print_over_http(result: dict[str, Any]) -> None:
    for row in result["rounds"]:
        split = row.get("by_object_ms", {})
        print(f"{row['system']:<20} round {row['round']}: {row['per_s']:7.1f}/s  "
              f"cpu {row['cpu_ms']:6.3f} ms/inv (event loop {row['event_loop_ms']:.3f}, "
              f"other threads {row['other_threads_ms']:.3f}; loop switches {row['event_loop_switches']})  "
              f"load {row['load_average']}  " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--callers", default="2,16", help="caller threads, comma-separated (default 2,16; "
                    "none: skip the in-process part)")
    ap.add_argument("-n", type=int, default=320, help="invocations per path per slice")
    ap.add_argument("--slices", type=int, default=5, help="alternating slices (the median counts)")
    ap.add_argument("--stand-in", action="store_true", help="a model that does next to nothing")
    ap.add_argument("--server", action="store_true",
                    help="also wasminfer serve against the baseline, over HTTP")
    ap.add_argument("--rounds", type=int, default=3, help="--server: alternating rounds")
    ap.add_argument("--slots", default="auto", help="--server: the model's max_concurrent_runs, one "
                    "function per value, comma-separated (auto: chosen at load)")
    ap.add_argument("--seconds", type=float, default=4.0, help="--server: counted seconds per round")
    args = ap.parse_args()
    args.callers = [int(c) for c in args.callers.split(",") if c not in ("", "none")]
    args.slots = args.slots.split(",")
    out: dict[str, Any] = {
        "command": " ".join(["python bench/minilm_cpu.py", *sys.argv[1:]]),
        "unit": "CPU ms per invocation (medians of alternating slices); ticker in CPU ms per second",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="wasminfer-minilm-cpu-") as tmp:
        work = Path(tmp)
        if args.callers:
            out["in_process"] = in_process(args, work)
            print_in_process(out["in_process"])
        if args.server and not args.stand_in:
            out["over_http"] = over_http(args, work)
            print_over_http(out["over_http"])
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("minilm_cpu_stand_in.json" if args.stand_in else "minilm_cpu.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    progress(f"wrote {path}")


if __name__ == "__main__":
    main()
