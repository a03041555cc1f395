"""Streamed invocations: the parts a function writes while it runs, sent as they come.

`POST /v1/functions/{name}/invoke?stream=1` answers with HTTP chunked transfer (each part as the
guest wrote it); with `Accept: text/event-stream` as Server-Sent Events (each part one `data`
event, split at its line breaks as the format wants; `event: end` with the invocation id closes
a stream that succeeded). Until the first part the answer is not started, so a failure before it
(an unknown function, a model the manifest does not allow, a limit) is the usual JSON error with
its status. A failure after it cannot change the status any more: the stream ends with the error
in the body — SSE: `event: error` whose data is `{"error": {"code", "message", "status"}}`;
chunked: a last line `\\n{"error": {...}}\\n` of the same JSON — and the connection closes normally.
The manifest's limits hold for the whole stream: `timeout_ms` from the start of the invocation to
its last part, `max_output_bytes` over all its parts. A client that goes away cancels the guest
(at its next part, or within an epoch slice while it computes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from wasminfer.errors import FunctionNotFound, InvocationCancelled, WasminferError
from wasminfer.gateway.state import app_state, principal
from wasminfer.replicas import InvokeResult, OutputStream
from wasminfer.syntax import is_header_value

SSE = "text/event-stream"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_DONE = object()  # the queue's last item: the invocation's task finished


def wants_sse(request: Request) -> bool:
    """Whether the client asked for Server-Sent Events (`Accept: text/event-stream`)."""
    accept = request.headers.get("accept", "")
    return any(part.split(";", 1)[0].strip().lower() == SSE for part in accept.split(","))


def sse_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE event: each line of `data` (split at CR LF, CR or LF) its own `data:` field."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    head = f"event: {event}\n".encode() if event else b""
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def error_json(exc: BaseException) -> bytes:
    wire = exc.to_dict() if isinstance(exc, WasminferError) else {
        "code": "internal", "message": "internal server error", "status": 500}
    return json.dumps({"error": wire}, separators=(",", ":")).encode()


class _Invocation:
    """One streamed invocation in flight: its task on the fleet and the queue of its parts."""

    def __init__(self, request: Request, body: bytes, content_type: str) -> None:
        self.st, self.tenant = app_state(request), principal(request).tenant
        self.name = request.path_params["name"]
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(chunk: bytes, ctype: str) -> None:  # on the guest's thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (chunk, ctype))

        self.stream = OutputStream(deliver)
        self.task: asyncio.Task[InvokeResult] = asyncio.ensure_future(
            self.st.fleet.stream(self.tenant, self.name, body, content_type, self.stream)
        )
        # Scheduled after every `deliver` of the guest's thread (they came before it returned).
        self.task.add_done_callback(lambda _t: self.queue.put_nowait(_DONE))

    def cancel(self, why: str) -> None:
        error = InvocationCancelled(f"the invocation of function {self.name!r} was cancelled: {why}")
        self.stream.cancel(error)


async def invoke_stream(request: Request, body: bytes, started: float) -> Response:
    """Runs an invocation whose parts are sent as they come (module docstring). Raises, before the
    first part, what `Fleet.stream` raises."""
    sse = wants_sse(request)
    inv = _Invocation(request, body, request.headers.get("content-type") or DEFAULT_CONTENT_TYPE)
    first = await _first(request, inv)
    ttfb = time.perf_counter() - started
    if first is _DONE and inv.task.exception() is not None:
        exc = inv.task.exception()
        assert exc is not None
        _count(inv, exc, started)
        raise exc
    if first is _DONE:
        result = inv.task.result()
        ctype, invocation_id = result.content_type, result.invocation_id
    else:
        ctype, invocation_id = first[1], inv.stream.invocation_id
    inv.st.metrics.first_byte(inv.tenant, inv.name, ttfb)
    headers = {"cache-control": "no-cache", "x-invocation-id": invocation_id}
    if sse:
        headers["x-accel-buffering"] = "no"  # proxies must not hold events back
    media = SSE if sse else (ctype if is_header_value(ctype) else DEFAULT_CONTENT_TYPE)
    return StreamingResponse(_parts(inv, first, sse, started), headers=headers, media_type=media)


async def _first(request: Request, inv: _Invocation) -> Any:
    """The first item of the queue; a client that leaves meanwhile cancels the guest."""
    gone = asyncio.ensure_future(_disconnected(request))
    getter = asyncio.ensure_future(inv.queue.get())
    try:
        await asyncio.wait((gone, getter), return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            inv.cancel("the client disconnected")
        return await getter
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _parts(inv: _Invocation, first: Any, sse: bool, started: float) -> AsyncIterator[bytes]:
    item = first
    try:
        while item is not _DONE:
            chunk = item[0]
            yield sse_event(chunk) if sse else chunk
            item = await inv.queue.get()
        exc = inv.task.exception()
        if exc is not None:
            yield sse_event(error_json(exc), "error") if sse else b"\n" + error_json(exc) + b"\n"
            _count(inv, exc, started)
            return
        result = inv.task.result()
        if result.body:  # what the guest set with `output`: the last part
            yield sse_event(result.body) if sse else result.body
        if sse:
            sent = inv.stream.bytes + len(result.body)
            end = json.dumps({"invocation_id": result.invocation_id, "bytes": sent})
            yield sse_event(end.encode(), "end")
        inv.st.metrics.invoked(inv.tenant, inv.name, "ok", time.perf_counter() - started,
                               result.run_us / 1e6, result.cold)
    except BaseException:  # the client went away (cancelled) or the send failed
        inv.cancel("the client disconnected")  # the guest ends at its next part; its states go with it
        # Counted when the guest has ended (awaiting it here would be cancelled again at once).
        inv.task.add_done_callback(lambda t: _count(inv, _outcome(t), started))
        raise


def _outcome(task: asyncio.Task[InvokeResult]) -> BaseException:
    if task.cancelled():
        return InvocationCancelled("the invocation was cancelled")
    return task.exception() or InvocationCancelled("the client disconnected after the last part")


def _count(inv: _Invocation, exc: BaseException, started: float) -> None:
    if isinstance(exc, FunctionNotFound):
        return  # not counted per function: any name would become a metric label
    code = exc.code if isinstance(exc, WasminferError) else "internal"
    inv.st.metrics.invoked(inv.tenant, inv.name, code, time.perf_counter() - started)


__all__ = ["SSE", "invoke_stream", "sse_event", "wants_sse"]
