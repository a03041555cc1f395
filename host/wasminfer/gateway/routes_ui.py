"""The web console (`/ui`) and the two read endpoints it needs beside the rest of the API:
`/v1/stats` (invocations, cold starts and latency per function, as the gateway counts them) and
`/v1/whoami` (the caller's tenant and scopes, so that the page offers only what its key may do).

The console is static files (`gateway/static/console.*`) that read the JSON API like any client:
the page asks for a key, keeps it in the tab's sessionStorage and sends it as `Authorization:
Bearer`, so it shows exactly what the API shows that key, and its controls are API calls that the
API allows or refuses as it would for any client."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wasminfer.gateway.assets import page
from wasminfer.gateway.routing import Params, Reply, operation
from wasminfer.gateway.state import app_state, principal


@operation(
    "The web console (HTML): functions, models, replicas, jobs, logs",
    Reply(200, "HTML", media="text/html"),
    description="A page for people over this API: it asks for an API key and shows what that key may "
    "read. Every file of it comes from this server (`/static/`).",
)
async def console(request: Request, params: Params) -> Response:
    return page("console.html")


@operation(
    "Invocation counters and latency histograms of the caller's functions",
    Reply(200, "Counted by this gateway since it started", "Stats"),
    description="Per function of the caller's tenant: invocations by outcome (`ok` or the error code), "
    "cold starts, and the end-to-end latency as a cumulative histogram (`[upper bound in seconds, "
    'count]` pairs ending with `"+Inf"`), the series `/metrics` has. A rate or a percentile over a '
    "window is the difference between two reads (`at` is the server's Unix time of each).",
)
async def stats(request: Request, params: Params) -> Response:
    st, who = app_state(request), principal(request)
    return JSONResponse({"at": time.time(), "functions": st.metrics.function_stats(who.tenant)})


@operation(
    "The caller: its tenant and its key's scopes",
    Reply(200, "Who the key acts as", "Whoami"),
    description="`open_access`: the server runs without keys (every request acts as the default "
    "tenant's admin).",
)
async def whoami(request: Request, params: Params) -> Response:
    who = principal(request)
    return JSONResponse(
        {
            "tenant": who.tenant,
            "scopes": sorted(who.scopes),
            "open_access": app_state(request).platform.open_access,
        }
    )
