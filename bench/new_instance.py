"""A new instance of a deployed function to its first answer, with and without the instance pool
(issue 18, `coldstart_speedup_new_instance`; the pool is `runtime/_pooling.py`).

    python bench/new_instance.py [-n 300] [--blocks 6]

The digits example (built from source) on one `Host` per configuration, all in this process, its
optimised code in: `on_demand` (no pool: `WASMINFER_INSTANCE_POOL=0`), `pooled` (opt-in,
1000 slots, each keeping its first `_pooling.KEEP_RESIDENT_BYTES` resident), `pooled_keep_0` (the
pool giving every page back when an instance closes); `--keep` adds other sizes. The
configurations take turns in blocks of `n` repetitions, in alternating order, so that a noisy
machine slows each alike. Each repetition, as the coldstart scenario's (a):
- warm_us: a request on the idle instance;
- new_us: its instances reaped, the next request (a new instance, then its first answer);
- start_us: of new_us, making the instance (`InvokeResult.start_us`);
- faults: minor page faults of that request;
- churn_us: an instance made and closed (`_create` + `_destroy`);
- renew_grown_us: an instance whose memory grew by `GROWN` bytes, all touched, renewed (closed and
  made again, `DeployedFunction._renew`: what `GrowthPolicy` does to an instance that grew).
Medians. Prints a table; writes bench/results/new_instance.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from wasmtime import _ffi as ffi

from wasminfer import examples, toolchain
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime._wasm import WasmEngine, WasmInstance
from wasminfer.runtime.host import HOST_FUNCS

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS: dict[str, dict[str, int]] = {
    "on_demand": {"pool_slots": 0},
    "pooled": {"pool_slots": 1000},
    "pooled_keep_0": {"pool_slots": 1000, "pool_keep_resident": 0},
}
FIGURES = ("warm_us", "new_us", "start_us", "faults", "churn_us", "renew_grown_us")
#: Past `GrowthPolicy.slack_bytes`, so renewed once idle; within digits' `memory_mb` of 2.
GROWN = 1 << 20


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def block(host: Host, body: bytes, n: int, out: dict[str, list[float]]) -> None:
    fn = host.function("digits")
    for _ in range(n):
        t = time.perf_counter_ns()
        host.invoke("digits", body, "application/json")
        out["warm_us"].append((time.perf_counter_ns() - t) / 1000)
        fn.pool.reap_idle(-1, 0)
        faults = minflt()
        t = time.perf_counter_ns()
        r = host.invoke("digits", body, "application/json")
        out["new_us"].append((time.perf_counter_ns() - t) / 1000)
        out["faults"].append(minflt() - faults)
        assert r.cold, "the pool still had an instance"
        out["start_us"].append(r.start_us)
    for _ in range(n):  # apart: its second slot would change the first loop's slot reuse
        t = time.perf_counter_ns()
        fn._destroy(fn._create())
        out["churn_us"].append((time.perf_counter_ns() - t) / 1000)
    inst = fn._create()
    for _ in range(n):
        grow(inst.wasm, GROWN)
        t = time.perf_counter_ns()
        inst = fn._renew(inst)
        out["renew_grown_us"].append((time.perf_counter_ns() - t) / 1000)
    fn._destroy(inst)


def grow(wasm: WasmInstance, nbytes: int) -> None:
    """Grows the instance's memory by `nbytes` and touches every page of it, as a large request does."""
    size = wasm.memory_size()
    previous = ctypes.c_uint64()
    error = ffi.wasmtime_memory_grow(ctypes.cast(wasm._ctx, ctypes.POINTER(ffi.wasmtime_context_t)),
                                     ctypes.cast(wasm._mem_ref, ctypes.POINTER(ffi.wasmtime_memory_t)),
                                     nbytes // 65536, ctypes.byref(previous))
    assert not error, "the memory did not grow"
    wasm._span = None  # grown behind the instance's back: the span it read is stale
    ctypes.memset(wasm.memory()._base(size, nbytes), 1, nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="repetitions per block")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per configuration")
    parser.add_argument("--keep", type=int, nargs="*", default=[],
                        help="also the pool keeping this many KiB of each slot resident (one config each)")
    args = parser.parse_args()
    configs = dict(CONFIGS)
    for kib in args.keep:
        configs[f"pooled_keep_{kib}k"] = {"pool_slots": 1000, "pool_keep_resident": kib << 10}

    wasm = toolchain.build(examples.functions_dir() / "digits").read_bytes()
    model = examples.digits_model()
    _, x_test, _, _ = examples.digits_split()
    body = json.dumps({"pixels": [float(v) for v in x_test[0]]}).encode()
    manifest = Manifest.from_dict(examples.EXAMPLES[0].manifest())

    hosts: dict[str, Host] = {}
    try:
        for name, settings in configs.items():
            host = hosts[name] = Host(engine=WasmEngine(HOST_FUNCS, None, **settings))
            host.deploy_model("digits", model)
            host.deploy_function("digits", wasm, manifest)
            if not host.function("digits").compiled.code.wait(120):
                raise RuntimeError("the optimised code did not come within 120 s")
            for _ in range(50):
                host.invoke("digits", body, "application/json")
        samples: dict[str, dict[str, list[float]]] = {c: {f: [] for f in FIGURES} for c in configs}
        order = list(configs)
        for b in range(args.blocks):
            for name in order if b % 2 == 0 else order[::-1]:
                block(hosts[name], body, args.n, samples[name])
        pooled = {n: h.engine.pool.live if h.engine.pool is not None else 0 for n, h in hosts.items()}
    finally:
        for host in hosts.values():
            host.close()
            host.engine.close()

    medians = {c: {f: round(statistics.median(v), 1) for f, v in s.items()} for c, s in samples.items()}
    print(f"{'config':16s}" + "".join(f"{f:>15s}" for f in FIGURES))
    for c, m in medians.items():
        print(f"{c:16s}" + "".join(f"{m[f]:15.1f}" for f in FIGURES))
    result: dict[str, Any] = {
        "command": f"python bench/new_instance.py -n {args.n} --blocks {args.blocks}"
                   + (f" --keep {' '.join(map(str, args.keep))}" if args.keep else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repetitions": args.n * args.blocks,
        "medians": medians,
        "pooled_instances_left": pooled,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "new_instance.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
