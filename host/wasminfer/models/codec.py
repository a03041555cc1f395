"""The one tensor codec: named tensors <-> CBOR (guest-sdk/ABI.md, "Tensor encoding"), and a JSON form.

The wire form is one CBOR map from tensor name to an RFC 8746 multi-dimensional array:
tag 40 around `[dims, data]`, where `data` is a little-endian typed array (a byte string in one of
the tags of `TYPED_ARRAY_TAGS`) or, for text tensors, an array of text strings. bool travels as
uint8 (tag 64); `ModelRegistry.infer` casts it back where the model wants bool.

Decoding treats its input as hostile. cbor2 (compiled; Rust/pyo3 in 6.x) parses the container with the
strictest settings it has (definite lengths only, no duplicate keys, text/bytes map keys only, a
nesting depth of exactly what the format needs), every tag cbor2 would interpret itself (dates,
bignums, shared references, ...) is disabled, and the decoded structure is then checked against the
grammar tensor by tensor. Every failure is an `InvalidTensor` naming the tensor, or a
`TensorTooLarge`; nothing else escapes. Typed arrays become `np.frombuffer` views of the byte strings
cbor2 produced (no copy beyond cbor2's own, read-only arrays, fine for ONNX Runtime).

Encoding writes the heads itself (all definite, shortest form, byte-identical to `cbor2.dumps` of
the same structure, which the tests check) and joins them with the arrays' own buffers, so each
tensor's data is copied exactly once, into the output.

Speed: `python bench/bench_models.py codec` (2 vCPUs shared with other work; median µs per call of
one tensor; the best quiet-machine runs were ~30% lower):

    tensor                    encode   decode   bytes
    [1,64] float32               1.4      5.5     275
    [1,3,224,224] float32         22       40   602136

Small tensors cost interpreter time (of the 5.5 µs, ~1.5 is cbor2 and ~2 the grammar check). Big
ones cost one memcpy each way (encode: into the output; decode: cbor2 copying the byte string out
of the input) -- plus, when glibc serves each such buffer from fresh mmap'd pages, a page fault per
4 KiB: 149 faults took decode to ~390 µs in one allocator state on this VM (the bench prints faults
per call; MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the server's environment avoid it).
"""

from __future__ import annotations

import io
import math
import struct
import sys
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from wasminfer.errors import InvalidTensor, TensorTooLarge
from wasminfer.parsing import CBOR2_INTERPRETED_TAGS

__all__ = [
    "MAX_RANK",
    "MAX_TENSORS",
    "TYPED_ARRAY_TAGS",
    "decode_tensors",
    "encode_tensors",
    "tensors_from_json",
    "tensors_to_json",
]

#: dtype name -> RFC 8746 tag of its little-endian typed array (guest-sdk/ABI.md).
TYPED_ARRAY_TAGS: dict[str, int] = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
}
_TAG_DTYPES: dict[int, np.dtype[Any]] = {
    tag: np.dtype(name).newbyteorder("<") for name, tag in TYPED_ARRAY_TAGS.items()
}
_MULTI_DIM_TAG = 40

#: More tensors than this in one map is refused: no model has that many inputs, and it bounds work.
MAX_TENSORS = 1024
#: ONNX has no rank limit; numpy stops at 64. 32 is beyond any real model.
MAX_RANK = 32
# numpy refuses arrays whose size (zero dims counted as one) times itemsize overflows intp.
_MAX_NUMPY_BYTES = 2**63 - 1
_LITTLE_ENDIAN = sys.byteorder == "little"

#: dtype names the JSON form and `TensorSpec.dtype` use, beyond the typed-array ones.
_JSON_DTYPES = frozenset(TYPED_ARRAY_TAGS) | {"bool", "string"}


# --- decoding -----------------------------------------------------------------------------------
class _ForeignTag:
    """Stands in for a tag cbor2 would otherwise interpret (a date, a bignum, a shared reference...)."""

    __slots__ = ("tag",)

    def __init__(self, tag: int) -> None:
        self.tag = tag


def _refuse(tag: int) -> Any:
    return lambda _value, _immutable: _ForeignTag(tag)


# Every tag cbor2 would interpret itself (`parsing.CBOR2_INTERPRETED_TAGS`) becomes a marker, so
# that the grammar check refuses it with the tensor's name, and so that no date parser, bignum,
# decimal exponentiation or shared-reference cycle ever runs on hostile input. (Not
# `parsing.loads_cbor`: its walk in Python costs more than the whole decode of a small tensor; with
# no hook running, cbor2's work here is linear in the bytes, which the caller bounds.)
_SEMANTIC_DECODERS = {tag: _refuse(tag) for tag in CBOR2_INTERPRETED_TAGS}
_LOADS_OPTIONS: dict[str, Any] = {
    "semantic_decoders": _SEMANTIC_DECODERS,
    # map -> tag 40 [ -> dims [ ...: the format never nests deeper than this.
    "max_depth": 4,
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    "strict_hashable_types": True,
}


def decode_tensors(data: bytes, *, max_tensor_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Decode named tensors from their CBOR encoding.

    Typed arrays come back as read-only views of the decoded byte strings; text tensors as object
    arrays of `str`. Raises `InvalidTensor` for anything that is not exactly the format (naming the
    tensor where there is one), and `TensorTooLarge` for a tensor of more than `max_tensor_bytes`
    bytes of data.
    """
    try:
        obj = cbor2.loads(data, **_LOADS_OPTIONS)
    except Exception as exc:  # cbor2 raises CBORDecodeError, but also e.g. TypeError for non-buffers
        raise InvalidTensor(f"tensors do not decode as CBOR: {exc}") from None
    if type(obj) is not dict:
        raise InvalidTensor(f"tensors must be a CBOR map of name to tensor, not {_kind(obj)}")
    if len(obj) > MAX_TENSORS:
        raise InvalidTensor(f"{len(obj)} tensors in one map; at most {MAX_TENSORS} are accepted")
    tensors: dict[str, np.ndarray] = {}
    size = _head_size(len(obj))
    for name, value in obj.items():
        array, encoded_size = _decode_one(name, value, max_tensor_bytes)
        tensors[name] = array
        size += encoded_size
    # cbor2.loads ignores bytes after the first item. The shortest encoding of what was decoded is a
    # lower bound on what it consumed, so a length equal to it proves there is no trailing data;
    # anything else (trailing bytes, or heads longer than needed, which is legal) is settled by
    # decoding again through a stream whose position tells what was consumed.
    if size != len(data) and _consumed(data) != len(data):
        raise InvalidTensor("unexpected bytes after the tensor map")
    return tensors


def _decode_one(name: object, value: object, max_tensor_bytes: int | None) -> tuple[np.ndarray, int]:
    """One map entry -> (array, size of its shortest encoding). The hot path: keep it flat."""
    if type(name) is not str:
        raise InvalidTensor(f"tensor names must be text strings, not {_kind(name)}")
    if not name:
        raise InvalidTensor("tensor names must not be empty")
    if type(value) is not cbor2.CBORTag or value.tag != _MULTI_DIM_TAG:
        raise InvalidTensor(f"tensor {name!r} must be tag 40 [dims, data], not {_kind(value)}")
    pair = value.value
    if type(pair) not in (list, tuple) or len(pair) != 2:
        raise InvalidTensor(f"tensor {name!r}: tag 40 must hold a two-element array [dims, data]")
    dims, payload = pair
    if type(dims) not in (list, tuple):
        raise InvalidTensor(f"tensor {name!r}: dims must be an array of unsigned integers, not {_kind(dims)}")
    if len(dims) > MAX_RANK:
        raise InvalidTensor(f"tensor {name!r} has rank {len(dims)}; at most {MAX_RANK} is accepted")
    key_size = len(name.encode())
    # key, tag 40 (2 bytes), array(2), dims head
    size = (1 if key_size < 24 else _head_size(key_size)) + key_size + 4
    count = 1
    for d in dims:
        # type() and not isinstance(): a CBOR `true` decodes to bool, which is an int subclass.
        if type(d) is not int or d < 0:
            raise InvalidTensor(f"tensor {name!r}: dims must be unsigned integers, got {_fmt_list(dims)}")
        size += 1 if d < 24 else _head_size(d)
        count *= d
    shape = tuple(dims)
    if count == 0:
        _check_zero_size(name, shape)

    if type(payload) is cbor2.CBORTag:
        dtype = _TAG_DTYPES.get(payload.tag) if type(payload.tag) is int else None
        if dtype is None:
            raise InvalidTensor(
                f"tensor {name!r} has typed-array tag {payload.tag}; supported tags are "
                + ", ".join(f"{tag} ({dt})" for dt, tag in TYPED_ARRAY_TAGS.items())
                + " (little-endian only; bool is uint8, tag 64)"
            )
        buf = payload.value
        if type(buf) is not bytes:
            raise InvalidTensor(f"tensor {name!r}: typed-array tag {payload.tag} must hold a byte string")
        nbytes = count * dtype.itemsize
        if len(buf) != nbytes:
            raise InvalidTensor(
                f"tensor {name!r} has {len(buf)} bytes of data; shape {_fmt(shape)} of {dtype.name} "
                f"needs {nbytes}"
            )
        if max_tensor_bytes is not None and nbytes > max_tensor_bytes:
            raise TensorTooLarge(
                f"tensor {name!r} has {nbytes} bytes of data; the limit is {max_tensor_bytes}"
            )
        array = np.frombuffer(buf, dtype=dtype)
        if not _LITTLE_ENDIAN:
            array = array.astype(dtype.newbyteorder("="))
        return array.reshape(shape), size + 2 + _head_size(nbytes) + nbytes

    if type(payload) in (list, tuple):
        if len(payload) != count:
            raise InvalidTensor(
                f"text tensor {name!r} has {len(payload)} strings; shape {_fmt(shape)} needs {count}"
            )
        size += _head_size(count)
        text_bytes = 0
        for item in payload:
            if type(item) is not str:
                raise InvalidTensor(f"text tensor {name!r} holds {_kind(item)}; only text strings")
            n = len(item.encode())
            text_bytes += n
            size += _head_size(n) + n
        if max_tensor_bytes is not None and text_bytes > max_tensor_bytes:
            raise TensorTooLarge(
                f"tensor {name!r} has {text_bytes} bytes of text; the limit is {max_tensor_bytes}"
            )
        array = np.empty(count, dtype=object)
        array[:] = payload
        return array.reshape(shape), size

    raise InvalidTensor(
        f"tensor {name!r}: data must be a typed array (tagged byte string) or an array of text "
        f"strings, not {_kind(payload)}"
    )


def _check_zero_size(name: str, shape: tuple[int, ...]) -> None:
    # A zero-size tensor passes the byte-length check whatever its other dims are, but numpy still
    # refuses a shape like [0, 2**62] (it multiplies the non-zero dims by the itemsize, at most 8).
    if math.prod(max(d, 1) for d in shape) * 8 > _MAX_NUMPY_BYTES:
        raise InvalidTensor(f"tensor {name!r} has dims {_fmt(shape)}, which are too large")


def _consumed(data: bytes) -> int:
    stream = io.BytesIO(data)
    try:
        cbor2.CBORDecoder(stream, read_size=1, **_LOADS_OPTIONS).decode()
    except Exception as exc:  # pragma: no cover - the same bytes decoded a moment ago
        raise InvalidTensor(f"tensors do not decode as CBOR: {exc}") from None
    return stream.tell()


def _head_size(n: int) -> int:
    """Bytes of the shortest CBOR head carrying argument `n`."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    if n < 0x100000000:
        return 5
    return 9


# --- encoding -----------------------------------------------------------------------------------
def _head(major: int, n: int) -> bytes:
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", mt | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", mt | 26, n)
    return struct.pack(">BQ", mt | 27, n)


# Heads of arguments below 256, precomputed per major type: the common dims, names and ranks.
_UINT, _ARRAY, _TEXT = ([_head(major, n) for n in range(256)] for major in (0, 4, 3))
_TAG_HEADS = {_TAG_DTYPES[tag]: b"\xd8" + bytes((tag,)) for tag in TYPED_ARRAY_TAGS.values()}
_TENSOR_START = b"\xd8\x28\x82"  # tag 40, array(2)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Encode named tensors as CBOR (definite lengths, shortest heads, little-endian typed arrays).

    bool arrays travel as uint8 (tag 64); str/object arrays of `str` as text tensors. Raises
    `InvalidTensor` for a name that is not a non-empty `str`, a value that is not a numpy array, or a
    dtype the format cannot carry (naming the tensor).
    """
    parts: list[bytes | memoryview] = [_head(5, len(tensors))]
    append = parts.append
    for name, array in tensors.items():
        if type(name) is not str or not name:
            raise InvalidTensor(f"tensor names must be non-empty strings, not {name!r}")
        if not isinstance(array, np.ndarray):
            if not isinstance(array, np.generic):
                raise InvalidTensor(f"tensor {name!r} is {_kind(array)}, not a numpy array")
            array = np.asarray(array)
        key = name.encode()
        append(_TEXT[len(key)] if len(key) < 256 else _head(3, len(key)))
        append(key)
        append(_TENSOR_START)
        shape = array.shape
        append(_ARRAY[len(shape)])  # rank <= 64 (numpy)
        for d in shape:
            append(_UINT[d] if d < 256 else _head(0, d))
        dtype = array.dtype
        tag_head = _TAG_HEADS.get(dtype)
        if tag_head is None:
            array, tag_head = _normalise(name, array)
            if tag_head is None:  # text
                append(_head(4, array.size))
                for item in array.flat:
                    text = item.encode()
                    append(_head(3, len(text)))
                    append(text)
                continue
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        append(tag_head)
        append(_head(2, array.nbytes))
        # Big arrays join as views (one copy, into the output); small ones (0-d and zero-size among
        # them, which memoryview cannot cast) are cheaper as bytes.
        append(array.data.cast("B") if array.nbytes > 2048 else array.tobytes())
    return b"".join(parts)


def _normalise(name: str, array: np.ndarray) -> tuple[np.ndarray, bytes | None]:
    """The slow path of encode: bool, byte-swapped numbers, text. -> (array, tag head or None=text)."""
    kind = array.dtype.kind
    if kind == "b":
        as_uint8 = array.view(np.uint8) if array.flags.c_contiguous else array.astype(np.uint8)
        return as_uint8, _TAG_HEADS[_TAG_DTYPES[64]]
    if kind in "iuf":
        little = array.dtype.newbyteorder("<")
        if little in _TAG_HEADS:
            return array.astype(little), _TAG_HEADS[little]
    if kind == "U":
        return array, None
    if kind == "O":
        for item in array.flat:
            if type(item) is not str:
                raise InvalidTensor(f"tensor {name!r} is an object array holding {_kind(item)}; only str")
        return array, None
    raise InvalidTensor(
        f"tensor {name!r} has dtype {array.dtype}, which the tensor encoding cannot carry; supported: "
        + ", ".join(sorted(_JSON_DTYPES))
    )


# --- JSON form ----------------------------------------------------------------------------------
def tensors_from_json(obj: object) -> dict[str, np.ndarray]:
    """Named tensors from their JSON form: `{"x": {"dtype": "float32", "shape": [1, 64], "data": [...]}}`.

    `data` is a flat or nested list (or a bare number for a scalar); `shape` is optional when `data`
    is nested. dtypes are those of the CBOR form plus `"bool"` and `"string"`. Values must fit their
    dtype exactly: no strings for numbers, no fractions or overflow for integers. Raises
    `InvalidTensor` naming the tensor.
    """
    if not isinstance(obj, Mapping):
        raise InvalidTensor(f"tensors must be a JSON object of name to tensor, not {_kind(obj)}")
    if len(obj) > MAX_TENSORS:
        raise InvalidTensor(f"{len(obj)} tensors in one object; at most {MAX_TENSORS} are accepted")
    tensors: dict[str, np.ndarray] = {}
    for name, spec in obj.items():
        if type(name) is not str or not name:
            raise InvalidTensor(f"tensor names must be non-empty strings, not {name!r}")
        tensors[name] = _tensor_from_json(name, spec)
    return tensors


# dtype -> (numpy kinds its JSON values may infer to, what to call them); integers otherwise.
_JSON_KINDS = {
    "bool": ("b", "true/false values"),
    "float16": ("iuf", "numbers"),
    "float32": ("iuf", "numbers"),
    "float64": ("iuf", "numbers"),
}


def _tensor_from_json(name: str, spec: object) -> np.ndarray:
    if not isinstance(spec, Mapping):
        raise InvalidTensor(f"tensor {name!r} must be an object with dtype, shape and data")
    unknown = set(spec) - {"dtype", "shape", "data"}
    if unknown:
        raise InvalidTensor(f"tensor {name!r} has unknown keys {sorted(map(str, unknown))}")
    dtype_name = spec.get("dtype")
    if dtype_name not in _JSON_DTYPES:
        raise InvalidTensor(
            f"tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(sorted(_JSON_DTYPES))}"
        )
    if "data" not in spec:
        raise InvalidTensor(f"tensor {name!r} has no data")
    data = spec["data"]
    is_text = dtype_name == "string"
    try:
        # Infer first, convert second: np.asarray(["1.5"], dtype=float32) would parse the string and
        # np.asarray([1.5], dtype=int32) would truncate.
        inferred = np.asarray(data, dtype=object if is_text else None)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidTensor(f"tensor {name!r}: data is not a rectangular array ({exc})") from None
    kinds, what = _JSON_KINDS.get(dtype_name, ("iu", "integers"))
    if inferred.size:  # an empty list infers float64, fine for any dtype
        if is_text:
            if not all(type(item) is str for item in inferred.flat):
                raise InvalidTensor(f"tensor {name!r} of dtype string must hold strings only")
        elif inferred.dtype.kind not in kinds:
            raise InvalidTensor(f"tensor {name!r} of dtype {dtype_name} must hold {what} only")
    if is_text:
        array = inferred
    else:
        try:
            with np.errstate(all="raise"):  # float overflow (1e39 as float32) is an error, not inf
                array = inferred.astype(dtype_name)
            if inferred.dtype.kind in "iu" and not np.array_equal(array, inferred):
                raise OverflowError("out of range")
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise InvalidTensor(f"tensor {name!r}: values do not fit {dtype_name} ({exc})") from None

    if "shape" in spec:
        shape = spec["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise InvalidTensor(f"tensor {name!r}: shape must be a list of non-negative integers")
        needed = math.prod(shape)
        if needed != array.size:
            raise InvalidTensor(
                f"tensor {name!r} has {array.size} values; shape {_fmt(tuple(shape))} needs {needed}"
            )
        if array.size == 0:
            _check_zero_size(name, tuple(shape))
        array = array.reshape(shape)
    return array


def tensors_to_json(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Named tensors in their JSON form, data flattened in row-major order (see `tensors_from_json`)."""
    out: dict[str, dict[str, Any]] = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        kind = array.dtype.kind
        if kind in "UO":
            dtype_name = "string"
        elif array.dtype.name in _JSON_DTYPES:
            dtype_name = array.dtype.name
        else:
            raise InvalidTensor(f"tensor {name!r} has dtype {array.dtype}, which has no JSON form")
        out[name] = {"dtype": dtype_name, "shape": list(array.shape), "data": array.ravel().tolist()}
    return out


# --- messages -----------------------------------------------------------------------------------
def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _fmt_list(items: list[Any] | tuple[Any, ...]) -> str:
    text = "[" + ",".join(repr(x) for x in items[:8]) + (",...]" if len(items) > 8 else "]")
    return text if len(text) < 200 else text[:197] + "..."


def _kind(obj: object) -> str:
    if type(obj) is cbor2.CBORTag:
        return f"tag {obj.tag}"
    if type(obj) is _ForeignTag:
        return f"tag {obj.tag}"
    names = {
        dict: "a map",
        list: "an array",
        tuple: "an array",
        str: "a text string",
        bytes: "a byte string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(obj), type(obj).__name__)
