"""The tables of jobs in the store's SQLite file: jobs' own migrations (`Database.migrate_part`).

Until jobs kept their own schema the store's migration 2 made these tables; a file of that version
has them already, so the first migration here creates what is missing (`IF NOT EXISTS`) and adopts
the rest with the jobs in them. Append new migrations; never edit a released one.
"""

from __future__ import annotations

#: The name under which the store's file keeps the version of these tables (`schema_parts`).
PART = "jobs"

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # Asynchronous and bulk invocations (`wasminfer.jobs`). A job's items live in chunks: each
        # chunk is claimed, run and committed as one unit, so a 10,000-item job costs tens of
        # commits, not thousands, and a crash re-runs at most the chunks that were running.
        # Ids are time-ordered (`jobs.records.new_job_id`), so `ORDER BY id` is submission order.
        """CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL DEFAULT 'default',
            function TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('invoke', 'batch')),
            status TEXT NOT NULL
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            content_type TEXT NOT NULL,
            items_total INTEGER NOT NULL CHECK (items_total >= 0),
            items_done INTEGER NOT NULL DEFAULT 0,
            items_failed INTEGER NOT NULL DEFAULT 0,
            chunks_open INTEGER NOT NULL,
            input_bytes INTEGER NOT NULL,
            idempotency_key TEXT,
            request_sha256 TEXT NOT NULL,
            webhook TEXT,
            webhook_state TEXT CHECK (webhook_state IN ('pending', 'delivered', 'failed')),
            error TEXT,
            ttl_s REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            expires_at REAL,
            UNIQUE (tenant, idempotency_key)
        )""",
        "CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, id)",
        "CREATE INDEX IF NOT EXISTS jobs_active ON jobs (id) WHERE status IN ('queued', 'running')",
        "CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS jobs_webhooks_pending ON jobs (id) WHERE webhook_state = 'pending'",
        # `input` / `output`: the chunk's items and results inline when small, NULL when they are
        # in a file of the job's folder (`<data_dir>/jobs/<id>/`): large bodies stay out of rows.
        """CREATE TABLE IF NOT EXISTS job_chunks (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            first_item INTEGER NOT NULL,
            items INTEGER NOT NULL CHECK (items > 0),
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'cancelled')),
            input BLOB,
            output BLOB,
            failed INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job_id, seq)
        )""",
        "CREATE INDEX IF NOT EXISTS job_chunks_running ON job_chunks (job_id) WHERE state = 'running'",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
