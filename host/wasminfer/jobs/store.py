"""`JobStore`: jobs and their chunks in the store's SQLite database, large bodies in files.

    <data_dir>/store.db            tables `jobs`, `job_chunks` (jobs' own migrations: `schema.py`)
    <data_dir>/jobs/<id>/in-N      a chunk's items, when larger than `inline_bytes`
    <data_dir>/jobs/<id>/out-N     a chunk's results, likewise

A job is acknowledged only after its row commits, and its files are fsynced (and their folder)
before that commit: an accepted job is whole on disk. A crash before the commit leaves at most a
folder without a row, which `sweep` removes. Results are written the same way before the commit
that marks their chunk done.

States: a chunk goes queued → running (claimed by the runner) → done, or → cancelled; `recover`
puts running chunks back to queued (what was running when the process died runs again: at least
once). A job is queued until its first chunk is claimed, running until its last chunk is done
(then succeeded, or failed for an invoke job whose invocation failed), or cancelled.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from wasminfer._fs import atomic_write, fsync_dir, makedirs_durable
from wasminfer.errors import Conflict, IdempotencyKeyReused, JobNotFound
from wasminfer.store import Store

from . import schema
from .items import Item, Result, decode_items, decode_results, encode_items, encode_results
from .records import JOB_ID, Job, new_job_id

_COLUMNS = (
    "id, tenant, function, kind, status, content_type, items_total, items_done, items_failed, "
    "input_bytes, idempotency_key, webhook, webhook_state, error, ttl_s, attempts, created_at, "
    "started_at, finished_at, expires_at"
)
# A folder without a row this old is the leftover of a crash during a submission.
ORPHAN_AGE_S = 3600.0


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        function=row["function"],
        kind=row["kind"],
        status=row["status"],
        content_type=row["content_type"],
        items_total=row["items_total"],
        items_done=row["items_done"],
        items_failed=row["items_failed"],
        input_bytes=row["input_bytes"],
        idempotency_key=row["idempotency_key"],
        webhook=row["webhook"],
        webhook_state=row["webhook_state"],
        error=json.loads(row["error"]) if row["error"] else None,
        ttl_s=row["ttl_s"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
    )


@dataclass(frozen=True, slots=True)
class ClaimedChunk:
    job_id: str
    seq: int
    first_item: int
    items: list[Item]


class JobStore:
    """Thread-safe and multi-process safe (every change is one SQLite write transaction)."""

    def __init__(self, store: Store, *, inline_bytes: int = 32 << 10) -> None:
        """Brings the jobs tables of the store's file to `schema.MIGRATIONS` (raises `WasminferError`
        for a file of a newer wasminfer), then makes the jobs folder."""
        self.db = store.db
        self.db.migrate_part(schema.PART, schema.MIGRATIONS)
        self.root = store.data_dir / "jobs"
        self.inline_bytes = inline_bytes
        makedirs_durable(self.root)

    def folder(self, job_id: str) -> Path:
        if JOB_ID.fullmatch(job_id) is None:  # ids reach the file system: only ours may
            raise JobNotFound(job_id)
        return self.root / job_id

    # --- submitting -------------------------------------------------------------------------------
    def create(
        self,
        *,
        tenant: str,
        function: str,
        kind: str,
        content_type: str,
        chunks: list[list[Item]],
        input_bytes: int,
        request_sha256: str,
        ttl_s: float,
        idempotency_key: str | None = None,
        webhook: str | None = None,
    ) -> tuple[Job, bool]:
        """Stores a new job and returns `(job, True)`; with an `idempotency_key` the tenant used
        before for the same request, returns that job and False instead (a key whose job has
        expired is free again: a new job). Raises
        `IdempotencyKeyReused` if the key came with another request, `OSError` (disk)."""
        if idempotency_key is not None:
            existing = self._by_key(tenant, idempotency_key, request_sha256)
            if existing is not None:
                return existing, False
        now = time.time()
        job_id = new_job_id(now)
        folder = self.folder(job_id)
        rows: list[tuple[str, int, int, int, bytes | None]] = []
        first = 0
        for seq, chunk in enumerate(chunks):
            data = encode_items(chunk)
            if len(data) > self.inline_bytes:
                makedirs_durable(folder)
                atomic_write(folder / f"in-{seq}", data, sync_dir=False)
                rows.append((job_id, seq, first, len(chunk), None))
            else:
                rows.append((job_id, seq, first, len(chunk), data))
            first += len(chunk)
        if folder.exists():
            fsync_dir(folder)
        try:
            with self.db.write() as conn:
                if idempotency_key is not None:
                    # A job past its retention is gone for its client even before `sweep` deletes
                    # it, and so is its key (as Stripe's keys after they are pruned): the key is
                    # free for a new request, which makes a new job.
                    conn.execute(
                        "UPDATE jobs SET idempotency_key = NULL "
                        "WHERE tenant = ? AND idempotency_key = ? AND expires_at <= ?",
                        (tenant, idempotency_key, time.time()),
                    )
                conn.execute(
                    "INSERT INTO jobs (id, tenant, function, kind, status, content_type, items_total, "
                    "chunks_open, input_bytes, idempotency_key, request_sha256, webhook, ttl_s, created_at) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        tenant,
                        function,
                        kind,
                        content_type,
                        first,
                        len(chunks),
                        input_bytes,
                        idempotency_key,
                        request_sha256,
                        webhook,
                        ttl_s,
                        now,
                    ),
                )
                conn.executemany(
                    "INSERT INTO job_chunks (job_id, seq, first_item, items, state, input) "
                    "VALUES (?, ?, ?, ?, 'queued', ?)",
                    rows,
                )
        except sqlite3.IntegrityError:
            shutil.rmtree(folder, ignore_errors=True)
            if idempotency_key is None:
                raise
            # Another submission with the same key committed first.
            existing = self._by_key(tenant, idempotency_key, request_sha256)
            if existing is None:
                raise
            return existing, False
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self.get(job_id), True

    def _by_key(self, tenant: str, key: str, request_sha256: str) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS}, request_sha256 FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                (tenant, key),
            ).fetchone()
        if row is None or _expired(row["expires_at"]):
            return None
        if row["request_sha256"] != request_sha256:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key!r:.80} was used for another request (job {row['id']}); "
                "use a new key for a new request"
            )
        return _job(row)

    # --- reading ----------------------------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None) -> Job:
        """The job (of `tenant`, when given). Raises `JobNotFound`, also once it has expired."""
        if JOB_ID.fullmatch(job_id) is None:
            raise JobNotFound(job_id)
        with self.db.read() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant) or _expired(row["expires_at"]):
            raise JobNotFound(job_id)
        return _job(row)

    def list_jobs(
        self,
        tenant: str,
        *,
        status: str | None = None,
        function: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Job]:
        """The tenant's jobs, newest first; `before`: only jobs older than that id (paging)."""
        with self.db.read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE tenant = ? AND (? IS NULL OR status = ?) "
                "AND (? IS NULL OR function = ?) AND (? IS NULL OR id < ?) "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC LIMIT ?",
                (tenant, status, status, function, function, before, before, time.time(), limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def results(self, job: Job) -> Iterator[tuple[int, list[Result]]]:
        """`(first item index, results)` of each done chunk of `job`, in item order. Reads one
        chunk at a time (no transaction is held between chunks)."""
        with self.db.read() as conn:
            chunks = conn.execute(
                "SELECT seq, first_item, output IS NULL FROM job_chunks "
                "WHERE job_id = ? AND state = 'done' ORDER BY seq",
                (job.id,),
            ).fetchall()
        for seq, first, in_file in chunks:
            if in_file:
                data = (self.folder(job.id) / f"out-{seq}").read_bytes()
            else:
                with self.db.read() as conn:
                    row = conn.execute(
                        "SELECT output FROM job_chunks WHERE job_id = ? AND seq = ?", (job.id, seq)
                    ).fetchone()
                if row is None:  # deleted meanwhile
                    return
                data = row[0]
            yield first, decode_results(data)

    # --- running (the runner) ---------------------------------------------------------------------
    def recover(self) -> int:
        """Puts every running chunk back to queued, and its job back to queued with one more
        attempt: what was running when the last runner stopped runs again. Call only from the one
        runner of the data folder, before it claims anything. Returns the number of chunks."""
        with self.db.write() as conn:
            jobs = [
                r[0] for r in conn.execute("SELECT DISTINCT job_id FROM job_chunks WHERE state = 'running'")
            ]
            n = conn.execute("UPDATE job_chunks SET state = 'queued' WHERE state = 'running'").rowcount
            conn.executemany(
                "UPDATE jobs SET attempts = attempts + 1, status = 'queued' "
                "WHERE id = ? AND status = 'running'",
                [(j,) for j in jobs],
            )
        return n

    def active(self) -> list[Job]:
        """Every queued or running job, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') ORDER BY id"
            ).fetchall()
        return [_job(row) for row in rows]

    def claim(self, job_id: str) -> ClaimedChunk | None:
        """Marks the job's next queued chunk running and returns it with its items; None when it
        has none left (or the job was cancelled)."""
        return self.claim_many([job_id])[job_id]

    def claim_many(self, job_ids: Collection[str]) -> dict[str, ClaimedChunk | None]:
        """`claim` for several jobs in one transaction (one fsync, however many jobs)."""
        now = time.time()
        rows: dict[str, tuple[int, int, bytes | None] | None] = {}
        with self.db.write() as conn:
            for job_id in job_ids:
                row = conn.execute(
                    "SELECT c.seq, c.first_item, c.input FROM job_chunks c JOIN jobs j ON j.id = c.job_id "
                    "WHERE c.job_id = ? AND c.state = 'queued' AND j.status IN ('queued', 'running') "
                    "ORDER BY c.seq LIMIT 1",
                    (job_id,),
                ).fetchone()
                rows[job_id] = None if row is None else (row[0], row[1], row[2])
                if row is None:
                    continue
                conn.execute(
                    "UPDATE job_chunks SET state = 'running' WHERE job_id = ? AND seq = ?", (job_id, row[0])
                )
                conn.execute(
                    "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?) WHERE id = ?",
                    (now, job_id),
                )
        claimed: dict[str, ClaimedChunk | None] = {}
        for job_id, found in rows.items():
            if found is None:
                claimed[job_id] = None
                continue
            seq, first, data = found
            if data is None:
                data = (self.folder(job_id) / f"in-{seq}").read_bytes()
            claimed[job_id] = ClaimedChunk(job_id, seq, first, decode_items(data))
        return claimed

    def release(self, job_id: str, seqs: Collection[int]) -> None:
        """Puts claimed chunks none of whose items started back to queued (no attempt is counted)."""
        with self.db.write() as conn:
            conn.executemany(
                "UPDATE job_chunks SET state = 'queued' WHERE job_id = ? AND seq = ? AND state = 'running'",
                [(job_id, s) for s in seqs],
            )

    def complete(self, job_id: str, seq: int, results: list[Result]) -> Job | None:
        """Stores a chunk's results and marks it done; the job succeeds (or, an invoke job whose
        one invocation failed, fails) with its last chunk. Returns the job after the change, None
        if it no longer exists (deleted meanwhile)."""
        return self.complete_many([(job_id, seq, results)])[0]

    def complete_many(self, chunks: list[tuple[str, int, list[Result]]]) -> list[Job | None]:
        """`complete` for several `(job id, seq, results)` in one transaction; large results are
        written and fsynced first."""
        staged = []
        for job_id, seq, results in chunks:
            data = encode_results(results)
            inline: bytes | None = data
            if len(data) > self.inline_bytes:
                folder = self.folder(job_id)
                makedirs_durable(folder)
                atomic_write(folder / f"out-{seq}", data)
                inline = None
            staged.append((job_id, seq, results, inline, sum(1 for r in results if r[3] is not None)))
        now = time.time()
        jobs: list[Job | None] = []
        with self.db.write() as conn:
            for job_id, seq, results, inline, failed in staged:
                changed = conn.execute(
                    "UPDATE job_chunks SET state = 'done', output = ?, failed = ? "
                    "WHERE job_id = ? AND seq = ? AND state = 'running'",
                    (inline, failed, job_id, seq),
                ).rowcount
                row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or not changed:  # deleted, or not ours any more: change nothing
                    jobs.append(None if row is None else _job(row))
                    continue
                error = None
                if row["kind"] == "invoke" and failed:
                    status, _, _, code, message = results[0]
                    error = json.dumps({"status": status, "code": code, "message": message})
                conn.execute(
                    "UPDATE jobs SET items_done = items_done + ?, items_failed = items_failed + ?, "
                    "chunks_open = chunks_open - 1, error = coalesce(?, error) WHERE id = ?",
                    (len(results), failed, error, job_id),
                )
                conn.execute(
                    "UPDATE jobs SET status = CASE WHEN error IS NULL THEN 'succeeded' ELSE 'failed' END, "
                    "finished_at = ?, expires_at = ? + ttl_s, "
                    "webhook_state = CASE WHEN webhook IS NULL THEN NULL ELSE 'pending' END "
                    "WHERE id = ? AND chunks_open = 0 AND status IN ('queued', 'running')",
                    (now, now, job_id),
                )
                row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
                jobs.append(_job(row))
        return jobs

    # --- cancelling, deleting, expiring -----------------------------------------------------------
    def cancel(self, job_id: str, tenant: str, withdrawn: Collection[int] = ()) -> Job:
        """Cancels what of the job has not started: its queued chunks, and the claimed chunks in
        `withdrawn` (ones the runner holds and has started none of). Chunks already running finish
        and keep their results. A finished job is returned unchanged.
        Raises `JobNotFound`, `Conflict` for an invoke job whose invocation already started."""
        job = self.get(job_id, tenant)
        if job.finished:
            return job
        now = time.time()
        with self.db.write() as conn:
            if job.kind == "invoke":
                running = conn.execute(
                    "SELECT seq FROM job_chunks WHERE job_id = ? AND state = 'running'", (job_id,)
                ).fetchall()
                if any(r[0] not in withdrawn for r in running):
                    raise Conflict(
                        f"job {job_id} has started and cannot be cancelled; its result will be kept"
                    )
            cancelled = conn.execute(
                "UPDATE job_chunks SET state = 'cancelled' WHERE job_id = ? AND state = 'queued'", (job_id,)
            ).rowcount
            for seq in withdrawn:
                cancelled += conn.execute(
                    "UPDATE job_chunks SET state = 'cancelled' "
                    "WHERE job_id = ? AND seq = ? AND state = 'running'",
                    (job_id, seq),
                ).rowcount
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', chunks_open = chunks_open - ?, finished_at = ?, "
                "expires_at = ? + ttl_s, "
                "webhook_state = CASE WHEN webhook IS NULL THEN NULL ELSE 'pending' END "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (cancelled, now, now, job_id),
            )
        return self.get(job_id, tenant)

    def delete(self, job_id: str, tenant: str) -> None:
        """Deletes a job, its chunks and files. Raises `JobNotFound`."""
        self.get(job_id, tenant)
        with self.db.write() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant))
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def sweep(self, now: float | None = None) -> int:
        """Deletes jobs whose retention ended, and folders left without a row by a crash during a
        submission (older than `ORPHAN_AGE_S`). Returns the number of jobs deleted."""
        now = time.time() if now is None else now
        with self.db.write() as conn:
            expired = [
                r[0] for r in conn.execute("SELECT id FROM jobs WHERE expires_at <= ?", (now,)).fetchall()
            ]
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(j,) for j in expired])
        for job_id in expired:
            shutil.rmtree(self.root / job_id, ignore_errors=True)
        try:
            folders = [p for p in self.root.iterdir() if p.is_dir() and JOB_ID.fullmatch(p.name)]
        except FileNotFoundError:
            folders = []
        for folder in folders:
            try:
                old = now - folder.stat().st_mtime > ORPHAN_AGE_S
            except FileNotFoundError:
                continue
            if old:
                with self.db.read() as conn:
                    exists = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (folder.name,)).fetchone()
                if exists is None:
                    shutil.rmtree(folder, ignore_errors=True)
        return len(expired)

    # --- webhooks ---------------------------------------------------------------------------------
    def pending_webhooks(self) -> list[Job]:
        with self.db.read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE webhook_state = 'pending' ORDER BY id"
            ).fetchall()
        return [_job(row) for row in rows]

    def set_webhook_state(self, job_id: str, state: str) -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE jobs SET webhook_state = ? WHERE id = ?", (state, job_id))


def _expired(expires_at: float | None) -> bool:
    return expires_at is not None and expires_at <= time.time()
