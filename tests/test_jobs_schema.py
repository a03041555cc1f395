"""Jobs keep their own tables in the store's file (`jobs/schema.py`, `Database.migrate_part`), and a
file made before that (the jobs tables from the store's migration 2) opens with its jobs."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from wasminfer.errors import WasminferError
from wasminfer.jobs import schema
from wasminfer.jobs.items import encode_items
from wasminfer.jobs.records import new_job_id
from wasminfer.jobs.store import JobStore
from wasminfer.store import MIGRATIONS, SCHEMA_VERSION, Store
from wasminfer.store.db import Database

# The store's migrations as they were released before jobs kept their own schema: the store's
# tables, then (migration 2) the jobs tables, made by the very statements jobs now runs, less the
# `IF NOT EXISTS` that lets jobs adopt them.
PREVIOUS_MIGRATIONS = (
    MIGRATIONS[0],
    tuple(statement.replace(" IF NOT EXISTS", "") for statement in schema.MIGRATIONS[0]),
)


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _previous_version_file(folder: Path) -> str:
    """A store file as the previous version left it, holding one queued batch job of 2 items (its
    rows written as that version's `JobStore.create` wrote them). Returns the job's id."""
    Database(folder / "store.db", PREVIOUS_MIGRATIONS).close()
    job_id = new_job_id()
    with sqlite3.connect(folder / "store.db") as conn:
        conn.execute(
            "INSERT INTO jobs (id, tenant, function, kind, status, content_type, items_total, chunks_open, "
            "input_bytes, request_sha256, ttl_s, created_at) "
            "VALUES (?, 'acme', 'digits', 'batch', 'queued', 'application/json', 2, 1, 6, ?, 3600, ?)",
            (job_id, "ab" * 32, time.time()),
        )
        conn.execute(
            "INSERT INTO job_chunks (job_id, seq, first_item, items, state, input) "
            "VALUES (?, 0, 0, 2, 'queued', ?)",
            (job_id, encode_items([(b"[1]", "application/json"), (b"[2,3]", "application/json")])),
        )
    return job_id


def test_a_store_of_the_previous_version_opens_and_keeps_its_jobs(tmp_path: Path) -> None:
    job_id = _previous_version_file(tmp_path)
    assert {"jobs", "job_chunks"} <= _tables(tmp_path / "store.db")
    assert "schema_parts" not in _tables(tmp_path / "store.db")
    with Store(tmp_path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 3
        jobs = JobStore(store)
        assert store.db.part_version("jobs") == schema.SCHEMA_VERSION == 1
        job = jobs.get(job_id, "acme")
        assert (job.function, job.kind, job.status, job.items_total) == ("digits", "batch", "queued", 2)
        chunk = jobs.claim(job_id)
        assert chunk is not None
        assert chunk.items == [(b"[1]", "application/json"), (b"[2,3]", "application/json")]
        done = jobs.complete(job_id, chunk.seq, [(200, "application/json", b"1", None, None)] * 2)
        assert done is not None and (done.status, done.items_done) == ("succeeded", 2)
    # Opened again: nothing to migrate, the job is still there as it was left.
    with Store(tmp_path) as store:
        assert JobStore(store).get(job_id, "acme").status == "succeeded"
        assert store.db.part_version("jobs") == 1


def test_the_jobs_tables_are_made_by_jobs_not_by_the_store(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        assert not {"jobs", "job_chunks"} & _tables(tmp_path / "store.db")
        assert store.db.part_version("jobs") == 0
        jobs = JobStore(store)
        assert {"jobs", "job_chunks"} <= _tables(tmp_path / "store.db")
        assert store.db.part_version("jobs") == 1
        job, created = jobs.create(tenant="default", function="f", kind="invoke", content_type="text/plain",
                                   chunks=[[(b"x", "text/plain")]], input_bytes=1, request_sha256="cd" * 32,
                                   ttl_s=60)
        assert created and jobs.get(job.id).items_total == 1


def test_jobs_tables_of_a_newer_version_are_refused_and_kept(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        JobStore(store)  # version 1: opens (the obeyed side)
        with store.db.write() as conn:
            conn.execute("UPDATE schema_parts SET version = 2 WHERE part = 'jobs'")
        with pytest.raises(WasminferError, match=r"\(jobs\) has schema version 2, newer than this wasminfer "
                                                 r"knows \(1\): upgrade wasminfer"):
            JobStore(store)
        assert store.db.part_version("jobs") == 2
        assert {"jobs", "job_chunks"} <= _tables(tmp_path / "store.db")
