"""Micro-benchmarks of Python guests (components built with componentize-py; `just bench-python`).

Prints a table and writes `bench/results/python_guest.json` (and `python_guest.png` if matplotlib is
there). The guest is bench/guests/py_digits: the C example functions/digits ported to the Python SDK
(JSON pixels in, `infer("digits")`, label and probabilities out as JSON; any other content type is
echoed). Figures, as bench/micro.py measures them for handler modules:

- py_instantiate_us_p50: a new instance of a deployed function and its disposal (`_create` +
  `_destroy` of its pool): a fresh Store, the component's instantiation (CPython's heap arrives as a
  copy-on-write image of the build's snapshot) and WASI context.
- py_idle_instance_kb: memory per extra idle instance after one invocation each, over N instances:
  the growth of the process' PSS (proportional set size: a page that N instances share counts 1/N
  per instance) divided by N. `_rss` is the same with RSS, which counts a page shared by N mappings
  N times (the snapshot's pages are mapped once per instance) and so overstates it.
- py_invoke_overhead_us_p50: `Host.invoke` of the digits port minus the model's own `session.run` on
  the same input (medians, side by side). It includes the guest's own Python work (parsing and
  writing JSON in CPython compiled to Wasm); `py_echo_invoke_us_p50` is the floor without any.
- py_payload_us_per_kib: what a KiB of body costs, in and out (a 64 KiB echo minus a 1-byte one):
  bodies and tensors cross as `list<u8>`, one component value per byte.

On a shared machine other processes inflate latencies: every latency figure is the median of the
quietest of `--rounds` consecutive rounds (`_all` fields: the median over all of them), and the JSON
records the load average.

The component is compiled once into the engine cache (`$WASMINFER_CACHE/engine`; 10-30 s the first
time) and the build is cached by content hash, so reruns start in seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from suite.stats import p50, pct
from wasminfer import examples, toolchain
from wasminfer.runtime import Host, Manifest, component, handler

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GUEST = HERE / "guests" / "py_digits"
TARGETS = {"py_instantiate_us_p50": 2000, "py_idle_instance_kb": 4096, "py_invoke_overhead_us_p50": 300}


def round_p50s(xs: list[float], rounds: int) -> list[float]:
    """The median of each of `rounds` consecutive slices of `xs` (samples in the order taken)."""
    size = max(1, len(xs) // rounds)
    return [p50(xs[i:i + size]) for i in range(0, size * rounds, size) if xs[i:i + size]]


def quietest(xs: list[float], rounds: int) -> float:
    return min(round_p50s(xs, rounds))


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def memory_kb() -> tuple[float, float]:
    """(PSS, RSS) of this process in KiB."""
    gc.collect()
    info = psutil.Process().memory_full_info()
    return info.pss / 1024, info.rss / 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="repetitions for the invoke figures")
    ap.add_argument("--instantiations", type=int, default=300, help="repetitions for py_instantiate")
    ap.add_argument("--instances", type=int, default=100, help="instances for the memory figure")
    ap.add_argument("--no-text-classify", action="store_true", help="skip the text-classify example")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per latency figure (the quietest counts)")
    args = ap.parse_args()

    load_at_start = round(os.getloadavg()[0], 2)
    cache = toolchain.default_cache_dir().parent / "engine"
    t0 = time.perf_counter()
    wasm = toolchain.build(GUEST, progress=log).read_bytes()
    build_s = time.perf_counter() - t0
    _, x_test, _, _ = examples.digits_split()
    sample = [float(v) for v in x_test[0]]
    body = json.dumps({"pixels": sample}).encode()
    manifest = Manifest(models=("digits",), memory_mb=64, timeout_ms=10_000, max_instances=100_000)

    with Host(cache_dir=cache) as host:
        host.deploy_model("digits", examples.digits_model())
        log("deploying (compiles the component once into the engine cache: 10-30 s the first time)")
        t0 = time.perf_counter()
        desc = host.deploy_function("py-digits", wasm, manifest)
        deploy_s = time.perf_counter() - t0
        fn = host.function("py-digits")

        # 1. instantiate
        log(f"instantiating {args.instantiations} instances")
        for _ in range(20):
            fn._destroy(fn._create())
        create, destroy = [], []
        for _ in range(args.instantiations):
            t = time.perf_counter_ns()
            inst = fn._create()
            t1 = time.perf_counter_ns()
            fn._destroy(inst)
            create.append((t1 - t) / 1000)
            destroy.append((time.perf_counter_ns() - t1) / 1000)
        inst_us = [c + d for c, d in zip(create, destroy, strict=True)]

        # 2. idle instance memory: fresh, then after one invocation each
        log(f"measuring the memory of {args.instances} idle instances")
        keep = []
        pss0, rss0 = memory_kb()
        for _ in range(args.instances):
            keep.append(fn._create())
        pss1, rss1 = memory_kb()
        for i, inst in enumerate(keep):
            st = handler.InvocationState("py-digits", manifest, host.models.infer, fn.logs, f"m{i}")
            component.invoke(inst.wasm, body, "application/json", st)  # type: ignore[arg-type]
        pss2, rss2 = memory_kb()
        for inst in keep:
            fn._destroy(inst)
        keep.clear()
        n_inst = args.instances

        # 3. invoke overhead: Host.invoke minus session.run, side by side
        log(f"invoking {args.n} times")
        sess = host.models._models["digits"].session
        feed = {"input": np.asarray([sample], dtype=np.float32)}
        for _ in range(300):
            host.invoke("py-digits", body, "application/json")
        inv, run, infer_us = [], [], []
        for _ in range(args.n):
            t = time.perf_counter_ns()
            r = host.invoke("py-digits", body, "application/json")
            inv.append((time.perf_counter_ns() - t) / 1000)
            infer_us.append(r.infer_us)
            t = time.perf_counter_ns()
            sess.run(None, feed)
            run.append((time.perf_counter_ns() - t) / 1000)
        echo = timed(lambda: host.invoke("py-digits", b"x", "text/plain"), args.n)
        # the overhead of the quietest round, from that round's own side-by-side samples
        k = args.rounds
        inv_rounds, run_rounds = round_p50s(inv, k), round_p50s(run, k)
        best = min(range(len(inv_rounds)), key=inv_rounds.__getitem__)
        overhead = inv_rounds[best] - run_rounds[best]
        # bulk data: a 64 KiB body in and out, each byte a component value of its own both ways
        big = b"x" * (64 << 10)
        echo_64k = timed(lambda: host.invoke("py-digits", big, "application/octet-stream"),
                         max(50, args.n // 20))

        text: dict[str, float] = {}
        text_samples: list[float] = []
        if not args.no_text_classify:
            ex = next(e for e in examples.EXAMPLES if e.name == "text-classify")
            for model in ex.models:
                host.deploy_model(model.name, model.make())
            host.deploy_function(ex.name, toolchain.build(ex.folder, progress=log).read_bytes(),
                                 Manifest.from_dict(ex.manifest()))
            sentence = b"Heavy rain and strong winds are expected along the coast tonight"
            for _ in range(200):
                host.invoke(ex.name, sentence, "text/plain")
            text_samples = timed(lambda: host.invoke(ex.name, sentence, "text/plain"), args.n // 2)
            text = {"text_classify_invoke_us_p50": round(quietest(text_samples, args.rounds), 1)}

    results: dict[str, Any] = {
        "py_instantiate_us_p50": round(quietest(inst_us, k), 1),
        "py_instantiate_us_p50_all": round(p50(inst_us), 1),
        "py_instantiate_us_p99": round(pct(inst_us, 0.99), 1),
        "py_instantiate_create_us_p50": round(quietest(create, k), 1),
        "py_instantiate_destroy_us_p50": round(quietest(destroy, k), 1),
        "py_idle_instance_kb": round((pss2 - pss0) / n_inst, 1),
        "py_idle_instance_kb_fresh": round((pss1 - pss0) / n_inst, 1),
        "py_idle_instance_rss_kb": round((rss2 - rss0) / n_inst, 1),
        "py_idle_instance_rss_kb_fresh": round((rss1 - rss0) / n_inst, 1),
        "py_idle_instances_measured": n_inst,
        "py_invoke_overhead_us_p50": round(overhead, 1),
        "py_invoke_overhead_us_p50_all": round(p50(inv) - p50(run), 1),
        "py_invoke_us_p50": round(inv_rounds[best], 1),
        "py_invoke_us_p50_all": round(p50(inv), 1),
        "py_invoke_us_p99": round(pct(inv, 0.99), 1),
        "py_infer_us_p50": round(quietest(infer_us, k), 1),
        "session_run_us_p50": round(run_rounds[best], 1),
        "py_echo_invoke_us_p50": round(quietest(echo, k), 1),
        "py_echo_64kib_us_p50": round(quietest(echo_64k, k), 1),
        "py_payload_us_per_kib": round((quietest(echo_64k, k) - quietest(echo, k)) / 64, 1),  # in and out
        **text,
        "component_bytes": len(wasm),
        "build_s": round(build_s, 1),
        "deploy_s": round(deploy_s, 2),
        "compiled_from_cache": desc["module"]["from_cache"],
        "targets": TARGETS,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "wasmtime": "50.0.1",
                    "componentize_py": "0.25.1", "date": time.strftime("%Y-%m-%d"),
                    "load_avg_1m_at_start": load_at_start,
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},  # a shared machine: see it
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "python_guest.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS / "python_guest.json")

    rows = [(k, v, f"≤ {TARGETS[k]}" if k in TARGETS else "") for k, v in results.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]
    print(f"{'metric':34} {'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:34} {value!s:>12}  {target}")
    print(f"\nwrote {RESULTS / 'python_guest.json'}")
    _plot({"echo (py-digits)": echo, "py-digits": inv, "text-classify": text_samples})


def _plot(series: dict[str, list[float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install 'wasminfer[bench]'): no python_guest.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs in series.items():
        if xs:
            s = sorted(xs)
            ax.plot(s, [i / len(s) for i in range(len(s))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("Host.invoke latency (µs)")
    ax.set_ylabel("fraction of invocations")
    ax.set_title("Python guests (componentize-py components), warm instances")
    ax.legend()
    fig.tight_layout()
    tmp = RESULTS / "python_guest.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, RESULTS / "python_guest.png")


if __name__ == "__main__":
    main()
