"""How many live, warm instances of the digits function fit in a memory budget (run by the density
scenario in a process of its own, so nothing else it holds is counted).

    python bench/suite/instances.py N [--budget-gib 4]

Loads the digits model into a `Host`, deploys the digits function (built from source), then makes
N instances, each invoked once (a warm instance holds what a request left in its heap), all kept
alive. Measures the process' PSS before and after, and prints JSON: the memory per instance, the
process' memory with N instances, and the most instances that fit in the budget,
`(budget - base) / per_instance`, where `base` is the process with the model and the function
loaded and no instance.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from suite import workloads  # noqa: E402


def pss() -> int:
    gc.collect()
    return int(psutil.Process().memory_full_info().pss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--budget-gib", type=float, default=4.0)
    args = ap.parse_args()

    from wasminfer import toolchain
    from wasminfer.manifest import Manifest
    from wasminfer.runtime import Host, handler

    w = workloads.WORKLOADS["digits"]
    wasm = toolchain.build(w.source).read_bytes()
    body = w.body()
    with Host(cache_dir=None) as host:
        host.deploy_model("digits", workloads.model_bytes("digits"))
        manifest = Manifest.from_dict(w.manifest()).replace(max_instances=max(args.n, 1))
        host.deploy_function("digits", wasm, manifest, prewarm=0)
        fn = host.function("digits")
        for _ in range(50):
            host.invoke("digits", body, w.content_type)
        fn.pool.reap_idle(-1, 0)
        base = pss()
        keep = []
        t0 = time.perf_counter()
        for i in range(args.n):
            inst = fn._create()
            state = handler.InvocationState("digits", manifest, host.models.infer, fn.logs, f"i{i}")
            handler.invoke(inst.wasm, body, w.content_type, state)
            if not state.output or b"label" not in state.output:
                raise RuntimeError(f"instance {i} did not answer: {state.output!r}")
            keep.append(inst)
        seconds = time.perf_counter() - t0
        total = pss()
        rss = psutil.Process().memory_info().rss
        for inst in keep:
            fn._destroy(inst)
    per_instance = (total - base) / max(args.n, 1)
    budget = args.budget_gib * 2**30
    print(
        json.dumps(
            {
                "function": "digits",
                "instances": args.n,
                "base_pss_mib": round(base / 2**20, 1),
                "total_pss_mib": round(total / 2**20, 1),
                "total_rss_mib": round(rss / 2**20, 1),
                "per_instance_kib": round(per_instance / 1024, 1),
                "budget_gib": args.budget_gib,
                "max_instances": int((budget - base) / per_instance) if per_instance > 0 else None,
                "measured_within_budget": total <= budget,
                "create_and_invoke_s": round(seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
