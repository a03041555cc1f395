"""Requests of different lengths batched by padding under an attention mask (models/padding.py),
with a masked encoder made in code: its batched answers equal the ones it gives each request alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_models_batching import always_wait, infer_at_once
from wasminfer.models import ModelRegistry
from wasminfer.models.inputs import TensorSpec
from wasminfer.models.padding import MIN_BUCKET, PaddedRows, padded_stack

VOCAB, HIDDEN = 50, 4


def encoder(*, per_token: bool = False) -> bytes:
    """input_ids, attention_mask int64 [batch, sequence] -> pooled float32 [batch, 4]: the mean of
    the tokens' embeddings over the positions the mask keeps. `per_token` adds `tokens` [batch,
    sequence, 4]."""
    rng = np.random.default_rng(7)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "two"], ["m3"]),
        helper.make_node("Mul", ["tokens", "m3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "one"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m", "one"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["pooled"]),
    ]
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", HIDDEN])]
    if per_token:
        per = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
        outputs.append(per)
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        outputs,
        inits,
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def feed(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(1, VOCAB, (rows, length)).astype(np.int64),
        "attention_mask": np.ones((rows, length), np.int64),
    }


def alone(model: bytes, f: dict[str, np.ndarray]) -> Any:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(["pooled"], f)[0]


def batched(model: bytes, feeds: list[dict[str, np.ndarray]], rows: int, delay_us: int = 1_000_000) -> Any:
    """Each feed from its own thread into `model` loaded with batches of `rows` (or the delay):
    the outcomes, and the batcher's stats."""
    with ModelRegistry() as registry:
        registry.load("enc", model, batching=always_wait(rows, delay_us))
        outcomes = infer_at_once(registry, "enc", feeds)
        return outcomes, registry.stats("enc").batching


def spec(name: str, shape: list[int | str | None], dtype: str = "int64") -> TensorSpec:
    return TensorSpec(name, dtype, shape)


def test_requests_of_different_lengths_share_a_run_and_get_their_own_answers() -> None:
    model = encoder()
    rng = np.random.default_rng(1)
    feeds = [feed(rng, rows, length) for rows, length in [(1, 3), (2, 5), (1, 8), (1, 6)]]
    outcomes, stats = batched(model, feeds, 5)
    for outcome, f in zip(outcomes, feeds, strict=True):
        assert outcome.error is None and outcome.result is not None
        got, want = outcome.result["pooled"], alone(model, f)
        assert got.shape == want.shape == (len(f["input_ids"]), HIDDEN)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert stats is not None and (stats.batches, stats.batched_requests) == (1, 4)  # one padded run


def test_lengths_in_different_buckets_do_not_share_a_run() -> None:
    model = encoder()
    rng = np.random.default_rng(2)
    feeds = [feed(rng, 1, 4), feed(rng, 1, 4), feed(rng, 1, 20), feed(rng, 1, 20)]
    outcomes, stats = batched(model, feeds, 2, 200_000)
    for outcome, f in zip(outcomes, feeds, strict=True):
        assert outcome.result is not None
        np.testing.assert_allclose(outcome.result["pooled"], alone(model, f), rtol=1e-6, atol=1e-6)
    assert stats is not None and (stats.batches, stats.batched_requests) == (2, 4)  # 8 and 32 apart


def test_join_pads_on_the_right_with_zeros_and_buckets_by_the_next_power_of_two() -> None:
    stack = PaddedRows()
    a = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.array([[1, 1, 1]])}
    b = {"input_ids": np.array([[1, 2, 3, 4, 9], [8] * 5]), "attention_mask": np.ones((2, 5), np.int64)}
    joined, starts = stack.join([a, b])
    assert starts == [0, 1]
    assert joined["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9], [8, 8, 8, 8, 8]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert a["input_ids"].shape == (1, 3)  # the requests' own arrays are left alone
    assert stack.rows(b) == 2
    assert stack.rows({"input_ids": np.ones((2, 3)), "attention_mask": np.ones((2, 4))}) == 0
    buckets = [stack.signature(feed(np.random.default_rng(0), 1, n))[1] for n in (1, 8, 9, 16, 17, 100)]
    assert buckets == [MIN_BUCKET, 8, 16, 16, 32, 128]


@pytest.mark.parametrize(
    ("inputs", "outputs", "why"),
    [
        ([spec("input_ids", ["b", "s"])], [spec("y", ["b", 2], "float32")], "no attention_mask"),
        ([spec("input_ids", ["b", "s"]), spec("attention_mask", ["b", "s"])],
         [spec("tokens", ["b", "s", 4], "float32")], "an output keeps the sequence"),
        ([spec("input_ids", ["b", None]), spec("attention_mask", ["b", None])],
         [spec("y", ["b", None], "float32")], "an unnamed length and a free output dimension"),
        ([spec("input_ids", ["b", "s"]), spec("attention_mask", ["b", "t"])],
         [spec("y", ["b", 2], "float32")], "lengths named differently"),
        ([spec("input_ids", ["b", 16]), spec("attention_mask", ["b", 16])],
         [spec("y", ["b", 2], "float32")], "a fixed length"),
        ([spec("x", ["b", "s", 3], "float32"), spec("attention_mask", ["b", "s"])],
         [spec("y", ["b", 2], "float32")], "an input that is not [batch, sequence]"),
    ],
)
def test_models_that_do_not_qualify_batch_equal_shapes_only(
    inputs: list[TensorSpec], outputs: list[TensorSpec], why: str
) -> None:
    assert padded_stack(inputs, outputs) is None, why


def test_a_per_token_output_keeps_equal_lengths_batching_only() -> None:
    model = encoder(per_token=True)
    rng = np.random.default_rng(3)
    feeds = [feed(rng, 1, 3), feed(rng, 1, 5)]
    outcomes, stats = batched(model, feeds, 2, 200_000)
    for outcome, f in zip(outcomes, feeds, strict=True):
        assert outcome.result is not None
        assert outcome.result["tokens"].shape == (1, f["input_ids"].shape[1], HIDDEN)
    assert stats is not None and stats.batches == 2  # each alone, after the delay
    assert padded_stack(
        [spec("input_ids", ["batch", "sequence"]), spec("attention_mask", ["batch", "sequence"])],
        [spec("pooled", ["batch", HIDDEN], "float32")],
    ) is not None
