"""Errors carry the guest's own words: a Rust-style panic (stderr, then a trap or exit 101), a C
`abort()` with a message, an uncaught Python exception (its type, message, file and line). The
words reach the caller in the error's message (a 500 of the function's own invocation, which only
its tenant can make), bounded to the last `logs.STDERR_TAIL` bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime
from starlette.testclient import TestClient

from wasminfer import pysource
from wasminfer.errors import GuestError, GuestTrap
from wasminfer.gateway import create_app
from wasminfer.runtime import Host, Manifest
from wasminfer.runtime.logs import STDERR_TAIL
from wasminfer.service import Platform

PANIC = (
    "thread 'main' panicked at 'index out of bounds: the len is 1 but the index is 1', src/main.rs:6:29\n"
    "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
)


def panicking_command(end: str, prefix: bytes = b"") -> bytes:
    """A WASI command that writes `prefix` and the panic to stderr as Rust's std does, then ends as a
    Rust program built with panic=abort (`unreachable`) or panic=unwind (`proc_exit(101)`) does."""
    text = prefix + PANIC.encode()
    data = "".join(f"\\{b:02x}" for b in text)
    finish = {"trap": "unreachable", "exit": "(call $exit (i32.const 101))"}[end]
    return bytes(wasmtime.wat2wasm(f"""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 64) "{data}")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const {len(text)}))
        (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 16)))
        {finish}))"""))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Host(cache_dir=tmp_path / "host") as h:
        yield h


def test_a_rust_panic_that_traps_says_why(host: Host) -> None:
    host.deploy_function("mnf", panicking_command("trap"), Manifest())
    with pytest.raises(GuestTrap) as info:
        host.invoke("mnf", b"")
    assert info.value.status == 500
    assert info.value.message == (
        "function 'mnf' trapped: wasm trap: wasm `unreachable` instruction executed; stderr: "
        + PANIC.strip()
    )


def test_a_rust_panic_that_exits_101_says_why(host: Host) -> None:
    host.deploy_function("mnf", panicking_command("exit"), Manifest())
    with pytest.raises(GuestError) as info:
        host.invoke("mnf", b"")
    assert type(info.value) is GuestError
    assert info.value.message == f"function 'mnf' exited with status 101; stderr: {PANIC.strip()}"


def test_the_words_are_bounded_to_the_last_bytes_of_stderr(host: Host) -> None:
    chatter = b"".join(b"line %04d of chatter before the panic\n" % i for i in range(200))
    host.deploy_function("chatty", panicking_command("trap", chatter), Manifest())
    with pytest.raises(GuestTrap) as info:
        host.invoke("chatty", b"")
    message = info.value.message
    words = message.split("; stderr: ", 1)[1]
    assert words.startswith("…") and words.endswith(PANIC.strip())
    assert len(words.encode()) <= STDERR_TAIL + len("…".encode())
    assert "line 0000" not in message  # the oldest chatter is cut, the panic kept
    # every line is still in the function's logs
    lines = host.logs("chatty", 1000)
    assert sum(ln.stream == "stderr" and "of chatter" in ln.message for ln in lines) == 200


def test_a_c_abort_says_why_over_http(tmp_path: Path, build_guest: Callable[..., bytes]) -> None:
    platform = Platform(tmp_path / "data")
    try:
        with TestClient(create_app(platform), raise_server_exceptions=False) as client:
            r = client.put("/v1/functions/abort?memory_mb=4", content=build_guest("abort.c"),
                           headers={"content-type": "application/wasm"})
            assert r.status_code == 201, r.text
            r = client.post("/v1/functions/abort/invoke", content=b"x" * 3)
            assert r.status_code == 500
            assert r.json()["error"] == {
                "code": "guest_trap",
                "message": "function 'abort' trapped: wasm trap: wasm `unreachable` instruction executed; "
                "stderr: abort.c: expected 64 pixels, got 3",
            }
            ok = client.post("/v1/functions/abort/invoke", content=b"x" * 64)
            assert (ok.status_code, ok.json()) == (200, {"ok": True})  # a fresh instance serves
    finally:
        platform.close()


BROKEN = b'''from wasminfer_guest import Request, handler


def scale(xs):
    return [x / len(xs[1:]) for x in xs]


@handler
def handle(request: Request) -> dict:
    return {"scaled": scale([float(request.text())])}
'''


def test_a_python_exception_says_what_and_where(host: Host) -> None:
    host.deploy_function("broken", pysource.bundle(BROKEN, pysource.PYTHON), Manifest())
    with pytest.raises(GuestError) as info:
        host.invoke("broken", b"2", "text/plain")
    assert type(info.value) is GuestError
    assert info.value.message == (
        "ZeroDivisionError: division by zero (app.py, line 5, in scale: return [x / len(xs[1:]) for x in xs])"
    )
    # the whole traceback is in the logs
    text = "\n".join(ln.message for ln in host.logs("broken") if ln.stream == "stderr")
    assert 'File "/fn/app.py", line 10, in handle' in text and "ZeroDivisionError" in text
