"""`Decision`: one scaling step and its reason; `DecisionLog`: the recent ones, also in the log.

Both autoscalers explain themselves the same way: `GET /v1/scaling` lists the recent decisions, the
metrics count them, and each goes to the `wasminfer.scaling` logger as one line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("wasminfer.scaling")


@dataclass(frozen=True)
class Decision:
    """`scope` is "instances" (of one function in one host) or "replicas" (of the fleet);
    `subject` names what changed (`tenant/function@replica`, or `replicas`)."""

    at: float  # Unix time
    scope: str
    subject: str
    before: int
    after: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.after > self.before else "down" if self.after < self.before else "hold"

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "scope": self.scope,
            "subject": self.subject,
            "before": self.before,
            "after": self.after,
            "direction": self.direction,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        return f"{self.scope} {self.subject}: {self.before} -> {self.after} ({self.reason})"


class DecisionLog:
    """The last `capacity` decisions, thread-safe; each one recorded is logged at INFO."""

    def __init__(self, capacity: int = 200) -> None:
        self._recent: deque[Decision] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}  # (scope, direction) -> decisions so far

    def record(self, scope: str, subject: str, before: int, after: int, reason: str) -> Decision:
        decision = Decision(time.time(), scope, subject, before, after, reason)
        with self._lock:
            self._recent.append(decision)
            key = (scope, decision.direction)
            self.counts[key] = self.counts.get(key, 0) + 1
        log.info("%s", decision)
        return decision

    def recent(self, n: int | None = None) -> list[Decision]:
        """The newest `n` (default: all kept), oldest first."""
        with self._lock:
            items = list(self._recent)
        return items if n is None else items[-n:] if n else []
