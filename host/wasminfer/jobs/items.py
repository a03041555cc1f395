"""The items of a job: a bulk body parsed into requests, chunks of them encoded for the store, and
each item's result in the form the API returns (one JSON line per item).

Bulk bodies (`POST /v1/functions/{name}/batch`):

- JSON Lines (`application/jsonl`, `application/x-ndjson`, …): one JSON value per line, sent to the
  function as that line's bytes with `application/json`. Blank lines are skipped; a line that is
  not JSON refuses the whole body (400 naming the line) before anything is stored.
- CBOR (`application/cbor`): one array. A byte string item is sent as it is, with
  `item_content_type` (default `application/octet-stream`); a text string as
  `text/plain; charset=utf-8`; any other value re-encoded as CBOR, `application/cbor` (typed
  arrays, RFC 8746, pass through).

A result is `(status, content_type, body, code, message)`: 200 with the function's output, or the
error status and code of the failed invocation (what a synchronous call would have answered).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from typing import Any

import cbor2

from wasminfer.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

JSONL = "application/jsonl"
JSONL_TYPES = (JSONL, "application/x-ndjson", "application/x-jsonlines", "application/json-lines")
CBOR = "application/cbor"
BULK_TYPES = (*JSONL_TYPES, CBOR)
JSON_ITEM = "application/json"
TEXT_ITEM = "text/plain; charset=utf-8"
DEFAULT_ITEM_TYPE = "application/octet-stream"

Item = tuple[bytes, str]  # (body, content type)
Result = tuple[int, str | None, bytes | None, str | None, str | None]  # status, ctype, body, code, message


def parse_bulk(
    body: bytes, media_type: str, max_items: int, item_content_type: str | None = None
) -> list[Item]:
    """The items of a bulk body. Raises `UnsupportedMediaType`, `BadRequest` (malformed, naming the
    line or element; no items), `PayloadTooLarge` (more than `max_items`)."""
    if media_type in JSONL_TYPES:
        if item_content_type is not None:
            raise BadRequest("item_content_type applies to CBOR bodies only (JSON Lines items are JSON)")
        items = _parse_jsonl(body, max_items)
    elif media_type == CBOR:
        items = _parse_cbor(body, max_items, item_content_type or DEFAULT_ITEM_TYPE)
    else:
        raise UnsupportedMediaType(
            f"a batch must be sent as JSON Lines ({JSONL}) or a CBOR array ({CBOR}), "
            f"not {media_type or 'no Content-Type'}"
        )
    if not items:
        raise BadRequest("the batch has no items")
    return items


def _too_many(max_items: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"a batch may have at most {max_items} items; split it into several batches")


def _parse_jsonl(body: bytes, max_items: int) -> list[Item]:
    items: list[Item] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            json.loads(line)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise BadRequest(f"line {number} of the batch is not JSON: {exc}") from None
        if len(items) == max_items:
            raise _too_many(max_items)
        items.append((line, JSON_ITEM))
    return items


def _parse_cbor(body: bytes, max_items: int, item_type: str) -> list[Item]:
    try:
        value = cbor2.loads(body)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise BadRequest(f"the batch is not CBOR: {exc}") from None
    if not isinstance(value, list):
        raise BadRequest(f"a CBOR batch must be one array of items, not {type(value).__name__}")
    if len(value) > max_items:
        raise _too_many(max_items)
    items: list[Item] = []
    for element in value:
        if isinstance(element, bytes | bytearray):
            items.append((bytes(element), item_type))
        elif isinstance(element, str):
            items.append((element.encode(), TEXT_ITEM))
        else:
            items.append((cbor2.dumps(element), CBOR))
    return items


def chunked(items: list[Item], max_items: int, max_bytes: int) -> Iterator[list[Item]]:
    """`items` in consecutive chunks of at most `max_items` items and (unless one item is larger
    alone) `max_bytes` bytes of bodies."""
    chunk: list[Item] = []
    size = 0
    for item in items:
        if chunk and (len(chunk) == max_items or size + len(item[0]) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += len(item[0])
    if chunk:
        yield chunk


# --- the stored forms ----------------------------------------------------------------------------
def encode_items(items: Iterable[Item]) -> bytes:
    return cbor2.dumps([[ctype, body] for body, ctype in items])


def decode_items(data: bytes) -> list[Item]:
    return [(bytes(body), str(ctype)) for ctype, body in cbor2.loads(data)]


def encode_results(results: Iterable[Result]) -> bytes:
    return cbor2.dumps([list(r) for r in results])


def decode_results(data: bytes) -> list[Result]:
    return [(int(s), c, b, code, msg) for s, c, b, code, msg in cbor2.loads(data)]


# --- the API form --------------------------------------------------------------------------------
def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python's json accepts them, JSON does not


def output_fields(content_type: str, body: bytes) -> dict[str, Any]:
    """An output as JSON fields: `output` holds a JSON output as JSON and a text output as a
    string; anything else (or JSON that does not parse) is `output_b64`."""
    media = _media_type(content_type)
    if media == "application/json" or media.endswith("+json"):
        try:
            return {"output": json.loads(body, parse_constant=_no_constant)}
        except ValueError:
            pass
    elif media.startswith("text/"):
        try:
            return {"output": body.decode()}
        except UnicodeDecodeError:
            pass
    return {"output_b64": base64.b64encode(body).decode("ascii")}


def result_fields(result: Result) -> dict[str, Any]:
    status, ctype, body, code, message = result
    if code is None:
        return {"status": status, "content_type": ctype, **output_fields(ctype or "", body or b"")}
    return {"status": status, "error": {"code": code, "message": message}}


def result_line(index: int, result: Result) -> bytes:
    """One line of a batch's results: `{"index": 0, "status": 200, "content_type": …, "output": …}`
    or `{"index": 1, "status": 500, "error": {"code": …, "message": …}}`, newline-terminated."""
    line = {"index": index, **result_fields(result)}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
