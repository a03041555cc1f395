"""Compiling in worker processes (runtime/_compiler.py): bounded in time and memory, reused, replaced."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import wasmtime

from live_server import live_server
from test_hostile_uploads import functions, leb, many_functions, many_locals, section
from wasminfer.runtime import Host
from wasminfer.runtime._compiler import (
    KEEP_HEAP_BYTES,
    REPLY_PIPE_BYTES,
    CompileError,
    Compiler,
    _Heap,
    engine_config,
)

GUESTS = Path(__file__).resolve().parent / "guests"
WASM = {"content-type": "application/wasm"}


def test_a_compile_writes_an_artefact_the_engine_loads(tmp_path: Path) -> None:
    c = Compiler()
    try:
        out = tmp_path / "m.cwasm"
        c.compile("module", functions(3), out, timeout_s=60)
        module = wasmtime.Module.deserialize_file(wasmtime.Engine(engine_config()), str(out))
        assert len(module.exports) == 0
        c.compile("module", functions(4), tmp_path / "n.cwasm", timeout_s=60)
        assert c.started == 1  # the worker was reused
        assert not list(tmp_path.glob(".tmp-*"))
    finally:
        c.close()


def test_a_wide_compile_loads_into_the_wide_engine_only(tmp_path: Path) -> None:
    c = Compiler()
    try:
        for wide in (False, True):
            c.compile("module", functions(3), tmp_path / f"{wide}.cwasm", timeout_s=60, wide=wide)
        assert c.started == 1  # one worker compiles for both configurations
        for wide in (False, True):
            own, other = (wasmtime.Engine(engine_config(wide=w)) for w in (wide, not wide))
            assert len(wasmtime.Module.deserialize_file(own, str(tmp_path / f"{wide}.cwasm")).exports) == 0
            with pytest.raises(wasmtime.WasmtimeError, match="compiled with a memory reservation of"):
                wasmtime.Module.deserialize_file(other, str(tmp_path / f"{wide}.cwasm"))
    finally:
        c.close()


def test_invalid_bytes_are_a_compile_error_and_the_worker_lives_on(tmp_path: Path) -> None:
    c = Compiler()
    try:
        with pytest.raises(CompileError, match="failed to parse|invalid|unexpected"):
            c.compile("module", b"\0asm\x01\0\0\0\x01\xff", tmp_path / "bad.cwasm", timeout_s=60)
        c.compile("module", functions(1), tmp_path / "ok.cwasm", timeout_s=60)
        assert c.started == 1
        assert not (tmp_path / "bad.cwasm").exists()
    finally:
        c.close()


@pytest.mark.serial  # measures time: runs alone, before the parallel suite
def test_compile_time_obeyed_and_violated(tmp_path: Path) -> None:
    c = Compiler()
    try:
        c.compile("module", functions(100), tmp_path / "small.cwasm", timeout_s=30)  # well within
        t = time.monotonic()
        with pytest.raises(CompileError, match="longer than the host's limit of 1 s"):
            c.compile("module", many_functions(), tmp_path / "bomb.cwasm", timeout_s=1)
        assert time.monotonic() - t < 3  # killed at the limit, not when Cranelift is done
        assert not (tmp_path / "bomb.cwasm").exists() and not list(tmp_path.glob(".tmp-*"))
        c.compile("module", functions(2), tmp_path / "after.cwasm", timeout_s=30)  # a fresh worker
        assert c.started == 2
    finally:
        c.close()


def test_compile_memory_violated(tmp_path: Path) -> None:
    c = Compiler(memory_bytes=64 << 20)  # less than Cranelift needs for 1 000 functions of 50 000 locals
    try:
        with pytest.raises(CompileError, match="ran out of memory or crashed"):
            c.compile("module", many_locals(), tmp_path / "m.cwasm", timeout_s=60)
    finally:
        c.close()


def test_host_upload_over_the_compile_time_limit_is_an_invalid_module(tmp_path: Path) -> None:
    from wasminfer.errors import InvalidModule

    with Host(cache_dir=tmp_path) as host:
        host.engine.compile_timeout_s = 1
        with pytest.raises(InvalidModule, match="longer than the host's limit"):
            host.deploy_function("bomb", many_functions())
        assert not list((tmp_path / "modules").iterdir())  # nothing cached


@pytest.mark.integration
@pytest.mark.slow
def test_compile_limits_from_the_environment_on_a_real_server(tmp_path: Path) -> None:
    """`WASMINFER_COMPILE_TIMEOUT_S` and `WASMINFER_COMPILE_MEMORY_MB` set on `wasminfer serve`: a
    small module compiles within them, a slow one and a memory-hungry one are refused with a 400
    that names the setting, and nothing of them is stored."""
    hostile = wasmtime.wat2wasm((GUESTS / "hostile.wat").read_text())
    # Bytes no compile cache has seen (a custom section with a fresh name): compiled here, under
    # these limits, not found compiled by an earlier test with more room.
    unique = uuid.uuid4().hex.encode()
    fresh = section(0, leb(len(unique)) + unique)
    cases = [
        # 400,000 functions: ~11 s of Cranelift on a quiet 2-core machine, far past 3 s however fast
        ({"WASMINFER_COMPILE_TIMEOUT_S": "3"}, functions(400_000) + fresh, "compiling it took longer than "
         "the host's limit of 3 s (WASMINFER_COMPILE_TIMEOUT_S); a module this slow to compile is refused"),
        ({"WASMINFER_COMPILE_MEMORY_MB": "64"}, many_locals() + fresh, "the compiler ran out of memory or "
         "crashed on it (the host allows 64 MiB per compile, WASMINFER_COMPILE_MEMORY_MB)"),
    ]  # fmt: skip
    for n, (env, bomb, message) in enumerate(cases):
        with live_server(tmp_path / f"data{n}", tmp_path / f"server{n}.log", env=env) as (url, _):
            r = httpx.put(f"{url}/v1/functions/small?memory_mb=4", content=bytes(hostile), headers=WASM,
                          timeout=60)
            assert r.status_code == 201, r.text
            r = httpx.put(f"{url}/v1/functions/bomb", content=bomb, headers=WASM, timeout=120)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error == {"code": "invalid_wasm", "message": f"invalid WebAssembly module: {message}"}
            assert httpx.get(f"{url}/v1/functions/bomb", timeout=60).status_code == 404
            r = httpx.post(f"{url}/v1/functions/small/invoke", content=b"estill here", timeout=60)
            assert (r.status_code, r.content) == (200, b"estill here")


def test_a_cancelled_compile_leaves_nothing_and_its_worker_is_replaced(tmp_path: Path) -> None:
    import threading

    c = Compiler()
    try:
        c.prestart()
        (ready,) = c.idle()  # a worker is running before any compile asks for one
        cancel = threading.Event()
        failure: list[BaseException] = []

        def compile_bomb() -> None:
            try:
                c.compile("module", many_functions(), tmp_path / "bomb.cwasm", timeout_s=60, cancel=cancel)
            except CompileError as exc:
                failure.append(exc)

        worker = threading.Thread(target=compile_bomb)
        worker.start()
        deadline = time.monotonic() + 30
        while c.idle() and time.monotonic() < deadline:  # the compile took the ready worker
            time.sleep(0.01)
        cancel.set()
        worker.join(timeout=30)
        assert [str(e) for e in failure] == ["the compile was cancelled"]
        assert not (tmp_path / "bomb.cwasm").exists() and not list(tmp_path.glob(".tmp-*"))
        (spare,) = c.idle()  # a fresh worker replaced the killed one
        assert spare != ready and c.started == 2
        c.compile("module", functions(2), tmp_path / "after.cwasm", timeout_s=60)
        assert (tmp_path / "after.cwasm").stat().st_size > 0 and c.idle() == [spare]
    finally:
        c.close()


def test_a_worker_that_dies_halfway_leaves_no_cache_entry_and_is_replaced(tmp_path: Path) -> None:
    import os
    import signal
    import threading

    c = Compiler()
    try:
        c.prestart()
        (victim,) = c.idle()
        failure: list[BaseException] = []

        def compile_bomb() -> None:
            try:
                c.compile("module", many_functions(), tmp_path / "bomb.cwasm", timeout_s=60)
            except CompileError as exc:
                failure.append(exc)

        t = threading.Thread(target=compile_bomb)
        t.start()
        deadline = time.monotonic() + 30
        while c.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)  # dies in the middle of compiling
        t.join(timeout=30)
        assert len(failure) == 1 and "ran out of memory or crashed" in str(failure[0])
        assert not (tmp_path / "bomb.cwasm").exists() and not list(tmp_path.glob(".tmp-*"))
        (spare,) = c.idle()
        assert spare != victim
        c.compile("module", functions(1), tmp_path / "ok.cwasm", timeout_s=60)
    finally:
        c.close()


def test_a_background_compile_starts_no_upload_worker_ahead(tmp_path: Path) -> None:
    """A background compile takes the background worker, never an idle one, so it starts none ahead:
    otherwise one ending while an upload's compile holds the only idle worker left two idle workers
    (~15 MiB each) once that one came back. An upload's compile still starts its successor."""
    c = Compiler()
    try:
        c.compile("module", functions(2), tmp_path / "bg.cwasm", timeout_s=60, background=True)
        assert c.idle() == [] and c.started == 1  # the background worker only
        assert (tmp_path / "bg.cwasm").stat().st_size > 0
        c.compile("module", functions(3), tmp_path / "upload.cwasm", timeout_s=60)
        (idle,) = c.idle()  # the upload's worker, given back (its compile found no idle one ready)
        assert c.started == 2
        c.compile("module", functions(4), tmp_path / "bg2.cwasm", timeout_s=60, background=True)
        assert c.idle() == [idle] and c.started == 2  # the same background worker, reused
    finally:
        c.close()


def test_the_background_worker_started_ahead_is_the_one_background_compiles_use(tmp_path: Path) -> None:
    """`prestart_background` (a server's warm-up): once, whatever the calls; the next background
    compile finds it running and starts none; an upload's compile does not take it."""
    c = Compiler()
    try:
        c.prestart_background()
        c.prestart_background()
        assert c.started == 1 and c.idle() == []
        c.compile("module", functions(2), tmp_path / "bg.cwasm", timeout_s=60, background=True)
        assert c.started == 1 and (tmp_path / "bg.cwasm").stat().st_size > 0
        c.compile("module", functions(3), tmp_path / "upload.cwasm", timeout_s=60)
        assert c.started == 2 and len(c.idle()) == 1  # its own worker: the background one stays
    finally:
        c.close()
    c.prestart_background()  # closed: starts nothing
    assert c.started == 2


def test_a_compile_reports_what_the_worker_spent(tmp_path: Path) -> None:
    """The reply carries the worker's own clock (for bench/newfn_breakdown.py): the compile, the
    artefact's write (none for the fast tier, which comes back over the pipe) and the round trip."""
    c = Compiler()
    try:
        artefact = c.compile_fast("module", functions(50), timeout_s=60)
        fast = dict(c.timings)
        assert set(fast) == {"compile_s", "write_s", "cpu_s", "roundtrip_s"}
        assert fast["compile_s"] > 0 and fast["cpu_s"] > 0
        assert fast["roundtrip_s"] >= fast["compile_s"] + fast["write_s"]
        assert len(wasmtime.Module.deserialize(wasmtime.Engine(engine_config()), artefact).exports) == 0
        c.compile("module", functions(50), tmp_path / "m.cwasm", timeout_s=60)
        assert c.timings["write_s"] > 0  # written and fsynced by the worker
        assert c.timings is not fast and c.started == 1
        with pytest.raises(CompileError):
            c.compile_fast("module", b"\0asm\x01\0\0\0\x01\xff", timeout_s=60)
        assert c.timings["write_s"] > 0  # a failed compile leaves the last good one's
    finally:
        c.close()


def test_an_upload_worker_keeps_its_heap_up_to_the_limit_and_gives_back_beyond() -> None:
    heap = _Heap(KEEP_HEAP_BYTES)
    start = heap._start
    assert start is not None and start > 0  # /proc/self/statm is read on Linux
    assert not heap.needs_trim(start)
    assert not heap.needs_trim(start + KEEP_HEAP_BYTES)  # obeyed: kept for the next compile
    assert heap.needs_trim(start + KEEP_HEAP_BYTES + 4096)  # violated: given back
    assert heap.needs_trim(None)  # unknown: given back
    background = _Heap(0)  # the background worker keeps nothing it grew
    assert background.needs_trim(background._start + 4096)  # type: ignore[operator]
    assert KEEP_HEAP_BYTES == 24 << 20


def test_a_worker_replies_on_a_pipe_that_holds_a_small_modules_artefact() -> None:
    """A fast-tier artefact of a real guest (~165 KB for digits) fits the reply pipe whole, so the
    worker writes it in one go (Linux; the default pipe holds 64 KiB)."""
    import fcntl

    c = Compiler()
    try:
        c.prestart()
        (pid,) = c.idle()
        worker = c._idle[0]
        assert worker.proc.pid == pid and worker.proc.stdout is not None
        assert fcntl.fcntl(worker.proc.stdout.fileno(), fcntl.F_GETPIPE_SZ) >= REPLY_PIPE_BYTES
        artefact = c.compile_fast("module", functions(1000), timeout_s=60)
        assert 64 << 10 < len(artefact) < REPLY_PIPE_BYTES  # more than a default pipe holds
    finally:
        c.close()
