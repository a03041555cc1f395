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

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from wasminfer import errors
from wasminfer.errors import UnsupportedMediaType
from wasminfer.gateway.bodies import REQUEST_BODY, media_type, read_body
from wasminfer.gateway.routing import Body, Params, Reply, operation
from wasminfer.gateway.state import app_state, principal, run_admin
from wasminfer.jobs import BULK_TYPES, CBOR, JSONL, STATUSES
from wasminfer.params import Param
from wasminfer.syntax import is_header_value

DEFAULT_CONTENT_TYPE = "application/octet-stream"
RESPOND_ASYNC = "respond-async"

# The options of both ways to submit a job (an asynchronous invoke, a batch).
JOB_OPTIONS = (
    Param("webhook", "string", "URL POSTed the job's view when it finishes (hosts the server allows only)"),
    Param("ttl_s", "number", "seconds the finished job and its results are kept (default: a day)"),
)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "string",
    "the same key and request again return the first job (202, `Idempotent-Replayed: true`) instead of "
    "a second one; another request with it is 422",
)
JOB_ACCEPTED = Reply(
    202,
    "Accepted: the job, durable; poll `Location` (or wait for the webhook)",
    "Job",
    headers={"Location": "/v1/jobs/{id}"},
)
_SUBMIT_ERRORS = (errors.FunctionNotFound, errors.IdempotencyKeyReused)


def wants_async(request: Request, flag: bool | None) -> bool:
    """Whether an invocation asks to run asynchronously: the `async` query parameter's `flag`
    (`?async=0` says no, whatever the headers), else a `Prefer` header with the `respond-async`
    preference."""
    if flag is not None:
        return flag
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            if preference.split(";", 1)[0].strip().lower() == RESPOND_ASYNC:
                return True
    return False


def _options(request: Request, params: Params) -> dict[str, Any]:
    return {
        "idempotency_key": request.headers.get("idempotency-key"),
        "webhook": params["webhook"],
        "ttl_s": params["ttl_s"],
    }


def _accepted(view: dict[str, Any], created: bool) -> Response:
    headers = {"location": view["location"], "preference-applied": RESPOND_ASYNC}
    if not created:
        headers["idempotent-replayed"] = "true"
    return JSONResponse(view, status_code=202, headers=headers)


async def invoke_async(request: Request, params: Params) -> Response:
    """An invocation as a job (`routes_functions.invoke` declares it)."""
    st, who = app_state(request), principal(request)
    options = _options(request, params)
    body = await read_body(request, st.settings.max_invoke_bytes, REQUEST_BODY)
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


@operation(
    "Invoke a function on many inputs: one job, one result per item",
    JOB_ACCEPTED,
    errors=_SUBMIT_ERRORS,
    description="JSON Lines (`application/jsonl`, `application/x-ndjson`): each line goes to the function "
    "as `application/json`. CBOR (`application/cbor`): one array; a byte string item goes as "
    "`item_content_type` (default application/octet-stream), a text string as text/plain, anything else "
    "as `application/cbor`. A failed item is reported in its result line; it does not fail the job.",
    query=(Param("item_content_type", "string", "the content type of CBOR byte-string items"), *JOB_OPTIONS),
    headers=(IDEMPOTENCY_KEY,),
    body=Body({JSONL: {"type": "string"}, CBOR: {"type": "array"}}),
    example="curl -X POST {base}/v1/functions/NAME/batch -H 'content-type: application/jsonl' "
    "--data-binary @inputs.jsonl",
)
async def batch(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    media = media_type(request)
    if media not in BULK_TYPES:  # before reading what may be a large body
        raise UnsupportedMediaType(
            f"a batch must be sent as JSON Lines ({JSONL}) or a CBOR array ({CBOR}), "
            f"not {media or 'no Content-Type'}"
        )
    options = _options(request, params)
    body = await read_body(request, st.settings.max_batch_bytes, "batch")
    view, created = await run_admin(
        request,
        st.jobs.submit_batch,
        request.path_params["name"],
        body,
        media,
        tenant=who.tenant,
        item_content_type=params["item_content_type"],
        **options,
    )
    return _accepted(view, created)


@operation(
    "The caller's jobs, newest first",
    Reply(200, "The jobs", "JobList"),
    query=(
        Param("status", "string", "only jobs in this status", choices=STATUSES),
        Param("function", "string", "only jobs of this function"),
        Param("limit", "integer", "at most this many", default=50, minimum=1, maximum=1000),
        Param("before", "string", "only jobs older than this job id (paging)"),
    ),
)
async def list_jobs(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    jobs = await run_admin(
        request,
        st.jobs.list_jobs,
        tenant=who.tenant,
        status=params["status"],
        function=params["function"],
        limit=params["limit"],
        before=params["before"],
    )
    return JSONResponse({"jobs": jobs})


@operation(
    "A job: status, progress, timings, error", Reply(200, "The job", "Job"), errors=(errors.JobNotFound,)
)
async def get_job(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    jobs, job_id = st.jobs, request.path_params["id"]
    view = await run_admin(request, lambda: jobs.view(jobs.get(job_id, tenant=who.tenant)))
    return JSONResponse(view)


@operation(
    "Cancel a job (what has not started), or delete a finished one and its results",
    Reply(200, "Cancelled: the job", "Job"),
    Reply(204, "Deleted"),
    errors=(errors.JobNotFound, errors.Conflict),
    description="409 for an invoke job that has started. A batch's chunks that have started finish and "
    "keep their results.",
)
async def delete_job(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    view = await run_admin(request, st.jobs.cancel, request.path_params["id"], tenant=who.tenant)
    return Response(status_code=204) if view is None else JSONResponse(view)


@operation(
    "A job's result",
    Reply(
        200,
        "An invoke job: the function's output with its content type (a failed one answers the error a "
        "synchronous call would have). A batch: JSON Lines, `{index, status, content_type, output | "
        "output_b64}` or `{index, status, error}` per finished item, in order (partial while it runs; "
        "`X-Job-Status` says)",
        media="*/*",
        headers={"X-Job-Status": "the job's status"},
    ),
    errors=(
        errors.JobNotFound, errors.JobNotFinished, errors.InvalidTensor, errors.GuestRejected,
        errors.GuestError, errors.Timeout,
    ),
    description="409 `job_not_finished` while an invoke job is queued or running.",
)  # fmt: skip
async def job_result(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    job = await run_admin(request, st.jobs.get, request.path_params["id"], tenant=who.tenant)
    headers = {"x-job-status": job.status}
    if job.kind == "batch":
        # A sync iterator: Starlette reads it on worker threads, one chunk of results at a time.
        return StreamingResponse(st.jobs.batch_results(job), media_type=JSONL, headers=headers)
    body, ctype = await run_admin(request, st.jobs.invoke_result, job)
    headers["content-type"] = ctype if is_header_value(ctype) else DEFAULT_CONTENT_TYPE
    return Response(body, headers=headers)
