"""Scenario `coldstart`: time to the first answer when nothing is running yet.

- `baseline`: a new container-per-function process: interpreter start, imports, its own model
  load, the first (cold) run, over HTTP (`systems.baseline_cold_start`).
- (a) `new_instance`: a deployed function whose pool is empty (its instances reaped): the request
  makes a fresh instance (a Store and an instantiation of the precompiled module) and runs on it.
- (b) `new_function`: a function never seen before — a module with a fresh nonce, so nothing is in
  the compile cache — deployed next to its already loaded model, then its first request:
  compile + instantiate + first answer. `new_function_request` is that first request alone (the
  deploy, like the baseline's image build, done before any request arrives).
- (c) `new_function_new_model`: (b) plus loading the model into a host that does not have it.

(a), (b), (c) run in-process on a `Host` (the runtime isolated: no HTTP, no store); (b) and (c) are
also measured through the gateway (`*_http`: PUT the model, PUT the function, POST the first
request, with the store's durable writes), which is what a user waits for. Every figure is the
median of repetitions; speedups divide the baseline's median by wasminfer's. The repetitions of
the baseline, (b) and (c) are taken in rounds (a baseline process start, then each of wasminfer's),
so that a machine whose speed drifts weighs on both sides of a ratio alike. Each new function of (b)
and (c) comes to a host at rest (`SETTLE_S` after the previous one).

The Python functions (text-classifier, minilm) are left out: they run on the Python runtime, whose
cold starts (a new function's source to its first answer, a new instance) bench/python_guest.py
measures.
"""

from __future__ import annotations

import time
from typing import Any

from suite import systems, workloads
from suite.common import Context, check_agreement, progress, write_result

FIGURES = (
    "new_instance",
    "new_function",
    "new_function_request",
    "new_function_new_model",
    "new_function_http",
    "new_function_new_model_http",
)


#: The pause before each new function (b, c): the host at rest, as the baseline's process starts from
#: rest. Back to back, a deploy met the previous one's background (optimised-tier) compile and the
#: start of the spare compile worker that replaced the one it used: digits' samples rose from 11 to
#: 39 ms over 7 repetitions. Both take well under this on a quiet machine.
SETTLE_S = 0.5


def reps(ctx: Context) -> int:
    return 3 if ctx.quick else 7


#: Samples of (a) and of the warm answer: each takes a fraction of a millisecond, so they are taken
#: many more times than the process starts they are divided into. Seven samples of a 0.2 ms figure
#: on a shared machine gave medians from 0.19 to 0.23 ms between runs (a thread switch, a page
#: reclaimed), which moved its speedup by 20%; a hundred settle it.
def instance_reps(ctx: Context) -> int:
    return 21 if ctx.quick else 101


def applicable(ctx: Context) -> list[str]:
    return [n for n in ctx.workloads if (workloads.WORKLOADS[n].source / "main.c").is_file()]


def run(ctx: Context) -> dict[str, Any]:
    from wasminfer.manifest import Manifest
    from wasminfer.runtime import Host

    results: dict[str, Any] = {}
    n = reps(ctx)
    for name in applicable(ctx):
        w = workloads.WORKLOADS[name]
        model_path, wasm, body = ctx.model_path(name), ctx.function(name), w.body()
        model_bytes = model_path.read_bytes()
        reference = w.handler(workloads.session(model_path))(body, w.content_type)
        manifest = Manifest.from_dict(w.manifest())
        samples: dict[str, list[float]] = {k: [] for k in ("baseline", *FIGURES, "warm")}

        engine = Host.new_engine(None)
        try:
            with Host(engine=engine) as host, \
                    systems.WasminferServer(ctx.work / f"coldstart-{name}" / "data") as server:
                progress(f"coldstart {name}: wasminfer in-process (a) ×{instance_reps(ctx)}")
                host.deploy_model(name, model_bytes)
                host.deploy_function(w.function, wasm, manifest)
                fn = host.function(w.function)
                # A function deployed a while ago runs its optimised code (the fast tier's serves only
                # its first answers, `_tiers.Tiering`): (a) and the warm figure are measured on that.
                if not fn.compiled.code.wait(120):
                    raise RuntimeError(f"{name}: the optimised code did not come within 120 s")
                for _ in range(5):
                    host.invoke(w.function, body, w.content_type)
                for _ in range(instance_reps(ctx)):
                    t0 = time.perf_counter()
                    host.invoke(w.function, body, w.content_type)
                    samples["warm"].append(time.perf_counter() - t0)
                    fn.pool.reap_idle(-1, 0)  # (a): no idle instance left
                    t0 = time.perf_counter()
                    r = host.invoke(w.function, body, w.content_type)
                    samples["new_instance"].append(time.perf_counter() - t0)
                    assert r.cold, "the pool still had an instance"
                    check_agreement("wasminfer", name, r.body, reference)
                client = server.client
                client.put_model(name, model_bytes)
                # The rest in rounds, each a baseline process start then every wasminfer figure, so
                # that the machine's speed, which drifts by tens of per cent over minutes on a shared
                # VM (the baseline's median went from 175 to 305 ms between runs of one afternoon),
                # weighs on both sides of each ratio alike.
                for i in range(n):
                    progress(f"coldstart {name}: round {i + 1}/{n}: baseline, (b), (c), in-process and http")
                    seconds, answer = systems.baseline_cold_start(name, model_path)
                    check_agreement("the baseline", name, answer, reference)
                    samples["baseline"].append(seconds)
                    _new_function(samples, host, w, wasm, manifest, body, reference, i)
                    _new_function_http(samples, client, w, wasm, manifest, body, reference, i)
                    _new_model(samples, engine, w, wasm, model_bytes, manifest, body, reference)
                    _new_model_http(samples, client, w, wasm, model_bytes, manifest, body, reference)
        finally:
            engine.close()

        med = {k: systems.median(v) for k, v in samples.items()}
        base = med["baseline"]
        results[name] = {
            "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
            "speedup": {k: round(base / med[k], 1) for k in FIGURES},
            # what starting costs on top of a warm answer (the model's run is in every figure)
            "start_overhead_ms": {k: round((med[k] - med["warm"]) * 1e3, 3) for k in ("baseline", *FIGURES)},
            "samples_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in samples.items()},
        }
        progress(
            f"coldstart {name}: baseline {base * 1e3:.1f} ms, (a) {med['new_instance'] * 1e3:.2f} ms, "
            f"(b) {med['new_function'] * 1e3:.1f} ms, (c) {med['new_function_new_model'] * 1e3:.1f} ms"
        )
    result = {"repetitions": n, "instance_repetitions": instance_reps(ctx), "workloads": results}
    write_result(ctx, "coldstart", result)
    return result


def _new_function(samples: dict[str, list[float]], host: Any, w: Any, wasm: bytes, manifest: Any,
                  body: bytes, reference: Any, i: int) -> None:
    """(b) in-process: a module no cache has seen deployed next to its loaded model, then its first
    request (`new_function_request` alone too)."""
    fresh = systems.unique_module(wasm)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    host.deploy_function(f"{w.function}-new-{i}", fresh, manifest)
    t1 = time.perf_counter()
    r = host.invoke(f"{w.function}-new-{i}", body, w.content_type)
    t2 = time.perf_counter()
    check_agreement("wasminfer", w.name, r.body, reference)
    samples["new_function"].append(t2 - t0)
    samples["new_function_request"].append(t2 - t1)
    host.remove_function(f"{w.function}-new-{i}")


def _new_function_http(samples: dict[str, list[float]], client: Any, w: Any, wasm: bytes, manifest: Any,
                       body: bytes, reference: Any, i: int) -> None:
    """(b) through the gateway: PUT the function, POST its first request."""
    fname = f"{w.function}-new-{i}"
    fresh = systems.unique_module(wasm)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    client.put_function(fname, fresh, manifest)
    answer = client.invoke(fname, body, w.content_type).body
    samples["new_function_http"].append(time.perf_counter() - t0)
    check_agreement("wasminfer", w.name, answer, reference)
    client.delete_function(fname)


def _new_model(samples: dict[str, list[float]], engine: Any, w: Any, wasm: bytes, model: bytes,
               manifest: Any, body: bytes, reference: Any) -> None:
    """(c) in-process: a host (a tenant's, sharing the engine) without the model: the model's load,
    then (b)."""
    from wasminfer.runtime import Host

    model, fresh = systems.unique_model(model), systems.unique_module(wasm)
    with Host(engine=engine) as host:
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        host.deploy_model(w.name, model)
        host.deploy_function(w.function, fresh, manifest)
        r = host.invoke(w.function, body, w.content_type)
        samples["new_function_new_model"].append(time.perf_counter() - t0)
        check_agreement("wasminfer", w.name, r.body, reference)


def _new_model_http(samples: dict[str, list[float]], client: Any, w: Any, wasm: bytes, model: bytes,
                    manifest: Any, body: bytes, reference: Any) -> None:
    """(c) through the gateway: PUT the model (deleted first), PUT the function, POST."""
    model, fresh = systems.unique_model(model), systems.unique_module(wasm)
    client.delete_model(w.name)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    client.put_model(w.name, model)
    client.put_function(w.function, fresh, manifest)
    answer = client.invoke(w.function, body, w.content_type).body
    samples["new_function_new_model_http"].append(time.perf_counter() - t0)
    check_agreement("wasminfer", w.name, answer, reference)
    client.delete_function(w.function)


def table(result: dict[str, Any]) -> str:
    cols = ("baseline", "warm", *FIGURES)
    heads = {
        "baseline": "baseline",
        "warm": "warm",
        "new_instance": "(a) inst",
        "new_function": "(b) fn",
        "new_function_request": "(b) req",
        "new_function_new_model": "(c) fn+model",
        "new_function_http": "(b) http",
        "new_function_new_model_http": "(c) http",
    }
    lines = [
        "time to first answer, ms (median)",
        f"{'workload':<18}" + "".join(f"{heads[c]:>13}" for c in cols),
    ]
    for name, r in result["workloads"].items():
        lines.append(f"{name:<18}" + "".join(f"{r['median_ms'][c]:>13.3f}" for c in cols))
    lines.append("speedup over the baseline's cold start (×)")
    for name, r in result["workloads"].items():
        lines.append(f"{name:<18}{'':>26}" + "".join(f"{r['speedup'][c]:>13.1f}" for c in FIGURES))
    return "\n".join(lines)
