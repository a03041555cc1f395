"""`Tensor`: a dtype, a shape and row-major data.

Numeric data is kept as little-endian bytes, the form it crosses the host boundary in; `values()`
and `tolist()` turn it into Python numbers with the `array` module (float16 through `struct`), so
that the SDK works without numpy (componentize-py components have none). Where numpy is there (the
Python runtime, plain Python), `Tensor.of(array)` and `tensor.numpy()` convert in bulk: one copy
in, none out (a read-only view of the bytes).
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Any

# dtype -> (array typecode, element size); float16 has no typecode (struct's "e"), bool is one byte.
_CODES = {
    "uint8": ("B", 1), "int8": ("b", 1), "uint16": ("H", 2), "int16": ("h", 2),
    "uint32": ("I", 4), "int32": ("i", 4), "uint64": ("Q", 8), "int64": ("q", 8),
    "float16": ("", 2), "float32": ("f", 4), "float64": ("d", 8), "bool": ("B", 1),
}  # fmt: skip
DTYPES = (*_CODES, "string")  # the order is the runtime's dtype codes: append only
_NP_DTYPES: dict[str, Any] = {}  # dtype -> numpy dtype, filled as used (numpy may be absent)
_BIG_ENDIAN = sys.byteorder == "big"
# One element of each numeric dtype, little-endian (`item` reads one without unpacking them all).
_ELEMENT = {d: struct.Struct("<" + (code or "e") if d != "bool" else "<?") for d, (code, _) in _CODES.items()}
# A tuple, not `bytes | bytearray`: a union written in an `isinstance` call is built again at each
# call (~1 µs in the runtime's interpreter, which runs compiled to Wasm).
_BYTES = (bytes, bytearray)


class Tensor:
    """A tensor: `dtype` (one of `DTYPES`), `shape` (a tuple, empty for a scalar) and `data`
    (little-endian bytes for numbers and bool, a list of str for dtype "string").

    Build one with `Tensor.of(values, dtype)` (nested lists or a flat sequence plus `shape`),
    `Tensor.from_bytes` or `Tensor.text`; read it with `values()` (flat), `tolist()` (nested) or
    `item()` (one element).
    """

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: Sequence[int], data: bytes | list[str]) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        count = _prod(shape)
        if dtype == "string":
            if not isinstance(data, list) or len(data) != count:
                raise ValueError(f"a string tensor of shape {list(shape)} needs a list of {count} str")
        elif not isinstance(data, _BYTES) or len(data) != count * _CODES[dtype][1]:
            need = count * _CODES[dtype][1]
            raise ValueError(f"a {dtype} tensor of shape {list(shape)} needs {need} bytes of data")
        self.dtype = dtype
        self.shape = shape
        self.data = bytes(data) if isinstance(data, bytearray) else data

    @classmethod
    def _trusted(cls, dtype: str, shape: Sequence[int], data: bytes | list[str]) -> Tensor:
        """A tensor from parts the host already checked (infer's outputs): no validation."""
        t = cls.__new__(cls)
        t.dtype, t.shape, t.data = dtype, tuple(shape), data
        return t

    @classmethod
    def of(cls, values: Any, dtype: str = "float32", shape: Sequence[int] | None = None) -> Tensor:
        """A tensor of `values`: nested lists (their nesting gives the shape) or a flat sequence
        with `shape`. Raises `ValueError` for ragged lists or a count that does not fit `shape`."""
        if shape is None and type(values) is list and values and type(values[0]) is list:
            packed = _pack_matrix(dtype, values)  # the common case, in one C call per row
            if packed is not None:
                return cls._trusted(dtype, (len(values), len(values[0])), packed)
        if _is_ndarray(values):
            return cls._from_numpy(values, dtype, shape)
        flat, found = _flatten(values)
        shape = tuple(shape) if shape is not None else found
        if _prod(shape) != len(flat):
            raise ValueError(f"{len(flat)} values do not fill shape {list(shape)}")
        if dtype == "string":
            return cls(dtype, shape, [str(v) for v in flat])
        return cls(dtype, shape, _pack(dtype, flat))

    @classmethod
    def _from_numpy(cls, arr: Any, dtype: str, shape: Sequence[int] | None) -> Tensor:
        import numpy as np

        if dtype == "string":
            return cls.text([str(v) for v in arr.reshape(-1).tolist()], shape or arr.shape)
        np_dtype = np.dtype(np.uint8 if dtype == "bool" else dtype).newbyteorder("<")
        data = np.ascontiguousarray(arr, dtype=np_dtype).tobytes()
        return cls(dtype, tuple(shape) if shape is not None else arr.shape, data)

    def numpy(self) -> Any:
        """The tensor as a numpy array: a read-only view of its bytes (copy it to write to it)."""
        import numpy as np

        if self.dtype == "string":
            return np.array(self.data, dtype=object).reshape(self.shape)
        np_dtype = _NP_DTYPES.get(self.dtype)
        if np_dtype is None:
            np_dtype = _NP_DTYPES[self.dtype] = np.dtype(np.bool_ if self.dtype == "bool" else self.dtype
                                                         ).newbyteorder("<")
        return np.frombuffer(self.data, np_dtype).reshape(self.shape)

    @classmethod
    def from_bytes(cls, data: bytes, dtype: str, shape: Sequence[int]) -> Tensor:
        """A numeric tensor over little-endian `data` (not copied)."""
        return cls(dtype, shape, data)

    @classmethod
    def text(cls, strings: Sequence[str], shape: Sequence[int] | None = None) -> Tensor:
        """A string tensor (ONNX `tensor(string)`); 1-D unless `shape` says otherwise."""
        return cls("string", shape if shape is not None else (len(strings),), list(strings))

    @property
    def size(self) -> int:
        return _prod(self.shape)

    def values(self) -> Sequence[Any]:
        """Every element, flat, in row-major order (an `array.array` for numbers, a list otherwise)."""
        if self.dtype == "string":
            return list(self.data)
        code, size = _CODES[self.dtype]
        if not code:  # float16
            return list(struct.unpack(f"<{len(self.data) // 2}e", self.data))
        out = array.array(code, self.data)
        if _BIG_ENDIAN and size > 1:
            out.byteswap()
        if self.dtype == "bool":
            return [bool(v) for v in out]
        return out

    def tolist(self) -> Any:
        """The elements as nested lists of the tensor's shape (a bare value for a scalar)."""
        values = self.values()
        flat = values.tolist() if type(values) is array.array else list(values)
        shape = self.shape
        if len(shape) == 2 and shape[0] == 1:  # a model's one row of outputs: no slicing
            return [flat]
        if not shape:
            return flat[0]
        return _nest(flat, shape)

    def item(self, *index: int) -> Any:
        """One element by its index (`t.item(0, 3)`), or the only one of a scalar or 1-element tensor."""
        flat = 0
        shape = self.shape
        if len(index) == 1 and len(shape) == 1:  # the common case, without the loop below
            flat = index[0]
            if not 0 <= flat < shape[0]:
                raise IndexError(f"index {index} out of shape {list(shape)}")
        elif not index:
            if self.size != 1:
                raise ValueError(f"item() of a tensor of shape {list(self.shape)} needs an index")
        elif len(index) != len(self.shape):
            raise IndexError(f"index {index} for shape {list(self.shape)}")
        else:
            for i, d in zip(index, self.shape, strict=True):
                if not 0 <= i < d:
                    raise IndexError(f"index {index} out of shape {list(self.shape)}")
                flat = flat * d + i
        if self.dtype == "string":
            return self.data[flat]
        element = _ELEMENT[self.dtype]
        return element.unpack_from(self.data, flat * element.size)[0]

    def reshape(self, *shape: int) -> Tensor:
        """The same data under another shape of the same size."""
        if _prod(shape) != self.size:
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(shape)}")
        return Tensor(self.dtype, shape, self.data)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tensor) and self.dtype == other.dtype and self.shape == other.shape
                and self.data == other.data)

    def __repr__(self) -> str:
        preview = list(self.values())[:6]
        more = ", …" if self.size > 6 else ""
        return f"Tensor({self.dtype}, shape={list(self.shape)}, [{', '.join(map(repr, preview))}{more}])"


def _is_ndarray(values: Any) -> bool:
    numpy = sys.modules.get("numpy")  # never imported here: a component has none
    return numpy is not None and isinstance(values, numpy.ndarray)


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flatten(values: Any) -> tuple[list[Any], tuple[int, ...]]:
    if isinstance(values, Tensor):
        return list(values.values()), values.shape
    if not isinstance(values, list | tuple | array.array):
        return [values], ()
    if not values or not isinstance(values[0], list | tuple):
        return (values if isinstance(values, list) else list(values)), (len(values),)
    width = len(values[0])
    if all(type(row) in (list, tuple) and len(row) == width for row in values) and not any(
        isinstance(x, list | tuple) for row in values for x in row[:1]
    ):  # the common case, a matrix: one pass
        return [x for row in values for x in row], (len(values), width)
    rows = [_flatten(v) for v in values]
    inner = rows[0][1]
    if any(shape != inner for _, shape in rows):
        raise ValueError("ragged nested lists: every row must have the same shape")
    return [x for flat, _ in rows for x in flat], (len(values), *inner)


def _pack_matrix(dtype: str, rows: list[Any]) -> bytes | None:
    """The bytes of a list of equally long lists of numbers; None if `rows` is anything else (the
    general path then says what is wrong)."""
    code, size = _CODES.get(dtype, ("", 0))
    width = len(rows[0])
    if not code or dtype == "bool" or (width and type(rows[0][0]) in (list, tuple)):
        return None
    # `struct` packs a row of numbers in a third of the time `array.extend` takes (which appends one
    # at a time), to the same bytes. What it refuses (a number out of range, a float for an int, a
    # short row) goes the array's way, which keeps the array's results and errors.
    row = _ROWS.get((code, width))
    if row is None:
        if len(_ROWS) >= 64:
            _ROWS.clear()
        row = _ROWS[(code, width)] = struct.Struct(f"<{width}{code}")
    try:
        if len(rows) == 1:
            return row.pack(*rows[0])
        if all(type(r) is list for r in rows):
            return b"".join([row.pack(*r) for r in rows])
    except (struct.error, OverflowError, TypeError):
        pass
    return _pack_rows(code, size, width, rows)


_ROWS: dict[tuple[str, int], struct.Struct] = {}  # (typecode, width) -> the Struct of one row


def _pack_rows(code: str, size: int, width: int, rows: list[Any]) -> bytes | None:
    packed = array.array(code)
    for row in rows:
        if type(row) is not list or len(row) != width:
            return None
        try:
            packed.extend(row)
        except TypeError:  # a nested list further down, or a non-number: the general path explains
            return None
    if _BIG_ENDIAN and size > 1:
        packed.byteswap()
    return packed.tobytes()


def _pack(dtype: str, flat: list[Any]) -> bytes:
    code, size = _CODES[dtype]
    if not code:
        return struct.pack(f"<{len(flat)}e", *flat)
    if dtype == "bool":
        flat = [1 if v else 0 for v in flat]
    # array takes ints for floats; it raises TypeError for floats as ints, OverflowError out of range
    packed = array.array(code, flat)
    if _BIG_ENDIAN and size > 1:
        packed.byteswap()
    return packed.tobytes()


def _nest(flat: list[Any], shape: tuple[int, ...]) -> list[Any]:
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]
