"""`tenant_cap`: how many of a host's shared slots (invocation threads, admin threads, job workers)
one tenant may hold, so that one tenant's flood or stuck calls leave the others their share.

Pure arithmetic, a leaf module: the limiters that apply it (`wasminfer.replicas.fairness.FairLimiter`
on the event loop, `wasminfer.jobs.runner` under its lock) keep the counts and the queues.

Two regimes:

- **A tenant alone** may hold every slot but a `reserve` (an eighth of them, at least one when there
  are two or more). Its throughput does not suffer (a host has more slots than cores), and a tenant
  that turns up while the first one's calls are stuck (a guest sleeping until its deadline) starts
  at once on a reserved slot instead of waiting for a stuck call to end.
- **Several tenants active** share `contended` slots: each may hold `contended // active` (at least
  one). Slots past the cores add no throughput to compute, only latency to everyone's calls, so a
  tenant flooding the host is held near its share of the cores, not of the threads: another
  tenant's call then runs beside a few of the flood's calls instead of a few dozen. A tenant over
  its share (it took its slots while alone) keeps them; it takes no new one until it is under.
"""

from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_reserve(total: int) -> int:
    """Slots a tenant alone leaves free for a newcomer: an eighth, at least one of two or more."""
    return max(1, total // 8) if total > 1 else 0


def tenant_cap(total: int, active: int, contended: int, reserve: int) -> int:
    """How many of `total` slots one of `active` tenants may hold (`active` counts the tenant
    asking). Raises `ValueError` for a negative or zero `total`."""
    if total < 1:
        raise ValueError("tenant_cap: total must be at least 1")
    if active <= 1:
        return max(1, total - reserve)
    return max(1, min(total, contended) // active)
