"""Log lines: they land in the function's log buffer (`wasminfer logs NAME`), stream `log`.

One line is at most 4 KiB; more than the manifest's `max_log_bytes` in one invocation fails it.
`print()` works too (streams `stdout`/`stderr`).
"""

from __future__ import annotations

from wasminfer_guest import _bindings as b


def debug(message: str) -> None:
    b.log("debug", str(message))


def info(message: str) -> None:
    b.log("info", str(message))


def warn(message: str) -> None:
    b.log("warn", str(message))


def error(message: str) -> None:
    b.log("error", str(message))
