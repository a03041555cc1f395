"""Health, readiness, metrics and the API's documentation."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from wasminfer.gateway.errors import error_body
from wasminfer.gateway.openapi import docs_page, openapi_document
from wasminfer.gateway.state import app_state


async def healthz(request: Request) -> Response:
    """The process answers (liveness): never touches the store."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready once the store is loaded (every stored function and model redeployed)."""
    platform = app_state(request).platform
    report = platform.load_report
    if not platform.ready or report is None:
        body = error_body("unavailable", "starting: loading functions and models from the store")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "loaded": report.to_dict()})


async def metrics(request: Request) -> Response:
    body, content_type = app_state(request).metrics.render()
    return Response(body, headers={"content-type": content_type})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def docs(request: Request) -> Response:
    return HTMLResponse(docs_page(str(request.base_url).rstrip("/")))
