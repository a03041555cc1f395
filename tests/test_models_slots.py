"""Run slots (wasminfer/models/slots.py) and the threads and slots chosen per model
(wasminfer/models/tuning.py), on real ONNX Runtime sessions.

Runs in flight are counted right around the real `session.run`: the test wraps a loaded model's
session in `Held`, which counts its callers and keeps each inside until the test lets it go, so the
bound is observed where it matters and every step synchronises on state, not on time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import NEVER, make_until_model
from wasminfer.errors import BadRequest, Timeout, TooManyRequests
from wasminfer.examples import tiny_gpt_model
from wasminfer.models import ModelRegistry
from wasminfer.models.slots import RunSlots
from wasminfer.models.tuning import (
    BATCH_BUDGET_S,
    BATCH_ROWS,
    FREE_DIM,
    TIE,
    Measurement,
    batch_row_time,
    choose,
    pick,
    sample_feed,
    thread_candidates,
)


class Held:
    """A real session whose runs are counted (`inside`, `peak`, shared by every `Held` given the same
    `tally`) and each held until `let_go()` allows one more (or `open()` all)."""

    def __init__(self, session: ort.InferenceSession, tally: dict[str, int], lock: threading.Lock) -> None:
        self.session = session
        self.tally = tally
        self.lock = lock
        self.passes = threading.Semaphore(0)
        self.opened = threading.Event()
        self.inside = 0

    def run(self, *args: Any) -> Any:
        with self.lock:
            self.inside += 1
            self.tally["inside"] += 1
            self.tally["peak"] = max(self.tally["peak"], self.tally["inside"])
        try:
            while not self.opened.is_set() and not self.passes.acquire(timeout=0.01):
                pass
            return self.session.run(*args)
        finally:
            with self.lock:
                self.inside -= 1
                self.tally["inside"] -= 1

    def let_go(self, n: int = 1) -> None:
        self.passes.release(n)

    def open(self) -> None:
        self.opened.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def hold(registry: ModelRegistry, name: str, tally: dict[str, int], lock: threading.Lock) -> Held:
    model = registry._models[name]
    held = Held(model.session, tally, lock)
    model.run_session = held.run  # what the registry's runs call (`session.runner`)
    return held


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.005)


def feed(n: int) -> dict[str, np.ndarray]:
    a = np.full((1, 3), n, dtype=np.float32)
    return {"a": a, "b": np.ones((1, 3), dtype=np.float32)}


Results = dict[tuple[str, int], Any]


def callers(
    registry: ModelRegistry, name: str, n: int, results: Results, start: int = 0
) -> list[threading.Thread]:
    def call(i: int) -> None:
        try:
            results[(name, i)] = registry.infer(name, feed(i))["y"]
        except BaseException as exc:
            results[(name, i)] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(start, start + n)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def tally() -> Iterator[tuple[dict[str, int], threading.Lock]]:
    yield {"inside": 0, "peak": 0}, threading.Lock()


# --- the bound -------------------------------------------------------------------------------------
def test_runs_in_flight_never_exceed_the_slots_under_a_burst(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock]
) -> None:
    counts, lock = tally
    with ModelRegistry(run_slots=RunSlots(4)) as registry:
        info = registry.load("add", add_model, intra_op_threads=1, max_concurrent_runs=2)
        assert info.max_concurrent_runs == 2 and info.options()["max_concurrent_runs"] == 2
        held = hold(registry, "add", counts, lock)
        results: dict[tuple[str, int], Any] = {}
        threads = callers(registry, "add", 8, results)
        wait_for(lambda: registry.stats("add").runs_queued == 6, "6 calls queued")
        stats = registry.stats("add")
        assert (held.inside, stats.runs_in_flight, stats.runs_queued) == (2, 2, 6)
        for done in range(1, 7):  # one at a time: each freed slot goes to the next in line
            held.let_go()
            wait_for(lambda d=done: registry.stats("add").runs == d, f"{done} runs")  # type: ignore[misc]
            assert counts["inside"] <= 2 and registry.stats("add").runs_queued == max(0, 6 - done)
        held.open()
        for t in threads:
            t.join()
        assert counts["peak"] == 2 and registry.stats("add").peak_runs_in_flight == 2
        for i in range(8):
            np.testing.assert_array_equal(results[("add", i)], np.full((1, 3), i + 1, dtype=np.float32))
        assert registry.stats("add").runs_in_flight == 0


def test_without_a_bound_every_caller_runs_at_once(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock]
) -> None:
    """The pair of the test above: `max_concurrent_runs=0` is no bound, and the count sees it."""
    counts, lock = tally
    with ModelRegistry(run_slots=RunSlots(4)) as registry:
        registry.load("add", add_model, intra_op_threads=1, max_concurrent_runs=0)
        held = hold(registry, "add", counts, lock)
        threads = callers(registry, "add", 8, {})
        wait_for(lambda: held.inside == 8, "8 runs inside the session")
        held.open()
        for t in threads:
            t.join()
        assert counts["peak"] == 8 and registry.stats("add").runs == 8


def test_the_bound_holds_for_batched_runs_too(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock]
) -> None:
    """A batching model's run slots default to its run slots, and its batched runs take them."""
    counts, lock = tally
    with ModelRegistry(run_slots=RunSlots(4)) as registry:
        registry.load("add", add_model, intra_op_threads=1, max_concurrent_runs=1, max_batch_size=4,
                      max_queue_delay_us=1_000_000)  # fmt: skip
        held = hold(registry, "add", counts, lock)
        results: dict[tuple[str, int], Any] = {}
        threads = callers(registry, "add", 5, results)
        wait_for(lambda: registry.stats("add").batching.batched_requests == 5, "5 requests batched")  # type: ignore[union-attr]
        held.open()
        for t in threads:
            t.join()
        assert counts["peak"] == 1
        assert all(not isinstance(r, BaseException) for r in results.values()), results


# --- deadlines and the queue limit -----------------------------------------------------------------
def test_a_request_queued_past_its_deadline_is_a_504_timeout() -> None:
    """A real run that does not end by itself holds the only slot; a request behind it with a short
    deadline gives up in the queue, while one with a longer deadline is still waiting."""
    with ModelRegistry(run_slots=RunSlots(2)) as registry:
        registry.load("until", make_until_model(), intra_op_threads=1, max_concurrent_runs=1)
        never = {"x": np.full((1, 1), NEVER, dtype=np.float32)}
        short = {"x": np.full((1, 1), 3.0, dtype=np.float32)}
        outcome: list[BaseException | None] = []

        def hog() -> None:
            try:
                registry.infer("until", never, deadline_ns=time.monotonic_ns() + 2_000_000_000)
            except BaseException as exc:
                outcome.append(exc)

        hogger = threading.Thread(target=hog)
        hogger.start()
        wait_for(lambda: registry.stats("until").runs_in_flight == 1, "the hog running")
        with pytest.raises(Timeout) as queued:
            registry.infer("until", short, deadline_ns=time.monotonic_ns() + 50_000_000)
        assert queued.value.status == 504 and queued.value.code == "timeout"
        assert "waited for a run slot" in queued.value.message
        assert "max_concurrent_runs" in queued.value.message
        assert registry.stats("until").runs_queued == 0  # it left the queue
        hogger.join()
        assert isinstance(outcome[0], Timeout)
        assert "stopped at the invocation's deadline" in outcome[0].message
        # the slot is free again: a request within its deadline runs
        y = registry.infer("until", short, deadline_ns=time.monotonic_ns() + 10_000_000_000)["y"]
        assert y.tolist() == [[3.0]]


def test_the_queue_limit_is_obeyed_then_429_with_retry_after(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock]
) -> None:
    counts, lock = tally
    with ModelRegistry(run_slots=RunSlots(2, max_queue=2)) as registry:
        registry.load("add", add_model, intra_op_threads=1, max_concurrent_runs=1)
        held = hold(registry, "add", counts, lock)
        results: dict[tuple[str, int], Any] = {}
        threads = callers(registry, "add", 3, results)  # one runs, two queue: the limit, obeyed
        wait_for(lambda: registry.stats("add").runs_queued == 2, "2 queued")
        with pytest.raises(TooManyRequests) as refused:
            registry.infer("add", feed(9))
        assert refused.value.status == 429 and refused.value.retry_after_s >= 1.0
        assert "2 requests waiting for a run slot" in refused.value.message
        held.open()
        for t in threads:
            t.join()
        assert sorted(float(r[0, 0]) for r in results.values()) == [1.0, 2.0, 3.0]


def test_a_guest_whose_infer_meets_a_full_model_queue_answers_429_with_retry_after(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock], build_guest: Callable[..., bytes]
) -> None:
    """The queue's refusal reaches the caller of the function as the same 429, not as a guest error:
    a C guest (sdk_echo.c runs the model its content type names) whose infer finds the model's one
    slot taken and no room to queue."""
    from wasminfer.models.codec import decode_tensors, encode_tensors
    from wasminfer.runtime import Host

    counts, lock = tally
    registry = ModelRegistry(run_slots=RunSlots(1, max_queue=0))
    with Host(models=registry) as host:
        host.deploy_model("add", add_model, intra_op_threads=1, max_concurrent_runs=1)
        host.deploy_function("echo", build_guest("sdk_echo.c"), {"models": ["add"], "timeout_ms": 60_000})
        held = hold(registry, "add", counts, lock)
        ctype = "application/cbor; model=add"
        first: dict[str, Any] = {}
        body = encode_tensors(feed(1))
        runner = threading.Thread(target=lambda: first.update(r=host.invoke("echo", body, ctype)))
        runner.start()
        wait_for(lambda: counts["inside"] == 1, "the first invocation's run holding the slot")
        with pytest.raises(TooManyRequests) as refused:
            host.invoke("echo", encode_tensors(feed(2)), ctype)
        assert refused.value.status == 429 and refused.value.retry_after_s >= 1.0
        assert "0 requests waiting for a run slot (the most a model may queue, 0)" in refused.value.message
        held.open()
        runner.join()
        assert decode_tensors(first["r"].body)["y"].tolist() == [[2.0, 2.0, 2.0]]
        again = host.invoke("echo", encode_tensors(feed(3)), ctype)  # the slot is free again
        assert decode_tensors(again.body)["y"].tolist() == [[4.0, 4.0, 4.0]]


# --- fairness ---------------------------------------------------------------------------------------
def test_slots_are_shared_between_two_busy_models(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock]
) -> None:
    """Both models may take both of the host's units; model b, arriving behind six calls of model a,
    gets the second unit that frees, not the seventh."""
    counts, lock = tally
    with ModelRegistry(run_slots=RunSlots(2)) as registry:
        for name in ("a", "b"):
            registry.load(name, add_model, intra_op_threads=1, max_concurrent_runs=2)
        held_a, held_b = hold(registry, "a", counts, lock), hold(registry, "b", counts, lock)
        results: dict[tuple[str, int], Any] = {}
        threads = callers(registry, "a", 6, results)
        wait_for(lambda: registry.stats("a").runs_queued == 4, "4 calls of a queued")
        threads += callers(registry, "b", 2, results)
        wait_for(lambda: registry.stats("b").runs_queued == 2, "2 calls of b queued")
        assert (held_a.inside, held_b.inside) == (2, 0)

        held_a.let_go()  # a and b both wait: the turn is a's (first to queue), then b's
        wait_for(lambda: registry.stats("a").runs == 1, "a's first run")
        wait_for(lambda: held_a.inside == 2, "a's next run inside")
        held_a.let_go()
        wait_for(lambda: held_b.inside == 1, "b running")
        assert (held_a.inside, registry.stats("a").runs_queued, registry.stats("b").runs_queued) == (1, 3, 1)
        assert counts["peak"] == 2
        held_a.open()
        held_b.open()
        for t in threads:
            t.join()
        assert counts["peak"] == 2 and len(results) == 8
        assert all(not isinstance(r, BaseException) for r in results.values()), results


def test_a_wide_run_is_not_starved_by_narrow_ones(
    add_model: bytes, tally: tuple[dict[str, int], threading.Lock]
) -> None:
    """A run of 2 threads needs both units: when its turn comes, runs of 1 thread queued behind it
    do not take the unit that frees first."""
    counts, lock = tally
    with ModelRegistry(run_slots=RunSlots(2)) as registry:
        registry.load("narrow", add_model, intra_op_threads=1, max_concurrent_runs=2)
        registry.load("wide", add_model, intra_op_threads=2, max_concurrent_runs=1)
        narrow, wide = hold(registry, "narrow", counts, lock), hold(registry, "wide", counts, lock)
        results: dict[tuple[str, int], Any] = {}
        threads = callers(registry, "narrow", 2, results)
        wait_for(lambda: narrow.inside == 2, "two narrow runs")
        threads += callers(registry, "wide", 1, results)
        wait_for(lambda: registry.stats("wide").runs_queued == 1, "wide queued")
        threads += callers(registry, "narrow", 1, results, start=2)
        wait_for(lambda: registry.stats("narrow").runs_queued == 1, "a third narrow queued")
        narrow.let_go()
        wait_for(lambda: registry.stats("narrow").runs == 1, "one narrow run done")
        assert (narrow.inside, wide.inside, registry.stats("narrow").runs_queued) == (1, 0, 1)
        narrow.let_go()
        wait_for(lambda: wide.inside == 1, "the wide run")
        assert narrow.inside == 0 and registry.stats("narrow").runs_queued == 1
        narrow.open()
        wide.open()
        for t in threads:
            t.join()
        assert len(results) == 4 and all(not isinstance(r, BaseException) for r in results.values())


# --- options and the plan ------------------------------------------------------------------------------
def test_max_concurrent_runs_limits_are_obeyed_and_violated(add_model: bytes) -> None:
    with ModelRegistry() as registry:
        for good in (0, 256):
            assert registry.load("add", add_model, max_concurrent_runs=good).max_concurrent_runs == good
        for bad in (-1, 257, True, "2"):
            with pytest.raises(BadRequest, match="max_concurrent_runs must be an integer from 0 to 256"):
                registry.load("add", add_model, max_concurrent_runs=bad)  # type: ignore[arg-type]
        assert registry.get("add").max_concurrent_runs == 256


def test_the_plan_of_a_tiny_model_is_shown_and_given_options_are_kept(add_model: bytes) -> None:
    with ModelRegistry(run_slots=RunSlots(2)) as registry:
        info = registry.load("add", add_model)
        plan = info.to_dict()["run_plan"]
        assert (plan["chosen_by"], plan["intra_op_threads"], plan["max_concurrent_runs"]) == ("tiny", 1, 0)
        assert plan["run_ms"] < 1.0 and plan["measurements"] == []
        assert info.options()["intra_op_threads"] is None and info.options()["max_concurrent_runs"] is None

        # given threads: still too small to bound
        given = registry.load("add", add_model, intra_op_threads=2)
        assert given.run_plan is not None and given.run_plan.chosen_by == "given; tiny"
        assert (given.intra_op_threads, given.max_concurrent_runs) == (2, 0)
        both = registry.load("add", add_model, intra_op_threads=1, max_concurrent_runs=5)
        assert both.run_plan is not None
        assert both.run_plan.chosen_by == "given; tiny; max_concurrent_runs given"
        assert both.options()["intra_op_threads"] == 1 and both.max_concurrent_runs == 5


def matmul_model(x: tuple[int | str, ...] = (256, 1024)) -> bytes:
    """y = x @ w, x float32 [256, 1024] (fixed) by default, w 1024 x 1024: ~270 M multiply-adds a
    run, whatever the values, so a run of zeros takes milliseconds: never tiny. `x` ("batch", 256,
    1024): the same per row of a batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x))],
        [numpy_helper.from_array(np.full((1024, 1024), 0.5, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def test_a_model_that_is_not_tiny_is_bounded_and_measured() -> None:
    model = matmul_model()
    with ModelRegistry(run_slots=RunSlots(4)) as registry:
        given = registry.load("mm", model, intra_op_threads=2)
        assert given.run_plan is not None and given.run_plan.chosen_by == "given"
        assert given.max_concurrent_runs == 2
        assert given.run_plan.run_ms is not None and given.run_plan.run_ms > 1

        chosen = registry.load("mm", model).run_plan
        assert chosen is not None and chosen.chosen_by in ("measured", "default: over the budget")
        measured = [(m.intra_op_threads, m.concurrent_runs) for m in chosen.measurements]
        assert len(measured) + len(chosen.skipped) == 3  # 1 x 4, 2 x 2, 4 x 1 on 4 units
        assert set(measured) <= {(1, 4), (2, 2), (4, 1)}
        if measured:
            assert (chosen.intra_op_threads, chosen.max_concurrent_runs) in measured
        assert registry.get("mm").intra_op_threads == chosen.intra_op_threads
        x = np.ones((256, 1024), dtype=np.float32)
        assert registry.infer("mm", {"x": x})["y"][0, 0] == 512.0


def test_a_model_that_can_batch_has_a_stacked_run_timed_and_one_that_cannot_has_none() -> None:
    """The plan says what a row costs in a run of BATCH_ROWS stacked rows, next to a lone run, for a
    model with a batch dimension; a fixed first dimension (nothing to stack along) measures none."""
    with ModelRegistry(run_slots=RunSlots(2)) as registry:
        fixed = registry.load("fixed", matmul_model()).run_plan
        assert fixed is not None and fixed.chosen_by == "measured" and fixed.batch_row_ms is None
        assert fixed.to_dict()["batch"] is None

        plan = registry.load("rows", matmul_model(("batch", 256, 1024))).run_plan
        assert plan is not None and plan.chosen_by == "measured" and plan.run_ms is not None, plan
        if 3 * BATCH_ROWS * plan.run_ms / 1e3 > BATCH_BUDGET_S:  # a machine this slow: over the budget
            assert plan.batch_row_ms is None
            return
        assert plan.batch_row_ms is not None and 0 < plan.batch_row_ms
        view = plan.to_dict()["batch"]
        assert view["rows"] == BATCH_ROWS and view["row_ms"] == round(plan.batch_row_ms, 4)
        assert view["row_vs_run"] == round(plan.batch_row_ms / plan.run_ms, 3)


def test_a_tie_goes_to_more_runs_at_once_and_for_a_batching_model_to_more_threads() -> None:
    runs = Measurement(1, 2, 200, 2.0)  # 100 runs/s, 1 thread x 2 runs
    threads = Measurement(2, 1, 103, 1.0)  # 103 runs/s: within TIE of it
    assert pick([runs, threads]) is runs and pick([threads, runs]) is runs
    assert pick([runs, threads], batched=True) is threads
    faster = Measurement(2, 1, 120, 1.0)  # past the tie: the faster one, batching or not
    assert pick([runs, faster]) is faster and pick([runs, faster], batched=True) is faster
    slower = Measurement(2, 1, 90, 1.0)
    assert pick([runs, slower], batched=True) is runs
    assert (1 - TIE) * 103 < 100 < 103 and 100 < (1 - TIE) * 120


def test_batch_row_time_runs_the_sample_stacked() -> None:
    seen: list[tuple[int, ...]] = []

    def run(feed: Mapping[str, np.ndarray]) -> object:
        seen.append(feed["x"].shape)
        assert not feed["x"].any()
        return None

    sample = {"x": np.zeros((1, 7), np.float32)}
    assert batch_row_time(run, sample) >= 0
    assert seen == [(BATCH_ROWS, 7)] * 3  # a first run, then the fastest of two
    assert sample["x"].shape == (1, 7)


def test_choose_measures_each_split_of_the_cores_and_keeps_one_of_them(add_model: bytes) -> None:
    """With the tiny threshold at 0 even the add model is measured: one candidate per thread count
    that fills the 2 cores, and the choice is one of them with its runs as the concurrency."""
    sessions: dict[int, ort.InferenceSession] = {}

    def run_with(threads: int) -> Callable[[Mapping[str, np.ndarray]], object]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[threads] = ort.InferenceSession(add_model, options, providers=["CPUExecutionProvider"])
        return lambda f: sessions[threads].run(None, dict(f))

    sample = sample_feed(_specs(add_model))
    assert sample is not None and sample["a"].shape == (1, 3) and not sample["a"].any()
    plan = choose(run_with, sample, 2, tiny_run_s=0.0, budget_s=5.0)
    assert plan.chosen_by == "measured" and plan.skipped == ()
    assert [(m.intra_op_threads, m.concurrent_runs) for m in plan.measurements] == [(1, 2), (2, 1)]
    assert all(isinstance(m, Measurement) and m.runs >= 1 and m.seconds > 0 for m in plan.measurements)
    assert (plan.intra_op_threads, plan.max_concurrent_runs) in [(1, 2), (2, 1)]
    assert sorted(sessions) == [1, 2]

    starved = choose(run_with, sample, 2, tiny_run_s=0.0, budget_s=0.0)  # not one round fits
    assert starved.chosen_by == "default: over the budget" and starved.max_concurrent_runs == 2
    assert len(starved.skipped) == 2 and "over the budget" in starved.skipped[0]
    assert thread_candidates(2) == [1, 2] and thread_candidates(6) == [1, 2, 4, 6]


def _specs(model: bytes) -> list[Any]:
    from wasminfer.models.inputs import tensor_spec

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [tensor_spec(arg, {}, "input") for arg in session.get_inputs()]


@pytest.mark.parametrize("mask", [False, True])
def test_a_decoders_sample_has_an_empty_past_so_a_masked_decoder_is_measured(mask: bool) -> None:
    # With a past of FREE_DIM the masked model's `total_seq` mask (64) would not match past + new
    # tokens (128): its sample did not run, and the plan fell back to the default unmeasured.
    model = tiny_gpt_model(attention_mask=mask)
    sample = sample_feed(_specs(model))
    assert sample is not None
    assert sample["input_ids"].shape == (1, FREE_DIM) and sample["past_key_0"].shape == (1, 4, 0, 16)
    assert ("attention_mask" in sample) is mask
    if mask:
        assert sample["attention_mask"].shape == sample["position_ids"].shape == (1, FREE_DIM)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], sample)[0]
    assert logits.shape == (1, FREE_DIM, 96)
    registry = ModelRegistry()
    try:
        plan = registry.load("gpt", model).run_plan
        assert plan is not None
        assert not plan.chosen_by.startswith("default: the sample input did not run"), plan.chosen_by
    finally:
        registry.close()


def test_a_batched_decoder_is_measured_at_one_thread_a_run_per_core(add_model: bytes) -> None:
    """`steps`: only the one-thread split is measured (the others are listed as skipped, why with
    them), and it is chosen; the same model without batching is measured at every split."""
    runs: list[int] = []

    def run_with(threads: int) -> Callable[[Mapping[str, np.ndarray]], object]:
        session = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"])
        return lambda f: runs.append(threads) or session.run(None, dict(f))

    sample = sample_feed(_specs(add_model))
    assert sample is not None
    plan = choose(run_with, sample, 2, tiny_run_s=0.0, budget_s=5.0, batched=True, steps=True)
    assert (plan.intra_op_threads, plan.max_concurrent_runs, plan.chosen_by) == (1, 2, "measured")
    assert [(m.intra_op_threads, m.concurrent_runs) for m in plan.measurements] == [(1, 2)]
    assert plan.skipped == ("2 thread(s) x 1 run(s): a batched decoder runs one thread a run",)
    assert set(runs) == {1}

    registry = ModelRegistry()
    try:
        # big enough to be measured (a run of ~2 ms; the default tiny-gpt is under TINY_RUN_S)
        model = tiny_gpt_model(d_model=256, layers=4, heads=4, attention_mask=True)
        batched = registry.load("gpt", model, max_batch_size=8).run_plan
        plain = registry.load("gpt-plain", model).run_plan
    finally:
        registry.close()
    assert batched is not None and plain is not None
    assert batched.chosen_by == "measured" and batched.intra_op_threads == 1
    assert {m.intra_op_threads for m in batched.measurements} == {1}
    # a run per core; with more than one core the other splits are listed as skipped
    skipped = [s for s in batched.skipped if "a batched decoder runs one thread a run" in s]
    assert bool(skipped) == (batched.max_concurrent_runs > 1)
    assert not any("batched decoder" in s for s in plain.skipped)
    if batched.max_concurrent_runs > 1 and plain.chosen_by == "measured":
        assert {m.intra_op_threads for m in plain.measurements} > {1}
