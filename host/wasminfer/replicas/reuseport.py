"""The reuseport backend: host replicas as processes that take connections on the gateway's own
port themselves (`wasminfer replica`, `gateway.replica`), so that a request served by a replica
never passes through the gateway's process.

Each process — the gateway's and every replica's — binds its own listening socket to the same
address with `SO_REUSEPORT` (Linux); the kernel spreads new connections over the sockets by a hash
of their addresses and ports, and a kept-alive connection stays with the process that accepted it
(so the processes even out their counts through a shared file in this backend's folder:
`replicas.balance`, `shares`).
Chosen over one listening socket inherited by every process because each process then has its own
accept queue (no process woken for a connection another takes) and the spread does not depend on
which interpreter happens to be free at the instant a connection comes; and because a process can
leave by closing its socket while the others keep theirs. What that costs: connections the kernel
had already queued on a socket when its process closes it are reset (unless
`net.ipv4.tcp_migrate_req=1`, Linux 5.14+, moves them to the other sockets); a replica closes its
socket only when it drains, after a calm window, so that queue is almost always empty. Only
processes of the same user can join the port (the kernel's rule for `SO_REUSEPORT`).

A replica answers invocations with its own `Platform` over the gateway's data folder and forwards
every other request to the gateway's process over a unix socket in this backend's 0700 folder
(`primary_socket`), so the store keeps one writer. Besides, it listens on a control socket of its
own there (`/readyz`, `/stats` with its load and invocation counters, `/counters`), which the
fleet reads once a tick and `/metrics` reads at every scrape.

Stopping one (a drain, or the server's shutdown) is SIGTERM: the replica closes its listening
socket first, answers what comes on its open connections with `Connection: close` until they are
closed or their keep-alive timeout passes, finishes what is in flight and exits, leaving its final
counters in a file this backend adds to those of the replicas gone before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from wasminfer.errors import Unavailable
from wasminfer.replicas.balance import SLOTS, vacate
from wasminfer.replicas.base import Replica, ReplicaStats, WarmSpec
from wasminfer.replicas.local import LocalBackend, _Connections, _process, _Worker
from wasminfer.runtime import InvokeResult
from wasminfer.scaling import ScalingConfig

Sample = list[Any]  # [sample name, labels, value], as `gateway.metrics` writes them


def reuseport_supported() -> bool:
    """Whether this system spreads connections over sockets sharing a port (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket listening on `host`:`port` with `SO_REUSEPORT`, so that other processes of this
    user may listen on the same port. Raises `OSError` (the port is taken by a socket without the
    option, or by another user's)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_socket(path: Path, backlog: int = 256) -> socket.socket:
    """A unix socket listening at `path` (in a folder only this user may enter). Raises `OSError`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class ReuseportBackend(LocalBackend):
    kind = "reuseport"
    takes_connections = True

    def __init__(
        self,
        data_dir: Path,
        config: ScalingConfig | None = None,
        *,
        listen: tuple[str, int],
        threads: int = 64,
        log_level: str = "warning",
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        start_timeout_s: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        """`listen`: the gateway's address (its socket must have `SO_REUSEPORT`: `listen_socket`).
        `env`: what replica processes get in their environment beyond this process' own (the API
        keys: never on a command line, where any user of the machine could read them). `options`:
        more options of `wasminfer replica` (`--http`, `--loop`)."""
        super().__init__(
            data_dir, config, threads=threads, log_level=log_level, start_timeout_s=start_timeout_s,
            python=python,
        )  # fmt: skip
        self.listen = listen
        self.env = dict(env or {})
        self.options = list(options)
        #: Where the gateway's process takes the requests replicas forward (`unix_socket` it here).
        self.primary_socket = self._folder / "primary.sock"
        #: Every process' client connections (`replicas.balance`); the gateway's process is slot 0.
        self.shares = self._folder / "connections.shares"
        self._slots: dict[str, int] = {}  # replica id -> its slot in `shares`
        self._live: dict[str, Replica] = {}  # started and not stopped, by id
        self._counters: dict[str, list[Sample]] = {}  # replica id -> its counters as last read
        self._retired: list[Sample] = []  # of the replicas gone, summed

    async def start(self, warm: Sequence[WarmSpec] = ()) -> Replica:
        rid = f"replica-{next(self._ids)}"
        sock = self._folder / f"{rid}.sock"
        taken = set(self._slots.values())
        slot = next((i for i in range(1, SLOTS) if i not in taken), None)
        if slot is None:
            raise Unavailable(f"{SLOTS} processes already share the port; no replica can join")
        self._slots[rid] = slot
        host, port = self.listen
        command = [
            self.python, "-m", "wasminfer", "replica",
            "--data", str(self.data_dir),
            "--listen", f"{host}:{port}",
            "--primary", str(self.primary_socket),
            "--socket", str(sock),
            "--parent", str(os.getpid()),
            "--threads", str(self.threads),
            "--id", rid,
            "--shares", f"{self.shares}:{slot}",
            "--log-level", self.log_level,
            *self.options,
        ]  # fmt: skip
        for option in self.config.instance_options():
            command += ["--scaling", option]
        warm_json = json.dumps([list(spec) for spec in warm]).encode()

        def spawn() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                env={**os.environ, **self.env},
                # A process group of its own: a Ctrl-C meant for the gateway does not reach it. Not
                # a session of its own: with the kernel's autogroups (sched_autogroup_enabled) a
                # session is a scheduling group, and a replica alone in one got about half the CPU
                # of the gateway's process with as many connections (bench/hotpath.py, 2 cores).
                process_group=0,
            )
            assert process.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # exited at once: `_wait_ready` says why
                process.stdin.write(warm_json)
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            return process

        started = time.monotonic()
        try:
            process = await anyio.to_thread.run_sync(spawn)
        except BaseException:
            self._slots.pop(rid, None)
            raise
        worker = _Worker(process, sock, _Connections(sock), _process(process.pid))
        replica = Replica(
            rid,
            self,
            handle=worker,
            pid=process.pid,
            capacity=self.threads + self.config.host_max_queue,
            accepts=True,
        )
        try:
            await self._wait_ready(replica, started)
        except BaseException:
            await self.stop(replica)
            raise
        replica.warm.update((t, n) for t, n, _ in warm)
        # The others' kept-alive connections come over as the processes even out their counts.
        self._live[replica.id] = replica
        if worker.psutil is not None:
            worker.psutil.cpu_percent(None)  # the first reading only starts the measurement
        return replica

    async def stop(self, replica: Replica) -> None:
        """SIGTERM (the replica drains), then its final counters join those of the replicas gone."""
        await super().stop(replica)
        self._live.pop(replica.id, None)
        slot = self._slots.pop(replica.id, None)
        if slot is not None:  # (a killed replica never emptied its slot)
            vacate(self.shares, slot)
        worker: _Worker = replica.handle
        final = worker.socket.with_suffix(".counters.json")
        try:
            counters = json.loads(final.read_bytes())
        except (OSError, ValueError):  # killed: what it said last
            counters = self._counters.get(replica.id, [])
        final.unlink(missing_ok=True)
        self._counters.pop(replica.id, None)
        self._retired = summed(self._retired, counters)

    async def route(
        self, replica: Replica, tenant: str, name: str, deployment: str, body: bytes, content_type: str
    ) -> InvokeResult:
        raise Unavailable(f"replica {replica.id} takes its own connections: nothing is routed to it")

    async def stats(self, replica: Replica) -> ReplicaStats:
        code = replica.handle.process.poll()
        if code is not None:
            return ReplicaStats(alive=False, exit_code=code)
        cpu, data = await self._read(replica, "/stats")
        if data is None:  # busy or failing: keep what it said last
            return ReplicaStats(cpu=cpu, functions=replica.stats.functions, decisions=replica.stats.decisions)
        self._counters[replica.id] = data.get("counters", [])
        load = data.get("load", {})
        return ReplicaStats(
            cpu=cpu,
            functions=data.get("functions", {}),
            decisions=data.get("decisions", []),
            queue_ms=float(load.get("queue_ms", 0.0)),
            requests=int(load.get("requests", 0)),
            concurrency=float(load.get("concurrency", 0.0)),
        )

    async def counters(self) -> list[Sample]:
        """Every replica's counters read now (as last read when one does not answer within 2 s),
        and those of the replicas gone."""
        live = [r for r in self._live.values() if r.handle.process.poll() is None]

        async def read(replica: Replica) -> None:
            with contextlib.suppress(Unavailable, OSError, ValueError, TimeoutError):
                answer = replica.handle.http.request("GET", "/counters")
                status, _, content = await asyncio.wait_for(answer, 2.0)
                if status == 200:
                    self._counters[replica.id] = json.loads(content)

        await asyncio.gather(*(read(r) for r in live))
        total = list(self._retired)
        for counters in self._counters.values():
            total = summed(total, counters)
        return total


def summed(a: list[Sample], b: list[Sample]) -> list[Sample]:
    """Two lists of counter samples added up by sample name and labels."""
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for name, labels, value in (*a, *b):
        key = (str(name), tuple(sorted((str(k), str(v)) for k, v in dict(labels).items())))
        sums[key] = sums.get(key, 0.0) + float(value)
    return [[name, dict(labels), value] for (name, labels), value in sums.items()]
