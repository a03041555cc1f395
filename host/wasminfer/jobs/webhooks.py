"""Completion webhooks: `POST` of the finished job's view (the body `GET /v1/jobs/{id}` answers)
to the URL given at submission, from a thread of their own.

Only hosts the server allows (`JobSettings.webhook_hosts`) may be called: a webhook makes the
server send a request where a tenant says, so by default there are none. Redirects are not
followed (they could lead anywhere). Delivery is at least once: the job's `webhook_state` is
`pending` from the commit that finishes it until a 2xx answer, so a restart delivers what was
pending; after `webhook_attempts` failures (doubling waits) it is `failed`. The receiver should
treat the job id as the idempotency key.
"""

from __future__ import annotations

import logging
import queue
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx

from wasminfer import __version__
from wasminfer.errors import BadRequest, WasminferError

from .records import Job, JobSettings
from .store import JobStore

log = logging.getLogger("wasminfer.jobs")

MAX_URL_LENGTH = 2048


def check_webhook_url(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """`url` if the server may call it: http(s), no credentials, an allowed host.
    Raises `BadRequest` naming what is wrong (and the setting that allows hosts)."""
    if not allowed_hosts:
        raise BadRequest(
            "webhooks are disabled on this server: its operator allows hosts with "
            "WASMINFER_WEBHOOK_HOSTS (e.g. hooks.example.com)"
        )
    if len(url) > MAX_URL_LENGTH:
        raise BadRequest(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise BadRequest(f"malformed webhook URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest("a webhook URL must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("a webhook URL may not carry credentials")
    if "*" not in allowed_hosts and host not in allowed_hosts:
        raise BadRequest(
            f"webhook host {host!r} is not allowed on this server (allowed: {', '.join(allowed_hosts)})"
        )
    return url


class WebhookSender:
    """Delivers webhooks one at a time on a thread of its own; `close()` is idempotent."""

    def __init__(self, store: JobStore, settings: JobSettings, view: Callable[[Job], dict[str, Any]]) -> None:
        self._store = store
        self._settings = settings
        self._view = view
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0

    def send(self, job: Job) -> None:
        """Delivers `job`'s webhook (once, however often it is asked while one is queued)."""
        with self._lock:
            if self._closed.is_set() or job.id in self._queued:
                return
            self._queued.add(job.id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasminfer-webhooks", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def close(self) -> None:
        self._closed.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(self._settings.webhook_timeout_s + 1)

    def _run(self) -> None:
        with httpx.Client(timeout=self._settings.webhook_timeout_s, follow_redirects=False) as http:
            while True:
                job = self._queue.get()
                if job is None or self._closed.is_set():
                    return
                try:
                    self._deliver(http, job)
                except Exception:
                    log.exception("webhook of job %s", job.id)
                finally:
                    with self._lock:
                        self._queued.discard(job.id)

    def _deliver(self, http: httpx.Client, job: Job) -> None:
        try:
            job = self._store.get(job.id)  # the latest state; skip what another process delivered
        except WasminferError:
            return
        if job.webhook is None or job.webhook_state != "pending":
            return
        body = self._view(job)
        headers = {"user-agent": f"wasminfer/{__version__}", "x-wasminfer-job": job.id}
        wait = self._settings.webhook_backoff_s
        for attempt in range(1, self._settings.webhook_attempts + 1):
            try:
                response = http.post(job.webhook, json=body, headers=headers)
                if 200 <= response.status_code < 300:
                    self._store.set_webhook_state(job.id, "delivered")
                    self.delivered += 1
                    return
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning("webhook of job %s, attempt %d: %s", job.id, attempt, problem)
            if attempt < self._settings.webhook_attempts and self._closed.wait(wait):
                return  # closing: still pending, the next start delivers it
            wait *= 2
        self._store.set_webhook_state(job.id, "failed")
        self.failed += 1
