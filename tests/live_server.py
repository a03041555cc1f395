"""A real `wasminfer serve` subprocess on 127.0.0.1, for the tests that need one (integration, restart,
crash, scaling, the README's flows end to end). One copy of the start / wait-until-ready / stop
sequence, and of running the `wasminfer` command as a user does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def live_server(
    data: Path,
    log: Path,
    *args: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    stop: signal.Signals = signal.SIGINT,
    stop_timeout_s: float = 30.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Starts `wasminfer serve --data DATA --port PORT *args`, yields `(url, process)` once `/readyz`
    answers 200, and stops it with `stop` (SIGINT: uvicorn's graceful shutdown) unless the test already
    ended it; a server that does not stop within `stop_timeout_s` is killed. Output goes to `log`."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wasminfer", "serve", "--data", str(data), "--port", str(port), *args],
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()[-5000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server never became ready:\n{log.read_text()[-5000:]}"
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def app_server(platform: Any, settings: Any = None, ready_timeout_s: float = 60.0,
               **uvicorn_options: Any) -> Iterator[str]:
    """`platform` served as `wasminfer serve` serves it (`create_app`, the guarded protocol with its
    express lane) by a real uvicorn on a free loopback port, in a thread of this process, so that the
    test can look at the platform too; yields the server's URL. The caller owns the platform (starts
    and closes it). `uvicorn_options` go to `uvicorn.Config` (e.g. `timeout_keep_alive`)."""
    import threading

    import uvicorn

    from wasminfer.gateway import Settings, create_app, guarded_protocol
    from wasminfer.gateway.express import Express

    settings = settings or Settings()
    app = create_app(platform, settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            http=guarded_protocol(settings, Express(app.state.wasminfer)), lifespan="on",
                            **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wasminfer(
    *args: str,
    url: str | None = None,
    key: str | None = None,
    stdin: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    status: int = 0,
    timeout_s: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m wasminfer ARGS` as a user would (a subprocess; PYTHONPATH inherited) and
    asserts its exit status. `url` and `key` go in `$WASMINFER_URL` and `$WASMINFER_KEY` (the README's
    commands carry neither flag); outside values of both are dropped so that a test names its own.
    Returns the process with its stdout and stderr decoded as UTF-8."""
    base = {k: v for k, v in os.environ.items() if k not in ("WASMINFER_URL", "WASMINFER_KEY")}
    # 200 columns: rich fits its tables to the terminal (80 columns without one) and would wrap cells
    extra = {"COLUMNS": "200", **({"WASMINFER_URL": url} if url else {})}
    if key is not None:
        extra["WASMINFER_KEY"] = key
    proc = subprocess.run(
        [sys.executable, "-m", "wasminfer", *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        cwd=cwd,
        env={**base, **extra, **(env or {})},
        timeout=timeout_s,
        check=False,
    )
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == status, (
        f"wasminfer {' '.join(args)}: exit {proc.returncode}, expected {status}\n"
        f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}"
    )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(text: str) -> str:
    """`text` with every run of whitespace made one space: rich wraps long lines at the terminal's
    width (80 columns without one), so the CLI's messages are compared unwrapped."""
    return " ".join(text.split())


def seed_compiled_components(data: Path, *folders: Path) -> None:
    """Puts the compiled form of each Python function folder's component into the data folder's
    compile cache, so that a server on `data` does not compile it again: compiling one (CPython
    inside, ~18 MB) takes 20-50 s on a shared 2-core machine and is tested on its own in
    test_python_guest.py. The component is built and compiled once per machine into the engine cache
    under ~/.cache that test_python_guest.py keeps (under its lock, which xdist workers share)."""
    import fcntl
    import hashlib

    from wasminfer import toolchain
    from wasminfer.runtime import Host

    engine_cache = toolchain.default_cache_dir().parent / "engine"
    engine_cache.mkdir(parents=True, exist_ok=True)
    target = data / "cache" / "components"
    target.mkdir(parents=True, exist_ok=True)
    with open(engine_cache / ".test_python_guest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            wasms = [toolchain.build(folder).read_bytes() for folder in folders]
            with Host(cache_dir=engine_cache) as host:
                for wasm in wasms:
                    host.inspect(wasm)  # a cache hit once compiled on this machine
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    for wasm in wasms:
        found = list((engine_cache / "components").glob(f"{hashlib.sha256(wasm).hexdigest()}-*.cwasm"))
        assert found, "the engine cache holds no compiled component after compiling it"
        for src in found:
            (target / src.name).write_bytes(src.read_bytes())


def last_line(text: str) -> str:
    """The last non-empty line of `text`: what a command says when it is done, after its progress
    lines (a build's, for instance)."""
    return text.strip().splitlines()[-1].strip()


def wait_optimised(url: str, name: str, timeout_s: float = 600.0) -> None:
    """Waits until function `name` on the server at `url` runs its optimised code: a new module
    answers on fast-tier code first (`runtime._tiers.Tiering`), slower for a loop, and only the
    optimised code goes into the compile cache. Raises `AssertionError` past `timeout_s`.

    The bound is long on purpose: the optimised compile runs in a background worker at nice 12, by
    design last in line for the CPU, and beside a dozen busy processes on 2 cores it took over
    120 s (its interpreter start included). Quiet, it lands within a second."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/v1/functions/{name}", timeout=30).json()["module"].get("tier") != "optimised":
        assert time.monotonic() < deadline, f"{name} never reached its optimised tier"
        time.sleep(0.05)
