"""What a job is: its record (`Job`), its statuses and ids, and the knobs of the job machinery."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wasminfer.store.records import iso_time

KINDS = ("invoke", "batch")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})

# Crockford's base32, lowercase: no i, l, o, u (nothing to misread in a URL or a terminal).
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
JOB_ID = re.compile(r"[0-9a-hjkmnp-tv-z]{26}")


def new_job_id(now: float | None = None) -> str:
    """A ULID-like id: 48 bits of milliseconds then 80 random bits, 26 characters. Ids sort by
    submission time (listings need no other index), and the random part makes them unguessable."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | secrets.randbits(80)
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclass(frozen=True, slots=True)
class Job:
    """One asynchronous invocation (`kind` "invoke": one item) or bulk invocation ("batch": many
    items, each run through the function on its own). A snapshot of its row."""

    id: str
    tenant: str
    function: str
    kind: str
    status: str
    content_type: str  # invoke: the request's; batch: the bulk body's media type
    items_total: int
    items_done: int
    items_failed: int
    input_bytes: int
    idempotency_key: str | None
    webhook: str | None
    webhook_state: str | None
    error: dict[str, Any] | None  # {"status", "code", "message"}: why an invoke job failed
    ttl_s: float
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self, live_done: int = 0, live_failed: int = 0) -> dict[str, Any]:
        """The API form. `live_done` / `live_failed`: items finished in memory but not committed
        yet (the runner's progress between commits), added to the committed counts."""
        # A chunk is counted live until the runner forgets it, just after its commit: clamp.
        done = min(self.items_total, self.items_done + live_done)
        failed = min(done, self.items_failed + live_failed)
        view: dict[str, Any] = {
            "id": self.id,
            "function": self.function,
            "kind": self.kind,
            "status": self.status,
            "items": {"total": self.items_total, "done": done, "succeeded": done - failed, "failed": failed},
            "created_at": iso_time(self.created_at),
            "started_at": iso_time(self.started_at) if self.started_at is not None else None,
            "finished_at": iso_time(self.finished_at) if self.finished_at is not None else None,
            "expires_at": iso_time(self.expires_at) if self.expires_at is not None else None,
            "timings": self.timings(),
            "attempts": self.attempts,
            "location": f"/v1/jobs/{self.id}",
            "result": f"/v1/jobs/{self.id}/result",
        }
        if self.error is not None:
            view["error"] = {"code": self.error["code"], "message": self.error["message"]}
        if self.webhook is not None:
            view["webhook"] = {"url": self.webhook, "state": self.webhook_state}
        if self.idempotency_key is not None:
            view["idempotency_key"] = self.idempotency_key
        return view

    def timings(self) -> dict[str, float | None]:
        """Seconds spent waiting (`queued_s`, until the first item started) and running (`run_s`)."""
        end = self.finished_at if self.finished_at is not None else time.time()
        queued = (self.started_at if self.started_at is not None else end) - self.created_at
        run = end - self.started_at if self.started_at is not None else None
        return {
            "queued_s": round(max(0.0, queued), 6),
            "run_s": round(max(0.0, run), 6) if run is not None else None,
        }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class JobSettings:
    """The knobs of asynchronous work; `JobSettings.from_env()` reads the `WASMINFER_*` overrides."""

    # Most async items running at once (0: accept jobs, run none). Two per core: the infer calls
    # of concurrent items overlap (a batching model stacks them) while one item's Wasm runs. More
    # did not pay on the digits example (bench/async_jobs.py): its items are mostly Wasm and
    # Python, and past two per core the threads only contend for the GIL. A function whose time is
    # in ONNX Runtime (which releases the GIL) gains from more: WASMINFER_ASYNC_WORKERS.
    workers: int = 2 * _cores()
    chunk_items: int = 256  # items claimed, run and committed as one unit (the at-least-once unit)
    chunk_bytes: int = 4 << 20
    inline_bytes: int = 32 << 10  # a chunk's inputs or results up to this size live in its row
    max_items: int = 1_000_000
    ttl_s: float = 86_400.0  # how long a finished job and its results are kept, by default
    max_ttl_s: float = 30 * 86_400.0
    webhook_hosts: tuple[str, ...] = ()  # hosts webhooks may call ("*": any); empty: webhooks refused
    webhook_attempts: int = 5
    webhook_timeout_s: float = 5.0
    webhook_backoff_s: float = 1.0  # doubled after each failed attempt
    poll_s: float = 1.0  # how often jobs submitted by other processes are looked for
    sweep_s: float = 60.0  # how often expired jobs are deleted
    # Synchronous invocations come first (`scheduler.SyncGate`): while one is in flight (and for
    # `sync_hold_s` after, so a client's next request finds the host quiet) async work starts no
    # new item beyond what `cores - sync_reserve_cores * in_flight` cores leave (on 2 cores:
    # none); within `sync_recent_s` of one it runs at most `sync_recent_workers` items (default
    # half the cores) at once, so that few are in flight when the next request comes.
    sync_hold_s: float = 0.001
    sync_reserve_cores: float = 2.0
    sync_recent_s: float = 0.25
    sync_recent_workers: int | None = None
    cores: int = _cores()
    drain_s: float = 5.0  # at shutdown, how long started chunks may take to finish

    def __post_init__(self) -> None:
        for name in ("chunk_items", "chunk_bytes", "max_items", "webhook_attempts", "cores"):
            if getattr(self, name) < 1:
                raise ValueError(f"JobSettings.{name} must be at least 1")
        if self.workers < 0:
            raise ValueError("JobSettings.workers must be 0 or more")
        if not 0 < self.ttl_s <= self.max_ttl_s:
            raise ValueError("JobSettings.ttl_s must be positive and at most max_ttl_s")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> JobSettings:
        """Defaults, then `WASMINFER_ASYNC_WORKERS`, `WASMINFER_WEBHOOK_HOSTS` (comma-separated)
        and `WASMINFER_JOB_TTL_S`, then `overrides`. Raises `ValueError` for a malformed value."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, key, parse in (
            ("WASMINFER_ASYNC_WORKERS", "workers", int),
            ("WASMINFER_JOB_TTL_S", "ttl_s", float),
        ):
            if env.get(var):
                try:
                    values[key] = parse(env[var])
                except ValueError:
                    raise ValueError(f"{var}={env[var]!r:.40} is not a {parse.__name__}") from None
        if env.get("WASMINFER_WEBHOOK_HOSTS"):
            values["webhook_hosts"] = tuple(
                h.strip().lower() for h in env["WASMINFER_WEBHOOK_HOSTS"].split(",") if h.strip()
            )
        values.update(overrides)
        return cls(**values)
