"""API keys on requests: `Authorization: Bearer KEY`, and the scope each route needs.

A route declares its scope where the app lists it (`route("POST", path, INVOKE, handler)`, which
wraps the handler in `scoped`); the wrapper finds the
caller's `Principal` (tenant and scopes) before the handler runs. No key: 401. A key without the
scope: 403. With no key configured anywhere the platform is in open access (the server then binds to
loopback only): every request acts as the default tenant's admin.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from wasminfer.errors import Forbidden, Unauthorized
from wasminfer.gateway.state import PRINCIPAL, app_state
from wasminfer.service import DEFAULT_TENANT, Platform, Principal

ADMIN, INVOKE, READ = "admin", "invoke", "read"
PUBLIC = None  # the scope of a route anyone may call

Endpoint = Callable[[Request], Awaitable[Response]]

OPEN_ACCESS = Principal(DEFAULT_TENANT, frozenset({ADMIN}))


def authenticate(request: Request) -> Principal:
    """The caller of `request`. Raises `Unauthorized` for a missing, malformed or unknown key."""
    return authenticate_header(app_state(request).platform, request.headers.get("authorization"))


def authenticate_header(platform: Platform, header: str | None) -> Principal:
    """The caller whose request has `header` as its (first) Authorization header, None: none.
    Raises `Unauthorized` for a missing, malformed or unknown key."""
    if platform.open_access:
        return OPEN_ACCESS
    if header is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer KEY'")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("malformed Authorization header: expected 'Bearer KEY'")
    who = platform.authenticate(key)
    if who is None:
        raise Unauthorized("invalid or revoked API key")
    return who


def scoped(scope: str, endpoint: Endpoint) -> Endpoint:
    """`endpoint`, callable only with a key that grants `scope` (`admin` grants every scope)."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        who = authenticate(request)
        if not who.allows(scope):
            raise Forbidden(
                f"this API key lacks the {scope!r} scope needed for {request.method} "
                f"{request.url.path} (it has: {', '.join(sorted(who.scopes)) or 'none'})"
            )
        request.scope[PRINCIPAL] = who
        return await endpoint(request)

    return guarded
