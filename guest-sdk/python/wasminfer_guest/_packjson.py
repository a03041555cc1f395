"""A handler's dict or list as JSON with its floats left for the host to write (Python runtime only).

CPython compiled to Wasm spends ~1.4 µs on the `repr` of each float (ten times native, more with
cold caches): a classifier's ten probabilities cost more to write as JSON than the rest of its
invocation's Python. So `pack` writes the JSON as a %-format: `%r` where each float goes, `%%` for
a `%` of the text, and sends the floats as float64s; the host formats them in (`NaN`, `Infinity`
as `json` writes them). The result is byte for byte what `json.dumps(value, separators=(",", ":"))`
gives in the guest: the same pieces (`json.encoder.encode_basestring_ascii`, `int.__repr__`,
`float.__repr__`) in the same order. `_runtime.py` describes the frame.

Only what is certain to come out alike is packed: exact `dict` with exact `str` keys, `list`,
`tuple`, exact `str`, exact `int` within 64 bits, exact `float`, `True`, `False`, `None`, nested at
most `MAX_DEPTH` deep (a cycle goes deeper), at most `MAX_PACKED` bytes in all. For anything else
`pack` returns None and the caller writes JSON as before, so every output and every error (a numpy
scalar's "not JSON serializable", a cycle's "Circular reference detected", ...) stays the guest
`json`'s own. `worth_packing` says when packing pays: for runs of floats, not for text.
"""

from __future__ import annotations

import struct
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

MAX_DEPTH = 32
#: Larger values are written as JSON by the guest: what the host finishes per response stays small.
MAX_PACKED = 64 << 10
HOLE = "%r"


class _Unfit(Exception):
    """The value holds something `pack` leaves to `json`."""


_LIMIT = 1 << 64
_FLOATS = {float}
_MAX_KEPT, _MAX_KEPT_TEXT = 256, 64


class _Quoted(dict[str, str]):
    """Texts as JSON strings (keys with their ':'), those that come back call after call (a
    response's keys, a model's labels) kept up to a bound. Looked up with exact `str` only."""

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix

    def __missing__(self, s: str) -> str:
        quoted = _quote(s)
        if "%" in quoted:
            quoted = quoted.replace("%", "%%")
        quoted += self.suffix
        if len(s) <= _MAX_KEPT_TEXT and len(self) < _MAX_KEPT:
            self[s] = quoted
        return quoted


_texts, _keys = _Quoted(""), _Quoted(":")
#: Fewer floats than this in a list are not worth packing (see `worth_packing`).
MIN_RUN = 8
_runs = ["[" + ",".join([HOLE] * n) + "]" for n in range(65)]  # a list of n floats
_counts: dict[int, Any] = {}  # n -> the Struct that packs a count and n floats


def worth_packing(value: Any) -> bool:
    """Whether `value` (an exact dict or list) holds a run of at least `MIN_RUN` floats near its
    top: it is one, or one of a dict's values, or a list's first item (a model's scores, an
    embedding, a batch of them). Measured in an invocation, the host's `repr` of a float costs
    ~1 µs (cold caches) against the guest's ~2.5: packing pays for runs, not for a few floats among
    text and integers, which the guest's `json` writes faster than `pack` walks them. (A plain
    loop: in an invocation it costs half what `set(map(type, ...))` does.)"""
    if type(value) is dict:
        for x in value.values():
            t = type(x)
            if (t is list or t is tuple) and len(x) >= MIN_RUN and type(x[0]) is float is type(x[-1]):
                return True
        return False
    return _is_run(value) or (len(value) > 0 and _is_run(value[0]))


def _is_run(x: Any) -> bool:
    t = type(x)
    return (t is list or t is tuple) and len(x) >= MIN_RUN and type(x[0]) is float is type(x[-1])


def pack(value: Any) -> bytes | None:
    """`value` as the frame the host finishes: u32 count of floats, the float64s (little-endian),
    the JSON as a %-format of them. None if it is not an exact dict or list of the kinds above."""
    out: list[str] = []
    floats: list[float] = []
    kind = type(value)
    try:
        if kind is dict:
            _map(value, out, floats, 0)
        elif kind is list:
            _array(value, out, floats, 0)
        else:
            return None
    except _Unfit:
        return None
    text = "".join(out).encode()
    n = len(floats)
    if 4 + 8 * n + len(text) > MAX_PACKED:
        return None
    packer = _counts.get(n)
    if packer is None:
        packer = struct.Struct(f"<I{n}d")
        if n <= 64:  # a Struct holds a code per item
            _counts[n] = packer
    return packer.pack(n, *floats) + text


def _scalar(x: Any) -> str:
    """What `_items` does not handle itself."""
    if x is None:
        return "null"
    if x is True:
        return "true"
    if x is False:
        return "false"
    if type(x) is int and -_LIMIT <= x < _LIMIT:  # past it, `json` may raise (digits limit)
        return int.__repr__(x)
    raise _Unfit


# One loop for both kinds of container (`_items`): it inlines the common kinds of item (a call costs
# more than the work for most of them) and ends each item with ",", the last of which becomes the
# closing bracket.
def _array(items: list[Any] | tuple[Any, ...], out: list[str], floats: list[float], depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise _Unfit
    n = len(items)
    if not n:
        out.append("[]")
        return
    if type(items[0]) is float and set(map(type, items)) == _FLOATS:
        out.append(_runs[n] if n < len(_runs) else "[" + ",".join([HOLE] * n) + "]")
        floats += items
        return
    out.append("[")
    _items(items, False, out, floats, depth)
    out[-1] = "]"


def _map(d: dict[Any, Any], out: list[str], floats: list[float], depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise _Unfit
    if not d:
        out.append("{}")
        return
    out.append("{")
    _items(d.items(), True, out, floats, depth)
    out[-1] = "}"


def _items(items: Any, keyed: bool, out: list[str], floats: list[float], depth: int) -> None:
    """The items of a list or tuple, or with `keyed` the (key, value) pairs of a dict."""
    put, texts, keys = out.append, _texts, _keys
    for x in items:
        if keyed:
            k, x = x
            if type(k) is not str:
                raise _Unfit
            put(keys[k])
        t = type(x)
        if t is str:
            put(texts[x])
        elif t is float:
            put(HOLE)
            floats.append(x)
        elif t is dict:
            _map(x, out, floats, depth + 1)
        elif t is list or t is tuple:
            _array(x, out, floats, depth + 1)
        else:
            put(_scalar(x))
        put(",")
