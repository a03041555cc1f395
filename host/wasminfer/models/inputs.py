"""A model's signature and the per-call check of inputs against it.

`tensor_spec` reads an input or output from the ONNX Runtime session into a `TensorSpec` (refusing
what is not a plain tensor); `compile_check` turns an input's spec into the few comparisons a call
costs; `check_inputs` runs them, so a bad input gets an error naming the tensor and the shape the
model expects instead of an ORT message, and converts the few dtype differences that are not errors
(bool sent as uint8, the other byte order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from wasminfer.errors import InvalidModel, InvalidTensor

__all__ = ["InputCheck", "TensorSpec", "check_inputs", "compile_check", "has_decoder_pairs", "present_names",
           "tensor_spec"]

# ORT type string -> numpy dtype name (TensorSpec.dtype). "string" tensors are object arrays of str.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
_UINT8 = np.dtype(np.uint8)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output of a model.

    `dtype` is a numpy dtype name ("float32", "int64", "bool", ...) or "string" for text tensors.
    `shape` has an int per fixed dimension, the name of a symbolic one ("batch"), or None for an
    unnamed free one; `shape` itself is None when the model does not declare the rank.
    """

    name: str
    dtype: str
    shape: list[int | str | None] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


def tensor_spec(arg: Any, declared_rank: Mapping[str, bool], kind: str) -> TensorSpec:
    """The spec of an ORT `NodeArg` (`kind`: "input" or "output"); `declared_rank` tells a scalar
    from an undeclared rank, which ORT shows alike. Raises `InvalidModel` for anything but a tensor."""
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        hint = ""
        if arg.type.startswith(("seq(", "map(")):
            hint = (
                " (a skl2onnx classifier's ZipMap: convert with options={id(model): {'zipmap': False}} "
                "to get a probabilities tensor)"
            )
        raise InvalidModel(
            f"{kind} {arg.name!r} has type {arg.type}; only tensors of "
            f"{', '.join(sorted(set(_ORT_TYPES.values())))} can be passed{hint}"
        )
    shape: list[int | str | None] | None = list(arg.shape)
    if not shape and not declared_rank.get(arg.name, True):
        shape = None
    return TensorSpec(arg.name, dtype, shape)


def present_names(past: str) -> tuple[str, ...]:
    """The output names that carry a decoder's past input `past` to its next step (past_key_0 ->
    present_key_0; Hugging Face's past_key_values.0.key -> present.0.key)."""
    if past.startswith("past_key_values"):
        return ("present" + past[len("past_key_values"):],)
    return ("present" + past[len("past"):],)


def has_decoder_pairs(inputs: Iterable[TensorSpec], output_names: Iterable[str]) -> bool:
    """Whether some input is a past with its present output: what `DecoderSpec.of` looks for."""
    outputs = set(output_names)
    return any(spec.name.startswith("past") and any(n in outputs for n in present_names(spec.name))
               for spec in inputs)


@dataclass(frozen=True, slots=True)
class InputCheck:
    """An input's spec compiled for the per-call check."""

    dtype: np.dtype[Any] | None  # None: string
    rank: int | None
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every fixed dimension
    expected: str  # the shape as the messages show it, e.g. "[N,3,224,224]"


def compile_check(spec: TensorSpec) -> InputCheck:
    if spec.shape is None:
        return InputCheck(_dtype_or_none(spec.dtype), None, (), "(any shape)")
    fixed = tuple((axis, d) for axis, d in enumerate(spec.shape) if isinstance(d, int) and d >= 0)
    shown = ",".join("?" if d is None else str(d) for d in spec.shape)
    return InputCheck(_dtype_or_none(spec.dtype), len(spec.shape), fixed, f"[{shown}]")


def _dtype_or_none(name: str) -> np.dtype[Any] | None:
    return None if name == "string" else np.dtype(name)


def check_inputs(checks: dict[str, InputCheck], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed for `session.run`: `inputs` checked against `checks` (by input name), converted
    where a difference is not an error. Raises `InvalidTensor` naming the tensor and what the model
    expects."""
    if len(inputs) != len(checks):
        _refuse_names(checks, inputs)
    feed: dict[str, np.ndarray] = {}
    for name, check in checks.items():
        # As many inputs as expected and each expected one present: then none is unexpected.
        array = inputs.get(name)
        if array is None:
            _refuse_names(checks, inputs)
        if not isinstance(array, np.ndarray):
            raise InvalidTensor(f"input {name!r} is a {type(array).__name__}, not a numpy array")
        if array.dtype != check.dtype:
            array = _convert(name, array, check)
        if check.rank is not None:
            shape = array.shape
            fits = len(shape) == check.rank
            for axis, size in check.fixed if fits else ():  # a loop: `any(<generator>)` costs ~1 µs more
                if shape[axis] != size:
                    fits = False
                    break
            if not fits:
                raise InvalidTensor(
                    f"input {name!r} has shape [{','.join(map(str, shape))}], "
                    f"the model expects {check.expected}"
                )
        feed[name] = array
    return feed


def _refuse_names(checks: Mapping[str, InputCheck], inputs: Mapping[str, object]) -> NoReturn:
    expected = ", ".join(repr(name) for name in checks) or "none"
    for name in inputs:
        if name not in checks:
            raise InvalidTensor(f"unexpected input {name!r}; the model's inputs are {expected}")
    for name in checks:
        if name not in inputs:
            raise InvalidTensor(f"input {name!r} is missing; the model's inputs are {expected}")
    raise InvalidTensor(f"input names do not match the model's inputs, {expected}")  # pragma: no cover


def _convert(name: str, array: np.ndarray, check: InputCheck) -> np.ndarray:
    """The few dtype differences that are not errors; anything else raises InvalidTensor."""
    wanted = check.dtype
    if wanted is None:
        if array.dtype.kind in "OU":  # ORT takes object arrays of str and numpy str arrays alike
            return array
        expected = "string"
    else:
        if wanted.kind == "b" and array.dtype == _UINT8:  # bool travels as uint8 on the wire
            return array.astype(np.bool_)
        if array.dtype.newbyteorder("=") == wanted:  # same type, other byte order
            return array.astype(wanted)
        expected = wanted.name
    got = "string" if array.dtype.kind in "OU" else array.dtype.name
    raise InvalidTensor(f"input {name!r} has dtype {got}, the model expects {expected}")
