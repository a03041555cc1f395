"""A new module answers on fast-tier code and the optimised code takes over behind it
(`_tiers.Tiering`): the same answers, the swap seen in the function's view, instances made on the
fast code renewed, only optimised code in the compile cache, and an optimising compile that dies
retried once, then reported while the function keeps serving.

The optimising compile is held still by stopping its worker (SIGSTOP) as soon as it shows in
`Compiler.busy()`: what the tests see in between does not depend on how fast the machine is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from test_hostile_uploads import section
from wasminfer.runtime import Host
from wasminfer.runtime._compiler import compiler, engine_config
from wasminfer.runtime._tiers import Tiering

GUESTS = Path(__file__).resolve().parent / "guests"


def padded(functions: int = 10_000) -> bytes:
    """The echo guest (hostile.wat) with extra functions: an optimising compile that lasts long
    enough (~1 s) to be caught in `Compiler.busy()` before it ends."""
    wat = (GUESTS / "hostile.wat").read_text().rstrip()
    assert wat.endswith(")")
    extra = "".join(f"(func (result i32) (i32.const {i}))" for i in range(functions))
    return bytes(wasmtime.wat2wasm(wat[:-1] + extra + ")"))


@pytest.fixture(scope="module")
def wasm() -> bytes:
    return padded()


def stop_optimising(not_pid: int | None = None, timeout_s: float = 120) -> int:
    """Stops (SIGSTOP) the worker compiling in the optimised tier; returns its process id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid, tier in compiler().busy().items():
            if tier == "optimised" and pid != not_pid:
                os.kill(pid, signal.SIGSTOP)
                return pid
        time.sleep(0.001)
    raise AssertionError("no optimising compile started")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Host(cache_dir=tmp_path) as h:
        yield h


def artefacts(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "modules").glob("*.cwasm"))


def test_the_fast_tier_answers_first_and_the_optimised_code_takes_over(
        host: Host, tmp_path: Path, wasm: bytes) -> None:
    host.deploy_function("f", wasm)
    worker = stop_optimising()
    try:
        fn = host.function("f")
        assert fn.describe()["module"]["tier"] == "fast"
        assert fn.compiled.tier == "fast" and fn.compiled.code.attempts == 1
        assert artefacts(tmp_path) == []  # the fast tier is never cached
        fast = host.invoke("f", b"ehello").body
        assert fast == b"ehello"
        (made_fast,) = [inst.wasm for inst, _ in fn.pool._idle]
        assert made_fast.module is fn.compiled.module and not made_fast.outdated()
    finally:
        os.kill(worker, signal.SIGCONT)
    assert fn.compiled.code.wait(120)
    assert fn.describe()["module"]["tier"] == "optimised" and "tier_error" not in fn.describe()["module"]
    assert made_fast.outdated()  # its module has better code now
    assert host.invoke("f", b"ehello").body == fast  # on the fast-tier instance, renewed at release
    assert fn.pool.stats()["renewed_total"] == 1 and made_fast.closed
    assert host.invoke("f", b"eagain").body == b"eagain"
    (now,) = [inst.wasm for inst, _ in fn.pool._idle]
    assert now.module is fn.compiled.module and not now.outdated()
    # The cache holds the optimised code: what an optimising compile of these bytes gives, byte for
    # byte (Cranelift is deterministic), not the fast tier's (a different, larger artefact).
    (cached,) = artefacts(tmp_path)
    optimised = bytes(wasmtime.Module(wasmtime.Engine(engine_config()), wasm).serialize())
    fast_code = bytes(wasmtime.Module(wasmtime.Engine(engine_config("fast")), wasm).serialize())
    assert cached.read_bytes() == optimised != fast_code
    # The next deploy of the same bytes is optimised at once, from the cache.
    with Host(cache_dir=tmp_path) as again:
        view = again.deploy_function("g", wasm)
        assert view["module"]["tier"] == "optimised" and view["module"]["from_cache"] is True


def test_an_optimising_compile_killed_once_is_retried(host: Host, tmp_path: Path, wasm: bytes) -> None:
    host.deploy_function("f", wasm)
    first = stop_optimising()
    os.kill(first, signal.SIGKILL)
    second = stop_optimising(not_pid=first)  # tried again, in another worker
    fn = host.function("f")
    try:
        assert fn.compiled.tier == "fast" and fn.compiled.code.attempts == 2
        assert host.invoke("f", b"estill").body == b"estill"
    finally:
        os.kill(second, signal.SIGCONT)
    assert fn.compiled.code.wait(120)
    assert fn.describe()["module"]["tier"] == "optimised" and len(artefacts(tmp_path)) == 1


def test_an_optimising_compile_that_keeps_dying_is_reported_and_the_fast_tier_serves(
        host: Host, tmp_path: Path, wasm: bytes) -> None:
    host.deploy_function("f", wasm)
    first = stop_optimising()
    os.kill(first, signal.SIGKILL)
    os.kill(stop_optimising(not_pid=first), signal.SIGKILL)
    fn = host.function("f")
    assert fn.compiled.code.wait(120)
    module = fn.describe()["module"]
    assert module["tier"] == "fast" and fn.compiled.code.attempts == 2
    assert module["tier_error"] == (
        "the optimised tier could not be compiled: the compiler ran out of memory or crashed on it "
        "(the host allows 6144 MiB per compile, WASMINFER_COMPILE_MEMORY_MB)"
    )
    assert host.invoke("f", b"eserving").body == b"eserving"
    assert artefacts(tmp_path) == [] and not list((tmp_path / "modules").glob(".tmp-*"))


def test_without_tiering_a_new_module_is_optimised_before_it_answers(host: Host, wasm: bytes) -> None:
    host.engine.tiered = False
    view = host.deploy_function("f", wasm + section(0, b"\x04salt"))  # other bytes: nothing shared
    assert view["module"]["tier"] == "optimised" and host.engine.tiering.pending() == 0
    assert host.invoke("f", b"eok").body == b"eok"


def test_an_optimising_compile_past_its_limit_is_not_retried_and_is_reported(
        host: Host, tmp_path: Path, wasm: bytes) -> None:
    """Its limit is `Tiering.RATIO` times the fast compile (1 here, to be quick), at least
    `MIN_LIMIT_S` (2 s): a stopped worker passes it, and is killed."""
    host.engine.tiering.RATIO = 1
    host.deploy_function("f", wasm)
    stopped = stop_optimising()
    fn = host.function("f")
    try:
        assert fn.compiled.code.wait(120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed at the limit, if all went well
            os.kill(stopped, signal.SIGCONT)
    module = fn.describe()["module"]
    assert module["tier"] == "fast" and fn.compiled.code.attempts == 1
    assert module["tier_error"].startswith(
        "the optimised tier could not be compiled: compiling it took longer than the host's limit of ")
    assert host.invoke("f", b"eok").body == b"eok" and artefacts(tmp_path) == []


def test_once_the_optimised_code_is_in_nothing_holds_the_fast_code(host: Host, wasm: bytes) -> None:
    """A function with an idle instance made on fast-tier code and one (the same bytes, shared code)
    whose instances were reaped: after the swap and the idle renewal, the fast module is gone, not
    kept by an instance, a pool or an `InstancePre`."""
    import gc
    import weakref

    host.deploy_function("f", wasm)
    worker = stop_optimising()
    try:
        host.deploy_function("g", wasm)  # shares f's code (`SharedCode`)
        f, g = host.function("f"), host.function("g")
        assert f.compiled.code is g.compiled.code and f.compiled.tier == "fast"
        assert g.pool.reap_idle(-1, 0) == 1 and g.pool.stats()["live"] == 0  # its prewarmed one
        assert host.invoke("f", b"efast").body == b"efast"
        fast = weakref.ref(f.compiled.module)
        (made_fast,) = [inst.wasm for inst, _ in f.pool._idle]
        # its InstancePre: in the instance pool's engine (`_pooling.py`), else the on-demand one's
        held = f.compiled.code.pooled or f.compiled.code.derived
        assert made_fast.module is fast() and held is not None and held[0] is fast()
        del held
    finally:
        os.kill(worker, signal.SIGCONT)
    assert f.compiled.code.wait(120) and f.compiled.tier == "optimised"
    # the fast code's InstancePre (and its copy in the pooled engine) went with the swap
    assert f.compiled.code.derived is None and f.compiled.code.pooled is None
    assert made_fast.outdated() and f.pool.shrink_idle(0) == 1 and g.pool.shrink_idle(0) == 0
    del made_fast
    gc.collect()
    assert fast() is None
    (renewed,) = [inst.wasm for inst, _ in f.pool._idle]
    held = f.compiled.code.pooled or f.compiled.code.derived
    assert renewed.module is f.compiled.module and held is not None and held[0] is renewed.module
    assert host.invoke("f", b"eoptimised").body == host.invoke("g", b"eoptimised").body == b"eoptimised"
    assert f.pool.stats()["renewed_total"] == 1 and g.pool.stats()["renewed_total"] == 0


def test_the_optimising_compile_waits_its_start_delay_behind_the_first_answers(
        host: Host, wasm: bytes) -> None:
    """`Tiering.START_DELAY_S` after its fast compile (an hour here: it cannot pass during the
    test), the optimising compile has not started; the new function answers on its fast code, and a
    close drops the compile still waiting (the code stays in the fast tier, saying why)."""
    assert Tiering.START_DELAY_S == 0.2
    host.engine.tiering.START_DELAY_S = 3600
    host.deploy_function("f", wasm + section(0, b"\x05delay"))  # other bytes: nothing shared
    fn = host.function("f")
    assert host.invoke("f", b"efirst").body == b"efirst"
    assert host.engine.tiering.pending() == 1 and fn.compiled.code.attempts == 0
    assert "optimised" not in compiler().busy().values()
    host.engine.tiering.close(0)
    assert fn.compiled.code.wait(0)
    assert fn.compiled.tier == "fast" and fn.compiled.code.attempts == 0
    assert fn.describe()["module"]["tier_error"] == "the host closed before the optimised code was compiled"
