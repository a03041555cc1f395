"""Dynamic batching behind `ModelRegistry.infer` (wasminfer/models/batching.py), with real models.

Batches are made deterministic with `max_concurrent_batches=0` (leaders always wait for a full
batch or the delay) and a `max_batch_size` equal to the rows the test sends at once.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wasminfer import examples
from wasminfer.errors import BadRequest, InferenceFailed, InvalidTensor, ModelNotFound, Timeout
from wasminfer.models import BatchingConfig, ModelRegistry
from wasminfer.models.batching import ROWS, BatchCounters, Batcher, Feed

OPSET = [helper.make_opsetid("", 17)]
TABLE = np.arange(20, dtype=np.int64).reshape(10, 2)


# --- models made in code ------------------------------------------------------------------------
def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: Sequence[Any] = ()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=OPSET)
    if all(v.type.tensor_type.HasField("shape") for v in [*inputs, *outputs]):
        onnx.checker.check_model(model)  # which insists on declared ranks, unlike ORT
    return bytes(model.SerializeToString())


def rowwise_model() -> bytes:
    """x float32 [N,4], ids int64 [N] -> y = x @ W + b [N,3], total = sum(x, 1) [N], picked =
    TABLE[ids] int64 [N,2]. An id outside 0..9 makes ORT fail the run (after validation)."""
    rng = np.random.default_rng(3)
    return _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axis1"], ["total"], keepdims=0),
            helper.make_node("Gather", ["table", "ids"], ["picked"], axis=0),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("picked", TensorProto.INT64, ["N", 2]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(TABLE, "table"),
        ],
    )


def sequence_model() -> bytes:
    """x float32 [N,T] (T free) -> m = max over T [N]: requests of different T cannot share a run."""
    return _model(
        [helper.make_node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N"])],
    )


def doubling_model() -> bytes:
    """x float32 [N,4] -> s = x stacked on itself [2N,4], declared ["K",4]: not row-wise, although
    its shapes say it could be. A batch's output has two rows per input row."""
    return _model(
        [helper.make_node("Concat", ["x", "x"], ["s"], axis=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["K", 4])],
    )


def rowwise_feed(rng: np.random.Generator, rows: int, bad: bool = False) -> dict[str, np.ndarray]:
    ids = rng.integers(0, 10, rows).astype(np.int64)
    if bad:
        ids[-1] = 99
    return {"x": rng.standard_normal((rows, 4)).astype(np.float32), "ids": ids}


# --- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture
def registry() -> Iterator[ModelRegistry]:
    with ModelRegistry() as reg:
        yield reg


@pytest.fixture(scope="module")
def digits() -> tuple[bytes, np.ndarray]:
    _, x_test, _, _ = examples.digits_split()
    return examples.digits_model(), x_test.astype(np.float32)


def always_wait(max_batch_size: int, delay_us: int = 1_000_000) -> BatchingConfig:
    """Leaders wait for `max_batch_size` rows (or the delay) whatever the load: deterministic batches."""
    return BatchingConfig(max_batch_size, delay_us, max_concurrent_batches=0)


class Outcome:
    def __init__(self) -> None:
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0


def infer_at_once(
    registry: ModelRegistry, name: str, feeds: Sequence[dict[str, np.ndarray]]
) -> list[Outcome]:
    """Each feed from its own thread, released together; every thread's wait is measured."""
    outcomes = [Outcome() for _ in feeds]
    start = threading.Barrier(len(feeds))

    def call(outcome: Outcome, feed: dict[str, np.ndarray]) -> None:
        start.wait()
        began = time.perf_counter()
        try:
            outcome.result = registry.infer(name, feed)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.error = exc
        outcome.seconds = time.perf_counter() - began

    threads = [threading.Thread(target=call, args=pair) for pair in zip(outcomes, feeds, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a caller never got its answer"
    return outcomes


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- results ------------------------------------------------------------------------------------
def test_batched_results_equal_unbatched_ones_exactly(registry: ModelRegistry) -> None:
    model = rowwise_model()
    registry.load("plain", model)
    rng = np.random.default_rng(0)
    feeds = [rowwise_feed(rng, rows) for rows in (1, 2, 1, 3, 1, 1, 4, 2)]
    registry.load("batched", model, batching=always_wait(sum(len(f["ids"]) for f in feeds)))

    outcomes = infer_at_once(registry, "batched", feeds)

    for outcome, feed in zip(outcomes, feeds, strict=True):
        assert outcome.error is None and outcome.result is not None
        assert_same(outcome.result, registry.infer("plain", feed))
    stats = registry.stats("batched")
    assert stats.batching is not None
    assert (stats.batching.batches, stats.batching.batched_requests) == (1, len(feeds))
    assert (stats.runs, stats.inferences) == (1, len(feeds))


def test_batched_digits_classifier_equals_unbatched(
    registry: ModelRegistry, digits: tuple[bytes, np.ndarray]
) -> None:
    model, x = digits
    registry.load("plain", model)
    sizes = [2, 3, 2, 4, 5, 2, 3, 2]
    starts = np.cumsum([0, *sizes])
    feeds = [{"input": x[a:b]} for a, b in zip(starts, starts[1:], strict=False)]
    registry.load("batched", model, batching=always_wait(int(starts[-1])))

    outcomes = infer_at_once(registry, "batched", feeds)

    for outcome, feed in zip(outcomes, feeds, strict=True):
        assert outcome.error is None and outcome.result is not None
        assert_same(outcome.result, registry.infer("plain", feed))
    assert registry.stats("batched").runs == 1


def test_single_rows_of_the_digits_classifier_differ_only_as_ort_rounds_them(
    registry: ModelRegistry, digits: tuple[bytes, np.ndarray]
) -> None:
    # ORT's LinearClassifier multiplies one row through MLAS's M=1 path, which rounds the scores
    # differently from the kernel of two rows or more; after the softmax the probabilities differ by
    # up to ~3e-7. The batcher adds nothing to that: each request gets exactly its rows of one
    # unbatched run of all the rows together.
    model, x = digits
    registry.load("plain", model)
    feeds = [{"input": x[i : i + 1]} for i in range(12)]
    registry.load("batched", model, batching=always_wait(len(feeds)))

    outcomes = infer_at_once(registry, "batched", feeds)

    together = registry.infer("plain", {"input": np.concatenate([f["input"] for f in feeds])})
    for i, (outcome, feed) in enumerate(zip(outcomes, feeds, strict=True)):
        assert outcome.result is not None
        assert_same(outcome.result, {k: v[i : i + 1] for k, v in together.items()})
        alone = registry.infer("plain", feed)
        np.testing.assert_array_equal(outcome.result["label"], alone["label"])
        np.testing.assert_allclose(outcome.result["probabilities"], alone["probabilities"], rtol=0, atol=1e-6)


def test_many_threads_get_their_own_results(registry: ModelRegistry) -> None:
    model = rowwise_model()
    registry.load("plain", model)
    registry.load("batched", model, max_batch_size=8, max_queue_delay_us=2000)  # default run slots
    threads, calls = 32, 40
    rng = np.random.default_rng(11)
    work = [[rowwise_feed(rng, int(rng.integers(1, 4))) for _ in range(calls)] for _ in range(threads)]
    got: list[list[dict[str, np.ndarray]]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def caller(index: int) -> None:
        start.wait()
        got[index] = [registry.infer("batched", feed) for feed in work[index]]

    pool = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    for feeds, results in zip(work, got, strict=True):
        assert len(results) == calls
        for feed, result in zip(feeds, results, strict=True):
            assert_same(result, registry.infer("plain", feed))
    stats = registry.stats("batched")
    assert stats.inferences == threads * calls and stats.errors == 0
    assert stats.batching is not None and stats.batching.batched_requests == threads * calls
    assert stats.runs == stats.batching.batches <= threads * calls


# --- the wait bound -------------------------------------------------------------------------------
@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_max_queue_delay_obeyed(registry: ModelRegistry) -> None:
    delay_s = 0.05
    registry.load("m", rowwise_model(), batching=always_wait(1024, int(delay_s * 1e6)))
    rng = np.random.default_rng(1)
    feeds = [rowwise_feed(rng, 2) for _ in range(6)]
    registry.infer("m", feeds[0])  # the first run of a session allocates; keep it out of the timing
    run_started = time.perf_counter()
    registry.infer("m", {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})  # waits, then runs
    one_batched_run = time.perf_counter() - run_started - delay_s

    outcomes = infer_at_once(registry, "m", feeds)

    slack = 0.5  # a loaded CI machine: the bound is what is tested, not the speed
    for outcome in outcomes:
        assert outcome.error is None
        assert outcome.seconds <= delay_s + max(one_batched_run, 0.0) + slack
    # The batch never filled: it ran when its oldest request had waited the delay, not before.
    assert max(outcome.seconds for outcome in outcomes) >= delay_s * 0.9
    stats = registry.stats("m").batching
    assert stats is not None
    assert stats.queue_delay_seconds_sum / stats.batched_requests <= delay_s + slack
    le_bound = next(n for le, n in stats.queue_delay_buckets if le >= delay_s + slack)
    assert le_bound == stats.batched_requests


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_a_lone_request_does_not_wait_while_a_run_slot_is_free(registry: ModelRegistry) -> None:
    registry.load("m", rowwise_model(), max_batch_size=32, max_queue_delay_us=1_000_000)
    feed = rowwise_feed(np.random.default_rng(2), 1)
    registry.infer("m", feed)
    started = time.perf_counter()
    registry.infer("m", feed)
    assert time.perf_counter() - started < 0.5  # the delay is 1 s: it did not wait for company


# --- what does not batch --------------------------------------------------------------------------
def test_mixed_shapes_run_in_separate_batches(registry: ModelRegistry) -> None:
    registry.load("plain", sequence_model())
    registry.load("seq", sequence_model(), batching=always_wait(64, 100_000))
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((rows, t)).astype(np.float32)} for rows, t in [(1, 3), (2, 5)] * 3]

    outcomes = infer_at_once(registry, "seq", feeds)

    for outcome, feed in zip(outcomes, feeds, strict=True):
        assert outcome.result is not None
        assert_same(outcome.result, registry.infer("plain", feed))
    stats = registry.stats("seq").batching
    assert stats is not None and (stats.batches, stats.batched_requests) == (2, 6)
    assert stats.batch_size_sum == 3 + 6


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_requests_that_cannot_batch_run_alone(registry: ModelRegistry, add_model: bytes) -> None:
    registry.load("add", add_model, batching=always_wait(4, 1_000_000))
    ones = np.ones((5, 3), dtype=np.float32)
    started = time.perf_counter()
    # More rows than max_batch_size, and no rows at all: both run at once, alone.
    assert registry.infer("add", {"a": ones, "b": ones})["y"].tolist() == [[2.0] * 3] * 5
    assert registry.infer("add", {"a": ones[:0], "b": ones[:0]})["y"].shape == (0, 3)
    # Inputs that disagree on their rows: alone too, and ORT's error is that request's own.
    with pytest.raises(InferenceFailed, match="'add' failed"):
        registry.infer("add", {"a": ones[:2], "b": ones[:3]})
    assert time.perf_counter() - started < 0.9  # none of them waited for the 1 s delay
    stats = registry.stats("add")
    assert stats.batching is not None
    assert (stats.batching.unbatched_requests, stats.batching.batches) == (3, 0)
    assert (stats.inferences, stats.errors) == (2, 1)


def test_output_without_one_row_per_input_row_falls_back_to_single_runs(registry: ModelRegistry) -> None:
    registry.load("double", doubling_model(), batching=always_wait(3))
    feeds = [{"x": np.full((1, 4), float(i), dtype=np.float32)} for i in (1, 2, 3)]

    outcomes = infer_at_once(registry, "double", feeds)

    for outcome, feed in zip(outcomes, feeds, strict=True):
        assert outcome.result is not None
        np.testing.assert_array_equal(outcome.result["s"], np.concatenate([feed["x"], feed["x"]]))
    stats = registry.stats("double")
    assert stats.batching is not None and stats.batching.fallback_batches == 1
    assert stats.runs == 1 + 3  # the batched run, then each request alone


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ([3, 4], "input 'x' has a fixed first dimension (3)"),
        (None, "input 'x' does not declare its shape"),
    ],
)
def test_a_model_without_a_batch_dimension_refuses_batching(
    registry: ModelRegistry, spec: list[int] | None, problem: str
) -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    expected = re.escape(f"model 'm' cannot batch: {problem}; batching needs")
    with pytest.raises(BadRequest, match=expected) as info:
        registry.load("m", model, max_batch_size=8)
    assert info.value.status == 400
    assert "m" not in registry
    assert registry.load("m", model).batching is None  # without batching it loads


def test_inputs_with_differently_named_batch_dimensions_refuse_batching(registry: ModelRegistry) -> None:
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    with pytest.raises(BadRequest, match=r"first dimensions have different names: 'a' \(N\), 'b' \(M\)"):
        registry.load("m", model, max_batch_size=8)


def test_a_scalar_output_refuses_batching(registry: ModelRegistry) -> None:
    model = _model(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
    )
    with pytest.raises(BadRequest, match="output 's' is a scalar"):
        registry.load("m", model, max_batch_size=8)


# --- errors ---------------------------------------------------------------------------------------
def test_errors_inside_a_batch_reach_only_their_requests(registry: ModelRegistry) -> None:
    model = rowwise_model()
    registry.load("plain", model)
    rng = np.random.default_rng(5)
    bad = {1, 4}
    feeds = [rowwise_feed(rng, 2, bad=i in bad) for i in range(6)]
    registry.load("batched", model, batching=always_wait(12))

    outcomes = infer_at_once(registry, "batched", feeds)

    for i, (outcome, feed) in enumerate(zip(outcomes, feeds, strict=True)):
        if i in bad:
            assert isinstance(outcome.error, InferenceFailed) and outcome.result is None
            assert "'batched' failed" in outcome.error.message and "99" in outcome.error.message
        else:
            assert outcome.error is None and outcome.result is not None
            assert_same(outcome.result, registry.infer("plain", feed))
    stats = registry.stats("batched")
    assert stats.batching is not None and stats.batching.fallback_batches == 1
    assert (stats.inferences, stats.errors, stats.runs) == (4, 2, 4)


def test_a_lone_failing_request_gets_its_error_without_a_rerun(registry: ModelRegistry) -> None:
    registry.load("m", rowwise_model(), max_batch_size=8)
    with pytest.raises(InferenceFailed, match="99"):
        registry.infer("m", rowwise_feed(np.random.default_rng(6), 1, bad=True))
    stats = registry.stats("m")
    assert stats.batching is not None
    assert (stats.errors, stats.batching.batches, stats.batching.fallback_batches) == (1, 1, 0)


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_validation_errors_never_enter_a_batch(registry: ModelRegistry) -> None:
    registry.load("m", rowwise_model(), batching=always_wait(64, 1_000_000))
    feed = rowwise_feed(np.random.default_rng(7), 2)
    started = time.perf_counter()
    with pytest.raises(InvalidTensor, match="input 'x' has shape \\[2,5\\], the model expects \\[N,4\\]"):
        registry.infer("m", {**feed, "x": np.zeros((2, 5), dtype=np.float32)})
    with pytest.raises(InvalidTensor, match="input 'ids' has dtype float32"):
        registry.infer("m", {**feed, "ids": np.zeros(2, dtype=np.float32)})
    assert time.perf_counter() - started < 0.5  # refused at once, not after the 1 s delay
    stats = registry.stats("m")
    assert stats.rejected == 2 and stats.batching is not None and stats.batching.batched_requests == 0


# --- shutdown ----------------------------------------------------------------------------------------
def _waiting_callers(
    registry: ModelRegistry, name: str, n: int
) -> tuple[list[Outcome], list[threading.Thread]]:
    rng = np.random.default_rng(8)
    outcomes = [Outcome() for _ in range(n)]

    def call(outcome: Outcome, feed: dict[str, np.ndarray]) -> None:
        began = time.perf_counter()
        try:
            outcome.result = registry.infer(name, feed)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.error = exc
        outcome.seconds = time.perf_counter() - began

    threads = [threading.Thread(target=call, args=(o, rowwise_feed(rng, 1))) for o in outcomes]
    for t in threads:
        t.start()
    wait_queued(registry, name, n)  # into the queue, where they would wait the whole (1 s) delay
    return outcomes, threads


def wait_queued(registry: ModelRegistry, name: str, n: int) -> None:
    """Until `n` requests wait in model `name`'s batch queues (the batcher's own state, not a sleep)."""
    batcher = registry._models[name].batcher
    assert batcher is not None
    deadline = time.monotonic() + 10
    while sum(len(q.pending) for q in list(batcher._queues.values())) < n:
        assert time.monotonic() < deadline, f"{n} requests never queued"
        time.sleep(0.001)


@pytest.mark.parametrize("how", ["close", "unload", "reload"])
@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_shutdown_answers_waiting_requests_at_once(registry: ModelRegistry, how: str) -> None:
    model = rowwise_model()
    registry.load("m", model, batching=always_wait(64, 1_000_000))
    outcomes, threads = _waiting_callers(registry, "m", 3)
    stopped = time.perf_counter()
    if how == "close":
        registry.close()
    elif how == "unload":
        registry.unload("m")
    else:
        registry.load("m", model)  # the new version does not batch; the old one's queue drains
    for t in threads:
        t.join(5)
    assert time.perf_counter() - stopped < 0.7  # long before the 1 s delay would have run them
    for outcome in outcomes:
        assert outcome.error is None and outcome.result is not None
        assert outcome.result["y"].shape == (1, 3)
    if how == "reload":
        stats = registry.stats("m")  # counters survive the reload
        assert stats.inferences == 3 and stats.batching is None
    else:
        with pytest.raises(ModelNotFound):
            registry.infer("m", rowwise_feed(np.random.default_rng(0), 1))


class Interrupted(BaseException):
    """What the test's SIGINT handler raises in the main thread (like KeyboardInterrupt)."""


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_an_interrupted_caller_leaves_the_queue_to_the_others(registry: ModelRegistry, role: str) -> None:
    # Only the main thread sees signals; a caller interrupted while it waits must not leave the
    # others waiting on a leader that is gone.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    registry.load("m", rowwise_model(), batching=always_wait(64, 300_000))
    rng = np.random.default_rng(12)
    outcomes = [Outcome() for _ in range(2)]

    def call(outcome: Outcome, feed: dict[str, np.ndarray]) -> None:
        try:
            outcome.result = registry.infer("m", feed)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.error = exc

    others = [threading.Thread(target=call, args=(o, rowwise_feed(rng, 1))) for o in outcomes]
    main = threading.main_thread().ident
    assert main is not None

    def interrupt_main() -> None:
        wait_queued(registry, "m", 1 if role == "leader" else 2)  # the main thread is in the queue
        for t in others if role == "leader" else others[1:]:
            t.start()  # they queue behind the main thread (or, as "follower", after it)
        wait_queued(registry, "m", 3)
        signal.pthread_kill(main, signal.SIGINT)

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, raise_interrupted)
    try:
        if role == "follower":
            others[0].start()  # the leader
            wait_queued(registry, "m", 1)
        helper = threading.Thread(target=interrupt_main)
        helper.start()
        with pytest.raises(Interrupted):
            registry.infer("m", rowwise_feed(rng, 1))
    finally:
        signal.signal(signal.SIGINT, previous)
    helper.join(5)
    for t in others:
        t.join(5)
        assert not t.is_alive(), "a caller was left waiting"
    for outcome in outcomes:
        assert outcome.error is None and outcome.result is not None
    stats = registry.stats("m").batching
    assert stats is not None and stats.batched_requests == 2


# --- options, info, metrics -------------------------------------------------------------------------
def test_batching_options_and_their_errors(registry: ModelRegistry, add_model: bytes) -> None:
    info = registry.load("a", add_model, max_batch_size=16, max_queue_delay_us=500, intra_op_threads=1)
    assert info.batching == BatchingConfig(16, 500)
    as_json = json.loads(json.dumps(info.to_dict()))
    assert (as_json["max_batch_size"], as_json["max_queue_delay_us"]) == (16, 500)
    assert as_json["max_concurrent_batches"] is None and as_json["intra_op_threads"] == 1
    assert registry.load("a", add_model, max_batch_size=8).batching == BatchingConfig(8, 2000)
    assert registry.load("a", add_model, max_batch_size=1).batching is None
    assert registry.load("a", add_model, max_batch_size=0).batching is None
    assert registry.load("a", add_model).to_dict()["max_batch_size"] is None

    bad: list[tuple[dict[str, Any], str]] = [
        ({"max_batch_size": 4096}, "max_batch_size must be an integer from 0 to 1024, not 4096"),
        ({"max_batch_size": True}, "max_batch_size must be an integer"),
        ({"max_batch_size": "8"}, "max_batch_size must be an integer"),
        ({"max_batch_size": 8, "max_queue_delay_us": -1}, "max_queue_delay_us must be an integer from 0"),
        ({"max_queue_delay_us": 100}, "max_queue_delay_us needs max_batch_size"),
        ({"max_concurrent_batches": 2}, "max_concurrent_batches needs max_batch_size"),
        ({"max_batch_size": 1, "max_queue_delay_us": 10}, "max_queue_delay_us needs max_batch_size"),
        ({"batching": BatchingConfig(), "max_batch_size": 8}, "give batching= or max_batch_size"),
        ({"intra_op_threads": -1}, "intra_op_threads must be an integer from 0 to 64, not -1"),
        ({"inter_op_threads": 1000}, "inter_op_threads must be an integer from 0 to 64"),
        ({"memory_arena": "yes"}, "memory_arena must be true or false, not 'yes'"),
        ({"memory_arena": 1}, "memory_arena must be true or false, not 1"),
    ]
    for options, message in bad:
        with pytest.raises(BadRequest, match=message):
            registry.load("b", add_model, **options)
    assert "b" not in registry
    with pytest.raises(ValueError, match="max_batch_size must be an integer from 2 to 1024, not 1"):
        BatchingConfig(max_batch_size=1)
    with pytest.raises(ValueError, match="max_concurrent_batches must be an integer from 0 to 256"):
        BatchingConfig(max_concurrent_batches=-1)


def test_stats_expose_batch_sizes_queue_delays_and_rates(registry: ModelRegistry) -> None:
    registry.load("m", rowwise_model(), batching=always_wait(4, 200_000))
    rng = np.random.default_rng(9)
    for _ in range(2):
        infer_at_once(registry, "m", [rowwise_feed(rng, 1) for _ in range(4)])  # two full batches
    infer_at_once(registry, "m", [rowwise_feed(rng, 1), rowwise_feed(rng, 2)])  # one after the delay

    stats = registry.stats("m")
    assert (stats.runs, stats.inferences) == (3, 10)
    assert stats.runs_per_second > 0 and stats.inferences_per_second > stats.runs_per_second
    batching = stats.batching
    assert batching is not None
    assert (batching.batches, batching.batched_requests, batching.batch_size_sum) == (3, 10, 11)
    assert batching.mean_batch_size == pytest.approx(11 / 3)
    assert dict(batching.batch_size_buckets)[2] == 0 and dict(batching.batch_size_buckets)[4] == 3
    assert batching.batch_size_buckets[-1] == (float("inf"), 3)
    counts = [n for _, n in batching.queue_delay_buckets]
    assert counts == sorted(counts) and counts[-1] == 10
    # The two requests of the last batch waited for the 0.2 s delay; the others did not.
    assert dict(batching.queue_delay_buckets)[0.1] <= 8
    assert batching.queue_delay_seconds_sum >= 0.2 * 0.9
    as_json = json.loads(json.dumps(stats.to_dict()))
    assert as_json["batching"]["batch_size_buckets"][-1] == ["+Inf", 3]
    assert as_json["inferences"] == 10 and as_json["batching"]["max_batch_size"] == 4
    plain = registry.load("p", rowwise_model())
    assert plain.batching is None and registry.stats("p").batching is None


# --- requests that recur (a decoder's steps) -----------------------------------------------------
class Recurring:
    """Rows stacked as `ROWS` stacks them, by `streams` requests that come back after each batch."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.cohorts: dict[int, tuple[Hashable, int]] = {}  # by the feed's id: what a test says of each

    def rows(self, feed: Feed) -> int:
        return ROWS.rows(feed)

    def signature(self, feed: Feed) -> Hashable:
        return ("recurring", ROWS.signature(feed))

    def join(self, feeds: Sequence[Feed]) -> tuple[Feed, list[int]]:
        return ROWS.join(feeds)

    def cohort(self, feed: Feed) -> tuple[Hashable, int] | None:
        return self.cohorts.get(id(feed))


class Turns:
    """A batcher of `slots` run slots over rowwise_model for `streams` recurring requests; the i-th run
    holds its slot until `gates[i]` is set (all set when `gated` is False); `ran` has the rows of
    each run, in the order they started."""

    def __init__(self, slots: int, streams: int, delay_us: int, gated: bool = True) -> None:
        self.session = ort.InferenceSession(rowwise_model(), providers=["CPUExecutionProvider"])
        self.gates = [threading.Event() for _ in range(8)]
        if not gated:
            for gate in self.gates:
                gate.set()
        self.ran: list[int] = []
        self.members: list[list[int]] = []
        self.lock = threading.Lock()
        self.stack = Recurring(streams)
        self.batcher = Batcher(BatchingConfig(8, delay_us), self._run, BatchCounters(), slots=slots)
        rng = np.random.default_rng(4)
        self.feeds = [rowwise_feed(rng, 1) for _ in range(8)]
        self.results: dict[int, list[Any]] = {}
        self.threads: list[threading.Thread] = []

    def _run(self, feed: Feed, _deadline_ns: int | None) -> list[Any]:
        members = sorted(  # which feeds' rows the run holds
            j for j, f in enumerate(self.feeds) if any(np.array_equal(row, f["x"][0]) for row in feed["x"]))
        with self.lock:  # `until` sees a run in `ran` only once its members are there too
            i = len(self.ran)
            self.members.append(members)
            self.ran.append(len(feed["x"]))
        self.gates[i].wait(30)
        return list(self.session.run(None, feed))

    def call(self, *ids: int) -> None:
        for i in ids:
            def go(i: int = i) -> None:
                self.results[i] = self.batcher.infer(self.feeds[i], None, self.stack)
            t = threading.Thread(target=go)
            t.start()
            self.threads.append(t)

    def until(self, runs: int, queued: int) -> None:
        """Until `runs` runs started and `queued` rows wait (synchronised on the batcher's state)."""
        signature = self.stack.signature(self.feeds[0])
        deadline = time.monotonic() + 10
        while len(self.ran) < runs or getattr(self.batcher._queues.get(signature), "rows", 0) != queued:
            assert time.monotonic() < deadline, f"runs {self.ran}, not {runs} with {queued} row(s) queued"
            time.sleep(0.001)

    def finish(self) -> None:
        for gate in self.gates:
            gate.set()
        for t in self.threads:
            t.join(30)
        for i, got in self.results.items():
            for out, want in zip(got, self.session.run(None, self.feeds[i]), strict=True):
                np.testing.assert_array_equal(out, want)


def test_recurring_requests_are_split_across_the_run_slots_in_batches_of_their_share() -> None:
    # 4 streams, 2 slots: batches of 2, two in flight at once, each waiting for its 2 with a slot free
    t = Turns(slots=2, streams=4, delay_us=1_000_000)
    t.call(0)
    t.until(runs=0, queued=1)  # a slot is free, but a batch's share is 2 rows: it waits for another
    t.call(1)
    t.until(runs=1, queued=0)
    t.call(2)
    t.until(runs=1, queued=1)
    assert t.ran == [2]
    t.call(3)
    t.until(runs=2, queued=0)
    assert t.ran == [2, 2]  # the second batch runs beside the first, in the other slot
    t.call(4, 5, 6, 7)  # both slots busy: they wait for one, then it takes its share, not all four
    t.until(runs=2, queued=4)
    t.gates[0].set()
    t.until(runs=3, queued=2)
    assert t.ran == [2, 2, 2]
    t.finish()
    assert t.ran == [2, 2, 2, 2] and sorted(t.results) == list(range(8))


def test_a_recurring_batch_waits_for_its_own_cohort_and_takes_it_first() -> None:
    """Requests 0 and 2 ran together last (cohort A), 1 and 3 too (B); they come back interleaved.
    Each batch is its cohort again (a decoder's steps then run on their batch's present as it is,
    with no copy), not the first two to arrive."""
    t = Turns(slots=2, streams=4, delay_us=1_000_000)
    for i in range(4):
        t.stack.cohorts[id(t.feeds[i])] = ("AB"[i % 2], 2)
    t.call(0)
    t.until(runs=0, queued=1)
    t.call(1)  # two rows wait, a share's worth, but of two cohorts: A's leader waits for its own
    t.until(runs=0, queued=2)
    t.call(2)
    t.until(runs=1, queued=1)
    t.call(3)
    t.until(runs=2, queued=0)
    t.finish()
    assert t.members == [[0, 2], [1, 3]]


def test_a_cohort_back_whole_runs_in_a_free_slot_while_the_leader_waits_for_its_own() -> None:
    """Cohort A's leader (request 0) waits for A's other row; B comes back whole meanwhile and a slot
    is free: B runs at once, on the thread of its oldest request, not after A (one leader per queue
    held it back: a decoder's two cohorts coupled at every step)."""
    t = Turns(slots=2, streams=4, delay_us=1_000_000)
    for i in range(4):
        t.stack.cohorts[id(t.feeds[i])] = ("AB"[i % 2], 2)
    t.call(0)
    t.until(runs=0, queued=1)
    t.call(1)
    t.until(runs=0, queued=2)
    t.call(3)
    t.until(runs=1, queued=1)
    assert t.members == [[1, 3]]
    t.call(2)
    t.until(runs=2, queued=0)
    t.finish()
    assert t.members == [[1, 3], [0, 2]]


def test_a_slot_that_frees_goes_to_a_cohort_back_whole_while_the_leader_waits_for_its_own() -> None:
    """Both slots busy (cohorts C and D) while A's leader waits and B comes back whole; when C's run
    ends, the slot goes to B, not to a leader still short of its cohort."""
    t = Turns(slots=2, streams=4, delay_us=1_000_000)
    for i, cohort in enumerate("ABABCCDD"):
        t.stack.cohorts[id(t.feeds[i])] = (cohort, 2)
    t.call(4, 5)
    t.until(runs=1, queued=0)
    t.call(6, 7)
    t.until(runs=2, queued=0)
    t.call(0)
    t.until(runs=2, queued=1)
    t.call(1, 3)
    t.until(runs=2, queued=3)  # B whole, but no slot free
    t.gates[0].set()  # C's run ends
    t.until(runs=3, queued=1)
    assert t.members[2] == [1, 3]
    t.call(2)
    t.finish()
    assert t.members == [[4, 5], [6, 7], [1, 3], [0, 2]]


def test_a_runner_interrupted_before_it_woke_puts_its_batch_back() -> None:
    """`_abandon` of a request made the runner of a cohort's batch (`_RUN`) while it slept (its
    thread interrupted in `wake.acquire()`): the others of the batch are pending again, counted as
    before, and the slot it held is free; the queue's leader is told. Driven on the batcher's state
    directly, on the test's thread: no thread sleeps here."""
    from wasminfer.models import batching

    t = Turns(slots=2, streams=4, delay_us=1_000_000)
    for i in range(4):
        t.stack.cohorts[id(t.feeds[i])] = ("AB"[i % 2], 2)
    b = t.batcher
    with b._lock:
        leader = b._enqueue(t.feeds[0], t.stack, 1, None)
        assert leader is not None and leader.state == batching._LEAD
        leader.queue.want = ("A", 2)  # as the waiting leader sets it (`_gathered`)
        first = b._enqueue(t.feeds[1], t.stack, 1, None)
        last = b._enqueue(t.feeds[3], t.stack, 1, None)  # B is whole: its batch starts
    assert first is not None and last is not None
    queue = leader.queue
    assert first.state == batching._RUN and first.batch == ([first, last], 2) and b._in_flight == 1
    assert queue.pending == [leader] and queue.rows == 1 and queue.cohorts == {"A": 1}
    b._abandon(first)
    assert first.batch is None and b._in_flight == 0
    # in arrival order again: the leader first, as `_pick` expects of it
    assert queue.pending == [leader, last] and queue.rows == 2 and queue.cohorts == {"A": 1, "B": 1}
    assert last.state == batching._WAITING and queue.leading


def test_a_cohort_short_of_a_member_runs_after_the_delay_with_rows_of_no_cohort_only() -> None:
    """A stream of cohort A ended: its other row waits the delay for it, then runs with the oldest
    rows of no cohort (a state whose last step ran alone) up to its share; cohort B's rows are not
    taken from B, which then runs as it ran before."""
    t = Turns(slots=2, streams=4, delay_us=50_000, gated=False)
    t.stack.cohorts[id(t.feeds[0])] = ("A", 2)
    t.stack.cohorts[id(t.feeds[1])] = ("B", 2)
    t.stack.cohorts[id(t.feeds[2])] = ("B", 2)
    t.call(0)
    t.until(runs=0, queued=1)
    t.call(1)
    t.until(runs=0, queued=2)
    t.call(3)  # no cohort
    t.until(runs=0, queued=3)
    t.call(2)
    t.finish()
    assert sorted(map(sorted, t.members)) == [[0, 3], [1, 2]]


def test_requests_that_do_not_recur_run_at_once_in_a_free_slot_and_take_all_that_wait() -> None:
    t = Turns(slots=2, streams=0, delay_us=1_000_000)
    t.call(0)
    t.until(runs=1, queued=0)  # alone, at once
    t.call(1)
    t.until(runs=2, queued=0)
    t.call(2, 3, 4)
    t.until(runs=2, queued=3)
    t.gates[0].set()
    t.until(runs=3, queued=0)
    t.finish()
    assert t.ran == [1, 1, 3]


def test_while_every_slot_is_busy_a_batch_grows_past_the_delay_until_one_frees() -> None:
    # The delay (1 ms) passes long before the slot frees: sent off then, [1, 2] would only have
    # waited for the slot, and 3 would have made a batch of its own.
    t = Turns(slots=1, streams=0, delay_us=1000)
    t.call(0)
    t.until(runs=1, queued=0)
    t.call(1, 2)
    t.until(runs=1, queued=2)
    time.sleep(0.1)
    t.call(3)
    t.until(runs=1, queued=3)
    assert t.ran == [1]
    t.gates[0].set()
    t.until(runs=2, queued=0)
    t.finish()
    assert t.ran == [1, 3]


def test_a_request_waiting_for_a_busy_slot_fails_at_its_deadline() -> None:
    session = ort.InferenceSession(rowwise_model(), providers=["CPUExecutionProvider"])
    release = threading.Event()

    def run(feed: Feed, deadline_ns: int | None) -> list[Any]:
        if deadline_ns is not None and time.monotonic_ns() >= deadline_ns:
            raise Timeout("past its deadline")  # as the registry's run does
        release.wait(30)
        return list(session.run(None, feed))

    batcher = Batcher(BatchingConfig(8, 1000), run, BatchCounters(), slots=1)
    rng = np.random.default_rng(5)
    busy = threading.Thread(target=batcher.infer, args=(rowwise_feed(rng, 1),))
    busy.start()  # takes the one slot until `release`
    while not batcher._in_flight:
        time.sleep(0.001)
    outcome: list[BaseException] = []

    def late() -> None:
        try:
            batcher.infer(rowwise_feed(rng, 1), time.monotonic_ns() + 50_000_000)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=late)
    waiter.start()
    waiter.join(10)  # the slot is still taken: only its deadline can end its wait
    assert not waiter.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Timeout)
    release.set()
    busy.join(10)


def test_one_slot_makes_a_recurring_batch_wait_for_every_stream_and_fewer_streams_wait_for_fewer() -> None:
    t = Turns(slots=1, streams=3, delay_us=1_000_000, gated=False)
    t.call(0, 1)
    t.until(runs=0, queued=2)
    t.call(2)
    t.until(runs=1, queued=0)
    t.stack.streams = 1  # two streams ended: the one left runs at once
    t.call(3)
    t.finish()
    assert t.ran == [3, 1]


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_recurring_requests_wait_no_longer_than_the_delay_for_the_missing_ones() -> None:
    delay_s = 0.05
    t = Turns(slots=1, streams=2, delay_us=int(delay_s * 1e6), gated=False)
    started = time.perf_counter()
    t.call(0)
    t.threads[0].join(30)  # the other stream never comes: it runs alone after the delay
    waited = time.perf_counter() - started
    assert t.ran == [1]
    assert delay_s * 0.9 <= waited <= delay_s + 5  # a loaded machine: the bound is what is tested
    t.finish()


def test_a_leader_waiting_for_its_share_with_a_slot_free_waits_no_longer_than_its_deadline() -> None:
    """A recurring request's batch waits for its share even with a run slot free, up to the delay;
    a request whose deadline comes first stops waiting then (and its run fails at once)."""
    session = ort.InferenceSession(rowwise_model(), providers=["CPUExecutionProvider"])
    calls: list[int | None] = []

    def run(feed: Feed, deadline_ns: int | None) -> list[Any]:
        calls.append(deadline_ns)
        if deadline_ns is not None and time.monotonic_ns() >= deadline_ns:
            raise Timeout("past the deadline")
        return list(session.run(None, feed))

    batcher = Batcher(BatchingConfig(8, 1_000_000), run, BatchCounters(), slots=2)
    feed = rowwise_feed(np.random.default_rng(5), 1)
    stack = Recurring(streams=4)  # a share of 2: it waits for another, which never comes
    deadline = time.monotonic_ns() + 100_000_000
    with pytest.raises(Timeout):
        batcher.infer(feed, deadline, stack)
    assert time.monotonic_ns() - deadline < 500_000_000  # not the delay's whole second
    assert calls == [deadline]
    # without a deadline it waits out the delay, then runs
    t0 = time.monotonic()
    out = Batcher(BatchingConfig(8, 200_000), run, BatchCounters(), slots=2).infer(feed, None, stack)
    assert time.monotonic() - t0 >= 0.19
    np.testing.assert_array_equal(out[0], session.run(None, feed)[0])
