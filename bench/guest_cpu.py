"""CPU per invocation of the benchmark's Python workloads, one caller, in one process: each function
as a componentize-py component, on the Python runtime (its source, as `wasminfer deploy function`
sends it), and the limit's own pipeline (the same pre/post-processing run natively, then
`session.run`), with `session.run` alone beside them.

    python bench/guest_cpu.py [--workload minilm] [-n 300] [--skip-component] [--stand-in]

`--stand-in` serves minilm's function with a model of the same inputs and outputs that does next to
nothing (a sum and a softmax) instead of the 87 MB transformer, whose run (~7 ms, ±1 ms on a loaded
machine) would bury the pre/post-processing being compared: what is left is each path's own cost.

CPU time (`time.process_time`: every thread of this process), not wall clock: the machine is shared.
Each path runs `-n` invocations after a warm-up, in alternating slices so that a noisy neighbour
does not land on one path only; the figure is the median of the slices' CPU ms per invocation.
Writes `bench/results/guest_cpu.json` (`guest_cpu_stand_in.json` with `--stand-in`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import workloads  # noqa: E402
from suite.common import RESULTS, agree, progress  # noqa: E402

SLICES = 6


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e3


def paths(
    host: Any, name: str, work: Path, stand_in: bool, component: bool
) -> dict[str, Callable[[], object]]:
    """The ways to serve workload `name`, each a call that serves its request once; the functions'
    answers checked against the limit's on the same model. Raises `RuntimeError` if one disagrees."""
    from wasminfer import pysource, toolchain

    w = workloads.WORKLOADS[name]
    model = workloads.prepare([name], work / "models")[name]
    if stand_in and name == "minilm":
        from suite import minilm

        model = work / "models" / "minilm-stand-in.onnx"
        model.write_bytes(minilm.stand_in_model())
    host.deploy_model(name, model.read_bytes(), intra_op_threads=1)
    folder = w.build_source(work / "staged")
    body, ctype = w.body(), w.content_type
    sess = workloads.session(model)
    limit = w.handler(sess)
    out: dict[str, Callable[[], object]] = {}
    progress(f"{name}: deploying the source to the Python runtime")
    host.deploy_function(f"{name}-py", pysource.bundle_folder(folder), w.manifest())
    out["python_runtime"] = lambda: host.invoke(f"{name}-py", body, ctype)
    if component:
        progress(f"{name}: building and deploying the component")
        host.deploy_function(f"{name}-component", toolchain.build(folder).read_bytes(), w.manifest())
        out["component"] = lambda: host.invoke(f"{name}-component", body, ctype)
    reference = json.loads(limit(body, ctype))
    for p, fn in out.items():
        answer = fn().body  # type: ignore[attr-defined]
        if not agree(json.loads(answer), reference):
            raise RuntimeError(f"{name} {p} disagrees with numpy: {answer[:200]!r}")
    out["limit_handler"] = lambda: limit(body, ctype)
    if name == "minilm":
        import numpy as np

        from suite import minilm

        source = workloads.BENCH_FUNCTIONS / "minilm-classify" / "wordpiece.py"
        tok = workloads._load_module("bench_wordpiece", source)
        vocab = tok.load_vocabulary(minilm.package_dir() / "vocab.txt")
        text = body.decode()
        ids = np.asarray([tok.encode(text, vocab, minilm.MAX_LENGTH)], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        out["limit_tokenize_only"] = lambda: tok.encode(text, vocab, minilm.MAX_LENGTH)
        out["session_run_only"] = lambda: sess.run(["probabilities"], feeds)
    return out


def measure(calls: dict[str, Callable[[], object]], n: int, label: str) -> dict[str, Any]:
    """CPU ms per call of each, the median of `SLICES` slices taken in turn, after a warm-up."""
    for fn in calls.values():
        for _ in range(20):
            fn()
    per = max(1, n // SLICES)
    samples: dict[str, list[float]] = {p: [] for p in calls}
    for i in range(SLICES):
        progress(f"{label}: slice {i + 1}/{SLICES}")
        for p, fn in calls.items():
            samples[p].append(cpu_ms(fn, per))
    out: dict[str, Any] = {p: round(statistics.median(xs), 3) for p, xs in samples.items()}
    out["slices"] = {p: [round(x, 3) for x in xs] for p, xs in samples.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", action="append", choices=["minilm", "text-classifier"])
    ap.add_argument("-n", type=int, default=300, help="invocations per path")
    ap.add_argument("--stand-in", action="store_true", help="minilm: a model that does next to nothing")
    ap.add_argument("--skip-component", action="store_true", help="leave the component out (it compiles "
                    "for minutes the first time on a busy machine)")
    args = ap.parse_args()
    from wasminfer.runtime import Host

    work = Path("/tmp/wasminfer-guest-cpu")
    out: dict[str, Any] = {
        "command": " ".join(["python bench/guest_cpu.py", *sys.argv[1:]]),
        "unit": "CPU ms per invocation (time.process_time), the median of slices",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    cache = Path.home() / ".cache" / "wasminfer" / "bench-engine"  # the component's compile, cached
    with Host(cache_dir=cache) as host:
        for name in args.workload or ["minilm"]:
            calls = paths(host, name, work, args.stand_in, not args.skip_component)
            out[name] = measure(calls, args.n, name)
            for p in calls:
                print(f"{name:<16}{p:<22}{out[name][p]:>8.3f} ms CPU/invocation")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("guest_cpu_stand_in.json" if args.stand_in else "guest_cpu.json")
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
