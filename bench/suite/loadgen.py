"""Closed-loop HTTP load: `concurrency` keep-alive connections, each sending its next request when
the last answer arrives. The same generator drives every system over loopback.

Throughput is counted in a window: the connections run for `warmup` seconds, then the answers that
arrive during the next `duration` seconds are counted, on the same connections. A separate warm-up
run would leave up to `concurrency` requests still computing in the server when the measurement
starts (a server does not cancel work whose client left), and counting from a cold start would miss
the first round trip — for a ResNet-50 at concurrency 64, over a second. Latency percentiles are
the generator's over the whole run.

`wrk` (C; `apt-get install wrk`) is the default when it is on PATH, as in bench/gateway.py: it
takes a few percent of a core at these rates. Its Lua script reads the body from a file (binary
bodies pass unchanged) and counts the window's answers with a monotonic clock (LuaJIT's FFI).
Without wrk, an asyncio generator (hand-written HTTP/1.1 on asyncio streams, one coroutine per
connection, about 4x cheaper per request than httpx) stands in; it costs more CPU at high rates.
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

from suite.stats import pct

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
WARMUP_S = 1.0  # from the start of a run to the start of its counting window


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
    shed: int = 0  # 429 answers (admission refused them): neither served nor broken

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
    warmup: float = WARMUP_S,
) -> Load:
    """Drives `url` (http://127.0.0.1:PORT/path) with POSTs of `body` and returns the answers counted
    in the window. `requests` (and so `per_s`) counts 2xx answers only; 429s count as `shed`, other
    non-2xx answers and broken connections as `errors`. Latencies are wrk's, over every answer, so
    when `shed` is not 0 they include the quick refusals. Raises `RuntimeError` if wrk fails."""
    generator = generator or default_generator()
    if generator == "wrk":
        return _wrk(url, body, content_type, concurrency, duration, warmup)
    return asyncio.run(_asyncio(url, body, content_type, concurrency, duration, warmup))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_WRK_SCRIPT = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"

local threads = {{}}
function setup(thread) table.insert(threads, thread) end

function init(args)
  window_start = now() + {warmup}
  window_end = window_start + {duration}
  counted, failed, shed = 0, 0, 0
end

function response(status, headers, body)
  local t = now()
  if t >= window_start and t < window_end then
    if status == 429 then shed = shed + 1
    elseif status >= 300 then failed = failed + 1
    else counted = counted + 1 end
  end
end

function done(summary, latency, requests)
  local c, e, s = 0, 0, 0
  for _, thread in ipairs(threads) do
    c = c + thread:get("counted")
    e = e + thread:get("failed")
    s = s + thread:get("shed")
  end
  io.write(string.format("WINDOW %d %d %d\\n", c, e, s))
end
"""


def _wrk(url: str, body: bytes, content_type: str, concurrency: int, duration: float, warmup: float) -> Load:
    with tempfile.TemporaryDirectory(prefix="wasminfer-wrk-") as tmp:
        body_file, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_file.write_bytes(body)
        script.write_text(
            _WRK_SCRIPT.format(body=body_file, content_type=content_type, warmup=warmup, duration=duration)
        )
        threads = min(2, concurrency)
        total = warmup + duration + 0.5  # wrk's -d takes whole seconds
        cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{int(total + 0.999)}s", "--timeout", "60s",
               "--latency", "-s", str(script), url]  # fmt: skip
        cpu = _children_cpu()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        cpu = _children_cpu() - cpu
    out = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or out}")

    def latency(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    window = re.search(r"^WINDOW (\d+) (\d+) (\d+)$", out, re.M)
    if window is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}\n{proc.stderr}")
    errors = int(window.group(2))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return Load(
        concurrency,
        int(window.group(1)),
        duration,
        latency("50"),
        latency("99"),
        errors,
        "wrk",
        cpu * duration / total,  # wrk's CPU over the whole run, prorated to the window
        int(window.group(3)),
    )


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
    counted = errors = shed = 0
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration

    async def connection() -> None:
        nonlocal counted, errors, shed
        reader, writer = await asyncio.open_connection(host, port)
        perf = time.perf_counter
        try:
            while True:
                t0 = perf()
                if t0 >= window_end:
                    return
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                t1 = perf()
                latencies.append(t1 - t0)
                if window_start <= t1 < window_end:
                    if head.startswith(b"HTTP/1.1 2"):
                        counted += 1
                    elif head.startswith(b"HTTP/1.1 429"):
                        shed += 1
                    else:
                        errors += 1
        finally:
            writer.close()

    cpu = time.process_time()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    p50, p99 = pct(latencies, 0.5) * 1e3, pct(latencies, 0.99) * 1e3
    cpu_share = cpu * duration / (warmup + duration)
    return Load(concurrency, counted, duration, p50, p99, errors, "asyncio", cpu_share, shed)
