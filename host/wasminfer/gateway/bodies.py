"""Request bodies under a size limit, and the content types an upload may have.

`read_body` refuses a body whose `Content-Length` is over the limit before reading any of it, and
stops a body that streams past the limit as soon as it does: a 2 GiB upload never sits in memory.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable

from starlette.requests import Request

from wasminfer.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType


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
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise BadRequest(f"invalid Content-Length {declared!r:.40}") from None
    if length > limit:
        raise _too_large(what, limit)


async def limited_stream(request: Request, limit: int, what: str) -> AsyncGenerator[bytes, None]:
    """The body's chunks; raises `PayloadTooLarge` once more than `limit` bytes came in."""
    check_length(request, limit, what)
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(what, limit)
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, at most `limit` bytes. Raises `PayloadTooLarge`, `BadRequest`."""
    chunks = [chunk async for chunk in limited_stream(request, limit, what)]
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
