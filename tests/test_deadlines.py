"""Deadlines that hold whatever the guest does: sleeping in a host call (WASI `poll_oneoff`), in its
`_initialize`, in a model run (a `Loop` that never ends), when its function is deleted, and when a
restart finds functions that fail or hang at load.

Guests: tests/guests/sleeper.wat (a handler that sleeps in `poll_oneoff`, see its header) and
sdk_echo.c (runs the model named by its content type). Tests that compare durations are serial and
generous; the others synchronise on state.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from conftest import NEVER, make_until_model
from wasminfer.errors import (
    FunctionLoadFailed,
    FunctionLoading,
    FunctionNotFound,
    InvalidModule,
    InvocationCancelled,
    Timeout,
    Unavailable,
)
from wasminfer.models import ModelRegistry
from wasminfer.models.codec import decode_tensors, encode_tensors
from wasminfer.runtime import Host
from wasminfer.service import Platform

GUESTS = Path(__file__).resolve().parent / "guests"
SLEEP, FD_AND_CLOCK, NO_SUBSCRIPTIONS, OUT_OF_BOUNDS, ABSOLUTE, REALTIME = range(6)
EINVAL, EFAULT = 28, 21


def sleeper(init_ms: int = 0) -> bytes:
    """The sleeper guest; its `_initialize` logs "init" and sleeps `init_ms` (0: returns at once)."""
    return bytes(wasmtime.wat2wasm((GUESTS / "sleeper.wat").read_text().replace("INIT_MS", str(init_ms))))


def request(mode: int, ms: int) -> bytes:
    return struct.pack("<II", mode, ms)


def answer(body: bytes) -> tuple[int, int, int, int, int]:
    """(errno, events, first event's userdata, errno and type) of a sleeper response."""
    errno, events, _, _ = struct.unpack_from("<IIII", body)
    userdata, event_errno, kind = struct.unpack_from("<QHB", body, 32)
    return errno, events, userdata, event_errno, kind


def x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.array([[value]], np.float32)}


def in_ms(ms: float) -> int:
    return time.monotonic_ns() + int(ms * 1e6)


@pytest.fixture
def host() -> Iterator[Host]:
    with Host() as h:
        yield h


def call_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def init_started(host: Callable[[], Host], name: str) -> bool:
    """Whether the sleeper `name` has logged "init" (its `_initialize` is running or ran)."""
    try:
        return any(line.message == "init" for line in host().logs(name))
    except (KeyError, FunctionNotFound):  # no host or no log buffer yet
        return False


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Polls a state (not a duration): the bound only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


# --- poll_oneoff ------------------------------------------------------------------------------------
def test_a_sleep_within_the_timeout_answers(host: Host) -> None:
    host.deploy_function("sleeper", sleeper(), {"timeout_ms": 1000, "memory_mb": 1})
    for mode in (SLEEP, ABSOLUTE, REALTIME):
        r = host.invoke("sleeper", request(mode, 100))
        assert answer(r.body) == (0, 1, 7, 0, 0), mode  # one clock event, userdata 7, no error


@pytest.mark.serial
def test_a_sleep_past_the_timeout_is_a_timeout_well_before_the_sleep_ends(host: Host) -> None:
    host.deploy_function("sleeper", sleeper(), {"timeout_ms": 500, "memory_mb": 1})
    for mode in (SLEEP, ABSOLUTE, REALTIME):
        started = time.monotonic()
        with pytest.raises(Timeout, match=r"its timeout of 500 ms, manifest key 'timeout_ms'\)"):
            host.invoke("sleeper", request(mode, 10_000))
        assert time.monotonic() - started < 5.0, mode  # the sleep asked for 10 s
    stats = host.function("sleeper").pool.stats()
    assert stats["discarded_total"] == 3  # a timed-out instance is never reused
    assert answer(host.invoke("sleeper", request(SLEEP, 1)).body) == (0, 1, 7, 0, 0)  # and it serves on


def test_fd_subscriptions_are_ready_at_once(host: Host) -> None:
    # A clock of 10 min beside an fd_read on stdin: only the fd event, and no wait for the clock.
    host.deploy_function("sleeper", sleeper(), {"timeout_ms": 900_000, "memory_mb": 1})
    assert answer(host.invoke("sleeper", request(FD_AND_CLOCK, 600_000)).body) == (0, 1, 9, 0, 1)


def test_bad_poll_oneoff_arguments_get_their_errno_not_a_trap(host: Host) -> None:
    host.deploy_function("sleeper", sleeper(), {"timeout_ms": 1000, "memory_mb": 1})
    assert answer(host.invoke("sleeper", request(NO_SUBSCRIPTIONS, 0)).body)[:2] == (EINVAL, 0)
    assert answer(host.invoke("sleeper", request(OUT_OF_BOUNDS, 0)).body)[:2] == (EFAULT, 0)


def test_initialize_within_its_timeout_deploys_and_past_it_is_refused(host: Host) -> None:
    host.deploy_function("fast", sleeper(init_ms=20), {"timeout_ms": 2000, "memory_mb": 1})
    assert [line.message for line in host.logs("fast") if line.stream == "stdout"] == ["init"]
    with pytest.raises(InvalidModule, match=r"function 'slow' ran past its timeout \(its timeout of 300"):
        host.deploy_function("slow", sleeper(init_ms=600_000), {"timeout_ms": 300, "memory_mb": 1})
    with pytest.raises(FunctionNotFound):
        host.function("slow")


# --- delete -----------------------------------------------------------------------------------------
def test_deleting_a_function_ends_its_sleeping_invocation(host: Host) -> None:
    host.deploy_function("sleeper", sleeper(), {"timeout_ms": 900_000, "memory_mb": 1})
    thread, out = call_in_thread(lambda: host.invoke("sleeper", request(SLEEP, 600_000)))
    wait_for(lambda: host.function("sleeper").pool.stats()["busy"] == 1, "the invocation started")
    host.remove_function("sleeper")
    thread.join(60)
    error = out.get("error")
    assert isinstance(error, InvocationCancelled), out
    assert (error.status, error.code) == (503, "invocation_cancelled")
    assert error.message == "function 'sleeper' was deleted while this invocation ran"


LOOP_WAT = """(module
  (memory (export "memory") 1)
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32) (loop $forever (br $forever))
    (i32.const 0)))"""


def test_deleting_a_function_ends_its_looping_invocation(host: Host) -> None:
    host.deploy_function("loop", bytes(wasmtime.wat2wasm(LOOP_WAT)), {"timeout_ms": 900_000, "memory_mb": 1})
    thread, out = call_in_thread(lambda: host.invoke("loop", b""))
    wait_for(lambda: host.function("loop").pool.stats()["busy"] == 1, "the invocation started")
    host.remove_function("loop")
    thread.join(60)
    assert isinstance(out.get("error"), InvocationCancelled), out


def test_closing_the_host_ends_a_sleeping_initialize() -> None:
    h = Host()
    thread, out = call_in_thread(
        lambda: h.deploy_function("slow", sleeper(init_ms=600_000), {"timeout_ms": 900_000, "memory_mb": 1})
    )
    wait_for(lambda: init_started(lambda: h, "slow"), "_initialize started")
    h.close()
    thread.join(60)
    error = out.get("error")
    assert isinstance(error, InvalidModule) and "the server is shutting down" in error.message, out


# --- models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def until_model() -> bytes:
    return make_until_model()


def test_a_model_run_within_the_deadline_answers_and_past_it_is_stopped(until_model: bytes) -> None:
    with ModelRegistry() as models:
        models.load("until", until_model)
        assert models.infer("until", x(1000), deadline_ns=in_ms(60_000))["y"].tolist() == [[1000.0]]
        with pytest.raises(Timeout, match="model 'until' was stopped at the invocation's deadline"):
            models.infer("until", x(NEVER), deadline_ns=in_ms(200))  # would never end
        with pytest.raises(Timeout, match="model 'until' was not run: the invocation's deadline had passed"):
            models.infer("until", x(1), deadline_ns=in_ms(-1))
        assert models.stats("until").runs == 1


def test_a_batched_run_is_stopped_at_its_earliest_deadline_and_the_others_rerun_alone(
    until_model: bytes,
) -> None:
    with ModelRegistry() as models:
        # Every batch waits to be full (2 rows) or for 1 s: the two calls below share one run.
        models.load("until", until_model, max_batch_size=2, max_queue_delay_us=1_000_000,
                    max_concurrent_batches=0)
        barrier = threading.Barrier(2)

        def infer(value: float, deadline_ms: float) -> object:
            barrier.wait()
            return models.infer("until", x(value), deadline_ns=in_ms(deadline_ms))

        # Together they never end (the batch counts until every row is done); alone, 1000 ends.
        never, never_out = call_in_thread(lambda: infer(NEVER, 1500))
        short, short_out = call_in_thread(lambda: infer(1000, 120_000))
        never.join(120)
        short.join(120)
        assert isinstance(never_out.get("error"), Timeout), never_out
        result = short_out.get("result")
        assert isinstance(result, dict) and result["y"].tolist() == [[1000.0]], short_out
        batching = models.stats("until").batching
        assert batching is not None and batching.fallback_batches == 1  # the shared run was stopped


def test_an_invocation_whose_model_runs_past_its_timeout_is_a_timeout(
    host: Host, until_model: bytes, build_guest: Callable[..., bytes]
) -> None:
    host.deploy_model("until", until_model)
    host.deploy_function("echo", build_guest("sdk_echo.c"), {"models": ["until"], "timeout_ms": 1000})
    ctype = "application/cbor; model=until"
    r = host.invoke("echo", encode_tensors(x(1000)), ctype)
    assert decode_tensors(r.body)["y"].tolist() == [[1000.0]]
    with pytest.raises(Timeout, match=r"function 'echo' ran past its timeout \(its timeout of 1000 ms"):
        host.invoke("echo", encode_tensors(x(NEVER)), ctype)
    assert host.function("echo").counters.errors == {"timeout": 1}


# --- the platform: deploys outside the lock, restarts ---------------------------------------------
def test_a_sleeping_initialize_holds_up_no_other_deploy(tmp_path: Path) -> None:
    p = Platform(tmp_path / "data")
    p.start()
    try:
        slow, out = call_in_thread(
            lambda: p.put_function("slow", sleeper(init_ms=600_000), {"timeout_ms": 900_000, "memory_mb": 1})
        )
        wait_for(lambda: init_started(p.host, "slow"), "_initialize started")
        view = p.put_function("other", sleeper(), {"memory_mb": 1}, tenant="acme")  # another tenant's deploy
        assert (view["name"], view["state"]) == ("other", "ready")
        assert [f["name"] for f in p.list_functions()] == []  # admin reads: nothing stored yet
        assert slow.is_alive()  # still in its _initialize
        assert answer(p.invoke("other", request(SLEEP, 1), tenant="acme").body) == (0, 1, 7, 0, 0)
    finally:
        p.close()
    slow.join(60)
    assert isinstance(out.get("error"), InvalidModule), out


def test_a_restart_serves_the_rest_while_one_function_fails_and_another_hangs_at_load(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with Platform(data) as p:
        p.start()
        p.put_function("good", sleeper(), {"memory_mb": 1})
        # Stored as they are, without the deploy's checks: modules that cannot start.
        p.store.put_function("bad", sleeper(init_ms=600_000), {"memory_mb": 1, "timeout_ms": 100}, "handler")
        p.store.put_function("hung", sleeper(init_ms=600_000), {"memory_mb": 1, "timeout_ms": 900_000},
                             "handler")
    p = Platform(data)
    try:
        report = p.start(ready_wait_s=0.5)
        assert p.ready
        wait_for(lambda: p.get_function("good")["state"] == "ready", "the good function loaded")
        wait_for(lambda: p.get_function("bad")["state"] == "failed", "the bad function failed")
        assert answer(p.invoke("good", request(SLEEP, 1)).body) == (0, 1, 7, 0, 0)
        bad = p.get_function("bad")
        assert bad["loaded"] is False
        failed = ("the module failed to start: function 'bad' ran past its timeout (its timeout of 100 ms, "
                  "manifest key 'timeout_ms')")
        assert bad["load_error"] == failed
        with pytest.raises(FunctionLoadFailed, match="'bad' failed to load after a restart: the module"):
            p.invoke("bad", b"")
        assert p.get_function("hung")["state"] == "loading"
        with pytest.raises(FunctionLoading) as loading:
            p.invoke("hung", b"")
        assert (loading.value.status, loading.value.code) == (503, "function_loading")
        assert report.failures == [f"function default/bad v1: {failed}"]
        # A deploy replaces what failed to load.
        assert p.put_function("bad", sleeper(), {"memory_mb": 1})["state"] == "ready"
        assert answer(p.invoke("bad", request(SLEEP, 1)).body)[0] == 0
    finally:
        p.close()
    with pytest.raises(Unavailable):
        p.invoke("good", b"")


COMMAND_SLEEP_WAT = """(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i64.store (i32.const 256) (i64.const 7))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.const MS000000))
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))))"""


def test_a_command_sleeping_past_its_timeout_is_a_timeout(host: Host) -> None:
    def command(ms: int) -> bytes:
        return bytes(wasmtime.wat2wasm(COMMAND_SLEEP_WAT.replace("MS", str(ms))))

    host.deploy_function("nap", command(10), {"timeout_ms": 10_000, "memory_mb": 1})
    assert host.invoke("nap", b"").body == b""  # exit status 0 after its 10 ms
    host.deploy_function("coma", command(600_000), {"timeout_ms": 300, "memory_mb": 1})
    with pytest.raises(Timeout, match=r"function 'coma' ran past its timeout \(its timeout of 300 ms"):
        host.invoke("coma", b"")
