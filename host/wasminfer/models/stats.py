"""The counters of each model and the snapshots a metrics endpoint reads (nothing here imports
prometheus): runs, inferences, errors, rejected calls, run time, rates over a sliding window, and
for a batching model its batcher's histograms."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

from wasminfer.models.batching import BatchCounters, Batcher, BatchingStats
from wasminfer.models.slots import ModelSlots

__all__ = ["Counters", "ModelStats", "Rate"]


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Counters of one model since it was first loaded (they survive reloads, reset on unload).

    `runs` counts successful `session.run` calls and `run_seconds_total` their time in it;
    `inferences` counts the `infer` calls answered (more than `runs` when calls share batched runs);
    `errors` counts calls ORT failed (`InferenceFailed`), `rejected` calls refused before running
    because an input did not match the model (`InvalidTensor`). The rates are over the last 10
    seconds. `last_used` is a `time.monotonic()` value, None before the first call. `batching`:
    the batcher's counters, None for a model that does not batch. `runs_in_flight` and
    `runs_queued`: its runs now, and the calls waiting for a run slot; `peak_runs_in_flight` the
    most at once since the model was (re)loaded.
    """

    runs: int
    errors: int
    rejected: int
    run_seconds_total: float
    last_used: float | None
    inferences: int = 0
    runs_per_second: float = 0.0
    inferences_per_second: float = 0.0
    batching: BatchingStats | None = None
    runs_in_flight: int = 0
    runs_queued: int = 0
    peak_runs_in_flight: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "inferences": self.inferences,
            "errors": self.errors,
            "rejected": self.rejected,
            "run_seconds_total": self.run_seconds_total,
            "runs_per_second": self.runs_per_second,
            "inferences_per_second": self.inferences_per_second,
            "last_used": self.last_used,
            "runs_in_flight": self.runs_in_flight,
            "runs_queued": self.runs_queued,
            "peak_runs_in_flight": self.peak_runs_in_flight,
            "batching": self.batching.to_dict() if self.batching else None,
        }


class Rate:
    """Events per second over a sliding window of whole seconds (a ring of per-second counts)."""

    __slots__ = ("counts", "seconds")
    WINDOW = 10

    def __init__(self) -> None:
        self.counts = [0] * self.WINDOW
        self.seconds = [-1] * self.WINDOW

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        slot = second % self.WINDOW
        if self.seconds[slot] != second:
            self.seconds[slot] = second
            self.counts[slot] = 0
        self.counts[slot] += n

    def per_second(self, now: float) -> float:
        second = int(now)
        recent = sum(c for c, s in zip(self.counts, self.seconds, strict=True) if second - s < self.WINDOW)
        return recent / (self.WINDOW - 1 + (now - second))  # the current second only partly elapsed


class Counters:
    """The counters of one model name (kept across reloads). Mutated under `lock`."""

    # A lock of its own, held for a few additions (never around run): `+=` on attributes is not
    # atomic across threads.
    __slots__ = (
        "lock", "runs", "inferences", "errors", "rejected", "run_ns", "last_used", "run_rate",
        "inference_rate", "batching",
    )  # fmt: skip

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs = self.inferences = self.errors = self.rejected = self.run_ns = 0
        self.last_used: float | None = None
        self.run_rate = Rate()
        self.inference_rate = Rate()
        # Made on the first load with batching; kept (monotonic) across reloads like the rest.
        self.batching: BatchCounters | None = None

    def snapshot(self, batcher: Batcher | None, slots: ModelSlots | None = None) -> ModelStats:
        now = time.monotonic()
        with self.lock:
            stats = ModelStats(
                self.runs, self.errors, self.rejected, self.run_ns / 1e9, self.last_used,
                inferences=self.inferences,
                runs_per_second=self.run_rate.per_second(now),
                inferences_per_second=self.inference_rate.per_second(now),
            )  # fmt: skip
        if slots is not None:
            in_flight, queued, peak = slots.in_flight, slots.queued, slots.peak
            stats = dataclasses.replace(
                stats, runs_in_flight=in_flight, runs_queued=queued, peak_runs_in_flight=peak
            )
        if batcher is None:
            return stats
        return dataclasses.replace(stats, batching=batcher.stats())
