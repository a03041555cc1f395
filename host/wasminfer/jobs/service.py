"""`JobService`: asynchronous and bulk invocation, as the gateway (and tests) call it.

Submitting stores the job durably and returns at once; the runner does the work in the capacity
synchronous traffic leaves. Every method blocks (SQLite, files, parsing a bulk body): the gateway
calls them on worker threads. Never imports starlette.

Semantics (see also `records.py` and `store.py`):

- **At least once.** A job is acknowledged (202) only once it is durable; it runs after a restart.
  Items run in chunks (`chunk_items`); a crash re-runs the chunks that were running, so an item
  may run twice. Functions are expected to be safe to re-run (inference is). A client that lost the
  202 and retries sends the same `Idempotency-Key` to get the first job back instead of a second.
- **Retention.** A finished job and its results are kept `ttl_s` (default `JobSettings.ttl_s`,
  per job `?ttl_s=`) after it finished, then deleted; an expired job is 404.
- **Cancelling** stops what has not started: queued chunks, and claimed chunks none of whose items
  started. An invoke job that has started cannot be cancelled (409). Deleting a finished job frees
  its results at once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from wasminfer.errors import BadRequest, Conflict, JobNotFinished, Unavailable, error_from_dict
from wasminfer.syntax import is_header_value

from .items import chunked, parse_bulk, result_line
from .records import STATUSES, Job, JobSettings
from .runner import JobRunner
from .scheduler import SyncGate
from .store import JobStore
from .webhooks import WebhookSender, check_webhook_url

if TYPE_CHECKING:
    from wasminfer.service import Platform

MAX_LIST = 1000


class JobService:
    """Jobs of every tenant of `platform`. `start()` starts the runner; `close()` (idempotent)
    drains it. The caller closes the platform after."""

    def __init__(self, platform: Platform, settings: JobSettings | None = None) -> None:
        self.platform = platform
        self.settings = settings if settings is not None else JobSettings.from_env()
        self.store = JobStore(platform.store, inline_bytes=self.settings.inline_bytes)
        self.gate = SyncGate(
            self.settings.cores,
            self.settings.sync_reserve_cores,
            self.settings.sync_hold_s,
            self.settings.sync_recent_s,
            self.settings.sync_recent_workers,
        )
        self.webhooks = WebhookSender(self.store, self.settings, self.view)
        self.runner = JobRunner(platform, self.store, self.settings, self.gate, self.webhooks.send)
        self._closed = False

    def start(self) -> None:
        self.runner.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.runner.close()
        self.webhooks.close()

    def __enter__(self) -> JobService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submitting -------------------------------------------------------------------------------
    def submit_invoke(
        self,
        function: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        *,
        tenant: str,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        ttl_s: float | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Queues one invocation; returns `(job view, created)` (`created` False: the job an
        `idempotency_key` already named). Raises `FunctionNotFound`, `BadRequest` (webhook, TTL,
        key), `IdempotencyKeyReused`, `Unavailable` while the server starts."""
        options = self._options(function, tenant, idempotency_key, webhook, ttl_s)
        job, created = self.store.create(
            tenant=tenant,
            function=function,
            kind="invoke",
            content_type=content_type,
            chunks=[[(body, content_type)]],
            input_bytes=len(body),
            request_sha256=_request_sha256("invoke", function, content_type, options, body),
            **options,
        )
        if created:
            self.runner.notify()
        return self.view(job), created

    def submit_batch(
        self,
        function: str,
        body: bytes,
        media_type: str,
        *,
        tenant: str,
        item_content_type: str | None = None,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        ttl_s: float | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Queues one invocation per item of a bulk body (`items.parse_bulk`) as one job. Raises
        what `submit_invoke` raises, and `BadRequest` / `UnsupportedMediaType` / `PayloadTooLarge`
        for the body (nothing is stored then)."""
        options = self._options(function, tenant, idempotency_key, webhook, ttl_s)
        if item_content_type is not None and not is_header_value(item_content_type, 255):
            raise BadRequest("item_content_type must be a plain media type (printable ASCII)")
        items = parse_bulk(body, media_type, self.settings.max_items, item_content_type)
        chunks = list(chunked(items, self.settings.chunk_items, self.settings.chunk_bytes))
        job, created = self.store.create(
            tenant=tenant,
            function=function,
            kind="batch",
            content_type=media_type,
            chunks=chunks,
            input_bytes=len(body),
            request_sha256=_request_sha256(
                "batch", function, f"{media_type};{item_content_type}", options, body
            ),
            **options,
        )
        if created:
            self.runner.notify()
        return self.view(job), created

    def _options(
        self, function: str, tenant: str, key: str | None, webhook: str | None, ttl_s: float | None
    ) -> dict[str, Any]:
        if not self.platform.ready:
            raise Unavailable("the server is starting: loading functions and models from the store")
        self.platform.store.get_function(function, tenant=tenant)  # FunctionNotFound, InvalidName
        if key is not None and not is_header_value(key, 255):
            raise BadRequest("an Idempotency-Key is 1-255 printable ASCII characters")
        if ttl_s is None:
            ttl = self.settings.ttl_s
        elif not (math.isfinite(ttl_s) and 1 <= ttl_s <= self.settings.max_ttl_s):
            raise BadRequest(f"ttl_s must be between 1 and {self.settings.max_ttl_s:g} seconds")
        else:
            ttl = ttl_s
        hook = check_webhook_url(webhook, self.settings.webhook_hosts) if webhook is not None else None
        return {"idempotency_key": key, "webhook": hook, "ttl_s": ttl}

    # --- reading ----------------------------------------------------------------------------------
    def view(self, job: Job) -> dict[str, Any]:
        """The API form of `job`, with the runner's progress not committed yet."""
        return job.to_dict(*self.runner.progress(job.id)) if not job.finished else job.to_dict()

    def get(self, job_id: str, *, tenant: str) -> Job:
        """Raises `JobNotFound` (also for another tenant's job, and once it expired)."""
        return self.store.get(job_id, tenant)

    def list_jobs(
        self,
        *,
        tenant: str,
        status: str | None = None,
        function: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[dict[str, Any]]:
        """The tenant's jobs, newest first. Raises `BadRequest` for an unknown status."""
        if status is not None and status not in STATUSES:
            raise BadRequest(f"unknown job status {status!r:.40}; one of {', '.join(STATUSES)}")
        jobs = self.store.list_jobs(
            tenant, status=status, function=function, limit=min(limit, MAX_LIST), before=before
        )
        return [self.view(job) for job in jobs]

    def invoke_result(self, job: Job) -> tuple[bytes, str]:
        """`(body, content type)` of a succeeded invoke job. Raises `JobNotFinished` (queued,
        running), `Conflict` (cancelled), and a failed job's error as it would have been raised by
        a synchronous invocation (its status, code and message)."""
        if job.kind != "invoke":
            raise BadRequest(f"job {job.id} is a batch: its results are JSON Lines")
        if job.status in ("queued", "running"):
            raise JobNotFinished(
                f"job {job.id} is {job.status}; poll GET /v1/jobs/{job.id} until it has finished"
            )
        if job.status == "cancelled":
            raise Conflict(f"job {job.id} was cancelled before it ran: it has no result")
        if job.status == "failed" and job.error is not None:
            raise error_from_dict(job.error)
        for _, results in self.store.results(job):
            status, ctype, body, _, _ = results[0]
            return body or b"", ctype or "application/octet-stream"
        raise JobNotFinished(f"job {job.id} has no stored result")  # pragma: no cover -- a done chunk exists

    def batch_results(self, job: Job) -> Iterator[bytes]:
        """The results of a job's finished items as JSON Lines (`items.result_line`), in item
        order, one block of lines per chunk; while the job runs, what has finished so far."""
        for first, results in self.store.results(job):
            yield b"".join(result_line(first + n, r) for n, r in enumerate(results))

    # --- cancelling -------------------------------------------------------------------------------
    def cancel(self, job_id: str, *, tenant: str) -> dict[str, Any] | None:
        """Cancels a job that has not finished (returns its view), or deletes a finished one and
        its results (returns None). Raises `JobNotFound`, `Conflict` (an invoke job that started)."""
        job = self.store.get(job_id, tenant)
        if job.finished:
            self.store.delete(job_id, tenant)
            return None
        seqs = self.runner.withdraw(job_id, keep_started=job.kind == "invoke")
        if seqs is None:
            raise Conflict(f"job {job_id} has started and cannot be cancelled; its result will be kept")
        try:
            job = self.store.cancel(job_id, tenant, seqs)
        except BaseException:
            if seqs:
                self.store.release(job_id, seqs)
                self.runner.notify()
            raise
        if job.webhook_state == "pending":
            self.webhooks.send(job)
        return self.view(job)

    def stats(self) -> dict[str, int]:
        return {**self.runner.stats(), **self.gate.stats()}


def _request_sha256(kind: str, function: str, content_type: str, options: dict[str, Any], body: bytes) -> str:
    h = hashlib.sha256()
    for part in (kind, function, content_type, str(options["webhook"]), repr(options["ttl_s"])):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    h.update(body)
    return h.hexdigest()
