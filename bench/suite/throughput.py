"""Scenario `throughput`: closed-loop load at concurrency 1, 4, 16, 64 on every workload and system.

Systems, measured back to back for each workload and concurrency (in a rotating order, so a noisy
neighbour on the shared machine does not always hit the same one):
- `wasminfer`: the workload's function through `wasminfer serve` (HTTP, loopback);
- `baseline`: the function's own Starlette + uvicorn process (container-per-function);
- `limit`: numpy pre/post + `session.run` in this process, no HTTP, no sandbox, at the best of
  `systems.limit_configs` (threads × intra-op threads) for the concurrency;
- `ray`: Ray Serve, in a network namespace of its own (`ray_serve.py`), when Ray is installed and
  this runs as root.

Invocations/s, p50, p99 (the generator's, or the limit's callers'), and CPU: the server processes'
user + system seconds per second of the run (`cores`) and per invocation (`cpu_ms`). `models`: for
each workload, the threads and run slots wasminfer chose at load and the measurements that chose
them (the model view's `run_plan`), and the most runs it had in flight at once during the runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

from suite import loadgen, systems, workloads
from suite.common import Context, check_agreement, progress, write_result

SYSTEMS = ("wasminfer", "baseline", "limit", "ray")


def concurrencies(ctx: Context) -> list[int]:
    return [1, 16] if ctx.quick else [1, 4, 16, 64]


def duration(ctx: Context) -> float:
    return 2.0 if ctx.quick else 4.0


def rounds(ctx: Context, c: int) -> int:
    """Alternating rounds: five at the concurrency the targets are set at (three with `--quick`), one
    elsewhere. Five, not three: on these shared 2-core machines a 4-s round of one system swings by
    ±10-20% (minilm's ratio to the limit was 1.06, 0.95 and 0.87 in three full runs of unchanged
    code), and the median of five paired ratios moves less than that of three."""
    if c != 16:
        return 1
    return 3 if ctx.quick else 5


def _measure(
    system: str,
    name: str,
    c: int,
    dur: float,
    gen: str,
    server: systems.WasminferServer,
    baseline: systems.BaselineProcess,
    ctx: Context,
) -> dict[str, Any]:
    w = workloads.WORKLOADS[name]
    # Every system starts from quiet servers: what the last run left computing is finished first.
    systems.settle(server.pids + baseline.pids)
    load_average = round(os.getloadavg()[0], 2)
    if system == "limit":
        # Every configuration, every round, for half the time each; the best one counts. Taking the
        # best of several noisy runs favours the limit, which errs on the side of our ratios.
        lim = systems.limit_pick(name, ctx.model_path(name), c, max(1.0, dur / 2))
        return {
            "system": "limit",
            "workload": name,
            "concurrency": c,
            "requests": lim.requests,
            "seconds": round(lim.seconds, 3),
            "per_s": round(lim.per_s, 1),
            "p50_ms": round(lim.p50_ms, 3),
            "p99_ms": round(lim.p99_ms, 3),
            "errors": 0,
            "shed": 0,
            "generator": "in-process",
            "cpu_s": round(lim.cpu_s, 3),
            "cores": round(lim.cpu_s / lim.seconds, 2),
            "cpu_ms": round(lim.cpu_s / max(lim.requests, 1) * 1e3, 3),
            "threads": lim.threads,
            "intra_op_threads": lim.intra_op_threads,
            "spinning": lim.spinning,
            "tried": lim.tried,
            "load_average": load_average,
        }
    url = server.invoke_url(w.function) if system == "wasminfer" else baseline.url
    pids = server.pids if system == "wasminfer" else baseline.pids
    window = systems.CpuWindow(pids, loadgen.WARMUP_S, dur)
    load = loadgen.run(url, w.body(), w.content_type, c, dur, gen)
    return _row(system, name, load, window.result()) | {"load_average": load_average}


def _row(system: str, workload: str, load: loadgen.Load, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "system": system,
        "workload": workload,
        **load.to_dict(),
        "cpu_s": round(cpu, 3),
        "cores": round(cpu / load.seconds, 2),
        "cpu_ms": round(cpu / max(load.requests, 1) * 1e3, 3),
        **extra,
    }


def run(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    cs, dur = concurrencies(ctx), duration(ctx)
    gen = ctx.generator or loadgen.default_generator()
    progress(
        f"throughput: {len(ctx.workloads)} workloads × concurrency {cs}, {dur:.0f} s each, generator {gen}"
    )
    plans: dict[str, Any] = {}
    with systems.WasminferServer(ctx.work / "throughput" / "data", ctx.engine_cache()) as server:
        for name in ctx.workloads:
            w = workloads.WORKLOADS[name]
            progress(f"throughput {name}: deploying to wasminfer")
            view = server.client.put_model(name, ctx.model_path(name).read_bytes(), **w.model_options)
            plans[name] = {"run_plan": view.get("run_plan"), "options": view.get("options")}
            progress(f"throughput {name}: {plan_text(plans[name])}")
            server.client.put_function(w.function, ctx.function(name), w.manifest())
            reference = w.handler(workloads.session(ctx.model_path(name)))(w.body(), w.content_type)
            check_agreement("wasminfer", name, server.invoke(w.function, w.body(), w.content_type), reference)
            baseline = systems.BaselineProcess(name, ctx.model_path(name), ctx.work / "baseline.log")
            try:
                baseline.wait_ready()
                import httpx

                answer = httpx.post(baseline.url, content=w.body(), headers={"content-type": w.content_type})
                check_agreement("the baseline", name, answer.content, reference)
                for c in cs:
                    for rnd in range(rounds(ctx, c)):
                        order = ["wasminfer", "baseline", "limit"]
                        order = order[rnd % 3 :] + order[: rnd % 3]
                        for system in order:
                            progress(f"throughput {name} c={c} round {rnd + 1}: {system}")
                            rows.append(
                                _measure(system, name, c, dur, gen, server, baseline, ctx)
                                | {"round": rnd + 1}
                            )
            finally:
                baseline.close()
            stats = server.client.model(name).get("stats") or {}
            plans[name]["peak_runs_in_flight"] = stats.get("peak_runs_in_flight")
            if stats.get("inferences") and stats.get("runs") and stats.get("batching"):
                plans[name]["mean_rows_per_run"] = round(stats["inferences"] / stats["runs"], 2)
    ray_info: dict[str, Any] = {}
    if ctx.ray:
        ray_rows, ray_info = run_ray(ctx, cs, dur, gen)
        rows.extend(ray_rows)
    result = {
        "concurrency": cs,
        "duration_s": dur,
        "rounds_at_16": rounds(ctx, 16),
        "generator": gen,
        "summary": summarize(rows),
        "ratios": ratios(rows),
        "efficiency": efficiency(summarize(rows)),
        "ray": ray_info,
        "models": plans,
        "runs": rows,
    }
    write_result(ctx, "throughput", result)
    return result


def ray_unavailable() -> str | None:
    """Why Ray Serve cannot be measured here, or None."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'wasminfer[bench]')"
    if os.geteuid() != 0:
        return "not root: Ray must run in a network namespace of its own (unshare -n), which needs root"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "unshare -n failed: no network namespace for Ray"
    return None


def run_ray(ctx: Context, cs: list[int], dur: float, gen: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    why = ray_unavailable()
    if why:
        progress(f"throughput: Ray Serve skipped: {why}")
        return [], {"skipped": why}
    for name in ctx.workloads:
        ctx.model_path(name)
    out = ctx.work / "ray.json"
    rounds_cs = [c for c in cs for _ in range(rounds(ctx, c))]
    cmd = [
        "unshare",
        "-n",
        sys.executable,
        str(systems.SUITE / "ray_serve.py"),
        "--models",
        str(ctx.work / "models"),
        "--out",
        str(out),
        "--duration",
        str(dur),
        "--generator",
        gen,
        "--concurrency",
        *map(str, rounds_cs),
    ]
    for name in ctx.workloads:
        cmd += ["--workload", name]
    progress("throughput: Ray Serve (in a network namespace with loopback only)")
    log = ctx.work / "ray.log"
    with log.open("wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1200, check=False)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-2000:]
        progress(f"throughput: Ray Serve failed ({proc.returncode}):\n{tail}")
        return [], {"failed": tail}
    data = json.loads(out.read_text())
    for name, answer in data.pop("answers", {}).items():
        w = workloads.WORKLOADS[name]
        reference = w.handler(workloads.session(ctx.model_path(name)))(w.body(), w.content_type)
        check_agreement("Ray Serve", name, answer.encode(), reference)
    rows = []
    seen: dict[tuple[str, int], int] = {}
    for r in data.pop("runs"):
        key = (r["workload"], r["concurrency"])
        seen[key] = r["round"] = seen.get(key, 0) + 1
        cpu = r.pop("cpu_s")
        rows.append(
            {
                "system": "ray",
                **r,
                "cpu_s": cpu,
                "cores": round(cpu / r["seconds"], 2),
                "cpu_ms": round(cpu / max(r["requests"], 1) * 1e3, 3),
            }
        )
    return rows, data


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per system, workload and concurrency: the median of its rounds, figure by figure."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["workload"], r["concurrency"]), []).append(r)
    out = []
    for rs in groups.values():
        row = dict(rs[0])
        row.pop("round", None)
        for key in ("per_s", "p50_ms", "p99_ms", "cores", "cpu_ms"):
            row[key] = round(systems.median([r[key] for r in rs]), 3)
        row["errors"] = sum(r["errors"] for r in rs)
        row["shed"] = sum(r.get("shed", 0) for r in rs)
        row["rounds"] = len(rs)
        out.append(row)
    return sorted(out, key=lambda r: (r["workload"], r["concurrency"], SYSTEMS.index(r["system"])))


def ratios(rows: list[dict[str, Any]], at: int = 16) -> dict[str, dict[str, float]]:
    """wasminfer's invocations/s over each other system's, per workload, at concurrency `at`: the
    median of the rounds' ratios where both ran in every round (measured side by side), else the
    ratio of the medians (Ray runs apart, in its own namespace)."""
    runs: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r["concurrency"] == at:
            runs.setdefault((r["system"], r["workload"]), {})[r.get("round", 0)] = r["per_s"]
    out: dict[str, dict[str, float]] = {}
    for (system, name), ours in runs.items():
        if system != "wasminfer":
            continue
        for other in ("limit", "baseline", "ray"):
            theirs = runs.get((other, name))
            if not theirs:
                continue
            paired = [ours[k] / theirs[k] for k in sorted(ours) if k in theirs and theirs[k]]
            if len(paired) > 1:
                out.setdefault(f"vs_{other}_rounds", {})[name] = [round(x, 3) for x in paired]
            ratio = (
                systems.median(paired)
                if paired
                else systems.median(list(ours.values())) / systems.median(list(theirs.values()))
            )
            out.setdefault(f"vs_{other}", {})[name] = round(ratio, 3)
    return out


def efficiency(summary: list[dict[str, Any]], at: int = 16) -> dict[str, dict[str, float]]:
    """Invocations per CPU-second of wasminfer over each other system's (their CPU ms per
    invocation over wasminfer's), at concurrency `at`. On a machine shared with other work, a system
    with more runnable threads gets a larger share of the cores; CPU per invocation does not depend
    on that share, so it tells how close the systems are when the share is the same."""
    cpu = {(r["system"], r["workload"]): r["cpu_ms"] for r in summary if r["concurrency"] == at}
    out: dict[str, dict[str, float]] = {}
    for (system, name), ours in cpu.items():
        if system != "wasminfer" or not ours:
            continue
        for other in ("limit", "baseline", "ray"):
            theirs = cpu.get((other, name))
            if theirs:
                out.setdefault(f"vs_{other}", {})[name] = round(theirs / ours, 3)
    return out


def plan_text(entry: dict[str, Any]) -> str:
    """One line: the threads and run slots chosen for a model and the measurements behind them."""
    plan = entry.get("run_plan")
    if not plan:
        return "no run plan (a server without run slots)"
    slots = plan["max_concurrent_runs"] or "unbounded"
    text = f"{plan['intra_op_threads']} intra-op thread(s) × {slots} run slot(s), {plan['chosen_by']}"
    if plan.get("run_ms") is not None:
        text += f"; one run {plan['run_ms']:.2f} ms"
    if plan.get("measurements"):
        text += "; measured " + ", ".join(
            f"{m['intra_op_threads']}×{m['concurrent_runs']}: {m['runs_per_second']:.1f} runs/s"
            for m in plan["measurements"]
        )
    if plan.get("skipped"):
        text += "; skipped " + "; ".join(plan["skipped"])
    if plan.get("batch"):
        batch = plan["batch"]
        text += f"; a row of {batch['rows']} stacked {batch['row_ms']:.2f} ms ({batch['row_vs_run']}× a run)"
    size = (entry.get("options") or {}).get("max_batch_size")
    if size:
        text += f"; dynamic batching up to {size} rows, {entry['options'].get('max_queue_delay_us')} µs"
    if entry.get("mean_rows_per_run"):
        text += f" ({entry['mean_rows_per_run']} requests a run on average)"
    if plan["max_concurrent_runs"] and entry.get("peak_runs_in_flight") is not None:
        text += f"; at most {entry['peak_runs_in_flight']} in flight"
    return text


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'workload':<18}{'system':<11}{'conc':>5}{'inv/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'cores':>7}{'cpu ms':>8}{'err':>5}{'429':>6}  config"
    ]
    for r in result["summary"]:
        config = ""
        if r["system"] == "limit":
            config = f"{r['threads']} thr × intra {r['intra_op_threads']}{' spin' if r['spinning'] else ''}"
        lines.append(
            f"{r['workload']:<18}{r['system']:<11}{r['concurrency']:>5}{r['per_s']:>9.0f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['cores']:>7.2f}{r['cpu_ms']:>8.2f}"
            f"{r['errors']:>5}{r.get('shed', 0):>6}  {config}"
        )
    lines.append("(medians of rounds; the limit's p50/p99 are its callers' own, see bench/README.md)")
    for name, entry in result.get("models", {}).items():
        lines.append(f"wasminfer {name}: {plan_text(entry)}")
    for key, per in result.get("efficiency", {}).items():
        lines.append(
            f"wasminfer invocations per CPU-second {key.replace('_', ' ')} at concurrency 16: "
            + ", ".join(f"{k} {v:.2f}×" for k, v in per.items())
        )
    for key, per in result["ratios"].items():
        if key.endswith("_rounds"):
            continue
        lines.append(
            f"wasminfer {key.replace('_', ' ')} at concurrency 16: "
            + ", ".join(f"{k} {v:.2f}×" for k, v in per.items())
        )
    return "\n".join(lines)
