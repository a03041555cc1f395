"""Host replicas: where invocations run, and how many places there are.

`Fleet` routes each invocation to a replica (admission, least outstanding requests by the power of
two choices, warm first), and grows and shrinks the replicas with the replica autoscaler. A backend
(`ReplicaBackend`: start, stop, route, stats) makes the replicas: `InProcessBackend` is the gateway's
own process, `LocalBackend` runs worker processes on this machine. `InstanceController` applies the
instance autoscaler inside one process. `FairLimiter` shares worker threads between tenants;
`InlinePolicy` picks the short invocations that run on the event loop instead. Never
imports starlette.
"""

from __future__ import annotations

from wasminfer.replicas.base import Replica, ReplicaBackend, ReplicaStats, WarmSpec
from wasminfer.replicas.fairness import FairLimiter
from wasminfer.replicas.fleet import Fleet
from wasminfer.replicas.inline import InlinePolicy
from wasminfer.replicas.inprocess import InProcessBackend
from wasminfer.replicas.instances import InstanceController, instance_stats
from wasminfer.replicas.local import LocalBackend
from wasminfer.runtime import InvokeResult, OutputStream  # what a streamed invocation hands the fleet

__all__ = [
    "FairLimiter",
    "Fleet",
    "InProcessBackend",
    "InlinePolicy",
    "InstanceController",
    "InvokeResult",
    "LocalBackend",
    "OutputStream",
    "Replica",
    "ReplicaBackend",
    "ReplicaStats",
    "WarmSpec",
    "instance_stats",
]
