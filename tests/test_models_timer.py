"""The run timer (models/timer.py): each thread's alarm and RunOptions, reused from run to run, and
a run stopped at its deadline that never stops the thread's next one.

The runs that never end are the `until` model's (tests/conftest.py): they end only when the timer
sets their terminate flag, so every test below fails by hanging past its bound if the timer does
not fire, and by a Timeout if a stale flag stops a run it should not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from conftest import NEVER, make_until_model
from wasminfer.errors import Timeout
from wasminfer.models import ModelRegistry
from wasminfer.models.timer import RUN_TIMER, RunTimer


def x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.array([[value]], np.float32)}


def in_ms(ms: float) -> int:
    return time.monotonic_ns() + int(ms * 1e6)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Polls a state (not a duration): the bound only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def until_model() -> bytes:
    return make_until_model()


def test_a_thread_keeps_its_alarm_and_run_options_across_runs_that_end_in_time() -> None:
    timer = RunTimer()
    first = timer.arm(in_ms(60_000))
    options = first.options
    assert (first.armed, first.fired, timer.pending()) == (True, False, 1)
    assert timer.disarm(first) is False
    second = timer.arm(in_ms(60_000))
    assert second is first and second.options is options and second.options.terminate is False
    assert timer.disarm(second) is False
    assert (timer.pending(), second.armed) == (0, False)
    assert timer.disarm(second) is False  # idempotent
    assert timer.pending() == 0


def test_threads_have_alarms_of_their_own() -> None:
    timer = RunTimer()
    mine = timer.arm(in_ms(60_000))
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.append(timer.arm(in_ms(60_000))))
    thread.start()
    thread.join()
    assert len(theirs) == 1 and theirs[0] is not mine and timer.pending() == 2
    assert timer.disarm(mine) is False
    assert timer.pending() == 1


def test_an_alarm_that_fired_gets_fresh_run_options_for_the_next_run() -> None:
    timer = RunTimer()
    alarm = timer.arm(in_ms(-1))  # already due: the timer thread fires it as it wakes
    stopped = alarm.options
    wait_for(lambda: alarm.fired, "the timer fires an alarm past its deadline")
    assert stopped.terminate is True and timer.pending() == 0
    assert timer.disarm(alarm) is True
    assert alarm.options is not stopped and alarm.options.terminate is False
    again = timer.arm(in_ms(60_000))
    assert again is alarm and (again.fired, again.armed, again.options.terminate) == (False, True, False)
    assert timer.disarm(again) is False


def test_a_run_stopped_at_its_deadline_leaves_the_threads_next_run_whole(until_model: bytes) -> None:
    with ModelRegistry() as models:
        models.load("until", until_model)
        for _ in range(2):  # the same thread, the same alarm each time
            with pytest.raises(Timeout, match="model 'until' was stopped at the invocation's deadline"):
                models.infer("until", x(NEVER), deadline_ns=in_ms(100))
            assert models.infer("until", x(1000), deadline_ns=in_ms(60_000))["y"].tolist() == [[1000.0]]
            assert models.infer("until", x(500))["y"].tolist() == [[500.0]]  # no deadline: no alarm
        stats = models.stats("until")
        assert (stats.runs, stats.inferences, stats.errors) == (4, 4, 0)


def test_runs_on_two_threads_each_stop_at_their_own_deadline(until_model: bytes) -> None:
    """The later deadline is armed while the timer sleeps until the earlier one, and the earlier one
    while it sleeps until the later: either way each run ends at its own, and only it."""
    with ModelRegistry() as models:
        models.load("until", until_model, max_concurrent_runs=0)
        results: dict[str, object] = {}
        started = threading.Barrier(2)

        def run(name: str, deadline_ms: float) -> None:
            started.wait()
            try:
                models.infer("until", x(NEVER), deadline_ns=in_ms(deadline_ms))
            except Timeout as exc:
                results[name] = exc.message
            # the same thread's next run, with a deadline far off, is whole
            results[name + " next"] = models.infer("until", x(700), deadline_ns=in_ms(60_000))["y"].tolist()

        threads = [threading.Thread(target=run, args=("late", 600)),
                   threading.Thread(target=run, args=("early", 150))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        stopped = "model 'until' was stopped at the invocation's deadline"
        assert results == {"early": stopped, "late": stopped,
                           "early next": [[700.0]], "late next": [[700.0]]}
    assert RUN_TIMER.pending() == 0


def test_an_alarm_that_fired_without_being_disarmed_does_not_stop_the_next_run() -> None:
    """A run left without its disarm (a BaseException on its way out) whose alarm then fired: the
    thread's next arming gets RunOptions whose flag is not set."""
    timer = RunTimer()
    alarm = timer.arm(in_ms(-1))
    stopped = alarm.options
    wait_for(lambda: alarm.fired, "the timer fires an alarm past its deadline")
    again = timer.arm(in_ms(60_000))
    assert again is alarm and again.options is not stopped
    assert (stopped.terminate, again.options.terminate, again.fired) == (True, False, False)
    assert timer.disarm(again) is False
