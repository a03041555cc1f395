"""Invocations on the event loop (`replicas.inline`, `gateway.direct`): the decision per function,
and the same answers on both paths.

The parity tests run two apps side by side over real platforms (Starlette's TestClient, which
calls the app as a server does, through `Gateway`'s direct route): one with `inline="always"`,
one with `inline="never"`, and send both every error the invoke route can return; status, headers
(but the values that differ per request: the date, Server-Timing's figures, the invocation id) and
body must be the same. Guests: tests/guests/hostile.wat (its first body byte picks a behaviour) and
tests/guests/sleep.wat. Instances are held busy by taking them from the function's real pool, as an
invocation in flight does. The serial test starts a real server.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime
from starlette.testclient import TestClient

from conftest import GUESTS, comparable_headers
from live_server import live_server, wait_optimised
from wasminfer.gateway import Settings, create_app
from wasminfer.replicas.inline import (
    CPU_SAMPLE_EVERY,
    FIRST_COOLDOWN_S,
    MAX_COOLDOWN_S,
    MIN_SAMPLES,
    SLOW_FACTOR,
    WALL_CLIP,
    WEIGHT,
    InlinePolicy,
    eligible,
)
from wasminfer.runtime.memory import MemorySettings
from wasminfer.service import Platform, parse_keys

KEYS = {"admin": "admin-secret", "reader": "reader-secret"}
WASM = {"content-type": "application/wasm"}
ONNX = {"content-type": "application/octet-stream"}


def sleep_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm((GUESTS / "sleep.wat").read_text()))


@dataclass
class App:
    mode: str
    client: TestClient
    platform: Platform

    def put(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        r = self.client.put(path, content=body, headers={**headers, **auth("admin")})
        assert r.status_code in (200, 201), r.text

    def invoke(self, name: str, body: bytes, query: str = "", **headers: str) -> httpx.Response:
        path = f"/v1/functions/{name}/invoke" + (f"?{query}" if query else "")
        return self.client.post(path, content=body, headers=headers)

    @property
    def inline_total(self) -> int:
        total: int = self.client.app.state.wasminfer.fleet.inline.inline_total  # type: ignore[attr-defined]
        return total


def auth(who: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture
def apps(tmp_path: Path, hostile_wasm: bytes, add_model: bytes) -> Iterator[dict[str, App]]:
    keys = parse_keys(f"{KEYS['admin']}:admin,{KEYS['reader']}:read")
    made: dict[str, App] = {}
    platforms: list[Platform] = []
    try:
        for mode in ("always", "never"):
            platform = Platform(
                tmp_path / mode, keys=keys, memory=MemorySettings(budget_mb=64, tenant_quota_mb=34)
            )
            platforms.append(platform)
            platform.start()
            settings = Settings(max_invoke_bytes=4096, inline=mode)
            client = TestClient(create_app(platform, settings), raise_server_exceptions=False)
            client.__enter__()
            app = made[mode] = App(mode, client, platform)
            app.put("/v1/models/add", add_model, ONNX)
            app.put("/v1/models/addb?max_batch_size=4", add_model, ONNX)
            app.put("/v1/functions/h?models=add&timeout_ms=300&memory_mb=4", hostile_wasm, WASM)
            app.put("/v1/functions/q?memory_mb=8&max_instances=16", hostile_wasm, WASM)
            app.put(
                "/v1/functions/held?models=addb&max_concurrency=1&max_queue=0&timeout_ms=5000&memory_mb=4",
                sleep_wasm(),
                WASM,
            )
        yield made
    finally:
        for app in made.values():
            app.client.__exit__(None, None, None)
        for platform in platforms:
            platform.close()


def comparable(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body, with what differs per request made equal."""
    return r.status_code, comparable_headers(r.headers.multi_items()), r.content


# What each request must get: (name, function and query, body, headers, status, error code, whether
# it reaches the function); the body's first byte picks hostile.wat's behaviour.
CASES: list[tuple[str, str, bytes, dict[str, str], int, str | None, bool]] = [
    ("echo", "h", b"ehello", auth("admin"), 200, None, True),
    ("unknown function", "nope", b"e", auth("admin"), 404, "function_not_found", False),
    ("no key", "h", b"e", {}, 401, "unauthorized", False),
    ("unknown key", "h", b"e", {"authorization": "Bearer wrong"}, 401, "unauthorized", False),
    ("read-only key", "h", b"e", auth("reader"), 403, "forbidden", False),
    ("body over the limit", "h", b"e" * 5000, auth("admin"), 413, "payload_too_large", False),
    ("declared length over the limit", "h", b"e", {**auth("admin"), "content-length": "5000"}, 413,
     "payload_too_large", False),
    ("bad query parameter", "h?async=maybe", b"e", auth("admin"), 400, "bad_request", False),
    ("trap", "h", b"t", auth("admin"), 500, "guest_trap", True),
    ("guest error status", "h", b"s", auth("admin"), 500, "guest_error", True),
    ("timeout", "h", b"l", auth("admin"), 504, "timeout", True),
    ("memory limit", "h", b"m", auth("admin"), 500, "memory_limit_exceeded", True),
    ("output limit", "h", b"o", auth("admin"), 500, "output_limit_exceeded", True),
    ("model not in the manifest", "h", b"n", auth("admin"), 403, "model_not_allowed", True),
    ("malformed tensors", "h", b"i\xff\x00", auth("admin"), 422, "invalid_tensor", True),
    ("stack overflow", "h", b"r", auth("admin"), 500, "guest_trap", True),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_paths_answer_every_request_alike(apps: dict[str, App], case: tuple[Any, ...]) -> None:
    _, target, body, headers, status, code, runs = case
    name, _, query = target.partition("?")
    answers = {}
    for mode, app in apps.items():
        r = app.invoke(name, body, query, **headers)
        assert r.status_code == status, (mode, r.text)
        if code is not None:
            assert r.json()["error"]["code"] == code, (mode, r.text)
        answers[mode] = comparable(r)
    assert answers["always"] == answers["never"]
    # Only requests that reach the function run anywhere; on the "always" app they ran inline.
    assert (apps["always"].inline_total, apps["never"].inline_total) == (int(runs), 0)


def test_memory_quota_refusal_is_the_same_inline_and_on_a_thread(apps: dict[str, App]) -> None:
    answers = {}
    for mode, app in apps.items():
        pool = app.platform.host("default").function("q").pool
        held = [pool.acquire(timeout_s=1)[0] for _ in range(3)]  # 24 MiB busy, 8 MiB of others idle
        try:
            r = app.invoke("q", b"ehello", **auth("admin"))
            assert r.status_code == 200, r.text  # a fourth: the idle instances of `h` and `held` make room
            held.append(pool.acquire(timeout_s=1)[0])
            r = app.invoke("q", b"ehello", **auth("admin"))
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "memory_quota_exceeded"
            assert r.headers["retry-after"] == "1"
            answers[mode] = comparable(r)
        finally:
            for inst in held:
                pool.release(inst, True)
    assert answers["always"] == answers["never"]
    assert apps["always"].inline_total == 2 and apps["never"].inline_total == 0


def test_a_function_with_a_batching_model_runs_on_threads_and_admission_still_refuses(
    apps: dict[str, App],
) -> None:
    """`held` names a batching model: never inline, so while one request sleeps in it (on a thread)
    the event loop still reads the next, which admission refuses (max_concurrency 1, no queue)."""
    answers = {}
    for mode, app in apps.items():
        fn = app.platform.host("default").function("held")
        assert not eligible(fn)
        first: list[httpx.Response] = []
        sleeper = threading.Thread(target=_invoke_into, args=(app, first, struct.pack("<I", 3000)))
        sleeper.start()
        try:
            deadline = time.monotonic() + 30
            while fn.pool.stats()["busy"] == 0:  # the sleeper holds its instance: admitted
                assert time.monotonic() < deadline, "the first request never started"
                time.sleep(0.005)
            r = app.invoke("held", struct.pack("<I", 0), **auth("admin"))
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_requests"
            assert "'max_concurrency' 1" in r.json()["error"]["message"]
            answers[mode] = comparable(r)
        finally:
            sleeper.join()
        assert first[0].status_code == 200 and first[0].content == b"ok"
    assert answers["always"] == answers["never"]
    assert apps["always"].inline_total == 0


def _invoke_into(app: App, out: list[httpx.Response], body: bytes) -> None:
    out.append(app.invoke("held", body, **auth("admin")))


# --- the decision ---------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Fn:
    """Stands for a deployed function in the decision's bookkeeping (only its identity counts)."""


def test_auto_runs_inline_only_after_enough_short_invocations() -> None:
    policy, fn, key = InlinePolicy("auto", 1000, clock=Clock()), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES - 1):
        policy.observe(key, fn, 200)
    assert not policy.short(key, fn)
    policy.observe(key, fn, 200)
    assert policy.short(key, fn)
    assert policy.stats()["functions"]["t/f"]["samples"] == MIN_SAMPLES
    other = Fn()  # a new version of the function starts over
    assert not policy.short(key, other)


def test_auto_keeps_functions_over_the_threshold_on_threads() -> None:
    policy, fn, key = InlinePolicy("auto", 1000, clock=Clock()), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):
        policy.observe(key, fn, 1500)
    assert not policy.short(key, fn)
    for _ in range(20):  # the average comes down under the threshold
        policy.observe(key, fn, 300)
    assert policy.short(key, fn)


def test_a_slow_invocation_sends_its_function_to_threads_for_a_doubling_cooldown() -> None:
    clock = Clock()
    policy, fn, key = InlinePolicy("auto", 1000, clock=clock), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):
        policy.observe(key, fn, 100)
    policy.observe(key, fn, 5000)  # over 4x the threshold: slow
    for _ in range(5):  # meanwhile on threads, short again
        policy.observe(key, fn, 100)
    assert not policy.short(key, fn)
    clock.now += FIRST_COOLDOWN_S + 0.01
    assert policy.short(key, fn)
    policy.observe(key, fn, 5000)  # slow again soon after: twice as long
    for _ in range(5):
        policy.observe(key, fn, 100)
    clock.now += FIRST_COOLDOWN_S + 0.01
    assert not policy.short(key, fn)
    clock.now += FIRST_COOLDOWN_S
    assert policy.short(key, fn)
    assert policy.cooldowns_total == 2


def test_inline_runs_that_hold_the_loop_without_computing_cool_down_too() -> None:
    """A guest that sleeps in a host call: little CPU, a long wall time inline."""
    clock = Clock()
    policy, fn, key = InlinePolicy("auto", 1000, clock=clock), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):
        policy.observe(key, fn, 100)
    policy.observe(key, fn, 100, inline_wall_us=12_000)  # one run slowed by the scheduler
    assert policy.short(key, fn)
    policy.observe(key, fn, 100, inline_wall_us=12_000)
    policy.observe(key, fn, 100, inline_wall_us=12_000)
    assert not policy.short(key, fn)
    assert policy.cooldowns_total == 1


def test_an_invocation_that_blocked_in_a_host_call_keeps_its_function_on_threads() -> None:
    clock = Clock()
    policy, fn, key = InlinePolicy("auto", 1000, clock=clock), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):
        policy.observe(key, fn, 100)
    assert policy.short(key, fn)
    policy.observe(key, fn, 50, blocked_us=1.0)  # slept a microsecond, on a thread
    assert not policy.short(key, fn)
    clock.now += 10 * MAX_COOLDOWN_S  # for good: no cooldown ends it
    for _ in range(3 * MIN_SAMPLES):
        policy.observe(key, fn, 100)
    assert not policy.short(key, fn)
    assert policy.stats()["functions"]["t/f"]["waits"] is True
    newer = Fn()  # a new version of the function starts over
    for _ in range(MIN_SAMPLES):
        policy.observe(key, newer, 100)
    assert policy.short(key, newer)


def test_a_guest_that_sleeps_is_never_run_inline(tmp_path: Path) -> None:
    """The real runtime reports a WASI sleep (`runtime.blocked_ns`): a guest sleeping 1 ms per call
    (CPU: microseconds) never goes on the loop, where an `auto` policy would otherwise put it."""
    platform = Platform(tmp_path)
    platform.start()
    try:
        with TestClient(create_app(platform, Settings(inline="auto"))) as client:
            assert client.put("/v1/functions/s", content=sleep_wasm(), headers=WASM).status_code == 201
            for _ in range(3 * MIN_SAMPLES):
                r = client.post("/v1/functions/s/invoke", content=struct.pack("<I", 1))
                assert (r.status_code, r.content) == (200, b"ok")
            inline = client.app.state.wasminfer.fleet.inline  # type: ignore[attr-defined]
            assert inline.inline_total == 0
            learned = inline.stats()["functions"]["default/s"]
            # every invocation learned; the CPU time of the first MIN_SAMPLES, then one in N
            measured = MIN_SAMPLES + 2 * MIN_SAMPLES // CPU_SAMPLE_EVERY
            assert learned["waits"] is True and learned["samples"] == measured, learned
    finally:
        platform.close()


def test_never_and_always_do_not_learn() -> None:
    for mode in ("never", "always"):
        policy = InlinePolicy(mode, 1000)
        policy.observe(("t", "f"), Fn(), 100)
        assert policy.stats()["functions"] == {}
    assert InlinePolicy("auto", 0).mode == "never"


def test_settings_reach_a_replica_process_as_they_are() -> None:
    """A replica process is started with `to_env`'s variables and reads them back with `from_env`:
    every setting, strings and tuples included, comes back equal (a quoted "'auto'" once stopped
    every replica process from starting)."""
    settings = Settings(
        inline="always", inline_max_us=250.5, header_timeout_s=3.25, connection_cap_exempt=("10.0.0.1", "::1")
    )
    assert Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env(Settings().to_env()) == Settings()


def test_inline_settings_obeyed_and_violated() -> None:
    assert (
        Settings.from_env({"WASMINFER_INLINE": "never", "WASMINFER_INLINE_MAX_US": "250"}).inline_max_us
        == 250
    )
    with pytest.raises(ValueError, match="Settings.inline must be one of auto, always, never"):
        Settings(inline="sometimes")
    with pytest.raises(ValueError, match="Settings.inline_max_us must be 0 or more"):
        Settings(inline_max_us=-1)
    with pytest.raises(ValueError, match="inline mode must be one of auto, always, never, not 'x'"):
        InlinePolicy("x")


# --- a slow guest beside short ones, on a real server ----------------------------------------------
@pytest.mark.serial
def test_a_slow_guest_does_not_hold_back_a_stream_of_short_invocations(
    tmp_path: Path, hostile_wasm: bytes
) -> None:
    """A guest computing ~200 ms per call (on a thread: too long for the loop) beside a client
    sending short invocations one after another (inline once learned): the short ones' p99 stays
    far under the slow one's run time."""
    spin = bytes(wasmtime.wat2wasm((GUESTS / "spin.wat").read_text()))
    with live_server(tmp_path / "data", tmp_path / "server.log") as (url, _), httpx.Client(base_url=url) as c:
        for name, wasm in (("fast", hostile_wasm), ("slow", spin)):
            r = c.put(f"/v1/functions/{name}?timeout_ms=20000", content=wasm, headers=WASM)
            assert r.status_code == 201, r.text
        wait_optimised(url, "slow")  # calibrated on fast-tier code, the loop would shrink after the swap
        # ~200 ms of spinning on this machine: the quickest of a few measured runs, scaled (with
        # headroom: other work on the machine makes a run slower, never faster)
        runs = []
        for _ in range(3):
            r = c.post("/v1/functions/slow/invoke", content=struct.pack("<I", 2_000_000), timeout=60)
            runs.append(float(re.search(r"run;dur=([0-9.]+)", r.headers["server-timing"]).group(1)))  # type: ignore[union-attr]
        iterations = int(2_000_000 * 300 / max(min(runs), 0.1))
        for _ in range(MIN_SAMPLES + 4):
            assert c.post("/v1/functions/fast/invoke", content=b"ehello").status_code == 200

        stop = threading.Event()
        slow_runs: list[float] = []

        def slow_stream() -> None:
            with httpx.Client(base_url=url, timeout=60) as s:
                while not stop.is_set():
                    r = s.post("/v1/functions/slow/invoke", content=struct.pack("<I", iterations))
                    assert r.status_code == 200, r.text
                    slow_runs.append(
                        float(re.search(r"run;dur=([0-9.]+)", r.headers["server-timing"]).group(1))
                    )  # type: ignore[union-attr]

        slow = threading.Thread(target=slow_stream)
        slow.start()
        latencies: list[float] = []
        try:
            while len(slow_runs) < 1:  # the slow guest is running
                time.sleep(0.01)
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                t0 = time.perf_counter()
                r = c.post("/v1/functions/fast/invoke", content=b"ehello")
                latencies.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200 and r.content == b"ehello"
        finally:
            stop.set()
            slow.join()
        inline = c.get("/v1/scaling").json()["inline"]["functions"]

    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert len(slow_runs) >= 3 and sorted(slow_runs)[len(slow_runs) // 2] > 100, slow_runs  # long, often
    assert p99 < 100, f"p99 {p99:.1f} ms over {len(latencies)} short invocations"
    assert inline["default/fast"]["mean_cpu_us"] < 1000 <= inline["default/slow"]["mean_cpu_us"], inline


def test_cpu_time_is_read_for_the_first_samples_then_one_invocation_in_n() -> None:
    policy, fn, key = InlinePolicy("auto", 1000, clock=Clock()), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):  # learning: every invocation is measured
        assert policy.measures(key)
        policy.observe(key, fn, 100, inline_wall_us=120)
    asked = [policy.measures(key) for _ in range(3 * CPU_SAMPLE_EVERY)]
    assert asked.count(True) == 3 and asked[CPU_SAMPLE_EVERY - 1] is True
    for _ in range(CPU_SAMPLE_EVERY):  # unmeasured runs learn their wall time only
        policy.observe(key, fn, None, inline_wall_us=120)
    assert policy.stats()["functions"]["t/f"]["samples"] == MIN_SAMPLES
    assert policy.short(key, fn)
    for mode in ("never", "always"):  # they do not learn: nothing to read
        assert not InlinePolicy(mode, 1000).measures(key)


def test_an_unmeasured_inline_run_past_the_slow_bound_has_the_next_one_measured() -> None:
    clock = Clock()
    policy, fn, key = InlinePolicy("auto", 1000, clock=clock), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):
        policy.observe(key, fn, 100)
    assert not policy.measures(key)
    policy.observe(key, fn, None, inline_wall_us=SLOW_FACTOR * 1000 - 1)  # held the loop: under the bound
    assert not policy.measures(key)
    policy.observe(key, fn, None, inline_wall_us=SLOW_FACTOR * 1000 + 1)  # past it: maybe it computed
    assert policy.short(key, fn)  # one long wall time alone is no slow spell (the scheduler's, maybe)
    assert policy.measures(key) and policy.measures(key)  # until a measured run comes
    policy.observe(key, fn, 5000, inline_wall_us=5100)  # it computed: slow, to threads
    assert not policy.short(key, fn)
    assert policy.cooldowns_total == 1
    assert not policy.measures(key)


def test_one_run_held_off_the_cpu_for_long_weighs_no_more_than_the_clip() -> None:
    """A run the scheduler held off the CPU for 200 ms (2 busy cores) is one long wall time, not a
    slow function: alone it leaves the function inline; two in a row still cool it down."""
    clock = Clock()
    policy, fn, key = InlinePolicy("auto", 1000, clock=clock), Fn(), ("t", "f")
    for _ in range(MIN_SAMPLES):
        policy.observe(key, fn, 100, inline_wall_us=150)
    before = policy.stats()["functions"]["t/f"]["mean_inline_wall_us"]
    policy.observe(key, fn, None, inline_wall_us=200_000)
    assert policy.short(key, fn)
    wall = policy.stats()["functions"]["t/f"]["mean_inline_wall_us"]
    assert wall == pytest.approx(before + (SLOW_FACTOR * 1000 * WALL_CLIP - before) * WEIGHT, abs=0.2)
    for _ in range(3):  # short again: the average comes back down
        policy.observe(key, fn, None, inline_wall_us=150)
    assert policy.short(key, fn) and policy.cooldowns_total == 0
    policy.observe(key, fn, None, inline_wall_us=200_000)
    policy.observe(key, fn, None, inline_wall_us=200_000)
    assert not policy.short(key, fn)
    assert policy.cooldowns_total == 1
