"""Decoder steps run ahead of their guests: a model's step loops (`StepLoop`, one per run slot), which
run together the next steps that `DecoderTable.next_token` queues (`runtime.decoders`; docs/streaming.md,
"Steps run ahead")."""

from __future__ import annotations

import threading
import time

import numpy as np

from wasminfer.models.decoding import DecoderSpec
from wasminfer.models.joined import JoinedRuns

#: A loop's member that has queued no step for this many of its runs (their time and the delay each),
#: and at least `IDLE_MIN_S` seconds, is not waited for until it queues one again.
IDLE_RUNS = 4
IDLE_MIN_S = 0.05


class Ahead:
    """A state's next step, queued in its `StepLoop` before the guest asks for it."""

    __slots__ = ("loop", "feed", "deadline_ns", "queued", "done", "outputs")

    def __init__(self, loop: StepLoop, feed: dict[str, np.ndarray], deadline_ns: int | None) -> None:
        self.loop = loop
        self.feed = feed
        self.deadline_ns = deadline_ns
        self.queued = time.monotonic()
        self.done = threading.Lock()  # released by the loop once the step ran (or failed)
        self.done.acquire()
        self.outputs: dict[str, np.ndarray] | None = None  # None: its batch failed

    def result(self) -> dict[str, np.ndarray] | None:
        """The step's outputs, once run; None if its batch failed, or if its deadline came while it
        was still queued (then the caller runs the step alone, which fails alone if the step is
        what fails, as the batcher does, or with the deadline's error)."""
        if self.deadline_ns is None:
            self.done.acquire()
        elif not self.done.acquire(timeout=max(0.0, (self.deadline_ns - time.monotonic_ns()) / 1e9)):
            if self.loop.discard(self):
                return None
            self.done.acquire()  # in a run, which its deadline (the earliest of the batch's) stops
        return self.outputs

    def drop(self) -> dict[str, np.ndarray] | None:
        """Drops the step: out of its loop's queue if it is still there; else its outputs once run
        (None if its batch failed)."""
        return None if self.loop.discard(self) else self.result()


class StepLoop:
    """A thread of its own running together the steps its states queue ahead of their guests.

    A stream's next step is known as soon as its token is chosen -- the step on that token -- so it
    is queued then (`next_token`, `submit`), and runs while the guest turns the token into text and
    streams it; the guest, coming back for the next token, takes the step's outputs. The loop runs
    whatever its states queued as one batch when every one of its active members has queued (a
    cohort back whole: run on its present as it is, `DecoderSpec.steps`), or `delay` after the
    first, on a thread of its own, one batch at a time. A member is active from when it joins (its
    state opened) until it has queued nothing for `IDLE_RUNS` runs and at least `IDLE_MIN_S`: a
    state opened and never stepped (a guest's, or a tenant's on purpose) would otherwise make every
    batch of the model wait the whole delay. A model has one loop per run slot, and its streams
    are spread across them (`StepLoops`).

    Measured (`bench/stream.py`, 21 rounds, three runs each, old and new code alternating): at 8
    streams 0.73-0.75 of the limit's tokens/s before, 0.81-0.90 with the loops; at 32 streams
    0.70-0.73 before, 0.81-0.83; CPU per token at 8 streams 369-440 µs before, 310-395 µs. The
    interpreter lock held per token (py-spy --gil, 8 streams) fell from ~91 to ~73 µs: the joining,
    the run and the splitting are done once per batch on the loop's thread, where every stream's
    thread had to come back, take the lock in turn, and lead or wait in the batcher."""

    def __init__(self, runs: JoinedRuns, spec: DecoderSpec) -> None:
        self.runs = runs
        self.steps = spec.steps
        # open states whose steps this loop runs (`StepLoops.assign` / `leave`), each with when it
        # joined or last queued a step
        self._members: dict[object, float] = {}
        self._pending: list[Ahead] = []
        self._run_s = 0.0  # the last batch's run
        self._cond = threading.Condition(threading.Lock())
        self._running = False

    @property
    def members(self) -> int:
        return len(self._members)

    def join(self, member: object) -> None:
        with self._cond:
            self._members[member] = time.monotonic()

    def leave(self, member: object) -> None:
        """`member` left: the share a batch waits for may be smaller now."""
        with self._cond:
            self._members.pop(member, None)
            self._cond.notify()

    def submit(self, feed: dict[str, np.ndarray], deadline_ns: int | None, member: object) -> Ahead:
        """Queues `member`'s step on `feed`, to run by `deadline_ns`."""
        ahead = Ahead(self, feed, deadline_ns)
        with self._cond:
            self._members[member] = ahead.queued
            self._pending.append(ahead)
            if not self._running:
                try:
                    threading.Thread(target=self._loop, name="wasminfer-step-loop", daemon=True).start()
                except RuntimeError:  # no thread to be had: the guest's asking runs it
                    self._pending.remove(ahead)
                    ahead.done.release()
                    return ahead
                self._running = True
            elif len(self._pending) == 1 or len(self._pending) >= self._share():
                self._cond.notify()  # the first starts the delay; the share ends it
        return ahead

    def _share(self) -> int:
        """Under the lock: the rows a batch waits for, a step of each active member (see the class
        doc), at most `max_batch_size`."""
        since = time.monotonic() - max(IDLE_MIN_S, IDLE_RUNS * (self._run_s + self.runs.delay))
        active = 0
        for last in self._members.values():
            if last >= since:
                active += 1
        return min(self.runs.max_rows, max(1, active))

    def discard(self, ahead: Ahead) -> bool:
        """Takes `ahead` out of the queue; False if a batch took it already (it runs all the same)."""
        with self._cond:
            try:
                self._pending.remove(ahead)
            except ValueError:
                return False
            return True

    def _take(self) -> list[Ahead] | None:
        """Waits for a batch: every member's step, or what is queued `delay` after the first; None
        when nothing is left to run (the thread then ends: the next `submit` starts another)."""
        with self._cond:
            pending = self._pending
            while True:
                if not pending:
                    if not self._cond.wait(1.0) and not self._pending:
                        self._running = False
                        return None
                    continue
                left = pending[0].queued + self.runs.delay - time.monotonic()
                if len(pending) >= self._share() or left <= 0:
                    break
                self._cond.wait(left)
            batch = pending[:self.runs.max_rows]
            del pending[:len(batch)]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run(batch)
            del batch  # (not held while the next one gathers: its feeds' pasts are batches' presents)

    def _run(self, batch: list[Ahead]) -> None:
        try:
            now_ns = time.monotonic_ns()
            # those past their deadline run alone on their guests' asking, and fail there
            live = [a for a in batch if a.deadline_ns is None or a.deadline_ns > now_ns]
            if live:
                feed, starts = self.steps.join([a.feed for a in live])
                deadlines = [a.deadline_ns for a in live if a.deadline_ns is not None]
                now = time.monotonic()
                outputs = self.runs.run(feed, min(deadlines) if deadlines else None,
                                        [now - a.queued for a in live], len(live))
                self._run_s = time.monotonic() - now
                for ahead, start in zip(live, starts, strict=True):
                    ahead.outputs = {name: out[start:start + 1] for name, out in outputs.items()}
        except BaseException:  # noqa: BLE001 - each step reruns alone on its own thread, and fails there
            for ahead in batch:
                ahead.outputs = None
        finally:
            for ahead in batch:
                ahead.feed = None  # type: ignore[assignment]  # its past: the rows of an older batch
                ahead.done.release()


class StepLoops:
    """The step loops of one decoder spec (one per run slot of its model), and which stream is on
    which: a stream joins the loop with the fewest, and stays."""

    def __init__(self, runs: JoinedRuns, spec: DecoderSpec) -> None:
        self.loops = [StepLoop(runs, spec) for _ in range(max(1, runs.slots))]
        self._lock = threading.Lock()

    def assign(self, member: object) -> StepLoop:
        with self._lock:
            loop = min(self.loops, key=lambda lo: lo.members)
            loop.join(member)
            return loop


__all__ = ["IDLE_MIN_S", "IDLE_RUNS", "Ahead", "StepLoop", "StepLoops"]
