"""Bounded parsing of untrusted bytes: JSON and CBOR that clients (or guests) send are checked and
turned into values here, under limits on size, nesting depth, number of values and CBOR tags. A
leaf module (it imports only `errors`): the gateway, jobs and models all use it.

Why each limit:

- cbor2's default decoder interprets tags (bignums, decimal fractions, big floats, rationals,
  dates, regular expressions, shared references) and some of its hooks take quadratic time inside
  one native call that holds the GIL: half a megabyte of nested bignums froze the whole server,
  `/healthz` included, for seconds. Here only the tags a format names are accepted (the rest are
  refused before cbor2 sees the bytes), and every tag cbor2 would interpret itself is also turned
  off in cbor2 (`CBOR2_INTERPRETED_TAGS`), so a shared-reference cycle (tags 28/29) never forms.
- One native call (`json.loads`, `cbor2.loads`) on millions of tiny values (`[[],[],...]`) holds
  the GIL for seconds and builds gigabytes of objects. The number of values is bounded before that
  call: for JSON, counted at memchr speed from commas and brackets (conservatively: those inside
  strings count too); for CBOR by `scan_cbor`, which walks the heads in Python (so other threads
  keep their turns of the GIL) and builds nothing.
- Python's `json` recurses per level: deep nesting would be a `RecursionError`, not a refusal.

Depth counts containers: a scalar is at depth 0, `[]` and `{}` have depth 1, `[[1]]` depth 2; a
CBOR tag counts as a container of its one value. Every refusal is a `BadRequest` (or the caller's
subclass of it) naming what was parsed and the limit it broke.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import cbor2

from wasminfer.errors import BadRequest

__all__ = [
    "CBOR2_INTERPRETED_TAGS",
    "Limits",
    "cbor_array",
    "head_size",
    "loads_cbor",
    "loads_json",
    "scan_cbor",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one parse may take: bytes in, nesting depth, values (every scalar, string and
    container counts one; a CBOR tag too)."""

    max_bytes: int
    max_depth: int
    max_values: int


# --- JSON -----------------------------------------------------------------------------------------
def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity; JSON does not


def loads_json(
    data: bytes | str, what: str, limits: Limits, *, error: type[BadRequest] = BadRequest
) -> Any:
    """The value of a JSON document. Raises `error` (a `BadRequest`) naming `what` for a document
    that is not JSON (NaN and Infinity are not), is larger than `limits.max_bytes`, may hold more
    than `limits.max_values` values (counted as commas plus opening brackets plus one, those
    inside strings included), or nests deeper than `limits.max_depth`."""
    if len(data) > limits.max_bytes:
        raise error(f"{what} is {len(data)} bytes long; at most {limits.max_bytes} are accepted")
    if isinstance(data, str):
        opened = data.count("[") + data.count("{")
        bound = opened + data.count(",") + 1
    else:
        opened = data.count(b"[") + data.count(b"{")
        bound = opened + data.count(b",") + 1
    if bound > limits.max_values:
        raise error(
            f"{what} may hold up to {bound} values (commas and brackets, counted also inside "
            f"strings); at most {limits.max_values} are accepted"
        )
    try:
        value = json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise error(_too_deep(what, limits.max_depth)) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{what} is not JSON: {exc}") from None
    if opened > limits.max_depth and _json_deeper_than(value, limits.max_depth):
        raise error(_too_deep(what, limits.max_depth))
    return value


def _json_deeper_than(value: Any, max_depth: int) -> bool:
    # Iterative: the value may nest as deep as json's own recursion allowed (~1000).
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth == max_depth:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _too_deep(what: str, max_depth: int) -> str:
    return f"{what} nests arrays and objects deeper than {max_depth} levels"


# --- CBOR -----------------------------------------------------------------------------------------
#: Tags cbor2 6.x decodes itself (found by probing every tag below 70000; test_models_codec.py
#: probes again): dates, bignums, decimal fractions, big floats, shared references, rationals,
#: regular expressions, MIME, UUIDs, sets, IP addresses, self-describe... None of them reaches
#: cbor2's own decoder from a parser here.
CBOR2_INTERPRETED_TAGS = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799,
)  # fmt: skip


_MALFORMED = "is not well-formed CBOR"


def scan_cbor(
    data: bytes, what: str, limits: Limits, tags: Collection[int], *, children: list[int] | None = None
) -> int:
    """Checks the one CBOR data item at the start of `data` and returns where it ends, building no
    value; `children`, if given, receives the offset of each value directly inside it. Raises
    `BadRequest` naming `what` for bytes that are not well-formed CBOR, an indefinite length, text
    that is not UTF-8, a tag not in `tags`, nesting deeper than `limits.max_depth`, more than
    `limits.max_values` values, or more than `limits.max_bytes` bytes in all."""
    n = len(data)
    if n > limits.max_bytes:
        raise BadRequest(f"{what} is {n} bytes long; at most {limits.max_bytes} are accepted")
    pos, values, max_values, max_depth = 0, 0, limits.max_values, limits.max_depth
    view = memoryview(data)
    pending = [1]  # values still to read in each open container, outermost first
    while pending:
        left = pending[-1]
        if not left:
            pending.pop()
            continue
        pending[-1] = left - 1
        if children is not None and len(pending) == 2:
            children.append(pos)
        if pos >= n:
            raise BadRequest(f"{what} {_MALFORMED}: it ends in the middle of a value")
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            if pos + size > n:
                raise BadRequest(f"{what} {_MALFORMED}: it ends in the middle of a value")
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif info == 31 and 2 <= major <= 5:
            raise BadRequest(f"{what}: indefinite-length strings, arrays and maps are not accepted")
        else:
            raise BadRequest(f"{what} {_MALFORMED}: byte {initial:#04x} at offset {pos - 1}")
        values += 1
        if values > max_values:
            raise BadRequest(f"{what} holds more than {max_values} values; at most {max_values} are accepted")
        if major == 2 or major == 3:
            if arg > n - pos:
                raise BadRequest(f"{what} {_MALFORMED}: a string runs past the end")
            if major == 3:
                try:
                    str(view[pos : pos + arg], "utf-8")
                except UnicodeDecodeError:
                    raise BadRequest(f"{what} has a text string that is not UTF-8 at offset {pos}") from None
            pos += arg
        elif major >= 4 and major <= 6:
            if major == 6 and arg not in tags:
                accepted = _tag_list(tags)
                raise BadRequest(f"{what}: CBOR tag {arg} is not accepted here (accepted: {accepted})")
            if len(pending) > max_depth:
                raise BadRequest(f"{what} nests CBOR arrays, maps and tags deeper than {max_depth} levels")
            pending.append(arg if major == 4 else 2 * arg if major == 5 else 1)
        elif major == 7 and info == 24 and arg < 32:
            raise BadRequest(f"{what} {_MALFORMED}: simple value {arg} in two bytes")
    return pos


def cbor_array(data: bytes, what: str, limits: Limits, tags: Collection[int]) -> list[int]:
    """Where each element of the one CBOR array that is the whole of `data` starts, then where the
    array ends (`len(data)`): element i is `data[offsets[i]:offsets[i + 1]]`. Everything is
    checked as `scan_cbor` checks (the array counts as one level and one value). Raises
    `BadRequest` as `scan_cbor` does, and for anything else than a single definite-length array."""
    if data[:1] and data[0] >> 5 != 4:
        raise BadRequest(f"{what} must be one CBOR array, not major type {data[0] >> 5}")
    offsets: list[int] = []
    end = scan_cbor(data, what, limits, tags, children=offsets)
    if end != len(data):
        raise BadRequest(f"{what} has {len(data) - end} unexpected bytes after its first CBOR value")
    offsets.append(end)
    return offsets


def head_size(initial: int) -> int:
    """Bytes of the head that starts with the byte `initial` (of well-formed, definite CBOR)."""
    info = initial & 0x1F
    return 1 if info < 24 else 1 + (1 << (info - 24))


def _refuse_tag(value: object, immutable: bool) -> Any:
    raise ValueError("a CBOR tag cbor2 would interpret")  # pragma: no cover - scan_cbor refused it


_REFUSING_DECODERS = {tag: _refuse_tag for tag in CBOR2_INTERPRETED_TAGS}


def loads_cbor(data: bytes, what: str, limits: Limits, tags: Collection[int] = ()) -> Any:
    """The value of one CBOR data item that is the whole of `data`, checked by `scan_cbor` first.
    Tags in `tags` come back as `cbor2.CBORTag` (none of them may be one cbor2 interprets).
    Raises `BadRequest` as `scan_cbor` does, and for bytes after the item, a map key that is not
    a string, or a duplicate map key."""
    interpreted = set(tags) & set(CBOR2_INTERPRETED_TAGS)
    if interpreted:
        raise ValueError(f"tags {sorted(interpreted)} would be interpreted by cbor2")
    end = scan_cbor(data, what, limits, tags)
    if end != len(data):
        raise BadRequest(f"{what} has {len(data) - end} unexpected bytes after its first CBOR value")
    try:
        return cbor2.loads(
            data,
            semantic_decoders=_REFUSING_DECODERS,
            max_depth=limits.max_depth + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
    except cbor2.CBORDecodeError as exc:
        raise BadRequest(f"{what} {_MALFORMED}: {exc}") from None


def _tag_list(tags: Collection[int]) -> str:
    if not tags:
        return "none"
    ordered, parts = sorted(tags), []
    first = last = ordered[0]
    for tag in [*ordered[1:], None]:
        if tag is not None and tag == last + 1:
            last = tag
            continue
        parts.append(str(first) if first == last else f"{first}-{last}")
        if tag is not None:
            first = last = tag
    return ", ".join(parts)
