"""The server's protocol: a header read timeout and a cap on the connections one client address may
hold, as a small subclass of uvicorn's httptools protocol; its responses written in one piece; and
the invoke route's express lane.

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`), but a request that
has started is never timed out: a client sending a header line every few seconds (slowloris) holds
its connection, and its socket, forever. Here a timer starts when a connection opens, and on a
kept-alive one at the end of the read that brought a request's first bytes when its headers did not
all come in it; if the request line and headers are not complete within `Settings.header_timeout_s`,
the client gets a 408 and the connection is closed. (A body is timed where it is read,
`gateway.bodies`, so that its 408 comes through the error mapping.)

The express lane (`gateway.express`): a synchronous invocation is answered from the parser's
callbacks once its body is complete, without uvicorn's ASGI cycle (a body that comes in pieces is
held, each piece within `body_timeout_s` or the general path's 408), or, when it does not run on the
event loop, by a task that writes its answer once it has run, a `PendingExpress` standing in for
uvicorn's cycle meanwhile; any request the lane does not take, or passes back, goes on as
uvicorn's own.

The same subclass writes a response in one piece (`CoalescingTransport`): uvicorn writes a
response's status line and headers, then its body, each with a `send` of its own, and each `send`
on a socket is a system call that, on loopback, also runs the receiving side's TCP path. Writes
made during one turn of the event loop go out together at the end of it: one system call per
response instead of two (for a small invocation, about a fifth of the server's CPU time went to
the two: `bench/hotpath.py`'s profile). The express lane's responses are one piece already, but
they wait for the end of the turn too: written at once (a transport write in the parser's
callback), digits at concurrency 16 took 0.127 ms of server CPU per invocation against 0.100 and
lost a quarter of its throughput (each answer then wakes its client before the turn has read the
other connections' requests).

`guarded_protocol(settings)` is what `uvicorn.Config(http=...)` takes (`wasminfer serve` uses it).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from wasminfer.errors import RequestTimeout, TooManyRequests, WasminferError
from wasminfer.gateway.bodies import REQUEST_BODY, body_timed_out
from wasminfer.gateway.errors import error_body, error_response
from wasminfer.gateway.settings import Settings
from wasminfer.syntax import NAME_REGEX

if TYPE_CHECKING:
    from wasminfer.gateway.express import Answer, Express

_INVOKE_HEAD, _INVOKE_TAIL = b"/v1/functions/", b"/invoke"
# A function's name as the express lane takes it from the path (no escapes): any other goes the
# general way, which decodes it and answers (no such function can exist).
_NAME = re.compile(NAME_REGEX.encode())


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop reach the socket as one write,
    at the end of that turn (see the module doc); everything else is the wrapped transport's.
    Pending bytes past `FLUSH_BYTES` are written at once: a streamed answer whose parts come
    without a pause still meets the transport's flow control (`pause_writing`). `close()` and
    `write_eof()` send what is pending first; `abort()` drops it, as the transport's own drops its
    buffer."""

    FLUSH_BYTES = 64 << 10

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if type(data) is not bytes:  # a caller may reuse its buffer once `write` returns
            data = bytes(data)
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._size = len(data)
            self._loop.call_soon(self.flush)
        else:
            pending.append(data)
            self._size += len(data)
        if self._size > self.FLUSH_BYTES:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Writes what is pending to the transport now (the turn's scheduled flush then finds
        nothing)."""
        pending, self._pending, self._size = self._pending, None, 0
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending, self._size = None, 0
        self._transport.abort()

    def is_closing(self) -> bool:  # (asked after every response: `__getattr__` is a Python call)
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class PendingExpress:
    """An express request answered later (`Express.later`), standing where uvicorn keeps a request's
    cycle (`protocol.cycle`) until its answer is written: uvicorn then queues the connection's next
    requests behind it as behind one of its own, marks it `disconnected` when the client goes, and
    clears `keep_alive` at the server's shutdown."""

    __slots__ = ("keep_alive", "response_complete", "disconnected", "message_event")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.message_event = self  # (uvicorn sets it when the connection is lost: nothing waits)

    def set(self) -> None:
        pass


@dataclass
class ConnectionLimits:
    """The limits of one server, and the connections it counts per client address."""

    header_timeout_s: float
    max_per_client: int  # 0: no cap
    exempt: frozenset[str]
    open: dict[str, int] = field(default_factory=dict)  # client address -> connections open now

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            settings.header_timeout_s,
            settings.max_connections_per_client,
            frozenset(settings.connection_cap_exempt),
        )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a per-address connection cap and the
    invoke route's express lane (`gateway.express`). Use a subclass made by `guarded_protocol`,
    which gives it its `limits` and its `express` (None: every request goes the general way)."""

    limits: ConnectionLimits
    express: Express | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_started = False  # bytes of a request came, its headers are not complete
        self._counted: str | None = None  # the address this connection counts against
        # An express request whose body is coming: its function's name, Content-Type and
        # Authorization header, and the body's pieces.
        self._express_request: tuple[str, bytes | None, bytes | None] = ("", None, None)
        self._express_body: list[bytes] | None = None
        self._body_timer: asyncio.TimerHandle | None = None  # while the rest of its body is to come
        # The keep-alive timeout after express responses: uvicorn arms and cancels a timer for each
        # response; here one timer checks when the connection went idle (None: busy since).
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        limits = self.limits
        address = self.client[0] if self.client else None
        if limits.max_per_client and address is not None and address not in limits.exempt:
            held = limits.open.get(address, 0)
            if held >= limits.max_per_client:
                self._refuse(
                    TooManyRequests(
                        f"this address already has {held} connections open (the server's limit per "
                        "client address); reuse them, or close some and retry"
                    )
                )
                return
            limits.open[address] = held + 1
            self._counted = address
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._disarm_body_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._express_body = None
        address, self._counted = self._counted, None
        if address is not None:
            left = self.limits.open.get(address, 1) - 1
            if left > 0:
                self.limits.open[address] = left
            else:
                self.limits.open.pop(address, None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        # uvicorn's, but the request's ASGI scope is made only when it goes the general way
        # (`_general_headers`): an express request never needs it.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        # A request on a kept-alive connection: its clock starts at the end of this read (in
        # `data_received`) unless its headers complete in it, as most do: no timer to make and
        # cancel for each of those.
        self._request_started = True

    def on_headers_complete(self) -> None:
        self._request_started = False
        if self._header_timer is not None:
            self._disarm_header_timer()
        if self.express is None or not self._takes_express():
            self._general_headers()

    def _general_headers(self) -> None:
        """uvicorn's `on_headers_complete`, after its `on_message_begin` has made the request's scope
        (keeping what the parser's callbacks gathered since)."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers
        super().on_headers_complete()

    # -- the express lane (gateway.express) -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        super().data_received(data)
        if self._request_started and self._header_timer is None:
            self._arm_header_timer()
        if self._express_body is not None:  # the rest of its body is to come
            if self.transport.is_closing():  # (a malformed rest: uvicorn answered 400 and closed)
                self._express_body = None
            else:  # it must come as the general path's would: each next piece within the timeout
                self._arm_body_timer()

    def on_body(self, body: bytes) -> None:
        if self._express_body is not None:
            self._express_body.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._express_body is not None:
            self._serve_express()
        else:
            super().on_message_complete()

    def _takes_express(self) -> bool:
        """Whether the request whose headers just came goes the express way (see `gateway.express`:
        the lane's conditions on the request's line and headers, checked here where the parser has
        them; those on the caller and the function, `Express.serve` checks)."""
        url = self.url
        if not (url.startswith(_INVOKE_HEAD) and url.endswith(_INVOKE_TAIL)) or self.root_path:
            return False
        name = url[len(_INVOKE_HEAD):-len(_INVOKE_TAIL)]
        if _NAME.fullmatch(name) is None:
            return False
        if self.parser.get_method() != b"POST" or self.client is None or self.expect_100_continue:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False  # a pipelined request waits for the one before, the general way
        if self.limit_concurrency is not None or self.access_log or self.parser.should_upgrade():
            return False
        length = authorization = content_type = None
        for key, value in self.headers:
            if key == b"content-length":
                if length is not None or not value.isdigit():
                    return False
                length = int(value)
            elif key == b"content-type":
                if content_type is None:
                    content_type = value
            elif key == b"authorization":
                if authorization is None:
                    authorization = value
            elif key == b"transfer-encoding" or key == b"prefer" or (
                    key == b"accept" and b"event-stream" in value.lower()):
                return False  # a body in chunks; maybe a job or a stream: the route decides
        assert self.express is not None
        if length is not None and length > self.express.max_body:
            return False
        self._express_request = (name.decode("ascii"), content_type, authorization)
        self._express_body = []
        return True

    def _serve_express(self) -> None:
        assert self.express is not None and self._express_body is not None
        if self._body_timer is not None:
            self._disarm_body_timer()
        chunks, self._express_body = self._express_body, None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        answer = self.express.serve(*self._express_request, body)
        if answer is None:
            self._to_general(body)
            super().on_message_complete()
            return
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        if type(answer) is tuple:
            status, headers, out, close = answer
            self._write_response(status, headers, out, close, keep_alive and not close)
            return
        # Answered later (`Express.later`): the connection's next request waits behind it.
        pending = self.cycle = PendingExpress(keep_alive)  # type: ignore[assignment]
        task = self.loop.create_task(self._answer_later(answer, pending))  # type: ignore[arg-type]
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_later(self, answer: Coroutine[Any, Any, Answer], pending: PendingExpress) -> None:
        """Writes the answer of an express request run in a task, as uvicorn ends a request's cycle:
        then the requests that came meanwhile (pipelined, queued behind `pending`) go on."""
        try:
            status, headers, out, close = await answer
        except BaseException:  # cancelled (the server's shutdown gave up waiting)
            pending.response_complete = True
            self.transport.close()
            raise
        pending.response_complete = True
        if pending.disconnected or self.transport.is_closing():
            return
        keep_alive = pending.keep_alive and not close  # (`shutdown` clears it meanwhile)
        self._write_response(status, headers, out, close, keep_alive, uvicorn_ends=True)

    def _write_response(
        self, status: int, headers: list[tuple[bytes, bytes]], out: bytes, close: bool, keep_alive: bool,
        uvicorn_ends: bool = False,
    ) -> None:
        """Writes a response as uvicorn would (its default headers first; `close`: the headers say
        `Connection: close` already), and closes the connection after it unless `keep_alive`.
        `uvicorn_ends`: uvicorn's `on_response_complete` follows (a request answered later: its
        keep-alive timeout, and the pipelined requests queued behind it)."""
        lines = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            lines += [name, b": ", value, b"\r\n"]
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        if not keep_alive and not close:  # (`close`: the headers say so already)
            lines.append(b"connection: close\r\n")
        lines += [b"\r\n", out]
        self.transport.write(b"".join(lines))
        if not keep_alive:
            self.transport.close()
        if uvicorn_ends:
            self.on_response_complete()
            return
        # uvicorn's `on_response_complete` for a request the lane answered at once, which is never
        # pipelined and never pauses reading: the count, and the keep-alive timeout from now.
        self.server_state.total_requests += 1
        if keep_alive:
            self._idle_since = self.loop.time()
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        """uvicorn's keep-alive timeout, for a connection whose last response was the lane's: closed
        once it has been idle that long (a request since, of either path, takes it over)."""
        self._idle_timer = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # busy: the response that ends it times the connection again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()

    def _to_general(self, body: bytes) -> None:
        """The express request goes the general way, its body complete: uvicorn's cycle and ASGI
        task."""
        self._general_headers()
        if body:
            super().on_body(body)

    def _arm_body_timer(self) -> None:
        assert self.express is not None
        self._disarm_body_timer()
        self._body_timer = self.loop.call_later(self.express.body_timeout_s, self._body_too_slow)

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        """The express request's next bytes did not come in time: the general path's 408."""
        self._body_timer = None
        chunks, self._express_body = self._express_body, None
        if chunks is None or self.transport.is_closing():
            return
        assert self.express is not None
        exc = body_timed_out(REQUEST_BODY, self.express.body_timeout_s, sum(map(len, chunks)))
        r = error_response(exc)
        self._write_response(r.status_code, list(r.raw_headers), bytes(r.body), True, False)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request is slow while the one before it is answered: close after that answer.
            self.cycle.keep_alive = False
            return
        if not self._request_started:  # opened and never used: nothing to answer
            self.transport.close()
            return
        limit = self.limits.header_timeout_s
        self._refuse(
            RequestTimeout(
                f"the request's line and headers did not come within {limit:g} s; send them at once"
            )
        )

    def _refuse(self, exc: WasminferError) -> None:
        """Writes `exc` as the response and closes the connection (no request is read any more)."""
        body = json.dumps(error_body(exc.code, exc.message)).encode()
        lines = [STATUS_LINE[exc.status]]
        for name, value in self.server_state.default_headers:
            lines += [name, b": ", value, b"\r\n"]
        for header, text in exc.http_headers().items():
            if header.lower() != "connection":  # written below, for every refusal
                lines += [header.lower().encode(), b": ", text.encode(), b"\r\n"]
        lines += [
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(lines))
        self.transport.close()


def guarded_protocol(settings: Settings, express: Express | None = None) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` holding one server's limits and counts, and
    its express lane (`gateway.express`; None, or `Settings.express` off: none)."""
    limits = ConnectionLimits.from_settings(settings)
    lane = express if settings.express else None
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits, "express": lane})
