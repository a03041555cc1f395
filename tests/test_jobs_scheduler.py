"""The job machinery's parts on their own: `FairQueue`, `SyncGate`, bulk parsing, `JobStore`."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import cbor2
import pytest

from wasminfer.errors import BadRequest, Conflict, IdempotencyKeyReused, JobNotFound, PayloadTooLarge
from wasminfer.jobs import FairQueue, JobSettings, JobStore, Lane, SyncGate, new_job_id, parse_bulk
from wasminfer.jobs.items import chunked, result_line
from wasminfer.jobs.records import JOB_ID
from wasminfer.store import Store


# --- FairQueue ------------------------------------------------------------------------------------
def drain(queue: FairQueue[str], costs: dict[str, float], n: int) -> list[str]:
    """Picks `n` items one at a time, charging each its tenant's cost."""
    order = []
    for _ in range(n):
        picked = queue.pick(lambda lane: True, now=0.0)
        assert picked is not None
        lane, item, estimate = picked
        queue.charge(lane, costs[lane.tenant], estimate)
        order.append(item)
    return order


def test_tenants_share_equally_whatever_their_backlog() -> None:
    queue: FairQueue[str] = FairQueue()
    big, small = Lane[str]("j1", "alpha"), Lane[str]("j2", "beta")
    for lane, n in ((big, 1000), (small, 10)):
        queue.add(lane)
        queue.push(lane, [lane.tenant] * n)
    order = drain(queue, {"alpha": 0.001, "beta": 0.001}, 20)
    assert order.count("beta") == 10  # done within the first 20 picks, not after 1000


def test_shares_are_of_time_not_of_items() -> None:
    queue: FairQueue[str] = FairQueue()
    for tenant in ("slow", "fast"):
        lane = Lane[str](tenant, tenant)
        queue.add(lane)
        queue.push(lane, [tenant] * 1000)
    order = drain(queue, {"slow": 0.010, "fast": 0.001}, 440)
    assert 8 <= order.count("fast") / order.count("slow") <= 12  # 10x cheaper items: ~10x as many


def test_jobs_of_one_tenant_share_its_turn_and_idle_time_banks_no_credit() -> None:
    queue: FairQueue[str] = FairQueue()
    a1, a2, b = Lane[str]("a1", "alpha"), Lane[str]("a2", "alpha"), Lane[str]("b", "beta")
    for lane in (a1, a2, b):
        queue.add(lane)
    queue.push(a1, ["a1"] * 100)
    queue.push(b, ["b"] * 100)
    drain(queue, {"alpha": 0.001, "beta": 0.001}, 100)
    queue.push(a2, ["a2"] * 100)  # a new job of alpha starts level with a1, not ahead of it
    order = drain(queue, {"alpha": 0.001, "beta": 0.001}, 40)
    assert order.count("b") == 20 and order.count("a1") == order.count("a2") == 10
    gamma = Lane[str]("g", "gamma")  # a tenant arriving late gets its share, not all the time it missed
    queue.add(gamma)
    queue.push(gamma, ["g"] * 100)
    order = drain(queue, {"alpha": 0.001, "beta": 0.001, "gamma": 0.001}, 30)
    assert order.count("g") == 10


def test_lanes_that_cannot_run_are_skipped_and_backoff_is_honoured() -> None:
    queue: FairQueue[str] = FairQueue()
    a, b = Lane[str]("a", "alpha"), Lane[str]("b", "beta")
    for lane in (a, b):
        queue.add(lane)
        queue.push(lane, [lane.key] * 3)
    picked = queue.pick(lambda lane: lane.key == "b", now=0.0)
    assert picked is not None and picked[1] == "b"
    b.not_before = 10.0
    assert queue.pick(lambda lane: lane.key == "b", now=5.0) is None
    assert queue.remove(a) == ["a", "a", "a"] and queue.backlog() == 2


# --- SyncGate -------------------------------------------------------------------------------------
def test_sync_traffic_takes_the_async_allowance() -> None:
    gate = SyncGate(cores=2, reserve_cores=2.0, hold_s=0.05, recent_s=10.0)
    assert gate.allowance(8) == (8, 0.0)
    gate.enter()
    assert gate.allowance(8)[0] == 0  # on 2 cores one synchronous request takes it all
    gate.exit()
    allowed, wait = gate.allowance(8)
    assert allowed == 0 and 0 < wait <= 0.05  # and the quiet period after it
    now = time.monotonic()
    assert gate.allowance(8, now + 0.1)[0] == 1  # then, while sync traffic is recent, a few
    assert gate.allowance(8, now + 11) == (8, 0.0)  # and all once it has been quiet for a while
    assert SyncGate(cores=16, reserve_cores=2.0).allowance(8)[0] == 8
    big = SyncGate(cores=16, reserve_cores=2.0)
    big.enter()
    assert big.allowance(8)[0] == 7  # 14 of 16 cores left


def test_an_async_worker_waits_for_sync_requests_to_end() -> None:
    gate = SyncGate(cores=2, hold_s=0.0)
    gate.enter()
    got = threading.Event()

    def worker() -> None:
        if gate.acquire(4):
            got.set()
            gate.release()

    thread = threading.Thread(target=worker)
    thread.start()
    # The worker is parked on the gate's condition (it found no room: a state, not a duration); it
    # checks again at every wake, so at no moment while the request is in flight has it a slot.
    deadline = time.monotonic() + 30
    while not gate._cond._waiters:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the worker never waited"
        time.sleep(0.001)
    assert not got.is_set() and gate.stats()["async_in_flight"] == 0
    gate.exit()
    assert got.wait(30)
    thread.join()
    assert gate.stats()["async_yields_total"] == 1
    gate.close()
    assert gate.acquire(4) is False


# --- bulk bodies ----------------------------------------------------------------------------------
def test_bulk_bodies() -> None:
    items = parse_bulk(b'{"pixels": [1]}\n\n[2]\n', "application/jsonl", 10)
    assert items == [(b'{"pixels": [1]}', "application/json"), (b"[2]", "application/json")]
    body = cbor2.dumps([b"\x00\x01", "text", {"a": 1}])
    items = parse_bulk(body, "application/cbor", 10, "image/x-portable-pixmap")
    assert items == [
        (b"\x00\x01", "image/x-portable-pixmap"),
        (b"text", "text/plain; charset=utf-8"),
        (cbor2.dumps({"a": 1}), "application/cbor"),
    ]
    with pytest.raises(BadRequest, match="line 2"):
        parse_bulk(b"1\n{\n", "application/x-ndjson", 10)
    with pytest.raises(PayloadTooLarge):
        parse_bulk(b"1\n2\n3\n", "application/jsonl", 2)
    with pytest.raises(BadRequest, match="CBOR bodies only"):
        parse_bulk(b"1\n", "application/jsonl", 2, "text/plain")
    sizes = [len(c) for c in chunked([(b"x" * 10, "t")] * 7, max_items=3, max_bytes=25)]
    assert sizes == [2, 2, 2, 1]


def test_result_lines() -> None:
    assert result_line(3, (200, "application/json", b'{"label": 7}', None, None)) == (
        b'{"index":3,"status":200,"content_type":"application/json","output":{"label":7}}\n'
    )
    assert b'"output_b64":"/w=="' in result_line(0, (200, "application/octet-stream", b"\xff", None, None))
    assert b'"output_b64"' in result_line(0, (200, "application/json", b"NaN", None, None))
    line = result_line(1, (504, None, None, "timeout", "too slow"))
    assert line == b'{"index":1,"status":504,"error":{"code":"timeout","message":"too slow"}}\n'


def test_job_ids_sort_by_time_and_are_safe_in_paths() -> None:
    early, late = new_job_id(1_700_000_000.0), new_job_id(1_700_000_000.002)
    assert early < late and JOB_ID.fullmatch(early) and len({new_job_id() for _ in range(1000)}) == 1000


# --- JobStore -------------------------------------------------------------------------------------
@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    store = Store(tmp_path)
    store.put_function("f", b"\0asm", {}, "handler")
    return JobStore(store, inline_bytes=64)


def create(jobs: JobStore, n_chunks: int = 3, key: str | None = None, body: bytes = b"x") -> str:
    job, _ = jobs.create(
        tenant="default",
        function="f",
        kind="batch",
        content_type="application/cbor",
        chunks=[[(body, "t")] * 2 for _ in range(n_chunks)],
        input_bytes=len(body) * 2 * n_chunks,
        request_sha256="0" * 64 if body == b"x" else "1" * 64,
        ttl_s=60,
        idempotency_key=key,
    )
    return job.id


def test_running_chunks_go_back_to_queued_at_recovery(jobs: JobStore) -> None:
    job_id = create(jobs)
    first = jobs.claim(job_id)
    assert first is not None and (first.seq, first.first_item, len(first.items)) == (0, 0, 2)
    assert jobs.get(job_id).status == "running"
    assert jobs.recover() == 1
    job = jobs.get(job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    again = jobs.claim(job_id)
    assert again is not None and again.seq == 0  # the same chunk, again
    for seq in (0, 1, 2):
        if seq:
            assert jobs.claim(job_id) is not None
        done = jobs.complete(job_id, seq, [(200, "t", b"ok", None, None), (500, None, None, "e", "m")])
        assert done is not None
    assert jobs.claim(job_id) is None
    job = jobs.get(job_id)
    assert (job.status, job.items_done, job.items_failed) == ("succeeded", 6, 3)
    assert [first for first, _ in jobs.results(job)] == [0, 2, 4]


def test_large_chunks_live_in_files_and_are_fsynced_before_the_row(
    jobs: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real fsync, watched: which file (inode: a file is written under a temporary name, then
    # renamed) each call synced, and how many job rows another connection could see at that moment
    # (none yet: the row commits after its files and their folder are durable).
    real_fsync = os.fsync
    synced: list[tuple[int, int]] = []

    def watched_fsync(fd: int) -> None:
        real_fsync(fd)
        with sqlite3.connect(jobs.db.path) as other:
            rows = other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        synced.append((os.fstat(fd).st_ino, rows))

    monkeypatch.setattr(os, "fsync", watched_fsync)
    job_id = create(jobs, body=b"y" * 100)
    monkeypatch.setattr(os, "fsync", real_fsync)
    folder = jobs.root / job_id
    durable = {folder.stat().st_ino} | {(folder / f"in-{seq}").stat().st_ino for seq in range(3)}
    before_row = {inode for inode, rows in synced if rows == 0}
    assert durable <= before_row, synced
    assert sorted(p.name for p in folder.iterdir()) == ["in-0", "in-1", "in-2"]
    claimed = jobs.claim(job_id)
    assert claimed is not None and claimed.items == [(b"y" * 100, "t")] * 2
    jobs.complete(job_id, 0, [(200, "t", b"z" * 100, None, None)] * 2)
    assert (folder / "out-0").is_file()
    jobs.delete(job_id, "default")
    assert not folder.exists()
    with pytest.raises(JobNotFound):
        jobs.get(job_id)


def test_idempotency_keys(jobs: JobStore) -> None:
    first = create(jobs, key="k")
    assert create(jobs, key="k") == first
    with pytest.raises(IdempotencyKeyReused):
        create(jobs, key="k", body=b"other")


def test_cancel_and_expiry(jobs: JobStore, tmp_path: Path) -> None:
    job_id = create(jobs)
    claimed = jobs.claim(job_id)
    assert claimed is not None
    job = jobs.cancel(job_id, "default", withdrawn={claimed.seq})
    assert job.status == "cancelled" and job.expires_at is not None
    with pytest.raises(JobNotFound):
        jobs.cancel(job_id, "someone-else")
    single, _ = jobs.create(
        tenant="default", function="f", kind="invoke", content_type="t", chunks=[[(b"x", "t")]],
        input_bytes=1, request_sha256="2" * 64, ttl_s=60,
    )  # fmt: skip
    assert jobs.claim(single.id) is not None
    with pytest.raises(Conflict):
        jobs.cancel(single.id, "default")  # started: it runs to its end
    orphan = jobs.root / new_job_id(time.time() - 7200)  # a submission that crashed before its row
    orphan.mkdir()
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    assert jobs.sweep(time.time() + 120) == 1  # the cancelled job's retention is over
    assert not orphan.exists()
    with pytest.raises(JobNotFound):
        jobs.get(job_id)


def test_settings_from_the_environment() -> None:
    env = {
        "WASMINFER_ASYNC_WORKERS": "0",
        "WASMINFER_WEBHOOK_HOSTS": "a.example, B.example",
        "WASMINFER_JOB_TTL_S": "60",
    }
    s = JobSettings.from_env(env)
    assert (s.workers, s.webhook_hosts, s.ttl_s) == (0, ("a.example", "b.example"), 60.0)
    with pytest.raises(ValueError):
        JobSettings(ttl_s=0)
