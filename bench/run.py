"""The benchmark suite: wasminfer against the limit, the container-per-function baseline and Ray
Serve (`just bench`; bench/README.md says what each scenario measures and how).

    python bench/run.py                       # every scenario (~20 min on 2 idle cores)
    python bench/run.py --quick               # every scenario, short (~5 min)
    python bench/run.py throughput coldstart  # some of them
    python bench/run.py --report              # only rebuild RESULTS.md, plots, summary.json

Each scenario prints its table, writes `bench/results/<scenario>.json`; then the report step
writes the PNG plots, `bench/results/summary.json` and `bench/RESULTS.md` from every result file
there (so scenarios can be rerun one at a time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import report, workloads  # noqa: E402
from suite.common import Context, progress  # noqa: E402

SCENARIOS = ("coldstart", "density", "throughput", "overhead")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="*", help=f"{', '.join(SCENARIOS)} (default: all)")
    ap.add_argument(
        "--quick", action="store_true", help="short runs: fewer concurrencies, functions, repetitions"
    )
    ap.add_argument(
        "--workload",
        action="append",
        choices=sorted(workloads.WORKLOADS),
        help="throughput and coldstart: only these (repeatable; default: all)",
    )
    ap.add_argument("--no-ray", action="store_true", help="leave Ray Serve out")
    ap.add_argument("--generator", choices=["wrk", "asyncio"], help="default: wrk if installed")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from bench/results")
    args = ap.parse_args()
    unknown = sorted(set(args.scenario) - set(SCENARIOS))
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    scenarios = [] if args.report else (args.scenario or list(SCENARIOS))
    started = time.monotonic()
    names = args.workload or list(workloads.WORKLOADS)
    skipped = {n: why for n in names if (why := workloads.unavailable(n))}
    for name, why in skipped.items():
        progress(f"workload {name} left out: {why}")
    with tempfile.TemporaryDirectory(prefix="wasminfer-bench-") as tmp:
        ctx = Context(
            quick=args.quick,
            work=Path(tmp),
            workloads=[n for n in names if n not in skipped],
            ray=not args.no_ray,
            generator=args.generator,
            skipped=skipped,
        )
        for name in scenarios:
            module = __import__(f"suite.{name}", fromlist=["run", "table"])
            t0 = time.monotonic()
            ctx.started = {
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
            result = module.run(ctx)
            print(f"\n== {name} ({time.monotonic() - t0:.0f} s) ==")
            print(module.table(result))
            sys.stdout.flush()
        shutil.rmtree(ctx.work, ignore_errors=True)
    summary = report.write(Path(__file__).resolve().parent)
    print("\n== summary ==")
    print(report.summary_table(summary))
    progress(f"done in {time.monotonic() - started:.0f} s: bench/RESULTS.md, bench/results/")


if __name__ == "__main__":
    main()
