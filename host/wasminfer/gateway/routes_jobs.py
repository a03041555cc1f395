"""Asynchronous and bulk invocation over HTTP, and `/v1/jobs`.

- `POST /v1/functions/{name}/invoke` with `Prefer: respond-async` (RFC 7240) or `?async=1`:
  `202 Accepted`, the job's view and `Location: /v1/jobs/{id}`.
- `POST /v1/functions/{name}/batch`: a JSON Lines or CBOR body of many inputs, one job.
- `GET /v1/jobs` (newest first), `GET /v1/jobs/{id}` (status, progress, timings, error),
  `GET /v1/jobs/{id}/result` (an invoke job: the function's output as a synchronous call would
  have answered it; a batch: JSON Lines, one result per item), `DELETE /v1/jobs/{id}` (cancel
  what has not started; on a finished job, delete it and its results).

Options of both submissions: `Idempotency-Key` header, `?webhook=URL`, `?ttl_s=` (retention).
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from wasminfer.errors import BadRequest, UnsupportedMediaType
from wasminfer.gateway.bodies import media_type, read_body
from wasminfer.gateway.state import app_state, principal, run_admin
from wasminfer.jobs import BULK_TYPES, CBOR, JSONL
from wasminfer.syntax import is_header_value

DEFAULT_CONTENT_TYPE = "application/octet-stream"
RESPOND_ASYNC = "respond-async"
# As in routes_functions: only a plain header value from a guest reaches the client.
_TRUE, _FALSE = ("", "1", "true", "yes"), ("0", "false", "no")


def wants_async(request: Request) -> bool:
    """Whether an invocation asks to run asynchronously: `?async=1` (`?async=0` says no, whatever
    the headers), else a `Prefer` header with the `respond-async` preference. Raises `BadRequest`
    for another `async` value."""
    flag = request.query_params.get("async")
    if flag is not None:
        if flag.lower() in _TRUE:
            return True
        if flag.lower() in _FALSE:
            return False
        raise BadRequest(f"query parameter 'async' must be 1 or 0, got {flag!r:.40}")
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            if preference.split(";", 1)[0].strip().lower() == RESPOND_ASYNC:
                return True
    return False


def _options(request: Request) -> dict[str, Any]:
    params = request.query_params
    ttl = params.get("ttl_s")
    ttl_s = None
    if ttl is not None:
        try:
            ttl_s = float(ttl)
        except ValueError:
            raise BadRequest(f"query parameter 'ttl_s' must be a number, got {ttl!r:.40}") from None
        if not math.isfinite(ttl_s):
            raise BadRequest("query parameter 'ttl_s' must be a finite number")
    return {
        "idempotency_key": request.headers.get("idempotency-key"),
        "webhook": params.get("webhook"),
        "ttl_s": ttl_s,
    }


def _accepted(view: dict[str, Any], created: bool) -> Response:
    headers = {"location": view["location"], "preference-applied": RESPOND_ASYNC}
    if not created:
        headers["idempotent-replayed"] = "true"
    return JSONResponse(view, status_code=202, headers=headers)


async def invoke_async(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    options = _options(request)
    body = await read_body(request, st.settings.max_invoke_bytes, "request body")
    content_type = request.headers.get("content-type") or DEFAULT_CONTENT_TYPE
    view, created = await run_admin(
        request,
        st.jobs.submit_invoke,
        request.path_params["name"],
        body,
        content_type,
        tenant=who.tenant,
        **options,
    )
    return _accepted(view, created)


async def batch(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    media = media_type(request)
    if media not in BULK_TYPES:  # before reading what may be a large body
        raise UnsupportedMediaType(
            f"a batch must be sent as JSON Lines ({JSONL}) or a CBOR array ({CBOR}), "
            f"not {media or 'no Content-Type'}"
        )
    options = _options(request)
    body = await read_body(request, st.settings.max_batch_bytes, "batch")
    view, created = await run_admin(
        request,
        st.jobs.submit_batch,
        request.path_params["name"],
        body,
        media,
        tenant=who.tenant,
        item_content_type=request.query_params.get("item_content_type"),
        **options,
    )
    return _accepted(view, created)


async def list_jobs(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    params = request.query_params
    raw = params.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter 'limit' must be an integer, got {raw!r:.40}") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("query parameter 'limit' must be between 1 and 1000")
    jobs = await run_admin(
        request,
        st.jobs.list_jobs,
        tenant=who.tenant,
        status=params.get("status"),
        function=params.get("function"),
        limit=limit,
        before=params.get("before"),
    )
    return JSONResponse({"jobs": jobs})


async def get_job(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    jobs, job_id = st.jobs, request.path_params["id"]
    view = await run_admin(request, lambda: jobs.view(jobs.get(job_id, tenant=who.tenant)))
    return JSONResponse(view)


async def delete_job(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    view = await run_admin(request, st.jobs.cancel, request.path_params["id"], tenant=who.tenant)
    return Response(status_code=204) if view is None else JSONResponse(view)


async def job_result(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    job = await run_admin(request, st.jobs.get, request.path_params["id"], tenant=who.tenant)
    headers = {"x-job-status": job.status}
    if job.kind == "batch":
        # A sync iterator: Starlette reads it on worker threads, one chunk of results at a time.
        return StreamingResponse(st.jobs.batch_results(job), media_type=JSONL, headers=headers)
    body, ctype = await run_admin(request, st.jobs.invoke_result, job)
    headers["content-type"] = ctype if is_header_value(ctype) else DEFAULT_CONTENT_TYPE
    return Response(body, headers=headers)
