"""`/v1/models`: upload ONNX models (validated by loading them), read, delete."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wasminfer.gateway.bodies import read_body, require_media_type
from wasminfer.gateway.state import app_state, principal, run_admin

MODEL_MEDIA_TYPES = ("application/octet-stream", "application/onnx", "application/x-onnx")


async def put_model(request: Request) -> Response:
    st, who = app_state(request), principal(request)
    require_media_type(request, MODEL_MEDIA_TYPES, "model")
    data = await read_body(request, st.settings.max_model_bytes, "model")
    view = await run_admin(
        request, st.platform.put_model, request.path_params["name"], data, tenant=who.tenant
    )
    return JSONResponse(view, status_code=201 if view["created"] else 200)


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
