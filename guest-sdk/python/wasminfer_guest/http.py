"""`Request` and `Response`, with helpers for JSON, CBOR and text bodies."""

from __future__ import annotations

import json as _json
from typing import Any

from wasminfer_guest import cbor as _cbor
from wasminfer_guest.tensor import Tensor

JSON = "application/json"
CBOR = "application/cbor"
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"
#: `json.dumps(value, separators=(",", ":"))`, its encoder made once rather than at every call.
_JSON_ENCODE = _json.JSONEncoder(separators=(",", ":")).encode
# Tuples, not `bytes | bytearray | memoryview`: a union written in an `isinstance` call is built
# again at each call (~1 µs in the runtime's interpreter, which runs compiled to Wasm).
_BYTES_LIKE = (bytes, bytearray, memoryview)
_JSON_LIKE = (dict, list)
_MEDIA_TYPES: dict[str, str] = {}  # content type -> its media type (`Request.media_type`)


class Reject(ValueError):
    """Raised by a handler to turn its input down with an HTTP client-error status (400-499):
    the caller gets that status and `message` (code `rejected_by_function`).

    `Request.json()`, `.cbor()` and `.text()` raise it with 400 for a body that does not parse.
    """

    def __init__(self, status: int, message: str) -> None:
        if not 400 <= status <= 499:
            raise ValueError(f"a rejection's status is 400-499, not {status}")
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One invocation's input: the body and its content type as the caller sent them."""

    __slots__ = ("body", "content_type")

    def __init__(self, body: bytes, content_type: str = "") -> None:
        self.body = body
        self.content_type = content_type

    @property
    def media_type(self) -> str:
        """The content type without parameters, lower case (`application/json`)."""
        content_type = self.content_type
        media = _MEDIA_TYPES.get(content_type)
        if media is None:  # callers send a few content types: each is taken apart once
            media = content_type.split(";", 1)[0].strip().lower()
            if len(_MEDIA_TYPES) < 64:
                _MEDIA_TYPES[content_type] = media
        return media

    def text(self) -> str:
        """The body as UTF-8 text. Raises `ValueError` if it is not."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Reject(400, f"the request body is not UTF-8 text: {exc}") from None

    def json(self) -> Any:
        """The body parsed as JSON. Raises `Reject` (400) saying where it is not."""
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Reject(400, f"the request body is not JSON: {exc}") from None

    def cbor(self) -> Any:
        """The body decoded as CBOR (RFC 8746 tensors become `Tensor`). Raises `Reject` (400)."""
        try:
            return _cbor.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise Reject(400, f"the request body is not CBOR: {exc}") from None

    def __repr__(self) -> str:
        return f"Request({len(self.body)} bytes, {self.content_type!r})"


class Response:
    """One invocation's output. A handler may also return `bytes` (octet-stream), `str` (text),
    or a dict or list (JSON): `Response.of` turns them into a `Response`."""

    __slots__ = ("body", "content_type")

    def __init__(self, body: bytes = b"", content_type: str = OCTETS) -> None:
        if not isinstance(body, _BYTES_LIKE):
            raise TypeError(f"a response body is bytes, not {type(body).__name__}")
        self.body = bytes(body)
        self.content_type = content_type

    @classmethod
    def json(cls, value: Any) -> Response:
        return cls(_JSON_ENCODE(value).encode(), JSON)

    @classmethod
    def cbor(cls, value: Any) -> Response:
        """`value` as CBOR; `Tensor`s become RFC 8746 arrays."""
        return cls(_cbor.dumps(value), CBOR)

    @classmethod
    def text(cls, value: str) -> Response:
        return cls(value.encode("utf-8"), TEXT)

    @classmethod
    def of(cls, value: Any) -> Response:
        """What a handler returned, as a `Response`. Raises `TypeError` for anything else."""
        if isinstance(value, Response):
            return value
        if isinstance(value, _BYTES_LIKE):
            return cls(bytes(value))
        if isinstance(value, str):
            return cls.text(value)
        if isinstance(value, _JSON_LIKE):
            return cls.json(value)
        if isinstance(value, Tensor):
            return cls.cbor(value)
        raise TypeError(
            f"a handler returns a Response, bytes, str, dict or list, not {type(value).__name__}"
        )

    def __repr__(self) -> str:
        return f"Response({len(self.body)} bytes, {self.content_type!r})"
