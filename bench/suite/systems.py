"""The systems under test, as processes the scenarios start, measure and stop.

- `WasminferServer`: `wasminfer serve` (the HTTP gateway over the embedded host) in a temporary
  data folder, functions and models deployed through `wasminfer.Client` like a user would.
- `BaselineProcess`: one container-per-function server (`baseline_server.py`).
- `limit_sweep`: the workload's numpy pipeline called from threads of this process, no HTTP and no
  sandbox, at the best threads × intra-op threads for the concurrency.

Also the measuring helpers every scenario shares: CPU and PSS of process trees, unique copies of a
module or a model (so a "new" function or model is new to every cache).
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from suite import workloads
from suite.stats import pct

ROOT = Path(__file__).resolve().parents[2]
SUITE = Path(__file__).resolve().parent


# --- measuring --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tree(pids: Iterable[int], recursive: bool = True) -> list[psutil.Process]:
    """The processes and (if `recursive`) their descendants, each once."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[p.pid] = p
            for child in p.children(recursive=True) if recursive else ():
                procs[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    return list(procs.values())


def cpu_seconds(pids: Iterable[int], recursive: bool = True) -> float:
    """User + system CPU of the processes (and their descendants) so far, threads included."""
    total = 0.0
    for p in tree(pids, recursive):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuWindow:
    """The CPU seconds processes use during a window that starts `start_in` seconds from now and
    lasts `length` (the load generator's counting window), sampled on a thread of its own."""

    def __init__(self, pids: Iterable[int], start_in: float, length: float, recursive: bool = True) -> None:
        self._pids = list(pids)
        self._recursive = recursive
        self._samples: list[float] = []
        t0 = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(t0 + start_in, t0 + start_in + length), daemon=True
        )
        self._thread.start()

    def _run(self, *at: float) -> None:
        for t in at:
            time.sleep(max(0.0, t - time.monotonic()))
            self._samples.append(cpu_seconds(self._pids, self._recursive))

    def result(self) -> float:
        self._thread.join()
        return self._samples[1] - self._samples[0]


def settle(pids: Iterable[int], quiet_cores: float = 0.1, timeout: float = 15.0) -> float:
    """Waits until the processes use less than `quiet_cores` of CPU (the requests of the last run
    that were still computing when its client stopped are done), at most `timeout` seconds.
    Returns the seconds waited."""
    pids = list(pids)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pids)
        time.sleep(0.2)
        if (cpu_seconds(pids) - before) / 0.2 < quiet_cores:
            break
    return time.monotonic() - start


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size summed over the processes (and children): a page shared by N
    processes counts 1/N in each, so the sum counts every page once."""
    total = 0
    for p in tree(pids):
        try:
            total += p.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


def unique_module(wasm: bytes) -> bytes:
    """`wasm` with a custom section holding a random nonce: the same code, but a module no cache
    (the engine's compile cache, the store's blobs) has seen."""
    name, payload = b"bench-nonce", secrets.token_bytes(16)
    content = bytes([len(name)]) + name + payload
    return wasm + b"\x00" + _leb128(len(content)) + content


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def unique_model(model: bytes) -> bytes:
    """`model` with a random doc string: the same graph as bytes no cache has seen."""
    import onnx

    proto = onnx.load_from_string(model)
    proto.doc_string = f"bench nonce {secrets.token_hex(8)}"
    data: bytes = proto.SerializeToString()
    return data


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- wasminfer ---------------------------------------------------------------------------------------
class WasminferServer:
    """`wasminfer serve` on 127.0.0.1 with a data folder of its own. The engine's compile cache is
    linked to a persistent folder so reruns skip compiling the C functions again; every
    module a scenario wants compiled afresh goes through `unique_module`."""

    def __init__(self, data: Path, compile_cache: Path | None = None) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data.mkdir(parents=True, exist_ok=True)
        if compile_cache is not None:
            compile_cache.mkdir(parents=True, exist_ok=True)
            (data / "cache").symlink_to(compile_cache, target_is_directory=True)
        self.log = data.parent / f"wasminfer-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "wasminfer",
                    "serve",
                    "--data",
                    str(data),
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                stdout=out,
                stderr=out,
                cwd=ROOT,
            )
        self._wait_ready()
        from wasminfer.client import Client

        self.client = Client(self.url)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wasminfer serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"wasminfer serve never became ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    def invoke_url(self, function: str) -> str:
        return f"{self.url}/v1/functions/{function}/invoke"

    def invoke(self, function: str, body: bytes, content_type: str) -> bytes:
        return self.client.invoke(function, body, content_type).body

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()

    def __enter__(self) -> WasminferServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the container-per-function baseline -----------------------------------------------------------
def _baseline_cmd(workload: str, model: Path, where: list[str]) -> list[str]:
    return [sys.executable, str(SUITE / "baseline_server.py"), workload, str(model), *where]


class BaselineProcess:
    """One function's own server process, on its own port."""

    def __init__(self, workload: str, model: Path, log: Path | None = None) -> None:
        self.workload = workloads.WORKLOADS[workload]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/invoke"
        out = log.open("ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            _baseline_cmd(workload, model, ["--port", str(self.port)]), stdout=out, stderr=out, cwd=ROOT
        )
        if log:
            out.close()  # type: ignore[union-attr]

    def wait_ready(self, timeout: float = 120) -> None:
        """Waits for the first answer (which also warms the session up)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the baseline server of {self.workload.name} exited")
            try:
                r = httpx.post(
                    self.url,
                    content=self.workload.body(),
                    headers={"content-type": self.workload.content_type},
                    timeout=30,
                )
                if r.status_code == 200:
                    return
                raise RuntimeError(f"the baseline of {self.workload.name} answered {r.status_code}: {r.text}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the baseline server of {self.workload.name} never answered")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def baseline_cold_start(workload: str, model: Path) -> tuple[float, bytes]:
    """Seconds from starting a baseline process to its first answer: process start, imports, model
    load, the first (cold) run. The parent holds the listening socket, so the request waits in the
    kernel's accept queue rather than in a polling loop. Returns (seconds, answer body)."""
    w = workloads.WORKLOADS[workload]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    body = w.body()
    request = (
        f"POST /invoke HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: {w.content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        _baseline_cmd(workload, model, ["--fd", str(listener.fileno())]),
        pass_fds=(listener.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
            conn.sendall(request)
            data = b""
            while chunk := conn.recv(1 << 16):
                data += chunk
        elapsed = time.perf_counter() - t0
    finally:
        listener.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    head, _, answer = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the baseline's first answer: {head[:200]!r}")
    return elapsed, answer


# --- the limit ---------------------------------------------------------------------------------------
@dataclass
class LimitRun:
    concurrency: int
    threads: int
    intra_op_threads: int
    spinning: bool
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    tried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


def _closed_loop(
    handle: workloads.Handler, body: bytes, ctype: str, threads: int, duration: float
) -> tuple[int, float, list[float], float]:
    lat: list[list[float]] = [[] for _ in range(threads)]
    for _ in range(3):
        handle(body, ctype)
    start_gate = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(out: list[float]) -> None:
        perf = time.perf_counter
        start_gate.wait()
        while True:
            t0 = perf()
            handle(body, ctype)
            t1 = perf()
            out.append(t1 - t0)
            if t1 > deadline[0]:
                return

    ts = [threading.Thread(target=worker, args=(lat[i],), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    deadline[0] = t0 + duration
    start_gate.wait()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    flat = sorted(x for xs in lat for x in xs)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return len(flat), elapsed, flat, cpu


def limit_configs(concurrency: int, cores: int) -> list[tuple[int, int, bool]]:
    """(caller threads, intra-op threads, spinning) worth trying: one-threaded sessions called by
    one thread per core or one per client (one caller alone only when the concurrency is 1: it
    leaves cores idle); and one caller whose session spreads each run over every core, with and
    without ORT's spinning between ops."""
    callers = sorted({min(concurrency, n) for n in (cores, concurrency)})
    configs = [(t, 1, False) for t in callers]
    if cores > 1:
        configs += [(1, cores, False), (1, cores, True)]
    return configs


def limit_pick(workload: str, model: Path, concurrency: int, duration: float) -> LimitRun:
    """Runs the workload in numpy + `session.run` in this process at each of `limit_configs` for
    `duration` seconds; returns the run with the most requests per second (its `tried` lists them
    all). Its latencies are those of its `threads` callers; at a concurrency above them, a client's
    wait in line would add `concurrency / per_s` (Little's law)."""
    w = workloads.WORKLOADS[workload]
    best: LimitRun | None = None
    tried = []
    for threads, intra, spin in limit_configs(concurrency, os.cpu_count() or 1):
        run = limit_run(workload, model, concurrency, threads, intra, spin, duration, w)
        tried.append(
            {"threads": threads, "intra_op_threads": intra, "spinning": spin, "per_s": round(run.per_s, 1)}
        )
        if best is None or run.per_s > best.per_s:
            best = run
    assert best is not None
    best.tried = tried
    return best


_SESSIONS: dict[tuple[Path, int, bool], Any] = {}


def limit_run(
    workload: str,
    model: Path,
    concurrency: int,
    threads: int,
    intra: int,
    spinning: bool,
    duration: float,
    w: workloads.Workload | None = None,
) -> LimitRun:
    """One closed-loop run of the limit: `threads` callers of one session with `intra` threads."""
    w = w or workloads.WORKLOADS[workload]
    key = (model, intra, spinning)
    if key not in _SESSIONS:
        if any(k[0] != model for k in _SESSIONS):
            _SESSIONS.clear()  # one model's sessions at a time
        _SESSIONS[key] = workloads.session(model, intra, spinning)
    n, elapsed, lat, cpu = _closed_loop(
        w.handler(_SESSIONS[key]), w.body(), w.content_type, threads, duration
    )
    return LimitRun(
        concurrency,
        threads,
        intra,
        spinning,
        n,
        elapsed,
        pct(lat, 0.5) * 1e3,
        pct(lat, 0.99) * 1e3,
        cpu,
    )


def which(tool: str) -> bool:
    return shutil.which(tool) is not None
