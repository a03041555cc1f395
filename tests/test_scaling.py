"""Both autoscalers as pure logic: a fake clock and synthetic load, so every step is deterministic."""

from __future__ import annotations

import pytest

from wasminfer.errors import BadRequest
from wasminfer.scaling import (
    Bounds,
    DecisionLog,
    FakeClock,
    InstanceAutoscaler,
    InstancePolicy,
    ReplicaAutoscaler,
    ReplicaLoad,
    ReplicaPolicy,
    ScalingConfig,
    Window,
)

POLICY = InstancePolicy(tick_s=1.0, stable_window_s=20.0, panic_window_s=4.0, panic_threshold=2.0)


def run_instances(
    scaler: InstanceAutoscaler, clock: FakeClock, load: list[float], live: int | None = None
) -> list[int]:
    """Feeds one concurrency value per tick; `live` follows the decisions unless fixed."""
    desired: list[int] = []
    current = live if live is not None else 1
    for concurrency in load:
        clock.advance(1.0)
        scaler.observe(concurrency)
        d = scaler.decide(current)
        desired.append(d.desired)
        if live is None:
            current = d.desired
    return desired


# --- the window ------------------------------------------------------------------------------------
def test_window_keeps_only_its_span_and_knows_when_it_is_full() -> None:
    w = Window(3.0)
    for t in range(1, 6):
        w.add(float(t), float(t))
    assert w.values(5.0) == [3.0, 4.0, 5.0] and w.mean(5.0) == 4.0 and w.max(5.0) == 5.0
    assert w.full(5.0)
    w.clear()
    w.add(6.0, 1.0)
    assert not w.full(7.0) and w.full(9.0)
    assert Window(1.0).mean(0.0) == 0.0


# --- instances (KPA) -------------------------------------------------------------------------------
def test_steady_load_wants_concurrency_over_target() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(0, 64, target=0.7), POLICY, clock)
    desired = run_instances(scaler, clock, [3.5] * 30)
    assert desired[-1] == 5  # ceil(3.5 / 0.7)
    assert not scaler.panicking
    # at exactly the target no rounding error asks for one more
    clock2 = FakeClock()
    exact = InstanceAutoscaler(Bounds(0, 64, target=0.7), POLICY, clock2)
    assert run_instances(exact, clock2, [0.7] * 30)[-1] == 1


def test_a_step_panics_within_a_tick_and_scales_to_the_burst() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(0, 64, target=1.0), POLICY, clock)
    run_instances(scaler, clock, [1.0] * 25)
    clock.advance(1.0)
    scaler.observe(12.0)  # a step from 1 to 12 concurrent
    d = scaler.decide(live=1)
    # the 4 s panic window (12+1+1+1)/4 = 3.75 wants 4 >= 2 x 1 live: panic, at the very first tick
    # (the 20 s stable window alone would want 2); and 12 were there at once: 12 are kept warm
    assert d.panic and d.desired == 12
    assert "panic: 3.75 concurrent" in d.reason and "12 at once" in d.reason
    for _ in range(3):
        clock.advance(1.0)
        scaler.observe(12.0)
        d = scaler.decide(live=d.desired)
    assert d.desired == 12 and d.panic


def test_bursts_shorter_than_a_tick_keep_their_peak_warm() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(0, 64, target=0.7), POLICY, clock)
    # 16 requests at once for a few ms every 5 s: an average of 0.2 over its tick
    load = [(0.2, 16) if i % 5 == 0 else (0.0, 0) for i in range(30)]
    desired = []
    for concurrency, peak in load:
        clock.advance(1.0)
        scaler.observe(concurrency, peak)
        desired.append(scaler.decide(16).desired)
    assert min(desired) == 16  # KPA on the averages alone would want 1: every burst a cold start
    for _ in range(21):  # no burst for a stable window: the peak leaves it
        clock.advance(1.0)
        scaler.observe(0.0, 0)
    assert scaler.decide(16).desired == 0


def test_panic_never_scales_down_and_ends_after_a_stable_window() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(0, 64, target=1.0), POLICY, clock)
    run_instances(scaler, clock, [0.0] * 5)
    burst = run_instances(scaler, clock, [10.0] * 4)  # enters panic
    assert scaler.panicking and burst[-1] == 10
    after = run_instances(scaler, clock, [0.0] * 25)
    # while panicking (20 s from the last tick the panic condition held) desired holds at 10
    assert after[:19] == [10] * 19
    assert not scaler.panicking
    # back to stable mode: what the 20 s stable window still remembers, and then nothing
    assert after[-1] < 10
    assert run_instances(scaler, clock, [0.0] * 20)[-1] == 0


def test_no_flapping_on_a_noisy_steady_load() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(0, 64, target=0.7), POLICY, clock)
    run_instances(scaler, clock, [3.0] * 30)
    noisy = [3.0 + (0.6 if i % 2 else -0.6) for i in range(60)]
    desired = run_instances(scaler, clock, noisy)
    assert len(set(desired)) == 1  # the stable window smooths it; no panic on +-20 %
    assert not scaler.panicking


def test_min_and_max_instances_hold() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(2, 5, target=1.0), POLICY, clock)
    assert run_instances(scaler, clock, [0.0] * 30)[-1] == 2  # never under min_instances
    desired = run_instances(scaler, clock, [50.0] * 10)
    assert max(desired) == 5  # never over max_instances, panic or not
    assert "clamped to 5" in scaler.decide(5).reason


def test_scale_to_zero_when_idle_and_min_is_zero() -> None:
    clock = FakeClock()
    scaler = InstanceAutoscaler(Bounds(0, 8, target=0.7), POLICY, clock)
    run_instances(scaler, clock, [2.0] * 25)
    assert run_instances(scaler, clock, [0.0] * 45)[-1] == 0


def test_instance_policy_is_checked() -> None:
    with pytest.raises(ValueError):
        InstancePolicy(tick_s=5.0, panic_window_s=2.0)
    with pytest.raises(ValueError):
        InstancePolicy(panic_threshold=1.0)


# --- replicas --------------------------------------------------------------------------------------
RPOLICY = ReplicaPolicy(
    min_replicas=1, max_replicas=3, tick_s=1.0, up_window_s=3.0, down_window_s=10.0,
    up_queue_ms=10.0, up_cpu=0.9, down_queue_ms=2.0, down_cpu=0.5,
)  # fmt: skip


def feed(scaler: ReplicaAutoscaler, clock: FakeClock, loads: list[ReplicaLoad]) -> list[tuple[int, int, str]]:
    """Returns (tick, delta, reason) of each decision that was not a hold."""
    out = []
    for i, load in enumerate(loads):
        clock.advance(1.0)
        d = scaler.observe(load)
        if d.delta:
            out.append((i, d.delta, d.reason))
    return out


def test_scale_up_once_the_queue_stays_over_the_threshold() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    hot = ReplicaLoad(replicas=1, queue_ms=25.0, cpu=0.6, requests=500)
    decisions = feed(scaler, clock, [ReplicaLoad(1, queue_ms=1.0)] * 5 + [hot] * 4)
    # the median of the 3 s window: once 2 of its 3 ticks are hot (ticks 5 and 6), not at the first
    assert [(i, delta) for i, delta, _ in decisions] == [(6, +1)]
    assert "queueing delay p90 25.0 ms" in decisions[0][2]


def test_scale_up_on_cpu_alone() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    decisions = feed(scaler, clock, [ReplicaLoad(1, queue_ms=0.5, cpu=0.97)] * 3)
    assert decisions and decisions[0][1] == +1 and "CPU 0.97" in decisions[0][2]


def test_one_slow_tick_is_not_saturation() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    calm, spike = ReplicaLoad(2, queue_ms=3.0, cpu=0.55), ReplicaLoad(2, queue_ms=500.0, cpu=0.7)
    assert feed(scaler, clock, [calm, calm, spike, calm, calm, spike, calm, calm] * 3) == []


def test_no_decision_while_a_replica_starts_and_a_fresh_window_after() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    hot = ReplicaLoad(1, queue_ms=30.0)
    assert feed(scaler, clock, [hot] * 3)[0][1] == +1
    starting = ReplicaLoad(1, starting=1, queue_ms=30.0)
    assert feed(scaler, clock, [starting] * 5) == []
    # serving now, still hot: a whole new window before the next one
    later = feed(scaler, clock, [ReplicaLoad(2, queue_ms=30.0)] * 3)
    assert [(i, d) for i, d, _ in later] == [(2, +1)]


def test_scale_down_only_after_a_whole_calm_window_and_never_below_min() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    calm = ReplicaLoad(2, queue_ms=0.5, cpu=0.2)
    decisions = feed(scaler, clock, [calm] * 12)
    assert [(i, d) for i, d, _ in decisions] == [(9, -1)]  # 10 s of calm
    assert "calm for 10 s" in decisions[0][2]
    assert feed(scaler, clock, [ReplicaLoad(1, queue_ms=0.0, cpu=0.0)] * 30) == []  # min_replicas 1


def test_no_flapping_when_one_fewer_replica_would_be_hot() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    # two replicas at 0.3 cores each: one alone would run at 0.6 > down_cpu 0.5, so both stay
    assert feed(scaler, clock, [ReplicaLoad(2, queue_ms=0.5, cpu=0.3)] * 60) == []
    # two ticks of queueing in the 10 s window hold it back, until they leave the window
    calm = ReplicaLoad(2, queue_ms=0.5, cpu=0.1, concurrency=0.5)
    queued = ReplicaLoad(2, queue_ms=5.0, cpu=0.1, concurrency=4.0)
    decisions = feed(scaler, clock, [calm] * 4 + [queued] * 2 + [calm] * 10)
    assert [(i, d) for i, d, _ in decisions] == [(14, -1)]  # 9 of the last 10 ticks calm
    # one stray spike alone does not: calm 9 ticks in 10 is calm
    scaler.reset()
    decisions = feed(scaler, clock, [calm] * 4 + [queued] + [calm] * 5)
    assert [(i, d) for i, d, _ in decisions] == [(9, -1)]


def test_an_idle_fleet_is_calm_whatever_its_jitter() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    # 3 ms p90 "queueing" of thread wake-ups, with 0.3 requests in flight in the whole fleet
    jitter = ReplicaLoad(2, queue_ms=3.0, cpu=0.1, concurrency=0.3)
    assert [(i, d) for i, d, _ in feed(scaler, clock, [jitter] * 10)] == [(9, -1)]
    busy = ReplicaLoad(2, queue_ms=3.0, cpu=0.1, concurrency=2.5)  # 2.5 in flight on one replica
    assert feed(scaler, clock, [busy] * 30) == []


def test_max_replicas_is_a_ceiling_and_min_a_floor() -> None:
    clock = FakeClock()
    scaler = ReplicaAutoscaler(RPOLICY, clock)
    assert feed(scaler, clock, [ReplicaLoad(3, queue_ms=100.0, cpu=1.0)] * 20) == []
    below = feed(scaler, clock, [ReplicaLoad(0)])
    assert below[0][1] == +1 and "below min_replicas" in below[0][2]
    above = feed(scaler, clock, [ReplicaLoad(4)])
    assert above[0][1] == -1 and "above max_replicas" in above[0][2]


def test_replica_policy_is_checked() -> None:
    with pytest.raises(ValueError):
        ReplicaPolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        ReplicaPolicy(up_queue_ms=1.0, down_queue_ms=2.0)


# --- configuration and the decision log ------------------------------------------------------------
def test_config_from_options_names_bad_keys() -> None:
    config = ScalingConfig.from_options(["replica_up_window_s=2", "primary_replica=false"], max_replicas=2)
    assert config.replica_policy().up_window_s == 2.0 and not config.primary_replica
    assert config.max_replicas == 2
    assert "instance_tick_s=0.5" in config.instance_options()
    with pytest.raises(BadRequest, match="unknown scaling key.*nope"):
        ScalingConfig.from_options(["nope=1"])
    with pytest.raises(BadRequest, match="'host_max_queue' must be a int"):
        ScalingConfig.from_options(["host_max_queue=lots"])
    with pytest.raises(BadRequest, match="min_replicas <= max_replicas"):
        ScalingConfig.from_options([], min_replicas=3, max_replicas=2)


def test_decision_log_keeps_counts_and_the_newest(caplog: pytest.LogCaptureFixture) -> None:
    log = DecisionLog(capacity=2)
    with caplog.at_level("INFO", logger="wasminfer.scaling"):
        for n in range(3):
            log.record("replicas", "replicas", n, n + 1, f"step {n}")
    assert [d.reason for d in log.recent()] == ["step 1", "step 2"]
    assert log.counts == {("replicas", "up"): 3}
    assert "replicas replicas: 2 -> 3 (step 2)" in caplog.text
    assert log.recent(1)[0].to_dict()["direction"] == "up"
