"""Request bodies under a size limit and a read timeout, and the content types an upload may have.

`read_body` refuses a body whose `Content-Length` is over the limit before reading any of it, and
stops a body that streams past the limit as soon as it does: a 2 GiB upload never sits in memory.
A body whose next bytes do not come within `Settings.body_timeout_s` is a 408 and its connection
is closed (the request's headers have their own timeout: `gateway.connections`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from types import CoroutineType

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from wasminfer import sniff
from wasminfer.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from wasminfer.gateway.state import app_state

#: What an invocation's body is called in its errors.
REQUEST_BODY = "request body"


def _too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the {what} is larger than this server's limit of {limit} bytes ({_human(limit)})"
    )


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def check_length(request: Request, limit: int, what: str) -> None:
    """Raises `PayloadTooLarge` if the declared `Content-Length` is over `limit`, `BadRequest` if it
    is not a number."""
    # The raw list, not `request.headers`: every invocation comes here, and the object and its
    # lookup cost more than this scan.
    for key, value in request.scope["headers"]:
        if key == b"content-length":
            declared = value.decode("latin-1")
            break
    else:
        return
    try:
        length = int(declared)
    except ValueError:
        raise BadRequest(f"invalid Content-Length {declared!r:.40}") from None
    if length > limit:
        raise _too_large(what, limit)


async def limited_stream(request: Request, limit: int, what: str) -> AsyncGenerator[bytes, None]:
    """The body's chunks; raises `PayloadTooLarge` once more than `limit` bytes came in,
    `RequestTimeout` when none came for `Settings.body_timeout_s`, starlette's `ClientDisconnect`
    if the client went away."""
    check_length(request, limit, what)
    idle_s = app_state(request).settings.body_timeout_s
    receive = request.receive  # not `request.stream()`: one timer per message, none per empty chunk
    received = 0
    more = True
    while more:
        chunk, more = await _next_chunk(receive, idle_s, what, received)
        received += len(chunk)
        if received > limit:
            raise _too_large(what, limit)
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, at most `limit` bytes. Raises what `limited_stream` raises, and `BadRequest`
    for a malformed Content-Length."""
    # `limited_stream`'s loop without an async generator and a list: every invocation comes here,
    # and most bodies come in one message.
    check_length(request, limit, what)
    idle_s = app_state(request).settings.body_timeout_s
    receive = request.receive
    chunks: list[bytes] = []
    received = 0
    more = True
    while more:
        chunk, more = await _next_chunk(receive, idle_s, what, received)
        received += len(chunk)
        if received > limit:
            raise _too_large(what, limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _next_chunk(receive: Receive, idle_s: float, what: str, received: int) -> tuple[bytes, bool]:
    """The next message's bytes and whether more follow. Raises `RequestTimeout` when none comes
    within `idle_s` (after `received` bytes), `ClientDisconnect` when the client went away."""
    # A message the server already holds (most invocations' whole body came with their headers)
    # is taken without arming a timer, which cost about as much as the rest of `read_body`: the
    # server's `receive` returns it without suspending. One that would suspend is closed at that
    # point, as a timeout would cancel it, and awaited again under the timer.
    pending = receive()
    if type(pending) is CoroutineType:  # (not the ABC: its isinstance is a Python call)
        try:
            pending.send(None)
        except StopIteration as done:
            return _chunk(done.value)
        pending.close()
        pending = receive()
    try:
        async with asyncio.timeout(idle_s):
            message = await pending
    except TimeoutError:
        raise body_timed_out(what, idle_s, received) from None
    return _chunk(message)


def body_timed_out(what: str, idle_s: float, received: int) -> RequestTimeout:
    """The error of a body whose next bytes did not come within `idle_s`, after `received` bytes
    (here, and in the express lane: `gateway.connections`)."""
    return RequestTimeout(
        f"no bytes of the {what} came for {idle_s:g} s (after {received} bytes); send it without pausing"
    )


def _chunk(message: Message) -> tuple[bytes, bool]:
    if message["type"] != "http.request":
        raise ClientDisconnect()
    body: bytes = message.get("body", b"")
    return body, message.get("more_body", False)


def media_type(request: Request) -> str:
    """The request's media type without parameters, lowercased ("" if none)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_media_type(request: Request, accepted: Iterable[str], what: str) -> str:
    """The request's media type if it is one of `accepted`. Raises `UnsupportedMediaType`."""
    accepted = tuple(accepted)
    got = media_type(request)
    if got not in accepted:
        raise UnsupportedMediaType(
            f"the {what} must be sent as {' or '.join(accepted)}, not {got or 'no Content-Type'}"
        )
    return got


#: What a client sends that did not say what the body is: curl's `-T` sends no Content-Type, its
#: `--data-binary` its form default. Uploads with these are named by their bytes (`sniff`).
UNDECLARED = ("", "application/x-www-form-urlencoded")


def declared_media_type(request: Request, accepted: Iterable[str], what: str) -> str | None:
    """The request's media type if it is one of `accepted`, None if the client did not say
    (`UNDECLARED`: then `sniffed_media_type` names the body once read). Raises
    `UnsupportedMediaType` for any other."""
    if media_type(request) in UNDECLARED:
        return None
    return require_media_type(request, accepted, what)


def sniffed_media_type(data: bytes, accepted: Iterable[str], what: str, hint: str) -> str:
    """The media type of an upload sent without one (`declared_media_type` said None), named by its
    bytes (`sniff.media_type`) when it is one of `accepted`. Raises `UnsupportedMediaType` whose
    message ends with `hint` (which header to send) when the bytes are something else or nothing
    certain."""
    kind = sniff.media_type(data)
    if kind is not None and kind in tuple(accepted):
        return kind
    looks = f"look like {sniff.describe(kind)}, which this route does not take" if kind else (
        "do not say for certain what it is"
    )
    raise UnsupportedMediaType(
        f"the {what} came without a Content-Type (or as application/x-www-form-urlencoded, curl's "
        f"default for --data-binary) and its bytes {looks}; {hint}"
    )
