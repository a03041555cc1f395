"""Closed-loop HTTP load: `concurrency` keep-alive connections, each sending its next request when
the last answer arrives, for a fixed time. The same generator drives every system over loopback.

`wrk` (C; `apt-get install wrk`) is the default when it is on PATH, as in bench/gateway.py: it
takes a few percent of a core at these rates, so on a 2-core machine the systems keep nearly all
the CPU. Without it, an asyncio generator (hand-written HTTP/1.1 on asyncio streams, one coroutine
per connection, about 4x cheaper per request than httpx) stands in; it costs the server more CPU
at high rates, the same for every system. The request body goes to wrk through a file read by a Lua
script, so binary bodies (PPM images) pass unchanged.
"""

from __future__ import annotations

import asyncio
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class Load:
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    generator: str
    generator_cpu_s: float = 0.0

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_s": round(self.per_s, 1)}


def default_generator() -> str:
    return "wrk" if shutil.which("wrk") else "asyncio"


def run(
    url: str,
    body: bytes,
    content_type: str,
    concurrency: int,
    duration: float,
    generator: str | None = None,
    warmup: float = 1.0,
) -> Load:
    """Drives `url` (http://127.0.0.1:PORT/path) with POSTs of `body` and returns what came back.
    Non-2xx answers and broken connections count as errors. Raises `RuntimeError` if wrk fails."""
    generator = generator or default_generator()
    if generator == "wrk":
        return _wrk(url, body, content_type, concurrency, duration, warmup)
    return asyncio.run(_asyncio(url, body, content_type, concurrency, duration, warmup))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _wrk(url: str, body: bytes, content_type: str, concurrency: int, duration: float, warmup: float) -> Load:
    with tempfile.TemporaryDirectory(prefix="wasminfer-wrk-") as tmp:
        body_file, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_file.write_bytes(body)
        script.write_text(
            f'local f = assert(io.open("{body_file}", "rb"))\n'
            'wrk.body = f:read("*a")\nf:close()\n'
            'wrk.method = "POST"\n'
            f'wrk.headers["Content-Type"] = "{content_type}"\n'
        )
        threads = min(2, concurrency)
        base = ["wrk", f"-t{threads}", f"-c{concurrency}", "--timeout", "30s", "-s", str(script)]
        if warmup > 0:
            subprocess.run([*base, f"-d{max(1, round(warmup))}s", url], capture_output=True, check=True)
        cpu = _children_cpu()
        proc = subprocess.run(
            [*base, f"-d{max(1, round(duration))}s", "--latency", url],
            capture_output=True,
            text=True,
            check=False,
        )
        cpu = _children_cpu() - cpu
    out = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or out}")

    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    done = re.search(r"(\d+) requests in ([0-9.]+)(ms|s|m)", out)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    seconds = float(done.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Load(concurrency, int(done.group(1)), seconds, latency("50"), latency("99"), errors, "wrk", cpu)


async def _asyncio(
    url: str, body: bytes, content_type: str, concurrency: int, duration: float, warmup: float
) -> Load:
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    if m is None:
        raise ValueError(f"not an http://host:port/path URL: {url}")
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors = 0

    async def connection(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        perf = time.perf_counter
        try:
            while True:
                t0 = perf()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                t1 = perf()
                errors += not head.startswith(b"HTTP/1.1 2")
                latencies.append(t1 - t0)
                if t1 > deadline:
                    return
        finally:
            writer.close()

    if warmup > 0:
        await asyncio.gather(*(connection(time.perf_counter() + warmup) for _ in range(concurrency)))
        latencies.clear()
        errors = 0
    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(connection(started + duration) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    s = sorted(latencies)
    return Load(
        concurrency,
        len(s),
        elapsed,
        s[len(s) // 2] * 1e3,
        s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3,
        errors,
        "asyncio",
        time.process_time() - cpu,
    )
