"""The local backend: host replicas as worker processes on this machine (`wasminfer worker`).

Each worker is a whole `Platform` on the gateway's data folder (SQLite in WAL mode and the blob
store are safe for several processes): its own interpreter — so its own GIL, the limit of one
process on a small machine — its own pools, one ONNX Runtime session per model. It listens on a unix
socket in a folder this backend makes with mode 0700 (only this user can connect: the endpoint has
no keys of its own); the gateway forwards invocations to it over keep-alive HTTP/1.1.

Workers run in their own session, so a Ctrl-C meant for the gateway does not reach them: the gateway
drains and stops them after its own graceful shutdown has finished what was in flight. A worker
whose gateway dies exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import psutil

from wasminfer.errors import NotDelivered, Unavailable, error_from_http
from wasminfer.replicas.base import Replica, ReplicaBackend, ReplicaStats, WarmSpec
from wasminfer.replicas.worker import DEPLOYMENT_HEADER, TIMING_HEADER
from wasminfer.runtime import InvokeResult
from wasminfer.scaling import ScalingConfig

log = logging.getLogger("wasminfer.replicas")

_DEPLOYMENT = DEPLOYMENT_HEADER.decode()
_TIMING = TIMING_HEADER.encode()


class _Connections:
    """Keep-alive HTTP/1.1 to one replica's unix socket, written by hand on asyncio streams.

    httpx cost ~1 ms of the gateway's CPU per forwarded request here (the same worker answered
    602 invocations/s at concurrency 1 through httpx, 2009/s through a bare asyncio client like
    this one; docs/scaling.md): on a machine whose limit is the gateway's GIL, that decides whether
    a second replica helps at all. The peer is always our own worker (uvicorn), which answers with
    a Content-Length and no chunking, so the client needs nothing more.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._closed = False

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: str = ""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """`headers`: extra header lines, each ending in CRLF. Raises `NotDelivered` if the replica
        could not be connected to (the request certainly did not run there), `Unavailable` if the
        connection broke after the request may have reached it."""
        head = (
            f"{method} {target} HTTP/1.1\r\nhost: replica\r\n{headers}content-length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        stale = False
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            try:
                return await self._exchange(reader, writer, head, body)
            except _Unanswered:
                # A kept-alive connection closed under us with no byte of answer: most likely the
                # worker had closed it as idle, and then it never read the request. Try a new one.
                stale = True
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path), limit=1 << 20)
        except OSError as exc:
            if stale:  # …unless the worker is gone: then the request may have been running there
                raise Unavailable(f"{self.path.stem} failed with a request in flight: {exc}; retry") from None
            raise NotDelivered(f"cannot connect to {self.path.stem}: {exc}") from None
        try:
            return await self._exchange(reader, writer, head, body)
        except _Unanswered as exc:
            raise Unavailable(
                f"{self.path.stem} closed the connection without an answer: {exc}; retry"
            ) from None

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        try:
            try:
                writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    writer.write(body)
                status_and_headers = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise Unavailable(f"{self.path.stem} broke off its answer; retry") from None
                raise _Unanswered("end of stream") from None
            except ConnectionError as exc:
                raise _Unanswered(str(exc)) from None
            lines = status_and_headers.split(b"\r\n")
            status = int(lines[0][9:12])
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
            try:
                content = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            except (asyncio.IncompleteReadError, ConnectionError):
                raise Unavailable(f"{self.path.stem} broke off its answer; retry") from None
        except BaseException:
            writer.close()  # its state is unknown (failed, or the caller was cancelled): never reused
            raise
        if self._closed or headers.get(b"connection") == b"close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, headers, content

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()


class _Unanswered(Exception):
    """The connection ended before any byte of the answer."""


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    socket: Path
    http: _Connections
    psutil: psutil.Process | None


class LocalBackend(ReplicaBackend):
    kind = "local"

    def __init__(
        self,
        data_dir: Path,
        config: ScalingConfig | None = None,
        *,
        threads: int = 64,
        log_level: str = "warning",
        start_timeout_s: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.config = config or ScalingConfig()
        self.threads = threads
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.python = python
        self._folder = Path(tempfile.mkdtemp(prefix="wasminfer-replicas-"))  # mode 0700
        self._ids = itertools.count(1)

    async def start(self, warm: Sequence[WarmSpec] = ()) -> Replica:
        rid = f"local-{next(self._ids)}"
        sock = self._folder / f"{rid}.sock"
        command = [
            self.python,
            "-m",
            "wasminfer",
            "worker",
            "--data",
            str(self.data_dir),
            "--socket",
            str(sock),
            "--parent",
            str(os.getpid()),
            "--threads",
            str(self.threads),
            "--id",
            rid,
            "--log-level",
            self.log_level,
        ]
        for option in self.config.instance_options():
            command += ["--scaling", option]
        started = time.monotonic()
        process = await anyio.to_thread.run_sync(
            lambda: subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        )
        worker = _Worker(process, sock, _Connections(sock), _process(process.pid))
        replica = Replica(
            rid, self, handle=worker, pid=process.pid, capacity=self.threads + self.config.host_max_queue
        )
        try:
            await self._wait_ready(replica, started)
            if warm:
                body = json.dumps([list(spec) for spec in warm]).encode()
                status, _, content = await worker.http.request("POST", "/warm", body)
                failed = (
                    {k: v for k, v in json.loads(content).items() if v != "ok"} if status == 200 else content
                )
                if failed:
                    log.warning("replica %s could not load every function routed to it: %s", rid, failed)
                replica.warm.update((t, n) for t, n, _ in warm)
        except BaseException:
            await self.stop(replica)
            raise
        if worker.psutil is not None:
            worker.psutil.cpu_percent(None)  # the first reading only starts the measurement
        log.info("replica %s (pid %d) serving after %.2f s", rid, process.pid, time.monotonic() - started)
        return replica

    async def _wait_ready(self, replica: Replica, started: float) -> None:
        worker: _Worker = replica.handle
        while True:
            code = worker.process.poll()
            if code is not None:
                raise Unavailable(f"replica {replica.id} exited with status {code} while starting")
            if time.monotonic() - started > self.start_timeout_s:
                raise Unavailable(f"replica {replica.id} did not start within {self.start_timeout_s:g} s")
            if worker.socket.exists():
                try:
                    if (await worker.http.request("GET", "/readyz"))[0] == 200:
                        return
                except (Unavailable, OSError):
                    pass
            await asyncio.sleep(0.02)

    async def stop(self, replica: Replica) -> None:
        worker: _Worker = replica.handle
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown

            def wait() -> None:
                try:
                    worker.process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    log.error("replica %s did not stop within 40 s of SIGTERM: killed", replica.id)
                    worker.process.kill()
                    worker.process.wait()

            await anyio.to_thread.run_sync(wait)
        await worker.http.aclose()
        worker.socket.unlink(missing_ok=True)

    async def route(
        self, replica: Replica, tenant: str, name: str, deployment: str, body: bytes, content_type: str
    ) -> InvokeResult:
        worker: _Worker = replica.handle
        try:
            status, headers, content = await worker.http.request(
                "POST",
                f"/invoke/{tenant}/{name}",
                body,
                f"content-type: {content_type}\r\n{_DEPLOYMENT}: {deployment}\r\n",
            )
        except OSError as exc:
            raise Unavailable(f"replica {replica.id} failed with the request: {exc}; retry") from None
        if status != 200:
            raise error_from_http(status, content)
        try:
            queue, start, run, infer, cold, invocation = headers[_TIMING].decode().split(",", 5)
            return InvokeResult(
                body=content,
                content_type=headers.get(b"content-type", b"application/octet-stream").decode("latin-1"),
                queue_us=float(queue),
                start_us=float(start),
                run_us=float(run),
                infer_us=float(infer),
                cold=cold == "1",
                invocation_id=f"{replica.id}.{invocation}",
            )
        except (KeyError, ValueError):
            raise Unavailable(f"replica {replica.id} answered without its timing header") from None

    async def stats(self, replica: Replica) -> ReplicaStats:
        code = replica.handle.process.poll()
        if code is not None:
            return ReplicaStats(alive=False, exit_code=code)
        cpu, data = await self._read(replica, "/stats")
        if not data:  # busy or failing: keep what it said last
            return ReplicaStats(cpu=cpu, functions=replica.stats.functions, decisions=replica.stats.decisions)
        return ReplicaStats(cpu=cpu, functions=data.get("functions", {}), decisions=data.get("decisions", []))

    async def _read(self, replica: Replica, path: str) -> tuple[float, dict[str, Any] | None]:
        """The CPU of `replica`'s process since the last reading, in cores, and the JSON object it
        answers at `path` (None when it does not within 5 s)."""
        worker: _Worker = replica.handle
        cpu = 0.0
        if worker.psutil is not None:
            with contextlib.suppress(psutil.Error):
                cpu = worker.psutil.cpu_percent(None) / 100
        try:
            status, _, content = await asyncio.wait_for(worker.http.request("GET", path), 5.0)
            data = json.loads(content) if status == 200 else None
        except (Unavailable, OSError, ValueError, TimeoutError):
            data = None
        return cpu, data if isinstance(data, dict) else None

    async def aclose(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None
