"""The express lane: synchronous invocations answered by the server's protocol itself, without ASGI.

An invocation of a small model spends more of its GIL time in the HTTP server's plumbing than in
its guest and model: uvicorn builds a scope, a request-response cycle with an `asyncio.Event`, and
an asyncio task per request, then the app awaits `receive` and makes two `send` messages that are
turned back into bytes (`bench/hotpath.py`'s profile). For the requests where that machinery
changes nothing but the cost, the protocol (`connections.GuardedHttpToolsProtocol`) hands the
parsed request to `Express.serve` as soon as its body is complete, and writes the answer itself.

Which requests: `POST /v1/functions/{name}/invoke` with no query string, a `Content-Length`
within `max_invoke_bytes` (its body held as it comes, each next piece within `body_timeout_s` or
the general path's 408, `bodies.body_timed_out`), no `Transfer-Encoding`, no `Expect`, no `Prefer`
and no `Accept` naming `text/event-stream` (so: no job, no stream), on a client connection with no
earlier request still being answered, on a server that keeps no access log (`wasminfer serve
--access-log` logs every request the general way); from a caller whose key is valid and has the
`invoke` scope; for a function that `Fleet.invoke_now` can run to its end on the event loop (the
inline policy's short functions, with room under every admission bound and nothing queued).
Everything else, and every request that would be refused before it reaches the function (no key,
a wrong key, an unknown function, a body over the limit, a server still loading), takes the
general path: uvicorn, `gateway.direct`, the route and its handlers, which then answer as always.
A request passed on has had nothing done for it (but a moment in the jobs gate's count, when the
fleet passes it back).

Once the function runs here, what the general path does is done the same, by the same code: the
jobs gate held around it, the metrics (`routes_functions.count_failure`, `answer`), Server-Timing,
the invocation id, every error rendered by `errors.error_response`, the default headers uvicorn
writes (`date`, `server`), `connection: close` where uvicorn would close, and in a process sharing
the port its `Wasminfer-Replica` tag and its share of connections to close (`closes`, `tagged`).
tests/test_express.py sends both paths every case and compares status, headers and body.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from wasminfer.errors import WasminferError
from wasminfer.gateway.auth import INVOKE, authenticate_header
from wasminfer.gateway.errors import error_response, internal_error_response
from wasminfer.gateway.routes_functions import DEFAULT_CONTENT_TYPE, answer, count_failure
from wasminfer.gateway.state import AppState

log = logging.getLogger("wasminfer.gateway")

Headers = list[tuple[bytes, bytes]]


class ProcessTags(Protocol):
    """What a process sharing the port adds to its answers (`replica.ProcessApp`)."""

    def closes(self, from_client: bool) -> bool: ...

    def tagged(self, headers: Headers) -> Headers: ...


class Express:
    """The express lane of one server: `serve` answers a request or passes it on (see the module)."""

    def __init__(self, state: AppState, process: ProcessTags | None = None) -> None:
        self.state = state
        self.process = process
        self.max_body = state.settings.max_invoke_bytes
        self.body_timeout_s = state.settings.body_timeout_s
        self.served = 0  # requests answered here (the rest went the general way)

    def serve(self, name: str, content_type: bytes | None, authorization: bytes | None,
              body: bytes) -> tuple[int, Headers, bytes, bool] | None:
        """The answer to `POST /v1/functions/{name}/invoke` with `body` and these headers (the first of
        each; the protocol has checked the others): status, headers (after the server's default
        ones), body and whether to close the connection after it; or None, having done nothing,
        for the general path. Never raises."""
        started = time.perf_counter()
        st = self.state
        key = None if authorization is None else authorization.decode("latin-1")
        try:
            who = authenticate_header(st.platform, key)
        except WasminferError:
            return None  # the route's 401, with its words
        if not who.allows(INVOKE):
            return None  # its 403
        ctype = content_type.decode("latin-1") if content_type is not None else DEFAULT_CONTENT_TYPE
        gate = st.jobs.gate  # synchronous invocations come first, as on the route
        gate.enter()
        try:
            result = st.fleet.invoke_now(who.tenant, name, body, ctype)
        except Exception as exc:
            count_failure(st, who.tenant, name, exc, started)
            if isinstance(exc, WasminferError):
                response = error_response(exc)
            else:  # a bug: logged with its traceback, answered as the general path's 500
                log.exception("unexpected %s on POST /v1/functions/%s/invoke", type(exc).__name__, name)
                response = internal_error_response()
            self.served += 1
            headers = list(response.raw_headers)
            # an error's own `Connection: close` (a 408's)
            close = any(k == b"connection" and b"close" in v.lower() for k, v in headers)
            return self._finish(response.status_code, headers, bytes(response.body), close)
        finally:
            gate.exit()
        if result is None:
            return None
        self.served += 1
        out, answer_headers = answer(st, who.tenant, name, result, started)
        if self.process is None:
            return 200, answer_headers, out, False
        return self._finish(200, answer_headers, out, False)

    def _finish(
        self, status: int, headers: Headers, body: bytes, close: bool
    ) -> tuple[int, Headers, bytes, bool]:
        process = self.process
        if process is not None:
            headers = process.tagged(headers)
            if process.closes(True):
                headers.append((b"connection", b"close"))
                close = True
        return status, headers, body, close
