"""`InstanceAutoscaler`: how many warm instances one function should have in one host.

Knative's KPA, on our numbers. Every tick the host reports the function's average concurrency over
the tick (requests running or waiting for an instance, exact from the pool's demand integral). The
autoscaler averages it over a long *stable* window and a short *panic* window and wants
`ceil(concurrency / target)` instances, where `target` is the manifest's `target_utilization_pct`
of one request per instance (an instance runs one request at a time; the rest is headroom):

- stable mode: desired follows the stable window, so a short lull never throws warm instances away;
- panic mode: entered when the panic window wants `panic_threshold` times the instances that are
  live; desired then follows the panic window and never goes down while panicking; left once the
  panic condition has not held for a whole stable window.

One addition to KPA: desired is never under the *peak* concurrency of the stable window (the most
requests that were in the pool at once). An invocation holds its instance for ~0.1 ms of a request
that spends milliseconds in HTTP, so under bursts the average concurrency is a small fraction of the
peak, and KPA on averages let the idle reaper take the burst's instances between bursts: every burst
made its instances again (bench/scaling.py --bursts: 8-15 cold starts per burst of 16 clients;
with the peak, none after the first). An idle instance costs tens of KiB; keeping the recent peak
warm is cheap.

The result is clamped to the manifest's `min_instances`..`max_instances`. Pure logic: no threads,
no pools, no time of its own (`clock`); `wasminfer.replicas.instances` applies it to a host.

Creating an instance costs ~64 µs here, and a request that finds none idle creates one at once, so
this autoscaler is not what makes a host react to a step (the pool does, within the request); it
decides what to keep warm: headroom ahead of demand, and how long to keep it before the idle reaper
(`idle_timeout_s`) may take it away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wasminfer.scaling.window import MONOTONIC, Clock, Window


@dataclass(frozen=True)
class InstancePolicy:
    """The knobs of every function's instance autoscaler in a host (defaults: docs/scaling.md)."""

    tick_s: float = 0.5
    stable_window_s: float = 30.0
    panic_window_s: float = 3.0
    panic_threshold: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.tick_s <= self.panic_window_s <= self.stable_window_s:
            raise ValueError("instance autoscaler: need 0 < tick_s <= panic_window_s <= stable_window_s")
        if self.panic_threshold <= 1:
            raise ValueError("instance autoscaler: panic_threshold must be more than 1")


@dataclass(frozen=True)
class Bounds:
    """What a function's manifest allows: `target` is the concurrency per instance to aim for."""

    min_instances: int = 0
    max_instances: int = 64
    target: float = 0.7

    def clamp(self, n: int) -> int:
        return max(self.min_instances, min(self.max_instances, n))


@dataclass(frozen=True)
class InstanceDecision:
    desired: int
    panic: bool
    stable_concurrency: float
    panic_concurrency: float
    reason: str


class InstanceAutoscaler:
    """The KPA of one function in one host. Feed `observe` once a tick, then ask `decide`."""

    def __init__(
        self, bounds: Bounds, policy: InstancePolicy | None = None, clock: Clock = MONOTONIC
    ) -> None:
        self.bounds = bounds
        self.policy = policy or InstancePolicy()
        self._clock = clock
        self._stable = Window(self.policy.stable_window_s)
        self._panic = Window(self.policy.panic_window_s)
        self._peak = Window(self.policy.stable_window_s)
        self._panic_since: float | None = None  # last time the panic condition held
        self._panic_max = 0

    @property
    def panicking(self) -> bool:
        return self._panic_since is not None

    def observe(self, concurrency: float, peak: float | None = None) -> None:
        """The function's average concurrency (running + waiting) over the tick that just ended, and
        the most requests at once during it (default: the average)."""
        now = self._clock()
        value = max(0.0, concurrency)
        self._stable.add(now, value)
        self._panic.add(now, value)
        self._peak.add(now, max(value, peak or 0.0))

    def decide(self, live: int) -> InstanceDecision:
        """The instances wanted now, given `live` instances (busy or idle) in the pool."""
        now = self._clock()
        p, b = self.policy, self.bounds
        stable = self._stable.mean(now)
        burst = self._panic.mean(now)
        want_stable = _instances_for(stable, b.target)
        want_panic = _instances_for(burst, b.target)
        over = want_panic >= p.panic_threshold * max(1, live)
        if over:
            self._panic_since = now
        elif self._panic_since is not None and now - self._panic_since >= p.stable_window_s:
            self._panic_since = None
            self._panic_max = 0
        if self._panic_since is not None:
            desired = max(want_panic, self._panic_max)
            self._panic_max = desired
            reason = (
                f"panic: {burst:.2f} concurrent over {p.panic_window_s:g} s wants {want_panic} "
                f"instance(s) at {b.target:.0%} each (live {live})"
            )
        else:
            desired = want_stable
            reason = (
                f"stable: {stable:.2f} concurrent over {p.stable_window_s:g} s wants {want_stable} "
                f"instance(s) at {b.target:.0%} each"
            )
        peak = math.ceil(self._peak.max(now) - 1e-9)
        if peak > desired:
            desired = peak
            reason += f"; {peak} at once within {p.stable_window_s:g} s: kept warm"
        clamped = b.clamp(desired)
        if clamped != desired:
            reason += (
                f"; clamped to {clamped} (min_instances {b.min_instances}, max_instances {b.max_instances})"
            )
        return InstanceDecision(clamped, self._panic_since is not None, stable, burst, reason)


def _instances_for(concurrency: float, target: float) -> int:
    # 1e-9: 0.7 concurrent at a 0.7 target is one instance, not two by rounding
    return max(0, math.ceil(concurrency / target - 1e-9))
