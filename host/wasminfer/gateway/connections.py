"""The server's guard on connections: a header read timeout and a cap on the connections one client
address may hold, as a small subclass of uvicorn's httptools protocol; and its responses written
in one piece.

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`), but a request that
has started is never timed out: a client sending a header line every few seconds (slowloris) holds
its connection, and its socket, forever. Here a timer starts when a connection opens and when a
request's first byte comes on a kept-alive one; if the request line and headers are not complete
within `Settings.header_timeout_s`, the client gets a 408 and the connection is closed. (A body is
timed where it is read, `gateway.bodies`, so that its 408 comes through the error mapping.)

The same subclass writes a response in one piece (`CoalescingTransport`): uvicorn writes a
response's status line and headers, then its body, each with a `send` of its own, and each `send`
on a socket is a system call that, on loopback, also runs the receiving side's TCP path. Writes
made during one turn of the event loop go out together at the end of it: one system call per
response instead of two (for a small invocation, about a fifth of the server's CPU time went to
the two: `bench/hotpath.py`'s profile).

`guarded_protocol(settings)` is what `uvicorn.Config(http=...)` takes (`wasminfer serve` uses it).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from wasminfer.errors import RequestTimeout, TooManyRequests, WasminferError
from wasminfer.gateway.errors import error_body
from wasminfer.gateway.settings import Settings


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
    """uvicorn's httptools protocol with a header timeout and a per-address connection cap. Use a
    subclass made by `guarded_protocol`, which gives it its `limits`."""

    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_started = False  # bytes of a request came, its headers are not complete
        self._counted: str | None = None  # the address this connection counts against

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
        address, self._counted = self._counted, None
        if address is not None:
            left = self.limits.open.get(address, 1) - 1
            if left > 0:
                self.limits.open[address] = left
            else:
                self.limits.open.pop(address, None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True
        if self._header_timer is None:  # a request on a kept-alive connection: its clock starts now
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._request_started = False
        self._disarm_header_timer()
        super().on_headers_complete()

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


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` holding one server's limits and counts."""
    limits = ConnectionLimits.from_settings(settings)
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
