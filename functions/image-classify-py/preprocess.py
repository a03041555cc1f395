"""The pre-processing of image-classify-py, in numpy and Pillow: the function runs this file in
the Python runtime, and tests/test_python_runtime.py runs the very same file natively to check
the function's answers."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIZE = 224
SHORT_SIDE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def decode(data: bytes) -> Image.Image:
    """An RGB image from the bytes of any format Pillow decodes here. Raises `ValueError` for
    anything else."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises several kinds for bytes that are not an image
        raise ValueError(f"not an image Pillow can read ({type(exc).__name__}: {exc})") from None
    return image.convert("RGB")


def preprocess(image: Image.Image) -> np.ndarray:
    """Short side to 256 (bilinear), centre crop 224, scale to [0, 1], normalise, HWC -> NCHW."""
    w, h = image.size
    scale = SHORT_SIDE / min(w, h)
    resized = image.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), Image.BILINEAR)
    left, top = (resized.width - SIZE) // 2, (resized.height - SIZE) // 2
    x = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32)
    x = (x * np.float32(1 / 255) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[np.newaxis])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, labels: list[str], k: int) -> list[dict[str, float | str]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": labels[i], "score": float(scores[i])} for i in order]
