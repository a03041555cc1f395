"""`ReplicaAutoscaler`: when to add a host replica to the fleet, and when to take one away.

Hybrid scaling's second step. A host replica is a whole process (its own interpreter, its own ONNX
Runtime sessions), so it is added only when the replicas there are saturated and removed only after
a long calm:

- up: over the `up_window_s`, the median tick had a queueing delay (p90 of what requests waited
  for a thread and an instance, plus any hop to the replica) over `up_queue_ms`, or replica CPU over
  `up_cpu` cores (one saturated interpreter is ~1 core: the GIL). A median, so one slow tick (a
  GC pause, a compile) is not enough.
- down: nine ticks in ten of the `down_window_s` (all but a stray spike of a noisy machine) had a
  CPU that would stay under `down_cpu` per replica with one replica fewer (the load of the one
  removed is spread over the rest: removing it must not make the rest hot, or the fleet would flap),
  and either a queueing delay under `down_queue_ms` or so few requests in flight that they would
  stay under `down_concurrency` per replica with one fewer. (The queueing delay of an idle fleet is
  scheduling jitter: on a busy 2-core machine its p90 reached 5 ms at 150 requests/s, one request in
  flight every few ms; the queue alone would have kept an idle replica forever.)

After every change (and while a replica is starting) both windows start again: the next decision
sees only the fleet as it is now. `min_replicas`..`max_replicas` always hold. Pure logic (a
`clock`, no I/O); `wasminfer.replicas.fleet` feeds it and acts on what it says.
"""

from __future__ import annotations

from dataclasses import dataclass

from wasminfer.scaling.window import MONOTONIC, Clock, Window


@dataclass(frozen=True)
class ReplicaPolicy:
    min_replicas: int = 1
    max_replicas: int = 1
    tick_s: float = 1.0
    up_window_s: float = 5.0
    down_window_s: float = 60.0
    up_queue_ms: float = 5.0
    up_cpu: float = 0.9
    down_queue_ms: float = 2.0
    down_cpu: float = 0.5
    down_concurrency: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("replica autoscaler: need 1 <= min_replicas <= max_replicas")
        if not (0 < self.tick_s <= self.up_window_s and self.tick_s <= self.down_window_s):
            raise ValueError("replica autoscaler: need 0 < tick_s <= up_window_s, down_window_s")
        if self.down_queue_ms > self.up_queue_ms or self.down_cpu > self.up_cpu:
            raise ValueError("replica autoscaler: the low-water marks must be under the high ones")


@dataclass(frozen=True)
class ReplicaLoad:
    """One tick's reading of the fleet."""

    replicas: int  # serving (not starting, not draining)
    starting: int = 0
    queue_ms: float = 0.0  # p90 queueing delay of the requests of the tick (0 with none)
    cpu: float = 0.0  # mean CPU of a serving replica, in cores
    requests: int = 0
    concurrency: float = 0.0  # mean requests in flight in the whole fleet over the tick


@dataclass(frozen=True)
class ReplicaDecision:
    delta: int  # +1: add one, -1: drain one, 0: hold
    reason: str


HOLD = ReplicaDecision(0, "")
CALM_FRACTION = 0.9  # of the down window's ticks


class ReplicaAutoscaler:
    def __init__(self, policy: ReplicaPolicy | None = None, clock: Clock = MONOTONIC) -> None:
        self.policy = policy or ReplicaPolicy()
        self._clock = clock
        tick = self.policy.tick_s
        self._queue = Window(self.policy.up_window_s, tick)
        self._cpu = Window(self.policy.up_window_s, tick)
        self._calm = Window(self.policy.down_window_s, tick)

    def reset(self) -> None:
        """Forget the windows (the fleet changed: what was measured no longer describes it)."""
        self._queue.clear()
        self._cpu.clear()
        self._calm.clear()

    def observe(self, load: ReplicaLoad) -> ReplicaDecision:
        """Feeds one tick's reading; returns what to do now."""
        p, now = self.policy, self._clock()
        total = load.replicas + load.starting
        if total < p.min_replicas:
            self.reset()
            return ReplicaDecision(+1, f"{total} replica(s), below min_replicas {p.min_replicas}")
        if load.replicas > p.max_replicas:
            self.reset()
            return ReplicaDecision(-1, f"{load.replicas} replicas, above max_replicas {p.max_replicas}")
        if load.starting:
            self.reset()  # judge the fleet once the new replica serves
            return HOLD
        self._queue.add(now, load.queue_ms)
        self._cpu.add(now, load.cpu)
        n = load.replicas
        fewer = n - 1 if n > 1 else 0
        projected_cpu = load.cpu * n / fewer if fewer else float("inf")
        projected_concurrency = load.concurrency / fewer if fewer else float("inf")
        calm = projected_cpu <= p.down_cpu and (
            load.queue_ms <= p.down_queue_ms or projected_concurrency <= p.down_concurrency
        )
        self._calm.add(now, 1.0 if calm else 0.0)
        if n < p.max_replicas and self._queue.full(now):
            queue, cpu = self._queue.median(now), self._cpu.median(now)
            if queue >= p.up_queue_ms or cpu >= p.up_cpu:
                self.reset()
                what = (
                    f"queueing delay p90 {queue:.1f} ms >= {p.up_queue_ms:g} ms"
                    if queue >= p.up_queue_ms
                    else f"CPU {cpu:.2f} cores >= {p.up_cpu:g}"
                )
                return ReplicaDecision(+1, f"saturated: median over {p.up_window_s:g} s {what}")
        if n > p.min_replicas and self._calm.full(now) and self._calm.mean(now) >= CALM_FRACTION:
            self.reset()
            return ReplicaDecision(
                -1,
                f"calm for {p.down_window_s:g} s: CPU <= {p.down_cpu:g} cores and queueing delay <= "
                f"{p.down_queue_ms:g} ms or in flight <= {p.down_concurrency:g}, per replica even "
                f"with {n - 1}",
            )
        return HOLD
