"""Clocks and time windows: what the autoscalers read their samples through.

An autoscaler never calls `time` itself: it is given a `Clock` (a function returning monotonic
seconds), so a test drives it with a `FakeClock` and synthetic load, deterministically.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

#: Monotonic seconds. `time.monotonic` in production, a `FakeClock` in tests.
Clock = Callable[[], float]

MONOTONIC: Clock = time.monotonic


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Window:
    """The values added over the last `span_s` seconds (one per autoscaler tick).

    `full(now)` says whether the samples cover the whole span since the window was made or last
    cleared (a sample added at `t` describes the `tick_s` before it): a decision that must hold
    "for the whole window" waits for that.
    """

    def __init__(self, span_s: float, tick_s: float = 0.0) -> None:
        if span_s <= 0:
            raise ValueError("a window spans more than 0 seconds")
        self.span_s = span_s
        self.tick_s = tick_s
        self._samples: deque[tuple[float, float]] = deque()
        self._since: float | None = None

    def add(self, now: float, value: float) -> None:
        if self._since is None:
            self._since = now - self.tick_s
        self._samples.append((now, value))
        self._evict(now)

    def _evict(self, now: float) -> None:
        horizon = now - self.span_s
        samples = self._samples
        while samples and samples[0][0] <= horizon:
            samples.popleft()

    def values(self, now: float) -> list[float]:
        self._evict(now)
        return [v for _, v in self._samples]

    def mean(self, now: float) -> float:
        """The mean of the values in the window (0 when it is empty)."""
        values = self.values(now)
        return sum(values) / len(values) if values else 0.0

    def median(self, now: float) -> float:
        values = self.values(now)
        return statistics.median(values) if values else 0.0

    def max(self, now: float) -> float:
        values = self.values(now)
        return max(values) if values else 0.0

    def full(self, now: float) -> bool:
        """Whether samples were added for at least the whole span (since the last `clear`)."""
        return self._since is not None and now - self._since >= self.span_s - 1e-9

    def clear(self) -> None:
        self._samples.clear()
        self._since = None
