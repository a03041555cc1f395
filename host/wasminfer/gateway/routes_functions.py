"""`/v1/functions`: upload (immutable versions), read, delete, roll back, invoke, logs."""

from __future__ import annotations

import time
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wasminfer import pysource
from wasminfer.errors import BadRequest, FunctionNotFound, InvalidManifest, WasminferError
from wasminfer.gateway import routes_jobs as jobs
from wasminfer.gateway.bodies import limited_stream, read_body, require_media_type
from wasminfer.gateway.state import app_state, principal, run_admin
from wasminfer.manifest import Manifest
from wasminfer.parsing import Limits, loads_json
from wasminfer.syntax import is_header_value

WASM = "application/wasm"
MULTIPART = "multipart/form-data"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_LOG_LINES = 10_000
MAX_MANIFEST_PART_BYTES = 1 << 20
# A manifest nests two levels (`env` is an object); its largest lists (models, args, env) stay far
# below the values allowed.
MANIFEST_LIMITS = Limits(max_bytes=MAX_MANIFEST_PART_BYTES, max_depth=4, max_values=100_000)
# A guest picks its response's content type; only a plain header value may reach the client (no
# CR/LF, nothing outside printable ASCII): anything else would corrupt or split the response.


async def put_function(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    name = request.path_params["name"]
    kind = require_media_type(request, (WASM, MULTIPART, *pysource.MEDIA_TYPES), "function upload")
    if kind != MULTIPART:
        wasm = await read_body(request, st.settings.max_wasm_bytes, "wasm module")
        if kind in pysource.MEDIA_TYPES:  # a Python function's files (runtime/python.py)
            wasm = pysource.bundle(wasm, kind)
        query: dict[str, list[str]] = {}
        for key, value in request.query_params.multi_items():
            query.setdefault(key, []).append(value)
        manifest = Manifest.from_query(query)
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


async def list_functions(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    functions = await run_admin(request, st.platform.list_functions, tenant=who.tenant)
    return JSONResponse({"functions": functions})


async def get_function(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    view = await run_admin(request, st.platform.get_function, request.path_params["name"], tenant=who.tenant)
    return JSONResponse(view)


async def delete_function(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    await run_admin(request, st.platform.delete_function, request.path_params["name"], tenant=who.tenant)
    return Response(status_code=204)


async def list_versions(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    versions = await run_admin(request, st.platform.versions, request.path_params["name"], tenant=who.tenant)
    return JSONResponse({"versions": versions})


async def rollback(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    raw = request.query_params.get("version")
    version = _int_param("version", raw, 1, 1 << 62) if raw is not None else None
    view = await run_admin(
        request, st.platform.rollback, request.path_params["name"], version, tenant=who.tenant
    )
    return JSONResponse(view)


async def invoke(request: Request) -> Response:
    if jobs.wants_async(request):
        return await jobs.invoke_async(request)
    # Synchronous invocations come first: while one is in flight, async work starts no new items.
    gate = app_state(request).jobs.gate
    gate.enter()
    try:
        return await _invoke_sync(request)
    finally:
        gate.exit()


async def _invoke_sync(request: Request) -> Response:
    started = time.perf_counter()
    st, who = app_state(request), principal(request)
    name = request.path_params["name"]
    body = await read_body(request, st.settings.max_invoke_bytes, "request body")
    content_type = request.headers.get("content-type") or DEFAULT_CONTENT_TYPE
    try:
        result = await st.fleet.invoke(who.tenant, name, body, content_type)
    except FunctionNotFound:
        raise  # not counted per function: any name would become a metric label
    except WasminferError as exc:
        st.metrics.invoked(who.tenant, name, exc.code, time.perf_counter() - started)
        raise
    except Exception:
        st.metrics.invoked(who.tenant, name, "internal", time.perf_counter() - started)
        raise
    elapsed = time.perf_counter() - started
    st.metrics.invoked(who.tenant, name, "ok", elapsed, result.run_us / 1e6, result.cold)
    ctype = result.content_type
    if not is_header_value(ctype):
        ctype = DEFAULT_CONTENT_TYPE
    return Response(
        result.body,
        headers={
            "content-type": ctype,
            "server-timing": f"{result.server_timing()}, total;dur={elapsed * 1000:.3f}",
            "x-invocation-id": result.invocation_id,
        },
    )


async def logs(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    params = request.query_params
    n = _int_param("n", params.get("n"), 0, MAX_LOG_LINES) if "n" in params else 200
    since = _float_param("since", params["since"]) if "since" in params else None
    lines = await run_admin(
        request, st.platform.logs, request.path_params["name"], n, since, tenant=who.tenant
    )
    return JSONResponse({"lines": [line.to_dict() for line in lines]})


def _int_param(key: str, raw: str | None, lo: int, hi: int) -> int:
    try:
        value = int(raw or "")
    except ValueError:
        raise BadRequest(f"query parameter {key!r} must be an integer, got {raw!r:.40}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {key!r} must be between {lo} and {hi}, got {value}")
    return value


def _float_param(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {key!r} must be a number, got {raw!r:.40}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"query parameter {key!r} must be a finite number")
    return value
