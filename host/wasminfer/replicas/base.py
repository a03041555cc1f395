"""The replica interface: what a backend of host replicas provides, and what the router keeps.

A backend has four operations — `start` a replica, `stop` one, `route` an invocation to one, read
one's `stats` — and nothing else: routing (least outstanding requests, power of two choices),
admission, draining and the autoscaler are the same for every backend (`wasminfer.replicas.fleet`).
The in-process backend is the gateway's own `Platform`; the local backend runs worker processes;
a Ray backend would hold actor handles.
"""

from __future__ import annotations

import collections
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wasminfer.runtime import InvokeResult

#: A function a new replica should load before it takes requests: (tenant, name, deployment digest).
WarmSpec = tuple[str, str, str]


@dataclass
class ReplicaStats:
    """What a replica reports of itself (read once a tick by the fleet)."""

    alive: bool = True
    cpu: float = 0.0  # cores its process used since the previous reading
    # "tenant/function" -> its instance pool there: live, busy, idle, waiting, desired, panic
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # its instance autoscaler's, newest last
    exit_code: int | None = None
    # The load a replica that takes its own connections measured itself over its last tick (the
    # fleet measures the others' as it routes to them): p90 queueing delay, requests, in flight.
    queue_ms: float = 0.0
    requests: int = 0
    concurrency: float = 0.0


@dataclass(eq=False)
class Replica:
    """One host replica, as made by its backend (`handle` is the backend's own: a process, an actor)
    plus what the router keeps about it."""

    id: str
    backend: ReplicaBackend
    handle: Any = None
    pid: int | None = None
    capacity: int = 320  # requests of one tenant at once (its worker threads + its host queue); past it: 429
    holds_all: bool = False  # serves every deployed function warm (the gateway's own process)
    local: bool = False  # runs in the gateway's process: no hop
    # Takes its own connections on the gateway's port (`replicas.reuseport`): never routed to; it
    # reports its own load, and drains by closing its listening socket.
    accepts: bool = False
    state: str = "starting"  # starting | serving | draining | stopped
    outstanding: int = 0  # requests routed to it and not answered yet
    tenants: collections.Counter[str] = field(default_factory=collections.Counter)  # `outstanding` by tenant
    warm: set[tuple[str, str]] = field(default_factory=set)  # (tenant, function) it holds loaded
    stats: ReplicaStats = field(default_factory=ReplicaStats)
    created_at: float = field(default_factory=time.time)
    serving_at: float | None = None

    @property
    def kind(self) -> str:
        return self.backend.kind

    def holds(self, key: tuple[str, str]) -> bool:
        return self.holds_all or key in self.warm


class ReplicaBackend(ABC):
    """Where host replicas come from. Every method runs on the gateway's event loop; one that blocks
    (spawning a process, waiting for it) must move that work to a thread itself."""

    kind: str = "abstract"
    takes_connections: bool = False  # its replicas accept on the gateway's port (never routed to)

    @abstractmethod
    async def start(self, warm: Sequence[WarmSpec] = ()) -> Replica:
        """Starts one replica and returns it once it serves, with the `warm` functions loaded.
        Raises `Unavailable` if it cannot start."""

    @abstractmethod
    async def stop(self, replica: Replica) -> None:
        """Stops a replica the fleet has drained (nothing is in flight on it any more)."""

    @abstractmethod
    async def route(
        self, replica: Replica, tenant: str, name: str, deployment: str, body: bytes, content_type: str
    ) -> InvokeResult:
        """Runs one invocation on `replica`, which first makes its copy of the function the one
        `deployment` names. Raises what `Platform.invoke` raises, `NotDelivered` if the request
        never reached the replica, `Unavailable` if the replica failed while it had it."""

    @abstractmethod
    async def stats(self, replica: Replica) -> ReplicaStats:
        """What `replica` reports now (`alive=False` once it has gone)."""

    async def counters(self) -> list[list[Any]]:
        """The invocation counters its replicas keep themselves (replicas that take their own
        connections), summed, as `[sample name, labels, value]`; those of replicas already gone
        included. Empty for a backend whose invocations the gateway counts as it routes them."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional: a backend may own nothing to release
        """Releases what the backend owns (after every replica it started was stopped)."""
