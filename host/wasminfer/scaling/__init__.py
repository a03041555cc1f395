"""Hybrid scaling, as decisions: instances per function inside a host first (`InstanceAutoscaler`,
Knative's KPA), host replicas second (`ReplicaAutoscaler`, on queueing delay and CPU).

Pure logic over samples and a clock: no threads, no I/O, no starlette. `wasminfer.replicas` feeds
the samples in and carries the decisions out; docs/scaling.md explains the defaults.
"""

from __future__ import annotations

from wasminfer.scaling.config import ScalingConfig
from wasminfer.scaling.decisions import Decision, DecisionLog
from wasminfer.scaling.instances import Bounds, InstanceAutoscaler, InstanceDecision, InstancePolicy
from wasminfer.scaling.replicas import ReplicaAutoscaler, ReplicaDecision, ReplicaLoad, ReplicaPolicy
from wasminfer.scaling.window import MONOTONIC, Clock, FakeClock, Window

__all__ = [
    "MONOTONIC",
    "Bounds",
    "Clock",
    "Decision",
    "DecisionLog",
    "FakeClock",
    "InstanceAutoscaler",
    "InstanceDecision",
    "InstancePolicy",
    "ReplicaAutoscaler",
    "ReplicaDecision",
    "ReplicaLoad",
    "ReplicaPolicy",
    "ScalingConfig",
    "Window",
]
