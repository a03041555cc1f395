"""`infer`: run a model the function's manifest allows, on named tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wasminfer_guest import _bindings as b
from wasminfer_guest.tensor import Tensor

# The cases of the WIT variant `infer-error` (guest-sdk/wit/world.wit), i.e. the handler ABI's codes.
KINDS = (
    "invalid-argument", "model-not-found", "model-not-allowed", "invalid-tensor", "runtime",
    "too-many-calls", "tensor-too-large",
)  # fmt: skip


class InferError(Exception):
    """`infer` failed. `kind` is one of `KINDS`, `message` the host's explanation.

    Not caught, it fails the invocation with the host's own error for it (e.g. 403
    model_not_allowed, 422 invalid_tensor): what the caller needs to fix.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def infer(model: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Runs `model` on `inputs` (tensor name -> `Tensor`); returns every output by name.

    Raises `InferError` (the model is not in the manifest's `models`, an input does not match
    the model, a limit, ...), `TypeError` for inputs that are not `Tensor`s.
    """
    for name, tensor in inputs.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"input {name!r} is {type(tensor).__name__}, not a wasminfer_guest.Tensor")
    if b.IN_RUNTIME:
        return _runtime_infer(model, inputs)
    if not b.IN_COMPONENT:
        if b.local_infer is None:
            raise RuntimeError("infer() outside a component needs a backend: wasminfer_guest.local.use()")
        return b.local_infer(model, dict(inputs))
    try:
        outputs = b.wit_inference.infer(model, [_to_wit(name, t) for name, t in inputs.items()])
    except b.Err as err:
        raise InferError(_kind(err.value), err.value.value) from None
    return {t.name: _from_wit(t) for t in outputs}


def _runtime_infer(model: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One frame to the host: a JSON header, then every tensor's bytes as they are (no per-element
    work: numpy arrays became bytes with one copy in `Tensor.of`)."""
    return runtime_answer(b._host.call(b"i" + runtime_request(model, inputs)))


def runtime_request(model: str, inputs: Mapping[str, Tensor]) -> bytes:
    """The tensors of an infer (or decoder step) frame: a JSON header, then each tensor's bytes."""
    import json

    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, t in inputs.items():
        if t.dtype == "string":
            specs.append({"name": name, "dtype": "string", "shape": list(t.shape), "strings": t.data})
        else:
            specs.append({"name": name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": len(t.data)})
            blobs.append(t.data)  # type: ignore[arg-type]
    raw = json.dumps({"model": model, "tensors": specs}, separators=(",", ":")).encode()
    return b"".join([len(raw).to_bytes(4, "little"), raw, *blobs])


def runtime_answer(answer: bytes) -> dict[str, Tensor]:
    """The outputs of an infer (or decoder step) answer. Raises `InferError`."""
    import json

    if answer[:1] != b"\x00":
        err = json.loads(answer[1:])
        raise InferError(err["kind"], err["message"])
    n = int.from_bytes(answer[1:5], "little")
    header = json.loads(answer[5:5 + n])
    data = memoryview(answer)[5 + n:]
    out: dict[str, Tensor] = {}
    offset = 0
    for spec in header:
        if spec["dtype"] == "string":
            out[spec["name"]] = Tensor._trusted("string", spec["shape"], spec["strings"])
            continue
        size = spec["nbytes"]
        out[spec["name"]] = Tensor._trusted(spec["dtype"], spec["shape"], bytes(data[offset:offset + size]))
        offset += size
    return out


def _to_wit(name: str, t: Tensor) -> Any:
    types = b.wit_types
    data = types.TensorData_Text(t.data) if t.dtype == "string" else types.TensorData_Raw(t.data)
    return types.Tensor(name=name, dtype=_WIT_DTYPES[t.dtype], shape=list(t.shape), data=data)


def _from_wit(t: Any) -> Tensor:
    return Tensor._trusted(_DTYPE_NAMES[t.dtype], t.shape, t.data.value)


_DTYPE_NAMES = {d: d.name.lower() for d in b.wit_types.Dtype} if b.IN_COMPONENT else {}
_WIT_DTYPES = {name: d for d, name in _DTYPE_NAMES.items()}


def _kind(case: Any) -> str:
    # InferError_ModelNotAllowed -> model-not-allowed
    name = type(case).__name__.split("_", 1)[1]
    return "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")


def to_wit_error(err: InferError) -> Any:
    """The WIT `infer-error` value of `err` (to hand an unrecovered infer error back to the host)."""
    cls = "InferError_" + "".join(part.capitalize() for part in err.kind.split("-"))
    return getattr(b.wit_types, cls)(err.message)
