"""Stops ONNX Runtime runs at their deadline: one timer thread for the process.

`session.run` cannot be interrupted from Python, but ORT looks at `RunOptions.terminate` between the
kernels of a run (and between the iterations of a `Loop`): a run given RunOptions of its own ends
soon after another thread sets the flag, raising an error. `RUN_TIMER.arm(deadline, options)` sets
it at the deadline. One thread sleeps until the earliest armed deadline (a heap), so a run with a
deadline costs a RunOptions (~0.3 µs) and a heap push, never a thread of its own.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

import onnxruntime as ort

__all__ = ["RUN_TIMER", "Alarm", "RunTimer"]


class Alarm:
    """One armed run. `fired` is True once the timer set its terminate flag."""

    __slots__ = ("deadline_ns", "options", "fired", "done")

    def __init__(self, deadline_ns: int, options: ort.RunOptions) -> None:
        self.deadline_ns = deadline_ns
        self.options = options
        self.fired = False
        self.done = False


class RunTimer:
    """Sets `RunOptions.terminate` of armed runs when their deadline (`time.monotonic_ns()`) passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Alarm]] = []
        self._live = 0  # armed and not yet disarmed or fired
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def arm(self, deadline_ns: int, options: ort.RunOptions) -> Alarm:
        """Terminates the run of `options` at `deadline_ns` unless `disarm`ed first."""
        alarm = Alarm(deadline_ns, options)
        with self._cond:
            heap = self._heap
            if len(heap) > 2 * self._live + 1024:  # disarmed entries wait for their deadline: drop them
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
            heapq.heappush(heap, (deadline_ns, next(self._seq), alarm))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasminfer-run-timer", daemon=True)
                self._thread.start()
            elif heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Call when the run returned. Returns whether the timer had fired (the run was told to stop)."""
        with self._cond:
            if not alarm.done:
                alarm.done = True
                self._live -= 1
            return alarm.fired

    def pending(self) -> int:
        """Armed runs not yet disarmed or fired."""
        with self._cond:
            return self._live

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                left = heap[0][0] - time.monotonic_ns()
                if left > 0:
                    self._cond.wait(left / 1e9)
                    continue
                _, _, alarm = heapq.heappop(heap)
                alarm.fired = alarm.done = True
                self._live -= 1
                alarm.options.terminate = True


#: The process' one timer.
RUN_TIMER = RunTimer()
