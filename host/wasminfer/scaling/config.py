"""`ScalingConfig`: every scaling knob of a server in one value, and how options spell it.

`wasminfer serve --min-replicas 1 --max-replicas 2 --scaling replica_up_window_s=2 …`: the two
replica bounds have options of their own, every other knob is `--scaling KEY=VALUE` with KEY one of
the fields below (an unknown key or a value out of range is an error naming the key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from wasminfer.errors import BadRequest
from wasminfer.scaling.instances import InstancePolicy
from wasminfer.scaling.replicas import ReplicaPolicy

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ScalingConfig:
    # The fleet: how many host replicas, from where.
    min_replicas: int = 1
    max_replicas: int = 1
    backend: str = "local"
    # Whether the gateway's own process serves invocations as a replica (no hop): see
    # docs/scaling.md for the measurement that chose the default.
    primary_replica: bool = True
    # The replica autoscaler (ReplicaPolicy).
    replica_tick_s: float = 1.0
    replica_up_window_s: float = 5.0
    replica_down_window_s: float = 60.0
    replica_up_queue_ms: float = 5.0
    replica_up_cpu: float = 0.9
    replica_down_queue_ms: float = 2.0
    replica_down_cpu: float = 0.5
    replica_down_concurrency: float = 1.0
    # The instance autoscaler of every host (InstancePolicy).
    instance_tick_s: float = 0.5
    instance_stable_window_s: float = 30.0
    instance_panic_window_s: float = 3.0
    instance_panic_threshold: float = 2.0
    # Admission: requests a host replica may hold beyond those running on its worker threads;
    # past it (on every replica) a fast 429.
    host_max_queue: int = 256
    # Routing: a replica that does not hold the function yet counts as this many requests more, and
    # one in another process (a hop away) this many more: at low load the gateway's process serves.
    cold_penalty: int = 4
    hop_penalty: int = 1
    # A replica started for load gets the hottest functions loaded before it takes requests.
    warm_functions: int = 8
    # The ray backend (docs/ray.md): the cluster ("auto", host:port, "ray://…", "local"), the
    # namespace of its actors, the CPUs each actor reserves (0: actors share cores), spreading
    # actors over nodes, and how long a new one may wait to be placed (Ray's autoscaler adding a node).
    ray_address: str = "auto"
    ray_namespace: str = "wasminfer"
    ray_num_cpus: float = 1.0
    ray_spread: bool = True
    ray_start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BadRequest(
                f"scaling: unknown replica backend {self.backend!r}; known: {', '.join(BACKENDS)}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise BadRequest(f"scaling: {f.name} must not be negative")
        try:
            self.replica_policy()
            self.instance_policy()
        except ValueError as exc:
            raise BadRequest(f"scaling: {exc}") from None

    def replica_policy(self) -> ReplicaPolicy:
        return ReplicaPolicy(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            tick_s=self.replica_tick_s,
            up_window_s=self.replica_up_window_s,
            down_window_s=self.replica_down_window_s,
            up_queue_ms=self.replica_up_queue_ms,
            up_cpu=self.replica_up_cpu,
            down_queue_ms=self.replica_down_queue_ms,
            down_cpu=self.replica_down_cpu,
            down_concurrency=self.replica_down_concurrency,
        )

    def instance_policy(self) -> InstancePolicy:
        return InstancePolicy(
            tick_s=self.instance_tick_s,
            stable_window_s=self.instance_stable_window_s,
            panic_window_s=self.instance_panic_window_s,
            panic_threshold=self.instance_panic_threshold,
        )

    def instance_options(self) -> list[str]:
        """The instance knobs as `KEY=VALUE` options (what a worker process is started with)."""
        return [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name.startswith("instance_")
        ]

    @classmethod
    def from_options(cls, options: Iterable[str] = (), **overrides: Any) -> ScalingConfig:
        """From `KEY=VALUE` strings (and keyword overrides). Raises `BadRequest` naming a bad key."""
        values: dict[str, Any] = {}
        for item in options:
            key, sep, raw = item.partition("=")
            if not sep:
                raise BadRequest(f"--scaling {item!r}: expected KEY=VALUE")
            values[key.strip()] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ScalingConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise BadRequest(f"unknown scaling key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        kw: dict[str, Any] = {}
        for key, raw in values.items():
            kind = type(getattr(cls(), key))
            try:
                if kind is bool:
                    if isinstance(raw, str) and raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError
                    kw[key] = raw.lower() in ("1", "true", "yes") if isinstance(raw, str) else bool(raw)
                else:
                    kw[key] = kind(raw)
            except (TypeError, ValueError):
                raise BadRequest(f"scaling key {key!r} must be a {kind.__name__}, got {raw!r}") from None
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
