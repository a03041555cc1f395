"""The epoch ticker (`runtime._engine`): once a slice while no call's deadline is near, every
millisecond while one is (or a call was cancelled). Deadlines themselves: test_sandbox_limits.py
(a loop stops near its deadline) and test_deadlines.py (a cancel ends a looping guest)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasminfer.runtime import _engine
from wasminfer.runtime._engine import CallState, Engine, urgency


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(tmp_path)
    try:
        yield e
    finally:
        e.close()


def wakes_during(engine: Engine, seconds: float) -> int:
    before = engine.ticker_wakes
    time.sleep(seconds)
    return engine.ticker_wakes - before


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_an_idle_ticker_wakes_once_a_slice(engine: Engine) -> None:
    time.sleep(_engine.SLICE_TICKS * _engine.TICK_S * 2)  # past the urgency other tests may have left
    wakes = wakes_during(engine, 0.5)
    # once every 50 ms: 10 in 0.5 s (ticking every ms would be ~450)
    assert 5 <= wakes <= 40, wakes


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_a_near_deadline_makes_the_ticker_tick_every_ms(engine: Engine) -> None:
    time.sleep(_engine.SLICE_TICKS * _engine.TICK_S * 2)
    state = CallState()
    state.deadline_ns = time.monotonic_ns() + 400_000_000
    assert state.slice_ticks() == _engine.SLICE_TICKS  # 400 ms away: far, the ticker stays lazy
    assert urgency.until_ns < state.deadline_ns
    state.deadline_ns = time.monotonic_ns() + 95_000_000
    assert state.slice_ticks() == _engine.SLICE_TICKS  # within NEAR_MS: the ticker hurries
    assert urgency.until_ns == state.deadline_ns + _engine.URGENT_PAST_TICKS * _engine._TICK_NS
    wakes = wakes_during(engine, 0.08)
    assert wakes >= 20, wakes  # a sleep of 1 ms takes ~1.1 ms: ~70 (once a slice would be 2)


def test_urgency_only_moves_later_and_wakes_the_sleeping_tickers() -> None:
    wake = threading.Event()
    urgency.watch(wake)
    try:
        later = max(urgency.until_ns, time.monotonic_ns()) + 10_000_000_000
        urgency.until(later)
        assert urgency.until_ns == later and wake.is_set()
        wake.clear()
        urgency.until(later - 1)  # earlier than what was asked already: nothing to do
        assert urgency.until_ns == later and not wake.is_set()
    finally:
        urgency.forget(wake)
        urgency.until_ns = 0  # (the tickers of other tests' engines go back to their slices)


def test_a_cancel_makes_the_ticker_hurry_for_a_slice() -> None:
    urgency.until_ns = 0
    state = CallState()
    before = time.monotonic_ns()
    state.cancel(RuntimeError("stop"))
    assert before + _engine.SLICE_TICKS * 1_000_000 <= urgency.until_ns <= time.monotonic_ns() + (
        _engine.SLICE_TICKS * 1_000_000
    )
    with pytest.raises(_engine.Interrupted, match="stop"):
        state.slice_ticks()
