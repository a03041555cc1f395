"""The one place that turns errors into HTTP responses.

Every `WasminferError` becomes `{"error": {"code", "message"}}` of its wire form
(`WasminferError.to_dict`) with its `status` and its `http_headers()` (`Retry-After` when the caller
should wait, `WWW-Authenticate` for `Unauthorized`, `Connection: close` for `RequestTimeout`: the
rest of that body may still come, and must not be read as a next request). Starlette's own
errors (no such route, wrong method) get the same shape. Anything else is a bug: the client gets a
bare `500 internal` with no detail, and the traceback goes to the server log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ExceptionHandler

from wasminfer.errors import WasminferError

log = logging.getLogger("wasminfer.gateway")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(exc: WasminferError) -> Response:
    wire = exc.to_dict()
    return JSONResponse(
        error_body(wire["code"], wire["message"]), status_code=wire["status"], headers=exc.http_headers()
    )


async def _wasminfer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WasminferError)
    return error_response(exc)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = {404: f"no route {request.url.path}; see /docs"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


def internal_error_response() -> Response:
    """What a client gets for an exception no handler knows (a bug: no detail)."""
    return JSONResponse(error_body("internal", "internal server error"), status_code=500)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler answers, so the server logs the traceback as well.
    log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return internal_error_response()


EXCEPTION_HANDLERS: Mapping[type[Exception], ExceptionHandler] = {
    WasminferError: _wasminfer_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
