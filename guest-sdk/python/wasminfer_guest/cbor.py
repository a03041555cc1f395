"""A small CBOR (RFC 8949) codec for request and response bodies, in pure Python.

Tensors are RFC 8746 row-major arrays, as on the rest of wasminfer's wire (guest-sdk/ABI.md):
tag 40 around `[dims, typed array]`, little-endian typed arrays, text tensors as arrays of text.
They decode to `Tensor` and `Tensor` encodes to them. Other tags decode to `Tag`. Definite lengths
only, as the host.
"""

from __future__ import annotations

import struct
from typing import Any

from wasminfer_guest.tensor import Tensor

TYPED_ARRAY_TAGS = {
    "uint8": 64, "uint16": 69, "uint32": 70, "uint64": 71, "int8": 72, "int16": 77, "int32": 78,
    "int64": 79, "float16": 84, "float32": 85, "float64": 86, "bool": 64,
}  # fmt: skip
_TAG_DTYPES = {tag: dtype for dtype, tag in TYPED_ARRAY_TAGS.items() if dtype != "bool"}
_SIZES = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "uint64": 8,
          "int64": 8, "float16": 2, "float32": 4, "float64": 8}
_MULTI_DIM = 40
_MAX_DEPTH = 64


class Tag:
    """A tagged value this codec does not interpret."""

    __slots__ = ("tag", "value")

    def __init__(self, tag: int, value: Any) -> None:
        self.tag = tag
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and (self.tag, self.value) == (other.tag, other.value)

    def __repr__(self) -> str:
        return f"Tag({self.tag}, {self.value!r})"


def loads(data: bytes) -> Any:
    """Decodes one CBOR item that spans all of `data`. Raises `ValueError` if it does not."""
    value, end = _decode(memoryview(data), 0, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the CBOR item")
    return value


def dumps(value: Any) -> bytes:
    """Encodes `value` (None, bool, int, float, str, bytes, list, tuple, dict, Tensor, Tag)."""
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


# --- decoding ---------------------------------------------------------------------------------------
def _head(data: memoryview, pos: int) -> tuple[int, int, int]:
    if pos >= len(data):
        raise ValueError("truncated CBOR")
    first = data[pos]
    major, info = first >> 5, first & 31
    pos += 1
    if info < 24:
        return major, info, pos
    if info > 27:
        raise ValueError("indefinite lengths and reserved values are not accepted")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise ValueError("truncated CBOR")
    return major, int.from_bytes(data[pos:pos + size], "big"), pos + size


def _decode(data: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise ValueError("CBOR nested too deeply")
    start = pos
    major, arg, pos = _head(data, pos)
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major in (2, 3):
        if pos + arg > len(data):
            raise ValueError("truncated CBOR")
        raw = bytes(data[pos:pos + arg])
        return (raw if major == 2 else raw.decode("utf-8")), pos + arg
    if major == 4:
        items = []
        for _ in range(arg):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        out = {}
        for _ in range(arg):
            key, pos = _decode(data, pos, depth + 1)
            out[key], pos = _decode(data, pos, depth + 1)
        return out, pos
    if major == 6:
        inner, pos = _decode(data, pos, depth + 1)
        return _tagged(arg, inner), pos
    # major 7: simple values and floats
    info = data[start] & 31
    if info == 20:
        return False, pos
    if info == 21:
        return True, pos
    if info in (22, 23):
        return None, pos
    if info in (25, 26, 27):
        fmt = {25: ">e", 26: ">f", 27: ">d"}[info]
        return struct.unpack(fmt, data[start + 1:pos])[0], pos
    raise ValueError(f"unsupported simple value {arg}")


def _tagged(tag: int, inner: Any) -> Any:
    if tag in _TAG_DTYPES and isinstance(inner, bytes):
        dtype = _TAG_DTYPES[tag]
        if len(inner) % _SIZES[dtype]:
            raise ValueError(f"typed array of {dtype} with {len(inner)} bytes")
        return Tensor(dtype, (len(inner) // _SIZES[dtype],), inner)
    if tag == _MULTI_DIM and isinstance(inner, list) and len(inner) == 2 and isinstance(inner[0], list):
        dims, payload = inner
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise ValueError("tensor dims must be unsigned integers")
        if isinstance(payload, Tensor):
            return Tensor(payload.dtype, dims, payload.data)
        if isinstance(payload, list) and all(isinstance(s, str) for s in payload):
            return Tensor("string", dims, payload)
        raise ValueError("tensor data must be a typed array or an array of text")
    return Tag(tag, inner)


# --- encoding ---------------------------------------------------------------------------------------
def _put_head(out: bytearray, major: int, n: int) -> None:
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out += bytes((mt | 24, n))
    elif n < 0x10000:
        out += struct.pack(">BH", mt | 25, n)
    elif n < 0x100000000:
        out += struct.pack(">BI", mt | 26, n)
    else:
        out += struct.pack(">BQ", mt | 27, n)


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None:
        out.append(0xF6)
    elif value is True or value is False:
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if not -(1 << 64) <= value < (1 << 64):
            raise ValueError(f"integer {value} does not fit CBOR's 64 bits")
        _put_head(out, 0, value) if value >= 0 else _put_head(out, 1, -1 - value)
    elif isinstance(value, float):
        out += b"\xfb" + struct.pack(">d", value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _put_head(out, 3, len(raw))
        out += raw
    elif isinstance(value, bytes | bytearray | memoryview):
        _put_head(out, 2, len(value))
        out += value
    elif isinstance(value, list | tuple):
        _put_head(out, 4, len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        _put_head(out, 5, len(value))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    elif isinstance(value, Tensor):
        _put_head(out, 6, _MULTI_DIM)
        out.append(0x82)
        _encode(list(value.shape), out, depth + 1)
        if value.dtype == "string":
            _encode(value.data, out, depth + 1)
        else:
            _put_head(out, 6, TYPED_ARRAY_TAGS[value.dtype])
            _encode(value.data, out, depth + 1)
    elif isinstance(value, Tag):
        _put_head(out, 6, value.tag)
        _encode(value.value, out, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as CBOR")
