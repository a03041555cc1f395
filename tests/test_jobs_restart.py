"""Jobs survive the server. Two real `wasminfer serve` (uvicorn) on 127.0.0.1 share one data folder,
as a replica would: only the holder of the runner lock runs jobs, also those the other accepts. The
holder is killed (SIGKILL: no shutdown of any kind) while a chunk of a bulk job runs; the other takes
the lock and starts as a restarted server does (`JobRunner._control`: the lock, then `recover`), so
the chunk runs again (at least once) and the jobs queued behind it run. Then the CLI drives the
survivor: `invoke --async --wait`, `batch FILE`, `jobs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest

from live_server import live_server

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[1]
QUERY = "models=add&memory_mb=4&timeout_ms=300&max_instances=4"


@contextmanager
def server(data: Path, log: Path) -> Iterator[str]:
    """A server on a free port, stopped with SIGINT (graceful)."""
    with live_server(data, log, stop_timeout_s=20) as (url, _):
        yield url


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "wasminfer", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        cwd=ROOT,
        check=False,
        env={**os.environ, "COLUMNS": "200"},  # room for the jobs table
    )
    assert proc.returncode == 0, f"wasminfer {' '.join(args)} failed:\n{proc.stderr.decode()}"
    return proc


FINISHED = ("succeeded", "failed", "cancelled")


def wait_job(url: str, job_id: str, until: tuple[str, ...] = FINISHED) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        view: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if view["status"] in until:
            return view
        assert time.monotonic() < deadline, f"the job never became {' or '.join(until)}: {view}"
        time.sleep(0.02)


def metric(url: str, name: str) -> float:
    """One sample of the server's /metrics, by its full name (labels included)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def deploy(url: str, add_model: bytes, hostile_wasm: bytes, query: str = QUERY) -> None:
    r = httpx.put(f"{url}/v1/models/add", content=add_model, headers={"content-type": "application/onnx"})
    assert r.status_code == 201, r.text
    r = httpx.put(f"{url}/v1/functions/hostile?{query}", content=hostile_wasm,
                  headers={"content-type": "application/wasm"})  # fmt: skip
    assert r.status_code == 201, r.text


def test_one_runner_and_a_chunk_running_at_its_kill_runs_again_where_the_lock_passes(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    data = tmp_path / "data"
    # The first server has one job worker; the bulk job's first item loops until its 4 s timeout:
    # the server is killed while that item runs (4 s: room for the metric reads before the kill on a
    # loaded machine), its chunk neither finished nor committed.
    with live_server(data, tmp_path / "first.log", env={"WASMINFER_ASYNC_WORKERS": "1"},
                     stop=signal.SIGKILL) as (first, first_proc):  # fmt: skip
        deploy(first, add_model, hostile_wasm, QUERY.replace("timeout_ms=300", "timeout_ms=4000"))
        with server(data, tmp_path / "second.log") as url:
            assert metric(first, "wasminfer_job_runner_leader") == 1
            assert metric(url, "wasminfer_job_runner_leader") == 0
            items = [b"l"] + [b"e%d" % n for n in range(600)] + [b"s"]
            bulk = httpx.post(  # accepted by the second server, run by the first
                f"{url}/v1/functions/hostile/batch",
                content=cbor2.dumps(items),
                headers={"content-type": "application/cbor"},
            )
            assert bulk.status_code == 202, bulk.text
            single = httpx.post(
                f"{url}/v1/functions/hostile/invoke",
                content=b"ebefore the crash",
                headers={"prefer": "respond-async"},
            )
            assert single.status_code == 202
            assert single.headers["location"] == f"/v1/jobs/{single.json()['id']}"
            assert wait_job(url, bulk.json()["id"], until=("running",))["items"]["done"] == 0
            deadline = time.monotonic() + 20
            while metric(first, "wasminfer_job_items_in_flight") != 1:  # the `l` item runs there
                assert time.monotonic() < deadline, "the first item never started"
                time.sleep(0.01)
            assert metric(url, "wasminfer_jobs_active") == 0  # the second server runs nothing
            first_proc.kill()
            first_proc.wait()

            deadline = time.monotonic() + 20
            while metric(url, "wasminfer_job_runner_leader") != 1:
                assert time.monotonic() < deadline, "the second server never took the runner lock"
                time.sleep(0.02)
            view = wait_job(url, single.json()["id"])
            assert view["status"] == "succeeded" and view["attempts"] in (0, 1)  # 1 if it was claimed
            out = httpx.get(f"{url}/v1/jobs/{single.json()['id']}/result")
            assert out.status_code == 200 and out.content == b"ebefore the crash"
            view = wait_job(url, bulk.json()["id"])
            assert view["status"] == "succeeded" and view["attempts"] == 1  # its running chunk ran again
            assert view["items"] == {"total": 602, "done": 602, "succeeded": 600, "failed": 2}
            lines = [
                json.loads(line)
                for line in httpx.get(f"{url}/v1/jobs/{bulk.json()['id']}/result").text.splitlines()
            ]
            assert [line["index"] for line in lines] == list(range(602))
            assert lines[0]["error"]["code"] == "timeout"  # the item running at the kill, run again
            assert lines[600]["output"] == "e599" and lines[601]["error"]["code"] == "guest_error"
            # Every item ran here: nothing of the killed server's chunk had been committed.
            assert metric(url, 'wasminfer_job_items_total{outcome="ok"}') == 601
            assert metric(url, 'wasminfer_job_items_total{outcome="failed"}') == 2

            # The CLI over the same server.
            out = cli("invoke", "hostile", "--async", "--wait", "--data", "-", "--url", url, stdin=b"ecli")
            assert out.stdout == b"ecli"
            inputs = tmp_path / "inputs.cbor"
            inputs.write_bytes(cbor2.dumps([b"ea", b"t", b"eb"]))
            done = cli("batch", "hostile", str(inputs), "--url", url)
            results = [json.loads(line) for line in done.stdout.decode().splitlines()]
            assert [r.get("output") or r["error"]["code"] for r in results] == ["ea", "guest_trap", "eb"]
            assert "2 of 3 succeeded, 1 failed" in done.stderr.decode()
            listed = cli("jobs", "--url", url).stdout.decode()
            assert bulk.json()["id"] in listed and "602/602" in listed
