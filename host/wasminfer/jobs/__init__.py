"""Asynchronous and bulk invocation: durable jobs for work that is not latency-sensitive.

`JobService` is the entry point (submit, read, cancel); `JobStore` keeps jobs in the store's
SQLite database (large bodies in files); `JobRunner` runs their items on the host in the capacity
synchronous traffic leaves (`SyncGate`), fairly between tenants and jobs (`FairQueue`); webhooks
announce finished jobs. Sits between the gateway and the platform: imports `wasminfer.service`
(for types), never starlette.
"""

from __future__ import annotations

from .items import BULK_TYPES, CBOR, JSONL, JSONL_TYPES, parse_bulk, result_line
from .records import FINISHED, KINDS, STATUSES, Job, JobSettings, new_job_id
from .runner import JobRunner
from .scheduler import FairQueue, Lane, SyncGate
from .service import JobService
from .store import JobStore
from .webhooks import WebhookSender, check_webhook_url

__all__ = [
    "BULK_TYPES",
    "CBOR",
    "FINISHED",
    "JSONL",
    "JSONL_TYPES",
    "KINDS",
    "STATUSES",
    "FairQueue",
    "Job",
    "JobRunner",
    "JobService",
    "JobSettings",
    "JobStore",
    "Lane",
    "SyncGate",
    "WebhookSender",
    "check_webhook_url",
    "new_job_id",
    "parse_bulk",
    "result_line",
]
