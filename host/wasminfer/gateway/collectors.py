"""The collectors that read a process' live state at scrape time, for `gateway.metrics.Metrics`:
the platform's functions and models (`PlatformCollector`), its memory (`MemoryCollector`), the
fleet's replicas (`FleetCollector`) and the job queue (`JobsCollector`). Each takes the tenant whose
series it is asked for (None: every tenant's) and yields only what that tenant may see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from wasminfer.jobs import JobService
from wasminfer.replicas import Fleet
from wasminfer.service import Platform


def _of(tenant: str | None, by_tenant: dict[str, Any]) -> list[tuple[str, Any]]:
    """The items of `by_tenant` that `tenant` may see (None: all)."""
    if tenant is None:
        return list(by_tenant.items())
    return [(tenant, by_tenant[tenant])] if tenant in by_tenant else []


class PlatformCollector:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def collect(self, tenant: str | None) -> Iterator[Metric]:
        ready = GaugeMetricFamily("wasminfer_ready", "1 once the store is loaded and the server serves")
        ready.add_metric([], 1.0 if self.platform.ready else 0.0)
        yield ready
        instances = GaugeMetricFamily(
            "wasminfer_instances",
            "Live Wasm instances by function and state",
            labels=["tenant", "function", "state"],
        )
        load = GaugeMetricFamily(
            "wasminfer_model_load_seconds", "Time the model took to load", labels=["tenant", "model"]
        )
        resident = GaugeMetricFamily(
            "wasminfer_model_resident_bytes",
            "Estimated memory of the model's ONNX Runtime session",
            labels=["tenant", "model"],
        )
        labels = ["tenant", "model"]
        runs = CounterMetricFamily(
            "wasminfer_model_runs", "ONNX Runtime runs of the model's session", labels=labels
        )
        inferences = CounterMetricFamily(
            "wasminfer_model_inferences",
            "infer calls answered (more than runs when calls share batched runs)",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "wasminfer_model_errors", "infer calls ONNX Runtime failed", labels=labels
        )
        run_seconds = CounterMetricFamily(
            "wasminfer_model_run_seconds", "Time spent in the model's session runs", labels=labels
        )
        batch_size = HistogramMetricFamily(
            "wasminfer_model_batch_size", "Rows per batched run (batching models)", labels=labels
        )
        queue_delay = HistogramMetricFamily(
            "wasminfer_model_queue_delay_seconds",
            "What requests waited in the batcher's queue before their batch ran (batching models)",
            labels=labels,
        )
        for owner, stats in _of(tenant, self.platform.stats()):
            for name, fn in stats["functions"].items():
                pool = fn["instances"]
                for state in ("live", "busy", "idle"):
                    instances.add_metric([owner, name, state], float(pool[state]))
            for model in stats["models"]:
                key = [owner, model["name"]]
                load.add_metric(key, float(model["load_seconds"]))
                resident.add_metric(key, float(model["resident_bytes"]))
                counters = model.get("stats")
                if counters is None:
                    continue
                runs.add_metric(key, float(counters["runs"]))
                inferences.add_metric(key, float(counters["inferences"]))
                errors.add_metric(key, float(counters["errors"]))
                run_seconds.add_metric(key, float(counters["run_seconds_total"]))
                batching = counters.get("batching")
                if batching is not None:
                    batch_size.add_metric(
                        key, _buckets(batching["batch_size_buckets"]), float(batching["batch_size_sum"])
                    )
                    queue_delay.add_metric(
                        key,
                        _buckets(batching["queue_delay_buckets"]),
                        float(batching["queue_delay_seconds_sum"]),
                    )
        yield instances
        yield load
        yield resident
        yield runs
        yield inferences
        yield errors
        yield run_seconds
        yield batch_size
        yield queue_delay


class MemoryCollector:
    """The host's memory budget and each tenant's quota and reservations (`runtime.memory`)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def collect(self, tenant: str | None) -> Iterator[Metric]:
        snap = self.platform.memory.snapshot()
        budget = GaugeMetricFamily("wasminfer_memory_budget_bytes", "The host's memory budget")
        budget.add_metric([], float(snap["budget_bytes"]))
        yield budget
        used = GaugeMetricFamily(
            "wasminfer_memory_reserved_bytes", "Memory reserved by every tenant's instances and models"
        )
        used.add_metric([], float(snap["used_bytes"]))
        yield used
        quota = GaugeMetricFamily(
            "wasminfer_tenant_memory_quota_bytes", "A tenant's memory quota", labels=["tenant"]
        )
        reserved = GaugeMetricFamily(
            "wasminfer_tenant_memory_reserved_bytes",
            "Memory a tenant reserves: instances at their memory_mb, models at an estimate",
            labels=["tenant", "kind"],
        )
        refusals = CounterMetricFamily(
            "wasminfer_tenant_memory_refusals",
            "Instances or models refused for memory, by the limit that refused ('tenant' quota: 429, "
            "'host' budget: 507)",
            labels=["tenant", "limit"],
        )
        for owner, t in _of(tenant, snap["tenants"]):
            quota.add_metric([owner], float(t["quota_bytes"]))
            for kind in ("instances", "models"):
                reserved.add_metric([owner, kind], float(t[f"{kind}_bytes"]))
            for limit, n in t["refusals"].items():
                refusals.add_metric([owner, limit], float(n))
        yield quota
        yield reserved
        yield refusals


def _buckets(pairs: list[list[Any]]) -> list[tuple[str, float]]:
    """`BatchingStats` histogram pairs (`[upper bound, cumulative count]`, ending with "+Inf") in
    the form prometheus-client's `HistogramMetricFamily` takes."""
    return [(le if isinstance(le, str) else repr(float(le)), float(n)) for le, n in pairs]


class FleetCollector:
    """The host replicas and both autoscalers, as of the fleet's last tick."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self, tenant: str | None) -> Iterator[Metric]:
        snap = self.fleet.snapshot(tenant)
        replicas = GaugeMetricFamily("wasminfer_replicas", "Host replicas by state", labels=["state"])
        for state in ("starting", "serving", "draining"):
            n = sum(r["state"] == state for r in snap["replicas"])
            replicas.add_metric([state], float(snap["starting"] if state == "starting" else n))
        yield replicas
        outstanding = GaugeMetricFamily(
            "wasminfer_replica_outstanding",
            "Requests routed to a replica and not answered yet",
            labels=["replica"],
        )
        cpu = GaugeMetricFamily(
            "wasminfer_replica_cpu_cores", "CPU of a replica's process", labels=["replica"]
        )
        instances = GaugeMetricFamily(
            "wasminfer_replica_instances",
            "Instances of a function in a replica: live, busy, idle, and what its autoscaler wants (desired)",
            labels=["replica", "tenant", "function", "state"],
        )
        for r in snap["replicas"]:
            outstanding.add_metric([r["id"]], float(r["outstanding"]))
            cpu.add_metric([r["id"]], float(r["cpu"]))
            for key, pool in r["functions"].items():
                owner, _, function = key.partition("/")
                for state in ("live", "busy", "idle", "desired"):
                    if pool.get(state) is not None:
                        instances.add_metric([r["id"], owner, function, state], float(pool[state]))
        yield outstanding
        yield cpu
        yield instances
        queue = GaugeMetricFamily(
            "wasminfer_queue_delay_p90_seconds",
            "p90 of what requests waited (threads, instances, the hop to a replica) over the last tick",
        )
        queue.add_metric([], snap["load"]["queue_ms_p90"] / 1000)
        yield queue
        decisions = CounterMetricFamily(
            "wasminfer_scaling_decisions",
            "Scaling decisions by scope and direction",
            labels=["scope", "direction"],
        )
        for (scope, direction), n in sorted(self.fleet.decisions.counts.items()):
            decisions.add_metric([scope, direction], float(n))
        yield decisions
        rejected = CounterMetricFamily(
            "wasminfer_admission_rejected",
            "Requests refused with 429 by the router, by limit",
            labels=["limit"],
        )
        for reason, n in sorted(snap["rejected"].items()):
            rejected.add_metric([reason], float(n))
        yield rejected


class JobsCollector:
    """Asynchronous work (`wasminfer.jobs`): items run, what waits, how often it gave way to
    synchronous invocations; process-wide (no tenant label). Registered by `create_app`."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def collect(self, tenant: str | None) -> Iterator[Metric]:
        stats = self.jobs.stats()
        items = CounterMetricFamily(
            "wasminfer_job_items", "Items of jobs run, by outcome ('ok' or 'failed')", labels=["outcome"]
        )
        items.add_metric(["ok"], float(stats["items_total"] - stats["items_failed_total"]))
        items.add_metric(["failed"], float(stats["items_failed_total"]))
        yield items
        for name, key, doc in (
            ("wasminfer_jobs_active", "active_jobs", "Queued or running jobs the runner holds"),
            ("wasminfer_job_items_queued", "queued_items", "Items of claimed chunks waiting for a worker"),
            ("wasminfer_job_items_in_flight", "items_in_flight", "Items of jobs running now"),
            (
                "wasminfer_job_runner_leader",
                "leader",
                "1 while this process holds the data folder's runner lock (it runs the jobs)",
            ),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(stats[key]))
            yield gauge
        yields = CounterMetricFamily(
            "wasminfer_job_sync_yields", "Times an async worker waited for synchronous invocations"
        )
        yields.add_metric([], float(stats["async_yields_total"]))
        yield yields
