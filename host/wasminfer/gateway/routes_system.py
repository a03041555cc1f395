"""Health, readiness, metrics and the API's documentation."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wasminfer.errors import Unavailable
from wasminfer.gateway.assets import page
from wasminfer.gateway.errors import error_body
from wasminfer.gateway.openapi import openapi_document
from wasminfer.gateway.routing import Params, Reply, operation
from wasminfer.gateway.state import app_state, principal
from wasminfer.service import DEFAULT_TENANT


@operation("Liveness: the process answers", Reply(200, "Alive"))
async def healthz(request: Request, params: Params) -> Response:
    """The process answers (liveness): never touches the store."""
    return JSONResponse({"status": "ok"})


@operation(
    "Readiness: the store is loaded and everything in it redeployed",
    Reply(200, "Ready"),
    errors=(Unavailable,),
)
async def readyz(request: Request, params: Params) -> Response:
    """Ready once the store is loaded (every stored function and model redeployed)."""
    platform = app_state(request).platform
    report = platform.load_report
    if not platform.ready or report is None:
        body = error_body("unavailable", "starting: loading functions and models from the store")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    if not app_state(request).fleet.filled:
        body = error_body("unavailable", "starting: not every replica to keep (min_replicas) serves yet")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    loaded = report.to_dict()
    if loaded["failures"] and not platform.open_access:
        # Unauthenticated: what failed names tenants and functions; the server log has it.
        loaded["failures"] = [f"{len(loaded['failures'])} item(s) failed to load: see the server log"]
    return JSONResponse({"status": "ready", "loaded": loaded})


@operation(
    "Prometheus metrics",
    Reply(200, "Prometheus text format", media="text/plain"),
    description="Keys of the default tenant (the operator's) see every tenant's series; keys of another "
    "tenant see the series labelled with their own tenant and the unlabelled, process-wide ones. "
    "Invocation counters include those of replica processes that take their own connections.",
)
async def metrics(request: Request, params: Params) -> Response:
    tenant = principal(request).tenant
    state = app_state(request)
    extra = await state.fleet.counters()  # replica processes count their own invocations
    body, content_type = state.metrics.render(None if tenant == DEFAULT_TENANT else tenant, extra)
    return Response(body, headers={"content-type": content_type})


@operation(
    "Host replicas, instances per function per replica, recent scaling decisions",
    Reply(200, "The fleet as of the autoscaler's last tick", "Scaling"),
    description="Functions and instance decisions of the caller's tenant only. See docs/scaling.md.",
)
async def scaling(request: Request, params: Params) -> Response:
    """Host replicas with their instances per function, the fleet's load, recent scaling decisions
    (the caller's tenant's functions only), and this process' memory budget with the caller's quota."""
    state, tenant = app_state(request), principal(request).tenant
    return JSONResponse({**state.fleet.snapshot(tenant), "memory": state.platform.memory_view(tenant)})


@operation("This document", Reply(200, "OpenAPI 3.1"))
async def openapi(request: Request, params: Params) -> Response:
    return JSONResponse(_document(request))


@operation(
    "Interactive API documentation (Swagger UI over /openapi.json)",
    Reply(200, "HTML", media="text/html"),
    description="Every file of the page comes from this server (`/static/`); *Authorize* takes an API key "
    "for the requests sent from the page.",
)
async def docs(request: Request, params: Params) -> Response:
    return page("docs.html")


def _document(request: Request) -> dict[str, object]:
    state = app_state(request)
    if state.openapi is None:  # made once per app, from its own routes
        state.openapi = openapi_document(request.app.routes)
    return state.openapi
