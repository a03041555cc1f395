"""Micro-benchmarks of the host runtime (`just bench-micro`).

Prints a table and writes `bench/results/micro.json`:
- instantiate_us_p50: a new instance of a deployed (compiled, InstancePre'd) function — the digits
  example built from source — including its WASI context and `_initialize`.
- idle_instance_kb: resident memory per extra idle instance, measured over N instances (RSS delta / N),
  fresh and after one invocation each.
- host_call_us_p50: a guest → host import → guest round trip: the median of a guest call that makes
  one import call minus the median of the same call without it.
- invoke_overhead_us_p50: `Host.invoke` of the digits function minus the model's own
  `session.run` on the same input (both medians, measured side by side in this run).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import wasmtime

from suite.stats import p50, pct
from wasminfer import examples, toolchain
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime._engine import CallState

RESULTS = Path(__file__).resolve().parent / "results"

CALL_WAT = r"""
(module
  (import "wasminfer" "last_error" (func $le (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) i32.const 0)
  (func (export "bare") (param i32) (result i32) local.get 0)
  (func (export "roundtrip") (param i32) (result i32) (call $le (i32.const 0) (i32.const 0))))
"""


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def rss_kb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000, help="repetitions for latency figures")
    ap.add_argument("--instances", type=int, default=2000, help="instances for the memory figure")
    args = ap.parse_args()

    progress = lambda m: print(m, file=sys.stderr)  # noqa: E731
    wasm = toolchain.build(examples.functions_dir() / "digits", progress=progress).read_bytes()
    model = examples.digits_model()
    _, x_test, _, _ = examples.digits_split()
    sample = [float(v) for v in x_test[0]]
    body = json.dumps({"pixels": sample}).encode()

    with Host(cache_dir=None) as host:
        host.deploy_model("digits", model)
        manifest = Manifest.from_dict(examples.EXAMPLES[0].manifest())
        host.deploy_function("digits", wasm, manifest.replace(max_instances=100_000))
        fn = host.function("digits")
        fn.compiled.code.wait(120)  # measured on the optimised code, not the fast tier's first answers

        # 1. instantiate a new instance of a warm function
        for _ in range(200):
            fn._destroy(fn._create())
        inst_us = timed(lambda: fn._destroy(fn._create()), args.n // 2)

        # 2. idle instance memory
        n_inst = args.instances
        keep = []
        before = rss_kb()
        for _ in range(n_inst):
            keep.append(fn._create())
        after_fresh = rss_kb()
        from wasminfer.runtime import handler

        for i, inst in enumerate(keep):
            st = handler.InvocationState("digits", manifest, host.models.infer, fn.logs, f"m{i}")
            handler.invoke(inst.wasm, body, "application/json", st)
        after_invoke = rss_kb()
        idle_kb = (after_fresh - before) / n_inst
        idle_kb_invoked = (after_invoke - before) / n_inst
        for inst in keep:
            fn._destroy(inst)
        keep.clear()

        # 3. host call round trip
        call_wasm = bytes(wasmtime.wat2wasm(CALL_WAT))
        host.deploy_function("calls", call_wasm, Manifest())
        cfn = host.function("calls")
        cfn.compiled.code.wait(120)
        compiled = cfn.compiled
        wi = compiled.instantiate(memory_bytes=1 << 20, timeout_ms=60_000,
                                  calls=(("bare", 1), ("roundtrip", 1)))
        st0 = handler.InvocationState("calls", Manifest(), host.models.infer, cfn.logs, "x")
        for _ in range(2000):
            wi.call("bare", (1,), st0)
            wi.call("roundtrip", (1,), st0)
        bare = timed(lambda: wi.call("bare", (1,), st0), args.n * 4)
        rt = timed(lambda: wi.call("roundtrip", (1,), st0), args.n * 4)
        wi.close()
        host_call = p50(rt) - p50(bare)
        _ = CallState

        # 4. invoke overhead: Host.invoke minus session.run on the same input, side by side
        sess = host.models._models["digits"].session if hasattr(host.models, "_models") else None
        feed = {"input": np.asarray([sample], dtype=np.float32)}
        for _ in range(500):
            host.invoke("digits", body, "application/json")
        inv, run = [], []
        for _ in range(args.n):
            t = time.perf_counter_ns()
            host.invoke("digits", body, "application/json")
            inv.append((time.perf_counter_ns() - t) / 1000)
            if sess is not None:
                t = time.perf_counter_ns()
                sess.run(None, feed)
                run.append((time.perf_counter_ns() - t) / 1000)
        invoke_overhead = p50(inv) - (p50(run) if run else 0.0)

        # and the same without any model: an echo-like call of the digits guest failing fast is not
        # representative, so report the bare call path of the hostile-free CALL_WAT handler too
        empty = timed(lambda: host.invoke("calls", b"", "application/octet-stream"), args.n)

    results = {
        "instantiate_us_p50": round(p50(inst_us), 1),
        "instantiate_us_p99": round(pct(inst_us, 0.99), 1),
        "idle_instance_kb": round(idle_kb, 1),
        "idle_instance_kb_after_invoke": round(idle_kb_invoked, 1),
        "idle_instances_measured": n_inst,
        "guest_call_us_p50": round(p50(bare), 2),
        "host_call_us_p50": round(host_call, 2),
        "invoke_overhead_us_p50": round(invoke_overhead, 1),
        "invoke_us_p50": round(p50(inv), 1),
        "invoke_us_p99": round(pct(inv, 0.99), 1),
        "session_run_us_p50": round(p50(run), 1) if run else None,
        "empty_invoke_us_p50": round(p50(empty), 1),
        "targets": {"instantiate_us_p50": 100, "idle_instance_kb": 64, "host_call_us_p50": 5,
                    "invoke_overhead_us_p50": 50},
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                    "wasmtime": "50.0.1", "date": time.strftime("%Y-%m-%d")},
        "module_bytes": len(wasm),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "micro.json").write_text(json.dumps(results, indent=2) + "\n")

    rows = [
        ("instantiate_us_p50", results["instantiate_us_p50"], "≤ 100"),
        ("idle_instance_kb", results["idle_instance_kb"], "≤ 64"),
        ("idle_instance_kb_after_invoke", results["idle_instance_kb_after_invoke"], ""),
        ("guest_call_us_p50", results["guest_call_us_p50"], ""),
        ("host_call_us_p50", results["host_call_us_p50"], "≤ 5"),
        ("session_run_us_p50", results["session_run_us_p50"], ""),
        ("invoke_us_p50", results["invoke_us_p50"], ""),
        ("invoke_overhead_us_p50", results["invoke_overhead_us_p50"], "≤ 50"),
        ("empty_invoke_us_p50", results["empty_invoke_us_p50"], ""),
    ]
    print(f"{'metric':34} {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:34} {value!s:>10}  {target}")
    print(f"\nwrote {RESULTS / 'micro.json'}")


if __name__ == "__main__":
    main()
