"""Scenario `overhead`: the runtime's micro figures (`bench/micro.py`, `just bench-micro`) run as they
are and collected into this report: instantiation, idle instance memory, the host-call round trip,
and `Host.invoke` of digits minus the model's own `session.run`, measured side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from suite.common import BENCH, Context, progress, write_result

ROWS = (
    ("instantiate_us_p50", "a new instance of a deployed function, µs (p50)"),
    ("idle_instance_kb", "an idle instance, KiB (RSS / N)"),
    ("idle_instance_kb_after_invoke", "an idle instance after one invocation, KiB"),
    ("host_call_us_p50", "guest → host import → guest, µs (p50)"),
    ("session_run_us_p50", "digits: session.run alone, µs (p50)"),
    ("invoke_us_p50", "digits: Host.invoke, µs (p50)"),
    ("invoke_overhead_us_p50", "digits: Host.invoke − session.run, µs (p50)"),
    ("empty_invoke_us_p50", "an empty handler: Host.invoke, µs (p50)"),
)


def run(ctx: Context) -> dict[str, Any]:
    args = ["--n", "1000", "--instances", "500"] if ctx.quick else []
    progress(f"overhead: bench/micro.py {' '.join(args)}")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "micro.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench/micro.py failed:\n{proc.stderr[-3000:]}")
    micro = json.loads((BENCH / "results" / "micro.json").read_text())
    result = {"micro": micro, "micro_args": args}
    write_result(ctx, "overhead", result)
    return result


def table(result: dict[str, Any]) -> str:
    micro, targets = result["micro"], result["micro"].get("targets", {})
    lines = [f"{'figure':<52}{'value':>10}  target"]
    for key, label in ROWS:
        target = f"≤ {targets[key]}" if key in targets else ""
        lines.append(f"{label:<52}{micro.get(key)!s:>10}  {target}")
    return "\n".join(lines)
