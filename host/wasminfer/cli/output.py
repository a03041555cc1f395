"""How commands show what the server answers: models and their options, tensor specs, times,
jobs with their progress (a bar on stderr) and results."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from wasminfer.cli.common import err, out

if TYPE_CHECKING:
    from wasminfer.client import Client



def print_log_line(line: dict[str, Any], console: Console) -> None:
    """One log line (`LogLine.to_dict`) as `12:01:02.345 stderr warn  [1a] message`: one line
    whatever the terminal's width (grep, tail)."""
    when = datetime.datetime.fromtimestamp(line["ts"]).strftime("%H:%M:%S.%f")[:-3]
    inv = f" [{line['invocation']}]" if line.get("invocation") else ""
    console.print(f"{when} {line['stream']:<6} {line['level']:<5}{inv} {line['message']}",
                  highlight=False, markup=False, soft_wrap=True)


def print_model(view: dict[str, Any], done: str) -> None:
    what = done if view.get("created") else "unchanged,"
    io = "; ".join(tensor_spec(s) for s in view.get("inputs", []))
    err.print(
        f"{view['name']}: {what} version {view['version']} ({view['size']} bytes; inputs {io}; "
        f"{options_text(view.get('options'), view.get('run_plan'))})",
        highlight=False,
    )


def options_short(options: dict[str, Any] | None) -> str:
    """Batching as `batch 8/2000µs` (rows/delay), or `-`."""
    size = (options or {}).get("max_batch_size") or 0
    return f"batch {size}/{options['max_queue_delay_us']}µs" if options and size >= 2 else "-"


def options_text(options: dict[str, Any] | None, plan: dict[str, Any] | None = None) -> str:
    """A model's load options in a few words: batching, threads, concurrent runs and the arena (as given, or
    as `plan`, the server's run plan, chose them)."""
    if not options:
        return "defaults"
    size = options.get("max_batch_size") or 0
    batching = (
        f"batching up to {size} rows, {options.get('max_queue_delay_us')} µs delay"
        if size >= 2
        else "no batching"
    )
    threads = options.get("intra_op_threads")
    if threads is None and plan:
        threads = plan.get("intra_op_threads")
    runs = plan.get("max_concurrent_runs") if plan else options.get("max_concurrent_runs")
    how = f" ({plan['chosen_by']})" if plan and plan.get("chosen_by") not in (None, "given") else ""
    text = f"{batching}, {threads if threads is not None else 'default'} intra-op thread(s)"
    arena = ", memory arena" if options.get("memory_arena") else ""
    return text + (f", {runs} run(s) at once" if runs else "") + arena + how


def tensor_spec(spec: dict[str, Any]) -> str:
    """A tensor spec as `name:dtype[N,64]` (`?` for an unnamed free dimension)."""
    shape = spec.get("shape")
    dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{spec['name']}:{spec['dtype']}[{dims}]"


def when(iso: str) -> str:
    """`2026-11-24T12:22:41.564Z` as `2026-11-24 12:22:41`."""
    return iso.replace("T", " ")[:19]


def follow(client: Client, job_id: str) -> dict[str, Any]:
    """Waits for the job with a progress bar on stderr; returns its last view."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(f"job {job_id}", total=None, note="")

        def update(view: dict[str, Any]) -> None:
            items = view["items"]
            note = f"{view['status']}" + (f", {items['failed']} failed" if items["failed"] else "")
            bar.update(task, total=items["total"], completed=items["done"], note=note)

        return client.wait_job(job_id, progress=update)


def write_results(client: Client, job_id: str, output: Path | None) -> None:
    lines = (
        json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in client.job_results(job_id)
    )
    if output is None:
        for line in lines:
            sys.stdout.write(line)
        sys.stdout.flush()
        return
    with output.open("w") as f:
        f.writelines(lines)


def job_summary(view: dict[str, Any]) -> None:
    items, timings = view["items"], view["timings"]
    run = timings.get("run_s")
    rate = f", {items['done'] / run:,.0f} items/s" if run else ""
    err.print(
        f"job {view['id']}: {view['status']}; {items['succeeded']} of {items['total']} succeeded, "
        f"{items['failed']} failed (queued {timings['queued_s']:.2f} s, ran {run or 0:.2f} s{rate})",
        highlight=False,
    )
    if view.get("error"):
        err.print(f"error: {view['error']['code']}: {view['error']['message']}", highlight=False)


def jobs_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="jobs", title_justify="left")
    for column in ("id", "function", "kind", "status", "progress", "failed", "created", "ran"):
        table.add_column(column, justify="right" if column in ("progress", "failed", "ran") else "left")
    for j in rows:
        items = j["items"]
        pct = f"{100 * items['done'] / items['total']:.0f}%" if items["total"] else "-"
        run = j["timings"].get("run_s")
        table.add_row(
            j["id"],
            j["function"],
            j["kind"],
            j["status"],
            f"{items['done']}/{items['total']} {pct}",
            str(items["failed"]),
            when(j["created_at"]),
            f"{run:.2f} s" if run is not None else "-",
        )
    out.print(table)
