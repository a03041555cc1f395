"""`/v1/models`: upload ONNX models (validated by loading them) with their load options (threads,
dynamic batching), change those options, read, delete."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wasminfer.errors import BadRequest
from wasminfer.gateway.bodies import read_body, require_media_type
from wasminfer.gateway.state import app_state, principal, run_admin
from wasminfer.model_options import parse_model_options
from wasminfer.parsing import Limits, loads_json

MODEL_MEDIA_TYPES = ("application/octet-stream", "application/onnx", "application/x-onnx")
OPTIONS_MEDIA_TYPES = ("application/json", "application/merge-patch+json")
MAX_OPTIONS_BYTES = 16 << 10
# A flat object of a handful of integers (depth 2: a list for a value is refused by name below).
OPTIONS_LIMITS = Limits(max_bytes=MAX_OPTIONS_BYTES, max_depth=2, max_values=256)


async def put_model(request: Request) -> Response:
    """The body is the ONNX file; load options (`max_batch_size`, `max_queue_delay_us`,
    `max_concurrent_batches`, `intra_op_threads`, `inter_op_threads`) are query parameters."""
    st, who = app_state(request), principal(request)
    require_media_type(request, MODEL_MEDIA_TYPES, "model")
    query: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key in query:
            raise BadRequest(f"query parameter {key} is given twice")
        query[key] = value
    options = parse_model_options(query, strings=True)  # before the body: a bad option costs no upload
    data = await read_body(request, st.settings.max_model_bytes, "model")
    view = await run_admin(
        request, st.platform.put_model, request.path_params["name"], data, options=options, tenant=who.tenant
    )
    return JSONResponse(view, status_code=201 if view["created"] else 200)


async def patch_model(request: Request) -> Response:
    """A JSON object of load options to change (null: back to the default); the model's latest
    bytes are loaded again with them as a new version (200 with the model's view)."""
    st, who = app_state(request), principal(request)
    require_media_type(request, OPTIONS_MEDIA_TYPES, "model options")
    body = await read_body(request, MAX_OPTIONS_BYTES, "model options")
    data: Any = loads_json(body, "the body", OPTIONS_LIMITS)
    if not isinstance(data, dict) or not data:
        raise BadRequest('send a JSON object of the options to change, e.g. {"max_batch_size": 32}')
    changes = parse_model_options(data)
    view = await run_admin(
        request, st.platform.patch_model, request.path_params["name"], changes, tenant=who.tenant
    )
    return JSONResponse(view)


async def list_models(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    return JSONResponse({"models": await run_admin(request, st.platform.list_models, tenant=who.tenant)})


async def get_model(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    return JSONResponse(
        await run_admin(request, st.platform.get_model, request.path_params["name"], tenant=who.tenant)
    )


async def delete_model(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    await run_admin(request, st.platform.delete_model, request.path_params["name"], tenant=who.tenant)
    return Response(status_code=204)
