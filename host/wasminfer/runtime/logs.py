"""Per-function log buffers: guest stdout/stderr, `wasminfer.log` lines and host-side events."""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

LEVELS = ("debug", "info", "warn", "error")
MAX_LINE = 4096  # bytes of UTF-8 in one kept line, the "…" that marks a cut one included
_CUT = "…"
_CUT_BYTES = len(_CUT.encode())


def clip_line(message: str) -> str:
    """`message` if it fits in `MAX_LINE` bytes of UTF-8, else its longest prefix of whole
    characters that fits with a trailing "…". Bytes, not characters: a line of 4,096 CJK characters
    or of U+FFFD replacements (one per invalid byte) would be three times the limit."""
    if len(message) <= MAX_LINE // 4:  # at most 4 bytes per character: it fits
        return message
    raw = message.encode("utf-8", "replace")
    if len(raw) <= MAX_LINE:
        return message
    return raw[: MAX_LINE - _CUT_BYTES].decode("utf-8", "ignore") + _CUT


@dataclass(frozen=True)
class LogLine:
    ts: float
    stream: str  # stdout | stderr | log | host
    level: str
    message: str
    invocation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "stream": self.stream, "level": self.level, "message": self.message,
                "invocation": self.invocation}


class LogBuffer:
    """A bounded ring of recent lines of one function. Thread-safe.

    Output streams are split into lines; a partial line waits (per stream and instance) for its end
    or for `flush`.
    """

    def __init__(self, capacity: int = 2000) -> None:
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.dropped = 0

    def append(self, stream: str, message: str, level: str = "info", invocation: str | None = None) -> None:
        line = LogLine(time.time(), stream, level, clip_line(message), invocation)
        with self._lock:
            if len(self._lines) == self._lines.maxlen:
                self.dropped += 1
            self._lines.append(line)

    def tail(self, n: int = 200, since: float | None = None) -> list[LogLine]:
        with self._lock:
            lines = list(self._lines)
        if since is not None:
            lines = [ln for ln in lines if ln.ts > since]
        return lines[-n:] if n > 0 else []

    def clear(self) -> None:
        with self._lock:
            self._lines.clear()


#: Bytes of a guest's stderr quoted in the error of a failed invocation: the guest's own words (a
#: Rust panic's message, a C assertion, a Python traceback's last lines) where its caller sees them,
#: not only in the logs.
STDERR_TAIL = 1024


class Tail:
    """The last `STDERR_TAIL` bytes a guest wrote to a stream during one invocation."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def add(self, data: bytes) -> None:
        self.data = (self.data + data)[-STDERR_TAIL:]

    def clear(self) -> None:
        self.data = b""

    def suffix(self) -> str:
        """`"; stderr: …"` to end an error message with (an ellipsis where older output was cut), or
        "" when the guest wrote nothing."""
        text = self.data.decode("utf-8", "replace").strip()
        return f"; stderr: {'…' if len(self.data) == STDERR_TAIL else ''}{text}" if text else ""


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (.+)$')


def where_raised(traceback: str) -> str:
    """Where an uncaught Python exception was raised, from its traceback's last frame:
    `" (app.py, line 12, in handle: raise ValueError(arg))"`, or "" without a frame. Components and
    the Python runtime both end their error's message with it."""
    lines = traceback.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        frame = _FRAME.match(lines[i])
        if frame is not None:
            path, line, func = frame.groups()
            source = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
            code = f": {source[:200]}" if source and not source.startswith(("Traceback", "~", "^")) else ""
            return f" ({path.rsplit('/', 1)[-1]}, line {line}, in {func}{code})"
    return ""


class StreamSplitter:
    """Turns chunks written to a guest's stdout/stderr into log lines, and keeps the invocation's
    `tail` (cleared by the host as each invocation starts)."""

    def __init__(self, buffer: LogBuffer, stream: str, level: str) -> None:
        self.buffer = buffer
        self.stream = stream
        self.level = level
        self._partial = b""
        self.invocation: str | None = None
        self.bytes_written = 0
        self.tail = Tail()

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        self.tail.add(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            self.buffer.append(self.stream, raw.decode("utf-8", "replace"), self.level, self.invocation)
        if len(self._partial) > MAX_LINE:
            self.flush()

    def flush(self) -> None:
        if self._partial:
            self.buffer.append(self.stream, self._partial.decode("utf-8", "replace"), self.level,
                               self.invocation)
            self._partial = b""
