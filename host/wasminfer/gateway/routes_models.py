"""`/v1/models`: upload ONNX models (validated by loading them) with their load options (threads,
dynamic batching), change those options, read, delete."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wasminfer import errors, sniff
from wasminfer.errors import BadRequest, ModelNotFound
from wasminfer.gateway.bodies import declared_media_type, read_body, require_media_type, sniffed_media_type
from wasminfer.gateway.routing import BINARY, Body, Params, QueryGroup, Reply, operation
from wasminfer.gateway.state import app_state, principal, run_admin
from wasminfer.model_options import MODEL_OPTION_PARAMS, parse_model_options
from wasminfer.parsing import Limits, loads_json

MODEL_MEDIA_TYPES = ("application/octet-stream", "application/onnx", "application/x-onnx")
OPTIONS_MEDIA_TYPES = ("application/json", "application/merge-patch+json")
MAX_OPTIONS_BYTES = 16 << 10
# A flat object of a handful of integers (depth 2: a list for a value is refused by name below).
OPTIONS_LIMITS = Limits(max_bytes=MAX_OPTIONS_BYTES, max_depth=2, max_values=256)
# Parsed before the body is read: a bad option costs no upload.
OPTIONS_QUERY = QueryGroup(
    "options",
    MODEL_OPTION_PARAMS,
    lambda query: parse_model_options({k: v[-1] for k, v in query.items()}, strings=True),
)
_SEND_MODEL_AS = "send it with -H 'Content-Type: application/octet-stream'"
_LOAD_ERRORS = (
    errors.InvalidModel, errors.InvalidName, errors.TooManyRequests, errors.MemoryQuotaExceeded,
    errors.HostMemoryExhausted,
)  # fmt: skip


@operation(
    "Upload an ONNX model",
    Reply(201, "A new version was created", "Model"),
    Reply(200, "Identical to the latest version: nothing changed", "Model"),
    errors=_LOAD_ERRORS,
    description="Validated by loading it into ONNX Runtime; a model whose tensors live in external files "
    "is refused. Functions using the name switch to the new version at once. Load options are query "
    "parameters; an upload states them all (missing ones take their defaults): change them alone with "
    "PATCH. A body sent without a Content-Type (or as curl's default application/x-www-form-urlencoded) "
    "is taken when its bytes are an ONNX model's (415 otherwise).",
    group=OPTIONS_QUERY,
    body=Body({MODEL_MEDIA_TYPES[0]: BINARY}),
    example="curl -X PUT {base}/v1/models/NAME -H 'content-type: application/octet-stream' "
    "--data-binary @model.onnx",
)
async def put_model(request: Request, params: Params) -> Response:
    """The body is the ONNX file; load options are query parameters (`model_options`)."""
    st, who = app_state(request), principal(request)
    declared = declared_media_type(request, MODEL_MEDIA_TYPES, "model")
    options = params["options"]
    data = await read_body(request, st.settings.max_model_bytes, "model")
    if declared is None:
        sniffed_media_type(data, (sniff.ONNX,), "model", _SEND_MODEL_AS)
    view = await run_admin(
        request, st.platform.put_model, request.path_params["name"], data, options=options, tenant=who.tenant
    )
    return JSONResponse(view, status_code=201 if view["created"] else 200)


@operation(
    "Change a model's load options (threads, dynamic batching)",
    Reply(201, "A new version was created", "Model"),
    Reply(200, "The options were already these: nothing changed", "Model"),
    errors=(ModelNotFound, *_LOAD_ERRORS),
    description="The latest version's bytes are loaded again with its options merged with these (null: "
    "back to the default) and stored as a new version. Turning batching off (max_batch_size 0) drops its "
    "other options.",
    body=Body({OPTIONS_MEDIA_TYPES[0]: {"$ref": "#/components/schemas/ModelOptions"}}),
    example="curl -X PATCH {base}/v1/models/NAME -H 'content-type: application/json' "
    "-d '{\"max_batch_size\": 32, \"max_queue_delay_us\": 2000}'",
)
async def patch_model(request: Request, params: Params) -> Response:
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


@operation("List models (latest versions)", Reply(200, "The models", "ModelList"))
async def list_models(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    return JSONResponse({"models": await run_admin(request, st.platform.list_models, tenant=who.tenant)})


@operation(
    "A model: inputs, outputs, versions, options, load time, memory, run and batching counters",
    Reply(200, "The model", "Model"),
    errors=(ModelNotFound,),
)
async def get_model(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    return JSONResponse(
        await run_admin(request, st.platform.get_model, request.path_params["name"], tenant=who.tenant)
    )


@operation(
    "Delete a model",
    Reply(204, "Deleted"),
    errors=(ModelNotFound, errors.Conflict),
    description="409 while any function's current manifest names it.",
)
async def delete_model(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    await run_admin(request, st.platform.delete_model, request.path_params["name"], tenant=who.tenant)
    return Response(status_code=204)
