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
`invoke` scope. Those requests (no key, a wrong key, a body over the limit) and every other take the
general path: uvicorn, `gateway.direct`, the route and its handlers, which then answer as always. A
request passed on has had nothing done for it.

How the lane runs one:
- inline, when `Fleet.invoke_now` can run it to its end on the event loop (the inline policy's short
  functions, with room under every admission bound and nothing queued): answered in the parser's
  callback;
- otherwise `Express.later`, in a task of its own, awaits `Fleet.invoke` as the route would: the
  same admission (queued, refused, sent to a worker thread or to a replica), and the same errors for
  an unknown function or a server still loading. The connection's next request waits behind it
  (`connections.PendingExpress`). This is most of a Python function's or a large model's requests,
  and every function's first ones (the inline policy has not learned them yet): uvicorn's cycle,
  Starlette's request and the route's layers cost more than the thread hand-off.

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
from collections.abc import Coroutine
from typing import Any, Protocol

from wasminfer.errors import WasminferError
from wasminfer.gateway.auth import INVOKE, authenticate_header
from wasminfer.gateway.errors import error_response, internal_error_response
from wasminfer.gateway.routes_functions import DEFAULT_CONTENT_TYPE, answer, count_failure
from wasminfer.gateway.state import AppState
from wasminfer.replicas import InvokeResult

log = logging.getLogger("wasminfer.gateway")

Headers = list[tuple[bytes, bytes]]
#: A response as the protocol writes it: status, headers, body, and whether to close after it.
Answer = tuple[int, Headers, bytes, bool]


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
              body: bytes) -> Answer | Coroutine[Any, Any, Answer] | None:
        """The answer to `POST /v1/functions/{name}/invoke` with `body` and these headers (the first of
        each; the protocol has checked the others): status, headers (after the server's default
        ones), body and whether to close the connection after it; for an invocation that does not
        run on the event loop, a coroutine that answers once it has run (`later`); or None, having
        done nothing, for the general path. Never raises."""
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
            return self._failed(exc, who.tenant, name, started)
        finally:
            gate.exit()
        if result is None:
            return self.later(who.tenant, name, body, ctype, started)
        return self._answered(who.tenant, name, result, started)

    async def later(self, tenant: str, name: str, body: bytes, ctype: str, started: float) -> Answer:
        """What the route's `_invoke_sync` does, for an invocation `Fleet.invoke_now` did not run: the
        fleet's admission (queued, refused or routed to a replica or a worker thread), its answer or
        its error, counted the same. Raises only `asyncio.CancelledError`."""
        st = self.state
        gate = st.jobs.gate
        gate.enter()
        try:
            result = await st.fleet.invoke(tenant, name, body, ctype)
        except Exception as exc:
            return self._failed(exc, tenant, name, started)
        finally:
            gate.exit()
        return self._answered(tenant, name, result, started)

    def _answered(self, tenant: str, name: str, result: InvokeResult, started: float) -> Answer:
        self.served += 1
        out, answer_headers = answer(self.state, tenant, name, result, started)
        if self.process is None:
            return 200, answer_headers, out, False
        return self._finish(200, answer_headers, out, False)

    def _failed(self, exc: Exception, tenant: str, name: str, started: float) -> Answer:
        count_failure(self.state, tenant, name, exc, started)
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

    def _finish(
        self, status: int, headers: Headers, body: bytes, close: bool
    ) -> Answer:
        process = self.process
        if process is not None:
            headers = process.tagged(headers)
            if process.closes(True):
                headers.append((b"connection", b"close"))
                close = True
        return status, headers, body, close
