"""`/v1/functions`: upload (immutable versions), read, delete, roll back, invoke, logs. Each handler
declares itself (`routing.operation`): its parameters, replies and errors."""

from __future__ import annotations

import time
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from wasminfer import errors, pysource
from wasminfer.errors import BadRequest, FunctionNotFound, InvalidManifest, WasminferError
from wasminfer.gateway import routes_jobs as jobs
from wasminfer.gateway import streaming
from wasminfer.gateway.bodies import (
    REQUEST_BODY,
    declared_media_type,
    limited_stream,
    read_body,
    sniffed_media_type,
)
from wasminfer.gateway.routing import BINARY, Body, Params, QueryGroup, Reply, operation
from wasminfer.gateway.state import AppState, app_state, principal, run_admin
from wasminfer.manifest import MANIFEST_KEYS, Manifest
from wasminfer.params import Param
from wasminfer.parsing import Limits, loads_json
from wasminfer.replicas import InvokeResult
from wasminfer.syntax import is_header_value

WASM = "application/wasm"
MULTIPART = "multipart/form-data"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_LOG_LINES = 10_000
MAX_MANIFEST_PART_BYTES = 1 << 20
# A manifest nests two levels (`env` is an object); its largest lists (models, args, env) stay far
# below the values allowed.
MANIFEST_LIMITS = Limits(max_bytes=MAX_MANIFEST_PART_BYTES, max_depth=4, max_values=100_000)
# The manifest of an `application/wasm` upload: every query parameter the route does not declare.
MANIFEST_QUERY = QueryGroup(
    "manifest", MANIFEST_KEYS, Manifest.from_query, repeatable=frozenset({"models", "env", "args"})
)
_SEND_FUNCTION_AS = (
    "send it with -H 'Content-Type: application/wasm' (a module or component), 'text/x-python' (one .py) "
    "or 'application/zip' (a Python function's folder)"
)
_VERSION_CREATED = Reply(201, "A new version was created", "FunctionVersion")
_VERSION_SAME = Reply(200, "Identical to the current version: nothing changed", "FunctionVersion")


@operation(
    "Upload a function: a new immutable version that becomes current",
    _VERSION_CREATED,
    _VERSION_SAME,
    errors=(
        errors.InvalidManifest, errors.InvalidModule, errors.InvalidName, errors.ModelNotFound,
        errors.TooManyRequests, errors.MemoryQuotaExceeded, errors.HostMemoryExhausted, errors.Timeout,
    ),
    description="Either `Content-Type: application/wasm` (or a Python function's source: one `.py` as "
    "`text/x-python`, or a zip or tar of its folder) with the manifest as query parameters, or "
    "`multipart/form-data` with a file part `wasm` and a JSON part `manifest`. The module is "
    "validated, compiled and prewarmed before it is stored, so the first invocation is warm. 404 "
    "when the manifest names a model that does not exist. A body sent without a Content-Type (or as "
    "curl's default application/x-www-form-urlencoded) is taken when its bytes say which of these it is "
    "(a Python source by its import of wasminfer_guest); 415 otherwise.",
    group=MANIFEST_QUERY,
    body=Body({
        WASM: BINARY,
        **{media: BINARY for media in pysource.MEDIA_TYPES},
        MULTIPART: {
            "type": "object",
            "required": ["wasm"],
            "properties": {"wasm": BINARY, "manifest": {"$ref": "#/components/schemas/Manifest"}},
        },
    }),
    example="curl -X PUT '{base}/v1/functions/NAME?models=MODEL&memory_mb=16' "
    "-H 'content-type: application/wasm' --data-binary @fn.wasm",
)  # fmt: skip
async def put_function(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    name = request.path_params["name"]
    kind = declared_media_type(request, (WASM, MULTIPART, *pysource.MEDIA_TYPES), "function upload")
    if kind != MULTIPART:
        wasm = await read_body(request, st.settings.max_wasm_bytes, "wasm module")
        if kind is None:  # curl's defaults: the bytes say what they are, or the 415 says what to send
            kind = sniffed_media_type(wasm, (WASM, *pysource.MEDIA_TYPES), "function upload",
                                      _SEND_FUNCTION_AS)
        if kind in pysource.MEDIA_TYPES:  # a Python function's files (runtime/python.py)
            wasm = pysource.bundle(wasm, kind)
        manifest: Manifest = params["manifest"]
    else:
        if request.query_params:
            raise BadRequest(
                "with multipart/form-data the manifest goes in the 'manifest' part, not in query parameters"
            )
        wasm, manifest = await _read_multipart(request, st.settings.max_wasm_bytes)
    result = await run_admin(request, st.platform.put_function, name, wasm, manifest, tenant=who.tenant)
    return JSONResponse(result, status_code=201 if result["created"] else 200)


async def _read_multipart(request: Request, limit: int) -> tuple[bytes, Manifest]:
    # The limit covers the whole body: the module, the manifest and the multipart framing.
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, limit, "function upload"),
        max_files=1,
        max_fields=1,
        max_part_size=MAX_MANIFEST_PART_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart/form-data body: {exc.message}") from None
    try:
        unknown = sorted(set(form.keys()) - {"wasm", "manifest"})
        if unknown:
            raise BadRequest(f"unexpected part(s) {', '.join(unknown)}: send 'wasm' and 'manifest'")
        part = form.get("wasm")
        if not isinstance(part, UploadFile):
            raise BadRequest(
                "the 'wasm' part is missing or not a file part (give it a filename, "
                "e.g. curl -F wasm=@fn.wasm)"
            )
        wasm = await part.read()
        python_type = part.content_type if part.content_type in pysource.MEDIA_TYPES else None
        if python_type or wasm[:4] == pysource.ZIP_MAGIC:  # a Python function's files
            wasm = pysource.bundle(wasm, python_type or pysource.ZIP)
        text = form.get("manifest")
        if isinstance(text, UploadFile):
            text = (await text.read()).decode("utf-8", "replace")
        data: Any = {}
        if text:
            data = loads_json(text, "the 'manifest' part", MANIFEST_LIMITS, error=InvalidManifest)
        return wasm, Manifest.from_dict(data)
    finally:
        await form.close()


@operation("List functions (current versions, counters)", Reply(200, "The functions", "FunctionList"))
async def list_functions(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    functions = await run_admin(request, st.platform.list_functions, tenant=who.tenant)
    return JSONResponse({"functions": functions})


@operation(
    "A function: current version, every version, counters, instances",
    Reply(200, "The function", "Function"),
    errors=(FunctionNotFound,),
)
async def get_function(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    view = await run_admin(request, st.platform.get_function, request.path_params["name"], tenant=who.tenant)
    return JSONResponse(view)


@operation("Delete a function and all its versions", Reply(204, "Deleted"), errors=(FunctionNotFound,))
async def delete_function(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    await run_admin(request, st.platform.delete_function, request.path_params["name"], tenant=who.tenant)
    return Response(status_code=204)


@operation(
    "Every version of a function, oldest first",
    Reply(200, "The versions", "VersionList"),
    errors=(FunctionNotFound,),
)
async def list_versions(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    versions = await run_admin(request, st.platform.versions, request.path_params["name"], tenant=who.tenant)
    return JSONResponse({"versions": versions})


@operation(
    "Make an earlier version current again",
    Reply(200, "The now current version", "Function"),
    errors=(
        FunctionNotFound, errors.Conflict, errors.TooManyRequests, errors.MemoryQuotaExceeded,
        errors.HostMemoryExhausted,
    ),
    description="Without `version`: the version before the current one (409 if there is none).",
    query=(Param("version", "integer", "the version to make current", minimum=1, maximum=1 << 62),),
)  # fmt: skip
async def rollback(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    view = await run_admin(
        request, st.platform.rollback, request.path_params["name"], params["version"], tenant=who.tenant
    )
    return JSONResponse(view)


@operation(
    "Invoke a function",
    Reply(
        200,
        "The function's output, with the content type it chose",
        media="*/*",
        headers={
            "Server-Timing": "queue, start (0 when warm), run, infer and total, in ms",
            "X-Invocation-Id": "the id its log lines carry",
        },
    ),
    jobs.JOB_ACCEPTED,
    errors=(
        FunctionNotFound, errors.ModelNotAllowed, errors.ModelNotFound, errors.InvalidTensor,
        errors.TensorTooLarge, errors.GuestRejected, errors.IdempotencyKeyReused, errors.TooManyRequests,
        errors.MemoryQuotaExceeded, errors.GuestError, errors.GuestTrap, errors.MemoryLimitExceeded,
        errors.OutputLimitExceeded, errors.LogLimitExceeded, errors.InferLimitExceeded,
        errors.InferenceFailed, errors.DecoderNotFound, errors.InvalidSampling, errors.InvocationCancelled,
        errors.FunctionLoading, errors.FunctionLoadFailed, errors.LostWithIdempotentRequest, errors.Timeout,
        errors.HostMemoryExhausted,
    ),
    description="The body and its Content-Type go to the function as they are. With "
    "`Prefer: respond-async` or `?async=1` the invocation becomes a job: 202 at once, the function's "
    "answer later from `GET /v1/jobs/{id}/result`. Jobs are durable (they run after a restart) and run "
    "at least once; they use the capacity synchronous invocations leave.",
    query=(
        Param("async", "boolean", "run as a job (as `Prefer: respond-async`); 0: synchronously, "
              "whatever the headers"),
        Param("stream", "boolean", "send the parts the function writes as they come (chunked transfer; "
              "Server-Sent Events with `Accept: text/event-stream`, which streams without it); "
              "see docs/streaming.md"),
        *jobs.JOB_OPTIONS,
    ),
    headers=(Param("Prefer", "string", "`respond-async`: run as a job"), jobs.IDEMPOTENCY_KEY),
    body=Body({"*/*": BINARY}, required=False),
    example="curl -X POST {base}/v1/functions/NAME/invoke -H 'content-type: application/json' "
    "-d @request.json",
)  # fmt: skip
async def invoke(request: Request, params: Params) -> Response:
    # The headers this route reads, in one pass over the raw list: Starlette's `Headers` scans it
    # again for each, and raises and catches a KeyError for each that is absent.
    accept = prefer = False
    content_type = None
    for key, value in request.scope["headers"]:
        if key == b"content-type":
            if content_type is None:
                content_type = value
        elif key == b"accept":
            accept = True
        elif key == b"prefer":
            prefer = True
    stream = params["stream"]
    if stream or (stream is None and accept and streaming.wants_sse(request)):
        return await _invoke_streamed(request, params)
    if (prefer or params["async"] is not None) and jobs.wants_async(request, params["async"]):
        return await jobs.invoke_async(request, params)
    started = time.perf_counter()
    st = app_state(request)
    # Read before the gate: a body that trickles in must not hold async work back while it does.
    body = await read_body(request, st.settings.max_invoke_bytes, REQUEST_BODY)
    # Synchronous invocations come first: while one is in flight, async work starts no new items.
    gate = st.jobs.gate
    gate.enter()
    try:
        return await _invoke_sync(
            request, body, started, content_type.decode("latin-1") if content_type else DEFAULT_CONTENT_TYPE
        )
    finally:
        gate.exit()


async def _invoke_streamed(request: Request, params: Params) -> Response:
    if jobs.wants_async(request, params["async"]):
        raise BadRequest("a streamed invocation cannot run as a job: drop ?async / Prefer: respond-async, "
                         "or the stream (?stream, Accept: text/event-stream)")
    started = time.perf_counter()
    st = app_state(request)
    body = await read_body(request, st.settings.max_invoke_bytes, REQUEST_BODY)
    gate = st.jobs.gate
    gate.enter()
    try:
        return await streaming.invoke_stream(request, body, started)
    finally:
        gate.exit()


async def _invoke_sync(request: Request, body: bytes, started: float, content_type: str) -> Response:
    st, who = app_state(request), principal(request)
    name = request.scope["path_params"]["name"]
    try:
        result = await st.fleet.invoke(who.tenant, name, body, content_type)
    except Exception as exc:
        count_failure(st, who.tenant, name, exc, started)
        raise
    return _Raw(*answer(st, who.tenant, name, result, started))


def count_failure(st: AppState, tenant: str, name: str, exc: Exception, started: float) -> None:
    """Counts a synchronous invocation that raised `exc` (here and in the express lane)."""
    if isinstance(exc, FunctionNotFound):
        return  # not counted per function: any name would become a metric label
    code = exc.code if isinstance(exc, WasminferError) else "internal"
    st.metrics.invoked(tenant, name, code, time.perf_counter() - started)


def answer(
    st: AppState, tenant: str, name: str, result: InvokeResult, started: float
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Counts a synchronous invocation that answered, and gives its response's body and headers as
    they are written (here and in the express lane)."""
    elapsed = time.perf_counter() - started
    st.metrics.invoked(tenant, name, "ok", elapsed, result.run_us / 1e6, result.cold)
    # A guest picks its response's content type; only a plain header value may reach the client (no
    # CR/LF, nothing outside printable ASCII): anything else would corrupt or split the response.
    ctype = result.content_type
    if ctype not in _PLAIN_TYPES:
        if not is_header_value(ctype):
            ctype = DEFAULT_CONTENT_TYPE
        elif len(_PLAIN_TYPES) < 256:
            _PLAIN_TYPES.add(ctype)
    body = result.body
    # The headers as they go on the wire (what Starlette's `Response(headers=...)` makes of them,
    # without its pass over them for a length and a type to add).
    return body, [
        (b"content-type", ctype.encode("latin-1")),
        (b"server-timing", result.server_timing(elapsed * 1000)),
        (b"x-invocation-id", result.invocation_id.encode("latin-1")),
        (b"content-length", b"%d" % len(body)),
    ]  # fmt: skip


# Content types a guest chose that `is_header_value` passed: most guests answer with one or two.
_PLAIN_TYPES: set[str] = set()


class _Raw(Response):
    """A 200 with its body and its headers given as they are written."""

    def __init__(self, body: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # `Response.__call__` without what this one never has (a websocket scope, a background task).
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


@operation(
    "Recent log lines of a function (guest stdout/stderr, log calls, host events)",
    Reply(200, "The lines, oldest first", "LogLines"),
    errors=(FunctionNotFound,),
    query=(
        Param("n", "integer", "at most this many lines", default=200, minimum=0, maximum=MAX_LOG_LINES),
        Param("since", "number", "only lines after this Unix time"),
    ),
)
async def logs(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    name, n, since = request.path_params["name"], params["n"], params["since"]
    lines = await run_admin(request, st.platform.logs, name, n, since, tenant=who.tenant)
    return JSONResponse({"lines": [line.to_dict() for line in lines]})

