"""Running a function in plain Python, before (or beside) building it: same handler, same SDK.

    from wasminfer_guest import local
    local.use(my_infer)                 # (model, {name: numpy array}) -> {name: numpy array}
    app = local.load("functions/text-classify")
    print(local.invoke(b"great match", "text/plain").body)

`my_infer` can be a `wasminfer.models.ModelRegistry`'s `infer`, or anything that runs ONNX models.
Needs numpy (the guest itself never does).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from wasminfer_guest import _bindings as b
from wasminfer_guest import export
from wasminfer_guest.http import Response
from wasminfer_guest.inference import InferError
from wasminfer_guest.tensor import Tensor

# wasminfer's error codes (`WasminferError.code`) -> infer-error kinds
_KINDS = {
    "model_not_found": "model-not-found", "model_not_allowed": "model-not-allowed",
    "invalid_tensor": "invalid-tensor", "tensor_too_large": "tensor-too-large",
    "inference_failed": "runtime", "infer_limit_exceeded": "too-many-calls",
}  # fmt: skip


def use(infer: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None,
        models: Iterable[str] | None = None) -> None:
    """Sends the SDK's `infer` to `infer(model, {name: ndarray}) -> {name: ndarray}` (None: none).

    With `models`, other models are refused as the host refuses models a manifest does not list.
    """
    if infer is None:
        b.local_infer = None
        return
    allowed = None if models is None else set(models)

    def run(model: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if allowed is not None and model not in allowed:
            raise InferError("model-not-allowed", f"model {model!r} is not in the allowed models")
        try:
            outputs = infer(model, {name: to_numpy(t) for name, t in inputs.items()})
        except Exception as exc:
            kind = _KINDS.get(getattr(exc, "code", ""))
            if kind is None:
                raise
            raise InferError(kind, getattr(exc, "message", str(exc))) from exc
        return {name: from_numpy(array) for name, array in outputs.items()}

    b.local_infer = run


def load(path: str | Path, module: str = "app") -> ModuleType:
    """Imports a function's module (`app.py` of a folder, or a `.py` file) afresh; its `@handler`
    becomes the one `invoke` calls. The folder goes on `sys.path` for its own imports."""
    path = Path(path)
    file = path / f"{module}.py" if path.is_dir() else path
    folder = str(file.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"wasminfer_local_{file.stem}_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    export.registered()
    return mod


def invoke(body: bytes, content_type: str = "") -> Response:
    """Calls the registered handler like the host does; its exceptions propagate unchanged."""
    return export.call(body, content_type)


def to_numpy(t: Tensor) -> Any:
    import numpy as np

    if t.dtype == "string":
        array = np.empty(len(t.data), dtype=object)
        array[:] = t.data
        return array.reshape(t.shape)
    dtype = np.dtype("uint8" if t.dtype == "bool" else t.dtype).newbyteorder("<")
    array = np.frombuffer(t.data, dtype=dtype).reshape(t.shape)
    return array.astype(bool) if t.dtype == "bool" else array


def from_numpy(array: Any) -> Tensor:
    import numpy as np

    array = np.asarray(array)
    if array.dtype.kind in "UO":
        return Tensor("string", array.shape, [str(s) for s in array.ravel()])
    if array.dtype.kind == "b":
        return Tensor("bool", array.shape, array.astype(np.uint8).tobytes())
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return Tensor(array.dtype.name, array.shape, np.ascontiguousarray(little).tobytes())
