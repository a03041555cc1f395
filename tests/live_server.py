"""A real `wasminfer serve` subprocess on 127.0.0.1, for the tests that need one (integration, restart,
crash, scaling). One copy of the start / wait-until-ready / stop sequence."""

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
