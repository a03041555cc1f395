"""Asynchronous work: `batch` (one job of many inputs) and `jobs` (list, follow, cancel, results)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from wasminfer.cli import common
from wasminfer.cli.common import DEFAULT_URL, Key, Url, app, err, out
from wasminfer.cli.output import follow, job_summary, jobs_table, write_results


@app.command()
def batch(
    name: Annotated[str, typer.Argument(help="The function.")],
    file: Annotated[
        Path,
        typer.Argument(help="The inputs: JSON Lines (one request body per line) or, .cbor, a CBOR array."),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the results (JSON Lines) here, not stdout.")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for the results with a progress bar (--no-wait: print the job id).")
    ] = True,
    item_content_type: Annotated[
        str | None, typer.Option(help="Content type of CBOR byte-string items.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with this key returns the first job.")
    ] = None,
    webhook: Annotated[str | None, typer.Option(help="URL to POST the job to when it finishes.")] = None,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """Invoke a function on every input of FILE as one job, then print one result per input."""
    ctype = "application/cbor" if file.suffix.lower() == ".cbor" else "application/jsonl"
    with common.client(url, key) as client:
        job = client.batch(
            name,
            file,
            ctype,
            item_content_type=item_content_type,
            idempotency_key=idempotency_key,
            webhook=webhook,
        )
        if not wait:
            out.print(job["id"], highlight=False)
            err.print(f"{job['items']['total']} items queued; follow: wasminfer jobs {job['id']} --wait")
            return
        view = follow(client, job["id"])
        write_results(client, job["id"], output)
    job_summary(view)


@app.command()
def jobs(
    job_id: Annotated[str | None, typer.Argument(help="A job: show it (default: list your jobs).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar until it ends.")] = False,
    result: Annotated[
        bool, typer.Option(help="Print its result: the output, or a batch's JSON Lines.")
    ] = False,
    cancel: Annotated[
        bool, typer.Option(help="Cancel what has not started (a finished job: delete it).")
    ] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="With --result: write here.")] = None,
    status: Annotated[str | None, typer.Option(help="List only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(help="List at most this many.")] = 20,
    url: Url = DEFAULT_URL,
    key: Key = None,
) -> None:
    """List your jobs with their progress; or show, follow, cancel one, or print its result."""
    with common.client(url, key) as client:
        if job_id is None:
            jobs_table(client.jobs(status=status, limit=limit))
            return
        if cancel:
            view = client.cancel_job(job_id)
            err.print(f"deleted job {job_id}" if view is None else f"job {job_id}: {view['status']}")
            return
        view = follow(client, job_id) if wait else client.job(job_id)
        if result:
            if view["kind"] == "batch":
                write_results(client, job_id, output)
            else:
                body = client.job_result(job_id).body
                if output is not None:
                    output.write_bytes(body)
                else:
                    sys.stdout.buffer.write(body)
                    sys.stdout.buffer.flush()
        elif not wait:
            out.print_json(data=view)
    if wait:
        job_summary(view)
