"""The items of a job: a bulk body parsed into requests, chunks of them encoded for the store, and
each item's result in the form the API returns (one JSON line per item).

Bulk bodies (`POST /v1/functions/{name}/batch`):

- JSON Lines (`application/jsonl`, `application/x-ndjson`, …): one JSON value per line, sent to the
  function as that line's bytes with `application/json`. Blank lines are skipped; a line that is
  not JSON (NaN and Infinity are not), nests deeper than `MAX_ITEM_DEPTH` or may hold more than
  `MAX_LINE_VALUES` values refuses the whole body (400 naming the line) before anything is stored.
- CBOR (`application/cbor`): one definite-length array. A byte string item is sent as it is, with
  `item_content_type` (default `application/octet-stream`); a text string as
  `text/plain; charset=utf-8`; any other value as its own CBOR bytes, exactly as sent,
  `application/cbor`. Tags: only RFC 8746's (`ITEM_TAGS`: typed arrays, multi-dimensional and
  homogeneous arrays), which pass through; an item nests at most `MAX_ITEM_DEPTH` levels and the
  body holds at most `MAX_CBOR_VALUES` values. The body is checked by `parsing.cbor_array`, which
  decodes nothing: no CBOR library hook ever runs on it.

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
from wasminfer.parsing import Limits, cbor_array, head_size, loads_cbor, loads_json

JSONL = "application/jsonl"
JSONL_TYPES = (JSONL, "application/x-ndjson", "application/x-jsonlines", "application/json-lines")
CBOR = "application/cbor"
BULK_TYPES = (*JSONL_TYPES, CBOR)
JSON_ITEM = "application/json"
TEXT_ITEM = "text/plain; charset=utf-8"
DEFAULT_ITEM_TYPE = "application/octet-stream"

#: RFC 8746: 64-87 typed arrays, 40 and 1040 multi-dimensional arrays, 41 homogeneous arrays.
ITEM_TAGS = frozenset({40, 41, 1040, *range(64, 88)})
#: Levels an item may nest (arrays, objects; in CBOR maps and tags too): far beyond any input format.
MAX_ITEM_DEPTH = 64
#: Values one JSON line may hold (an upper bound: its commas and brackets): it bounds one call of
#: the json parser, which holds the GIL throughout (~0.5 s for a million empty arrays here).
MAX_LINE_VALUES = 1_000_000
#: Values a CBOR body may hold in all (an item of bytes or text is one): checked in Python at
#: ~0.3-1 µs per value, sharing the GIL, so a few seconds at most of an admin thread.
MAX_CBOR_VALUES = 4_000_000
# A JSON output goes into its result line as JSON only within the limits of a line of input.
_OUTPUT = Limits(max_bytes=1 << 40, max_depth=MAX_ITEM_DEPTH, max_values=MAX_LINE_VALUES)
# The stored forms: [[content type, body], ...] and [[status, ctype, body, code, message], ...].
_STORED = Limits(max_bytes=1 << 40, max_depth=2, max_values=1 << 40)

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
    limits = Limits(max_bytes=len(body), max_depth=MAX_ITEM_DEPTH, max_values=MAX_LINE_VALUES)
    items: list[Item] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        loads_json(line, f"line {number} of the batch", limits)
        if len(items) == max_items:
            raise _too_many(max_items)
        items.append((line, JSON_ITEM))
    return items


def _parse_cbor(body: bytes, max_items: int, item_type: str) -> list[Item]:
    if body[:1] and body[0] >> 5 == 4 and _declared_length(body) > max_items:
        raise _too_many(max_items)  # before walking what may be millions of items
    limits = Limits(max_bytes=len(body), max_depth=MAX_ITEM_DEPTH + 1, max_values=MAX_CBOR_VALUES)
    offsets = cbor_array(body, "the CBOR batch", limits, ITEM_TAGS)
    items: list[Item] = []
    for start, end in zip(offsets, offsets[1:], strict=False):
        major = body[start] >> 5
        if major == 2:
            items.append((body[start + head_size(body[start]) : end], item_type))
        elif major == 3:
            items.append((body[start + head_size(body[start]) : end], TEXT_ITEM))
        else:
            items.append((body[start:end], CBOR))
    return items


def _declared_length(body: bytes) -> int:
    size = head_size(body[0]) - 1
    return body[0] & 0x1F if size == 0 else int.from_bytes(body[1 : 1 + size], "big")


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
    return [(bytes(body), str(ctype)) for ctype, body in loads_cbor(data, "stored job items", _STORED)]


def encode_results(results: Iterable[Result]) -> bytes:
    return cbor2.dumps([list(r) for r in results])


def decode_results(data: bytes) -> list[Result]:
    stored = loads_cbor(data, "stored job results", _STORED)
    return [(int(s), c, b, code, msg) for s, c, b, code, msg in stored]


# --- the API form --------------------------------------------------------------------------------
def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def output_fields(content_type: str, body: bytes) -> dict[str, Any]:
    """An output as JSON fields: `output` holds a JSON output as JSON and a text output as a
    string; anything else (or JSON that does not parse, or is past the limits of a JSON line of
    a batch) is `output_b64`."""
    media = _media_type(content_type)
    if media == "application/json" or media.endswith("+json"):
        try:
            return {"output": loads_json(body, "the output", _OUTPUT)}
        except BadRequest:
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
