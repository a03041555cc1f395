"""Health, readiness, metrics and the API's documentation."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from wasminfer.gateway.errors import error_body
from wasminfer.gateway.openapi import docs_page, openapi_document
from wasminfer.gateway.state import app_state, principal
from wasminfer.service import DEFAULT_TENANT


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
    loaded = report.to_dict()
    if loaded["failures"] and not platform.open_access:
        # Unauthenticated: what failed names tenants and functions; the server log has it.
        loaded["failures"] = [f"{len(loaded['failures'])} item(s) failed to load: see the server log"]
    return JSONResponse({"status": "ready", "loaded": loaded})


async def metrics(request: Request) -> Response:
    """Every tenant's series for the default tenant (the operator's), only its own for another."""
    body, content_type = app_state(request).metrics.render()
    tenant = principal(request).tenant
    if tenant != DEFAULT_TENANT:
        own = tenant.encode()
        body = b"\n".join(
            line for line in body.split(b"\n")
            if line.startswith(b"#") or (m := _TENANT_LABEL.search(line)) is None or m.group(1) == own
        )
    return Response(body, headers={"content-type": content_type})


_TENANT_LABEL = re.compile(rb'[{,]tenant="([^"]*)"')


async def scaling(request: Request) -> Response:
    """Host replicas with their instances per function, the fleet's load, recent scaling decisions
    (the caller's tenant's functions only), and this process' memory budget with the caller's quota."""
    state, tenant = app_state(request), principal(request).tenant
    return JSONResponse({**state.fleet.snapshot(tenant), "memory": state.platform.memory_view(tenant)})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def docs(request: Request) -> Response:
    return HTMLResponse(docs_page(str(request.base_url).rstrip("/")))
