"""Jobs survive the server: a real `wasminfer serve` (uvicorn) on 127.0.0.1 accepts jobs without
running them (`WASMINFER_ASYNC_WORKERS=0`), is killed (SIGKILL: no shutdown of any kind), and the
next server runs them; a chunk left `running` by the crash runs again (at least once). Then the CLI
drives the same server: `invoke --async --wait`, `batch FILE`, `jobs`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
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
def server(data: Path, log: Path, *, kill: bool = False, **env: str) -> Iterator[str]:
    """A server on a free port; stopped with SIGINT (graceful) or, `kill`, SIGKILL."""
    stop = signal.SIGKILL if kill else signal.SIGINT
    with live_server(data, log, env=env, stop=stop, stop_timeout_s=20) as (url, _):
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


def wait_job(url: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        view: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        assert time.monotonic() < deadline, f"the job did not finish: {view}"
        time.sleep(0.02)


def test_jobs_survive_a_crash_and_run_after_the_restart(
    tmp_path: Path, add_model: bytes, hostile_wasm: bytes
) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    with server(data, log, kill=True, WASMINFER_ASYNC_WORKERS="0") as url:
        r = httpx.put(f"{url}/v1/models/add", content=add_model, headers={"content-type": "application/onnx"})
        assert r.status_code == 201, r.text
        r = httpx.put(f"{url}/v1/functions/hostile?{QUERY}", content=hostile_wasm,
                      headers={"content-type": "application/wasm"})  # fmt: skip
        assert r.status_code == 201, r.text
        single = httpx.post(
            f"{url}/v1/functions/hostile/invoke",
            content=b"ebefore the crash",
            headers={"prefer": "respond-async"},
        )
        assert single.status_code == 202 and single.headers["location"] == f"/v1/jobs/{single.json()['id']}"
        items = [b"e%d" % n for n in range(600)] + [b"s"]
        bulk = httpx.post(
            f"{url}/v1/functions/hostile/batch",
            content=cbor2.dumps(items),
            headers={"content-type": "application/cbor"},
        )
        assert bulk.status_code == 202
        time.sleep(0.3)
        assert httpx.get(f"{url}/v1/jobs/{single.json()['id']}").json()["status"] == "queued"  # nothing runs
    # As if the crash had hit while the bulk job's first chunk was running.
    with sqlite3.connect(data / "store.db") as db:
        db.execute(
            "UPDATE job_chunks SET state = 'running' WHERE job_id = ? AND seq = 0", (bulk.json()["id"],)
        )
        db.execute("UPDATE jobs SET status = 'running' WHERE id = ?", (bulk.json()["id"],))

    with server(data, log) as url:  # a normal server: it takes the jobs up
        view = wait_job(url, single.json()["id"])
        assert view["status"] == "succeeded" and view["attempts"] == 0
        out = httpx.get(f"{url}/v1/jobs/{single.json()['id']}/result")
        assert out.status_code == 200 and out.content == b"ebefore the crash"
        view = wait_job(url, bulk.json()["id"])
        assert view["status"] == "succeeded" and view["attempts"] == 1  # its chunk 0 ran again
        assert view["items"] == {"total": 601, "done": 601, "succeeded": 600, "failed": 1}
        lines = [
            json.loads(line)
            for line in httpx.get(f"{url}/v1/jobs/{bulk.json()['id']}/result").text.splitlines()
        ]
        assert [line["index"] for line in lines] == list(range(601))
        assert lines[599]["output"] == "e599" and lines[600]["error"]["code"] == "guest_error"

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
        assert bulk.json()["id"] in listed and "601/601" in listed
