"""The model registry (wasminfer/models/registry.py), with real models made in code."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from wasminfer.errors import (
    InferenceFailed,
    InvalidModel,
    InvalidName,
    InvalidTensor,
    ModelNotFound,
    Unavailable,
)
from wasminfer.models import ModelInfo, ModelRegistry, TensorSpec, decode_tensors, encode_tensors

OPSET = [helper.make_opsetid("", 17)]


# --- models made in code ------------------------------------------------------------------------
def serialize(model: onnx.ModelProto) -> bytes:
    return bytes(model.SerializeToString())


def add_model(constant: float = 1.0, *, metadata: dict[str, str] | None = None) -> bytes:
    """y = x @ eye(4) + constant, x: float32 [N, 4] (a symbolic batch dimension)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "eye"], ["m"]),
            helper.make_node("Add", ["m", "c"], ["y"]),
        ],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.eye(4, dtype=np.float32), "eye"),
            numpy_helper.from_array(np.array([constant], dtype=np.float32), "c"),
        ],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    if metadata:
        helper.set_model_props(model, metadata)
    return serialize(model)


def two_input_model() -> bytes:
    """z = a + b (int64 [N]) and flag = not(mask) (bool [3]), s = Identity(text [?])."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["z"]),
            helper.make_node("Not", ["mask"], ["flag"]),
            helper.make_node("Identity", ["text"], ["s"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["M"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [3]),
            helper.make_tensor_value_info("text", TensorProto.STRING, [None]),
        ],
        [
            helper.make_tensor_value_info("z", TensorProto.INT64, None),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, [3]),
            helper.make_tensor_value_info("s", TensorProto.STRING, [None]),
        ],
    )
    return serialize(helper.make_model(graph, opset_imports=OPSET))


def any_rank_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "any",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return serialize(helper.make_model(graph, opset_imports=OPSET))


def external_tensor(name: str, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_data_model(where: str = "initializer", location: str = "../../etc/passwd") -> bytes:
    """y = x + w where w's data is "in `location`", w placed where `where` says."""
    w = external_tensor("w", location)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if where == "initializer":
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "ext", [x], [y], [w])
    elif where == "constant":
        nodes = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["x", "w"], ["y"])]
        graph = helper.make_graph(nodes, "ext", [x], [y])
    else:  # an initializer of the then-branch of an If
        branch = helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["t"])],
            "then",
            [],
            [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
            [w],
        )
        other = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["e"])],
            "else",
            [],
            [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
        )
        nodes = [
            helper.make_node(
                "Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
            ),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
        ]
        graph = helper.make_graph(nodes, "ext", [x], [y])
    return serialize(helper.make_model(graph, opset_imports=OPSET))


def custom_domain_model(declare: bool = True) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["y"], domain="com.example.evil")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    opsets = OPSET + ([helper.make_opsetid("com.example.evil", 1)] if declare else [])
    return serialize(helper.make_model(graph, opset_imports=opsets))


def local_function_model() -> bytes:
    """y = Twice(x), Twice a function defined in the model, in domain "local"."""
    twice = helper.make_function(
        "local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])], OPSET
    )
    graph = helper.make_graph(
        [helper.make_node("Twice", ["x"], ["y"], domain="local")],
        "fn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=OPSET + [helper.make_opsetid("local", 1)], functions=[twice]
    )
    return serialize(model)


def sequence_input_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["seq"], ["n"])],
        "seq",
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    return serialize(helper.make_model(graph, opset_imports=OPSET))


def digits_model(zipmap: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    """LogisticRegression on scikit-learn's bundled digits, via skl2onnx: (model, X, labels)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():  # convergence and deprecation chatter is not what is tested
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=3000).fit(x, y)
        onx = convert_sklearn(
            clf,
            initial_types=[("input", FloatTensorType([None, 64]))],
            options={id(clf): {"zipmap": zipmap}},
        )
    return serialize(onx), x.astype(np.float32), clf.predict(x)


@pytest.fixture(scope="module")
def digits() -> tuple[bytes, np.ndarray, np.ndarray]:
    return digits_model()


@pytest.fixture
def registry() -> Iterator[ModelRegistry]:
    with ModelRegistry() as reg:
        yield reg


# --- load ---------------------------------------------------------------------------------------
def test_load_reports_the_model(registry: ModelRegistry) -> None:
    data = add_model(metadata={"author": "tests", "labels": "a,b"})
    info = registry.load("add", data)
    assert info.name == "add" and info.size_bytes == len(data)
    assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
    assert info.inputs == [TensorSpec("x", "float32", ["N", 4])]
    assert info.outputs == [TensorSpec("y", "float32", ["N", 4])]
    assert info.metadata == {"author": "tests", "labels": "a,b"}
    assert info.load_seconds > 0 and info.resident_bytes >= 0
    assert (info.intra_op_threads, info.inter_op_threads) == (1, 1)
    as_json = json.loads(json.dumps(info.to_dict()))
    assert as_json["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 4]}]
    assert registry.get("add") is info and "add" in registry and "nope" not in registry
    y = registry.infer("add", {"x": np.ones((2, 4), dtype=np.float32)})["y"]
    np.testing.assert_array_equal(y, np.full((2, 4), 2.0, dtype=np.float32))


def test_load_digits_classifier(
    registry: ModelRegistry, digits: tuple[bytes, np.ndarray, np.ndarray]
) -> None:
    model, x, expected = digits
    info = registry.load("digits", model)
    assert info.inputs == [TensorSpec("input", "float32", [None, 64])]
    assert [(o.name, o.dtype, o.shape) for o in info.outputs] == [
        ("label", "int64", [None]),
        ("probabilities", "float32", [None, 10]),
    ]
    out = registry.infer("digits", {"input": x[:100]})
    np.testing.assert_array_equal(out["label"], expected[:100])
    assert out["probabilities"].shape == (100, 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_load_from_path_and_thread_knobs(registry: ModelRegistry, tmp_path: Path) -> None:
    path = tmp_path / "add.onnx"
    path.write_bytes(add_model())
    info = registry.load("add", path, intra_op_threads=0, inter_op_threads=2)
    assert (info.intra_op_threads, info.inter_op_threads) == (0, 2)
    assert registry.infer("add", {"x": np.zeros((1, 4), dtype=np.float32)})["y"].tolist() == [[1.0] * 4]


def large_run_model(mib: int) -> bytes:
    """x float32 [1, 1] -> Expand to `mib` MiB -> ReduceSum -> y: one run allocates `mib` MiB that
    constant folding cannot take away (x is an input)."""
    rows = mib * (1 << 20) // (4 * 65536)
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "large_run",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array([rows, 65536], dtype=np.int64), "shape")],
    )  # fmt: skip
    return serialize(helper.make_model(graph, opset_imports=OPSET))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("arena", [False, True])
def test_memory_arena_keeps_a_large_runs_memory_only_when_on(registry: ModelRegistry, arena: bool) -> None:
    """The option reaches the session: with the arena the 128 MiB a run needed stay resident after
    it answered (ORT grows the arena by doubling, so at least 128 MiB); without it they go back to
    the kernel with the tensor (glibc maps a block this large on its own and unmaps it on free)."""
    mib = 1 << 20
    before = _rss()
    info = registry.load("big", large_run_model(128), intra_op_threads=1, memory_arena=arena)
    y = registry.infer("big", {"x": np.full((1, 1), 0.5, dtype=np.float32)})["y"]
    held = _rss() - before
    assert float(y) == pytest.approx(0.5 * 128 * mib / 4, rel=1e-3)
    assert info.memory_arena is arena and info.options()["memory_arena"] is arena
    assert info.to_dict()["memory_arena"] is arena
    if arena:
        assert held >= 128 * mib, held / mib
    else:
        assert held < 48 * mib, held / mib


@pytest.mark.parametrize("location", ["../../etc/passwd", "passwd"])
@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_external_data_is_refused_never_read(
    registry: ModelRegistry, where: str, location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ORT resolves the external data of a model loaded from bytes against the working directory
    # (1.32 reads a file named "passwd" there when graph optimisations are off; it refuses "../"
    # itself, older versions did not). Give it a file to find, so that the refusal is ours.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_bytes(bytes(range(64)))
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b" if location.startswith("..") else tmp_path / "etc")
    with pytest.raises(
        InvalidModel,
        match=rf"^tensor 'w' \(model\.graph\..*\) keeps its data outside the model \(external data, "
        rf"location '{re.escape(location)}'\); upload a model with its weights inside",
    ):
        registry.load("ext", external_data_model(where, location))
    assert "ext" not in registry


def test_custom_domain_is_refused(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidModel, match="imports operator domain 'com.example.evil'; only '', 'ai.onnx'"):
        registry.load("evil", custom_domain_model())
    with pytest.raises(InvalidModel, match="uses operator 'Evil' of domain 'com.example.evil'"):
        registry.load("evil", custom_domain_model(declare=False))


def test_functions_defined_in_the_model_are_allowed(registry: ModelRegistry) -> None:
    registry.load("fn", local_function_model())
    assert registry.infer("fn", {"x": np.array([1, 2], dtype=np.float32)})["y"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not an ONNX model: no graph"),
        (b"definitely not onnx", "not an ONNX model"),
        (b"\x08\x07", "not an ONNX model: no graph"),
        (bytes(range(256)) * 4, "not an ONNX model"),
    ],
)
def test_garbage_is_refused(registry: ModelRegistry, data: bytes, match: str) -> None:
    with pytest.raises(InvalidModel, match=match):
        registry.load("garbage", data)


def test_ort_failure_is_invalid_model(registry: ModelRegistry) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "missing"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    broken = helper.make_model(graph, opset_imports=OPSET).SerializeToString()
    with pytest.raises(InvalidModel, match="ONNX Runtime cannot load the model: .*missing"):
        registry.load("broken", broken)


def test_zipmap_output_is_refused_with_a_hint(registry: ModelRegistry) -> None:
    model, _, _ = digits_model(zipmap=True)
    with pytest.raises(InvalidModel, match=r"output 'output_probability' has type seq\(map.*'zipmap': False"):
        registry.load("zipmap", model)


def test_sequence_input_is_refused(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidModel, match=r"input 'seq' has type seq\(tensor\(float\)\)"):
        registry.load("seq", sequence_input_model())


@pytest.mark.parametrize("name", ["", "Upper", "-dash", "a/b", "x" * 65, "sp ace", "..", "ü"])
def test_bad_names(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(InvalidName):
        registry.load(name, add_model())


def test_failed_reload_keeps_the_model_serving(registry: ModelRegistry) -> None:
    registry.load("add", add_model())
    with pytest.raises(InvalidModel):
        registry.load("add", external_data_model())
    assert registry.infer("add", {"x": np.zeros((1, 4), dtype=np.float32)})["y"].tolist() == [[1.0] * 4]


# --- infer: input checks ------------------------------------------------------------------------
def test_unknown_model(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFound, match="model 'ghost' does not exist"):
        registry.infer("ghost", {})


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "input 'x' is missing; the model's inputs are 'x'"),
        ({"y": np.zeros((1, 4), np.float32)}, "unexpected input 'y'; the model's inputs are 'x'"),
        (
            {"x": np.zeros((1, 4), np.float32), "extra": np.zeros(1)},
            "unexpected input 'extra'; the model's inputs are 'x'",
        ),
        ({"x": np.zeros((1, 4), np.float64)}, "input 'x' has dtype float64, the model expects float32"),
        ({"x": np.zeros((1, 4), np.uint8)}, "input 'x' has dtype uint8, the model expects float32"),
        ({"x": np.array([["a"] * 4])}, "input 'x' has dtype string, the model expects float32"),
        ({"x": np.zeros(4, np.float32)}, r"input 'x' has shape \[4\], the model expects \[N,4\]"),
        ({"x": np.zeros((1, 4, 1), np.float32)}, r"input 'x' has shape \[1,4,1\], the model expects \[N,4\]"),
        ({"x": np.zeros((2, 5), np.float32)}, r"input 'x' has shape \[2,5\], the model expects \[N,4\]"),
        ({"x": [[0.0] * 4]}, "input 'x' is a list, not a numpy array"),
    ],
)
def test_input_errors(registry: ModelRegistry, inputs: dict[str, np.ndarray], message: str) -> None:
    registry.load("add", add_model())
    with pytest.raises(InvalidTensor) as info:
        registry.infer("add", inputs)
    assert info.value.message == message.replace("\\", "")
    assert type(info.value) is InvalidTensor


def test_shape_message_names_the_expected_shape(
    registry: ModelRegistry, digits: tuple[bytes, np.ndarray, np.ndarray]
) -> None:
    registry.load("digits", digits[0])
    with pytest.raises(
        InvalidTensor, match=r"^input 'input' has shape \[1,3,8,8\], the model expects \[\?,64\]$"
    ):
        registry.infer("digits", {"input": np.zeros((1, 3, 8, 8), np.float32)})


def test_free_dimensions_accept_any_size(registry: ModelRegistry) -> None:
    registry.load("add", add_model())
    for batch in (0, 1, 7, 300):
        assert registry.infer("add", {"x": np.zeros((batch, 4), np.float32)})["y"].shape == (batch, 4)
    registry.load("any", any_rank_model())
    assert registry.get("any").inputs == [TensorSpec("x", "float32", None)]
    for shape in ((), (3,), (2, 0, 5)):
        assert registry.infer("any", {"x": np.zeros(shape, np.float32)})["y"].shape == shape


def test_bool_uint8_and_text_inputs(registry: ModelRegistry) -> None:
    registry.load("two", two_input_model())
    wire = encode_tensors(
        {
            "a": np.array([1, 2, 3], np.int64),
            "b": np.array([10, 20, 30], np.int64),
            "mask": np.array([True, False, True]),  # travels as uint8
            "text": np.array(["héllo", "wörld"], dtype=object),
        }
    )
    inputs = decode_tensors(wire)  # read-only views, as the host passes them
    assert inputs["mask"].dtype == np.uint8 and not inputs["a"].flags.writeable
    out = registry.infer("two", inputs)
    assert out["z"].tolist() == [11, 22, 33]
    assert out["flag"].dtype == np.bool_ and out["flag"].tolist() == [False, True, False]
    assert out["s"].tolist() == ["héllo", "wörld"]
    assert decode_tensors(encode_tensors(out))["flag"].tolist() == [0, 1, 0]

    base = {"a": np.array([1], np.int64), "b": np.array([1], np.int64), "text": np.array(["x"])}
    with pytest.raises(InvalidTensor, match="^input 'mask' has dtype int8, the model expects bool$"):
        registry.infer("two", {**base, "mask": np.zeros(3, np.int8)})
    with pytest.raises(InvalidTensor, match="^input 'a' has dtype bool, the model expects int64$"):
        registry.infer("two", {**base, "a": np.array([True]), "mask": np.zeros(3, bool)})
    with pytest.raises(InvalidTensor, match="^input 'text' has dtype float32, the model expects string$"):
        registry.infer("two", {**base, "text": np.zeros(1, np.float32), "mask": np.zeros(3, bool)})


def test_other_byte_order_and_layout_are_fine(registry: ModelRegistry) -> None:
    registry.load("add", add_model())
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    expected = registry.infer("add", {"x": np.ascontiguousarray(x.T)})["y"]
    np.testing.assert_array_equal(registry.infer("add", {"x": x.T})["y"], expected)
    np.testing.assert_array_equal(registry.infer("add", {"x": x.T.astype(">f4")})["y"], expected)


def test_runtime_failure_is_inference_failed(registry: ModelRegistry) -> None:
    registry.load("two", two_input_model())
    inputs = {
        "a": np.arange(3, dtype=np.int64),
        "b": np.arange(4, dtype=np.int64),  # N=3, M=4: valid shapes each, not broadcastable together
        "mask": np.zeros(3, bool),
        "text": np.array(["x"]),
    }
    with pytest.raises(InferenceFailed, match="^model 'two' failed: .*") as info:
        registry.infer("two", inputs)
    assert info.value.status == 500 and info.value.code == "inference_failed"
    assert registry.stats("two").errors == 1


def test_runs_call_the_binding_and_answer_as_ort_s_wrapper_does(registry: ModelRegistry) -> None:
    # The registry skips ORT's Python wrapper (`session.runner`): the same session answers the same
    # through both, errors stay the registry's, and no run is retried on another provider.
    registry.load("two", two_input_model())
    model = registry._models["two"]
    session = model.session
    assert model.run_session == session._sess.run
    assert session._enable_fallback is False
    feed = {"a": np.arange(3, dtype=np.int64), "b": np.arange(3, dtype=np.int64) * 7,
            "mask": np.array([True, False, True]), "text": np.array(["é", "x"])}
    got = registry.infer("two", feed)
    want = dict(zip(model.output_names, session.run(model.output_names, feed), strict=True))
    assert list(got) == list(want) == model.output_names
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(got["z"], [0, 8, 16])
    with pytest.raises(InvalidTensor,
                       match="^input 'mask' is missing; the model's inputs are 'a', 'b', 'mask', 'text'$"):
        registry.infer("two", {k: v for k, v in feed.items() if k != "mask"})


# --- lifecycle ----------------------------------------------------------------------------------
def test_stats_count_runs_errors_and_rejections(registry: ModelRegistry) -> None:
    registry.load("add", add_model())
    assert registry.stats("add").runs == 0 and registry.stats("add").last_used is None
    for _ in range(5):
        registry.infer("add", {"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(InvalidTensor):
        registry.infer("add", {"x": np.zeros((1, 4), np.float64)})
    stats = registry.stats("add")
    assert (stats.runs, stats.errors, stats.rejected) == (5, 0, 1)
    assert 0 < stats.run_seconds_total < 5 and stats.last_used is not None
    registry.load("add", add_model(2.0))  # counters are per name: they survive a reload
    assert registry.stats("add").runs == 5
    registry.unload("add")
    with pytest.raises(ModelNotFound):
        registry.stats("add")


def test_unload_list_close(registry: ModelRegistry) -> None:
    for name in ("b-model", "a-model"):
        registry.load(name, add_model())
    assert [info.name for info in registry.list()] == ["a-model", "b-model"]
    assert list(registry) == ["a-model", "b-model"] and len(registry) == 2
    registry.unload("a-model")
    assert "a-model" not in registry
    with pytest.raises(ModelNotFound):
        registry.unload("a-model")
    with pytest.raises(ModelNotFound):
        registry.get("a-model")
    registry.close()
    registry.close()  # idempotent
    assert registry.list() == []
    with pytest.raises(ModelNotFound):
        registry.infer("b-model", {"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(Unavailable, match="closed"):
        registry.load("c-model", add_model())


class _BlockingRun:
    """Wraps a model's run (`_Model.run_session`): waits until released, to hold a call in flight."""

    def __init__(self, run: Any) -> None:
        self.inner = run
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, *args: object) -> object:
        self.entered.set()
        assert self.release.wait(10)
        return self.inner(*args)


def test_reload_is_atomic_and_in_flight_calls_finish_on_the_old_session(registry: ModelRegistry) -> None:
    registry.load("add", add_model(1.0))
    blocking = _BlockingRun(registry._models["add"].run_session)
    registry._models["add"].run_session = blocking.run
    x = np.zeros((1, 4), np.float32)
    result: list[np.ndarray] = []
    caller = threading.Thread(target=lambda: result.append(registry.infer("add", {"x": x})["y"]))
    caller.start()
    assert blocking.entered.wait(10)
    registry.load("add", add_model(2.0))  # does not wait for the call in flight
    assert registry.infer("add", {"x": x})["y"].tolist() == [[2.0] * 4]
    blocking.release.set()
    caller.join(10)
    assert result[0].tolist() == [[1.0] * 4]


def test_reload_under_load_never_mixes(registry: ModelRegistry) -> None:
    registry.load("add", add_model(1.0))
    x = np.zeros((1, 4), np.float32)
    seen: set[float] = set()
    last = [0.0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        try:
            while not stop.is_set():
                y = registry.infer("add", {"x": x})["y"]
                assert len(set(y.ravel().tolist())) == 1
                seen.add(float(y[0, 0]))
                last[0] = float(y[0, 0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            version = float(i % 2 + 1)
            registry.load("add", add_model(version))
            deadline = time.monotonic() + 10
            while last[0] != version and time.monotonic() < deadline:  # a caller got the new version
                time.sleep(0.001)
            assert last[0] == version
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    # Both versions answered (the reloads happened while the callers ran), and nothing else did.
    assert seen == {1.0, 2.0}, seen


def test_concurrent_infer_on_one_session_gives_the_single_threaded_results(
    registry: ModelRegistry, digits: tuple[bytes, np.ndarray, np.ndarray]
) -> None:
    model, x, _ = digits
    registry.load("digits", model)
    threads, calls = 8, 150
    rng = np.random.default_rng(7)
    work = [[x[rng.integers(0, len(x), rng.integers(1, 9))] for _ in range(calls)] for _ in range(threads)]
    expected = [[registry.infer("digits", {"input": batch}) for batch in batches] for batches in work]
    got: list[list[dict[str, np.ndarray]]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def caller(index: int) -> None:
        start.wait()
        got[index] = [registry.infer("digits", {"input": batch}) for batch in work[index]]

    pool = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    for want_list, got_list in zip(expected, got, strict=True):
        assert len(got_list) == calls
        for want, have in zip(want_list, got_list, strict=True):
            np.testing.assert_array_equal(have["label"], want["label"])
            np.testing.assert_array_equal(have["probabilities"], want["probabilities"])
    assert registry.stats("digits").runs == 2 * threads * calls


def test_model_info_is_frozen() -> None:
    info = ModelInfo("m", "0" * 64, 1, [], [], 0.0, 0, {}, 1, 1)
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]
