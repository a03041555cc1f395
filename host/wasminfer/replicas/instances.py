"""`InstanceController`: applies the instance autoscaler to every function of one `Platform`.

One background thread per process (the gateway's, and each worker's): every tick it reads each
pool's demand integral, feeds that function's `InstanceAutoscaler`, pre-warms instances up to what
it wants and reaps the ones idle past the manifest's `idle_timeout_s` down to what it wants (never
under `min_instances`), and renews the idle ones that grew (`GrowthPolicy`). Reaping every
instance of a function keeps its compiled module and its models: the next request instantiates in
microseconds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from wasminfer.manifest import Manifest
from wasminfer.runtime import DeployedFunction, release_freed_memory
from wasminfer.scaling import MONOTONIC, Bounds, Clock, DecisionLog, InstanceAutoscaler, InstancePolicy
from wasminfer.service import Platform

log = logging.getLogger("wasminfer.scaling")


def bounds(manifest: Manifest) -> Bounds:
    return Bounds(manifest.min_instances, manifest.max_instances, manifest.target_utilization_pct / 100)


@dataclass
class _Tracked:
    fn: DeployedFunction
    scaler: InstanceAutoscaler
    area: float  # the pool's demand integral at the last tick
    at: float  # when, on the pool's clock (time.monotonic): the rate is the integral's over its own
    desired: int = 0
    panic: bool = False


class InstanceController:
    """Idempotent `close()`; `tick()` runs one round by itself (what the tests call)."""

    def __init__(
        self,
        platform: Platform,
        policy: InstancePolicy | None = None,
        decisions: DecisionLog | None = None,
        replica: str = "primary",
        clock: Clock = MONOTONIC,
    ) -> None:
        self.platform = platform
        self.policy = policy or InstancePolicy()
        self.decisions = decisions or DecisionLog()
        self.replica = replica
        self._clock = clock
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="wasminfer-instances", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.policy.tick_s):
            try:
                self.tick()
            except Exception:  # a bug must not stop scaling for good
                log.exception("instance autoscaler tick failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def tick(self) -> None:
        with self._lock:
            seen: set[tuple[str, str]] = set()
            for tenant, host in self.platform.hosts().items():
                for fn in host.functions():
                    key = (tenant, fn.name)
                    seen.add(key)
                    area, now, peak = fn.pool.demand()
                    tracked = self._tracked.get(key)
                    if tracked is None or tracked.fn is not fn:  # new, or redeployed: start afresh
                        scaler = InstanceAutoscaler(bounds(fn.manifest), self.policy, self._clock)
                        self._tracked[key] = _Tracked(fn, scaler, area, now)
                        continue
                    elapsed = now - tracked.at
                    if elapsed <= 0:
                        continue
                    tracked.scaler.observe((area - tracked.area) / elapsed, peak)
                    tracked.area, tracked.at = area, now
                    self._apply(tenant, tracked)
            for key in set(self._tracked) - seen:
                del self._tracked[key]

    def _apply(self, tenant: str, tracked: _Tracked) -> None:
        fn, m = tracked.fn, tracked.fn.manifest
        live = fn.pool.stats()["live"]
        decision = tracked.scaler.decide(live)
        tracked.desired, tracked.panic = decision.desired, decision.panic
        made = reaped = 0
        if decision.desired > live:
            try:
                made = fn.prewarm(decision.desired)  # within the tenant's memory quota
            except Exception as exc:  # the module fails to start now: requests will say why
                log.warning("could not pre-warm %s/%s: %s", tenant, fn.name, exc)
        keep = max(decision.desired, m.min_instances)
        if live > keep:
            reaped = fn.pool.reap_idle(m.idle_timeout_s, keep)
        # The memory the survivors grew goes back too, not only their count; and what the C
        # allocator kept of the instances dropped (`release_freed_memory`, at most once a second).
        if fn.pool.shrink_idle() or reaped:
            release_freed_memory()
        if made or reaped:
            reason = decision.reason
            if made:
                reason += f"; pre-warmed {made}"
            if reaped:
                reason += f"; reaped {reaped} idle for over idle_timeout_s {m.idle_timeout_s}"
            self.decisions.record(
                "instances", f"{tenant}/{fn.name}@{self.replica}", live, live + made - reaped, reason
            )

    def snapshot(self) -> dict[tuple[str, str], dict[str, Any]]:
        """What the autoscaler wants per function: desired instances, and whether it panics."""
        return {key: {"desired": t.desired, "panic": t.panic} for key, t in list(self._tracked.items())}


def instance_stats(platform: Platform, controller: InstanceController | None) -> dict[str, dict[str, Any]]:
    """Every function's pool in `platform`, by "tenant/function", with what the autoscaler wants."""
    wanted = controller.snapshot() if controller is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for tenant, host in platform.hosts().items():
        for fn in host.functions():
            pool = fn.pool.stats()
            entry: dict[str, Any] = {k: pool[k] for k in ("live", "busy", "idle", "waiting")}
            entry.update(wanted.get((tenant, fn.name), {"desired": None, "panic": False}))
            out[f"{tenant}/{fn.name}"] = entry
    return out
