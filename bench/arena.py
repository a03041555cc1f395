"""ONNX Runtime's CPU arena: what a large run leaves resident, and what each way out costs.

    python bench/arena.py [--big-mib 1024] [--small-runs 3000]

ORT's CPU allocator is an arena: a run that needs 1 GiB grows it by 1 GiB, and by default the arena
keeps it for the session's lifetime (the process stays 1 GiB larger after the run answered). Three
configurations, each in a fresh process so that RSS figures are its own:

- `arena` -- ORT's default (what the registry did before);
- `arena_off` -- `SessionOptions.enable_cpu_mem_arena = False`: tensors come from malloc and go
  back with free (glibc returns big blocks to the kernel at once);
- `shrinkage` -- the arena on, and every run given `RunOptions` with
  `memory.enable_memory_arena_shrinkage = cpu:0` (the arena frees unused regions after the run).

Each process loads a model made in code whose run allocates `big_mib` (a float32 `Expand` summed
by `ReduceSum`), runs it twice, and reads its RSS before, at the peak (`ru_maxrss`) and after; then a
digits-like MLP ([1,64] -> 64 -> 10, softmax) is timed over `small_runs` runs (the cost of each option
on a small model's run). Prints a table and writes bench/results/arena.json. docs/models.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "arena.json"
CONFIGS = ("arena", "arena_off", "shrinkage")


def big_model(mib: int) -> bytes:
    """x [1,1] float32 -> Expand to [rows, 65536] (`mib` MiB) -> ReduceSum -> y: one run allocates
    `mib` MiB that nothing can fold away (x is an input)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = mib * (1 << 20) // (4 * 65536)
    shape = numpy_helper.from_array(np.array([rows, 65536], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def small_model() -> bytes:
    """A digits-like MLP: [N,64] -> Gemm 64 -> Relu -> Gemm 10 -> Softmax."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (64, 64)), ("b1", (64,)), ("w2", (64, 10)), ("b2", (10,)))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["z"]), helper.make_node("Softmax", ["z"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, big_mib: int, small_runs: int) -> dict[str, Any]:
    """One configuration, in this process (run by `main` in a child of its own)."""
    import numpy as np
    import onnxruntime as ort

    def session(model: bytes) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = config != "arena_off"
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])

    run_options = None
    if config == "shrinkage":
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    big = session(big_model(big_mib))
    x = np.ones((1, 1), np.float32)
    rss_loaded = _rss()
    t = time.perf_counter()
    big.run(None, {"x": x}, run_options)
    big_run_s = time.perf_counter() - t
    rss_after_1 = _rss()
    big.run(None, {"x": x}, run_options)
    rss_after_2 = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    small = session(small_model())
    feed = {"x": np.random.default_rng(1).random((1, 64), dtype=np.float32)}
    for _ in range(200):
        small.run(None, feed, run_options)
    rounds = []
    per_round = max(1, small_runs // 10)
    for _ in range(10):
        t = time.perf_counter_ns()
        for _ in range(per_round):
            small.run(None, feed, run_options)
        rounds.append((time.perf_counter_ns() - t) / per_round / 1000)
    mib = 1 << 20
    return {
        "config": config,
        "big_mib": big_mib,
        "rss_loaded_mib": round(rss_loaded / mib, 1),
        "rss_peak_mib": round(peak / mib, 1),
        "rss_after_run_mib": round(rss_after_1 / mib, 1),
        "rss_after_2nd_run_mib": round(rss_after_2 / mib, 1),
        "held_after_run_mib": round((rss_after_2 - rss_loaded) / mib, 1),
        "big_run_ms": round(big_run_s * 1000, 1),
        "small_run_us_p50": round(statistics.median(rounds), 2),
        "small_run_us_min": round(min(rounds), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-runs", type=int, default=3000)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.big_mib, args.small_runs)))
        return
    rows = []
    for config in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", config, "--big-mib", str(args.big_mib),
             "--small-runs", str(args.small_runs)],
            check=True, capture_output=True, text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    header = (f"{'config':<11}{'loaded':>9}{'peak':>9}{'after run':>11}{'after 2nd':>11}{'held':>8}"
              f"{'big run ms':>12}{'small run µs':>14}")
    print(f"RSS in MiB; the big run allocates {args.big_mib} MiB")
    print(header)
    for r in rows:
        print(f"{r['config']:<11}{r['rss_loaded_mib']:>9}{r['rss_peak_mib']:>9}{r['rss_after_run_mib']:>11}"
              f"{r['rss_after_2nd_run_mib']:>11}{r['held_after_run_mib']:>8}{r['big_run_ms']:>12}"
              f"{r['small_run_us_p50']:>14}")
    import onnxruntime

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "onnxruntime": onnxruntime.__version__,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "big_mib": args.big_mib,
        "small_runs": args.small_runs,
        "configs": rows,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
