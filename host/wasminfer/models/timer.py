"""Stops ONNX Runtime runs at their deadline: one timer thread for the process.

`session.run` cannot be interrupted from Python, but ORT looks at `RunOptions.terminate` between the
kernels of a run (and between the iterations of a `Loop`): a run given RunOptions of its own ends
soon after another thread sets the flag, raising an error. `RUN_TIMER.arm(deadline)` gives the
calling thread's `Alarm`, whose `options` the run is given, and sets their flag at the deadline. One
thread sleeps until the earliest armed deadline (a heap), so a run with a deadline never costs a
thread of its own.

Per run, arming and disarming are a plain lock, a heap push and a few attributes: each thread keeps
one `Alarm` and its RunOptions for all its runs (making RunOptions and an alarm per run, and a
`Condition`'s Python-level `with`, were ~5 µs of a ~30 µs digits run). An alarm that fired gets new
RunOptions when it is disarmed, so a run stopped for one request never stops the thread's next.
The timer thread is woken only when a new deadline is earlier than the one it sleeps until.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

import onnxruntime as ort

__all__ = ["RUN_TIMER", "Alarm", "RunTimer"]

_NEVER = 1 << 127  # the timer thread's wake-up time while nothing is armed


def _run_options() -> ort.RunOptions:
    options = ort.RunOptions()
    options.log_severity_level = 4  # a run stopped on purpose is no error for ORT to log
    return options


class Alarm:
    """The armed run of one thread: pass `options` to `session.run`. `fired` is True once the timer
    set their terminate flag. Reused by the thread's next run once disarmed (`armed` False)."""

    __slots__ = ("deadline_ns", "options", "fired", "armed", "generation")

    def __init__(self) -> None:
        self.deadline_ns = 0
        self.options = _run_options()
        self.fired = False
        self.armed = False
        self.generation = 0  # which arming a heap entry is for: older entries are stale


class RunTimer:
    """Sets `RunOptions.terminate` of armed runs when their deadline (`time.monotonic_ns()`) passes."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Alarm, int]] = []  # (deadline, seq, alarm, its generation)
        self._live = 0  # armed and not yet disarmed or fired
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake_ns = _NEVER  # when the timer thread wakes next (under the lock)
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def arm(self, deadline_ns: int) -> Alarm:
        """The calling thread's alarm, armed: the run given its `options` is terminated at
        `deadline_ns` unless `disarm`ed first."""
        alarm: Alarm | None = getattr(self._local, "alarm", None)
        if alarm is None or alarm.armed:  # (armed: a run inside a run of this thread, never seen)
            alarm = Alarm()
            if getattr(self._local, "alarm", None) is None:
                self._local.alarm = alarm
        with self._lock:
            heap = self._heap
            if len(heap) > 2 * self._live + 1024:  # disarmed entries wait for their deadline: drop them
                heap[:] = [entry for entry in heap if entry[2].armed and entry[2].generation == entry[3]]
                heapq.heapify(heap)
            if alarm.fired:  # fired and never disarmed (a run left by a BaseException): its flag is set
                alarm.options = _run_options()
            generation = alarm.generation + 1
            alarm.generation = generation
            alarm.deadline_ns = deadline_ns
            alarm.fired = False
            alarm.armed = True
            heapq.heappush(heap, (deadline_ns, next(self._seq), alarm, generation))
            self._live += 1
            if deadline_ns < self._wake_ns:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="wasminfer-run-timer", daemon=True)
                    self._thread.start()
                self._wake_ns = deadline_ns
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """Call when the run returned. Returns whether the timer had fired (the run was told to stop)."""
        with self._lock:
            if alarm.armed:
                alarm.armed = False
                self._live -= 1
            fired = alarm.fired
        if fired:  # its flag stays set: the thread's next run gets RunOptions of its own
            alarm.options = _run_options()
        return fired

    def pending(self) -> int:
        """Armed runs not yet disarmed or fired."""
        with self._lock:
            return self._live

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                while heap and not (heap[0][2].armed and heap[0][2].generation == heap[0][3]):
                    heapq.heappop(heap)
                if not heap:
                    self._wake_ns = _NEVER
                    self._cond.wait()
                    continue
                deadline = heap[0][0]
                left = deadline - time.monotonic_ns()
                if left > 0:
                    self._wake_ns = deadline
                    self._cond.wait(left / 1e9)
                    continue
                _, _, alarm, _ = heapq.heappop(heap)
                alarm.fired = True
                alarm.armed = False
                self._live -= 1
                alarm.options.terminate = True


#: The process' one timer.
RUN_TIMER = RunTimer()
