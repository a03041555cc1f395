"""Prometheus metrics of one app, in collectors of its own (two apps in one process, as in the tests,
never share counters).

Filtered per tenant before they are rendered: every collector takes the tenant whose series it is
asked for (`TenantCollector.collect(tenant)`; None: every tenant's, the operator's view) and yields
only the samples labelled with that tenant, and the unlabelled process-wide ones. A scrape puts the
collectors, bound to the caller's tenant, in a registry of its own.

Counted per request by the invoke route: invocations by function and outcome (`ok` or the error
code), end-to-end latency and guest run time, cold starts. A successful invocation only adds to a
tally of its function (`_OkTally`: a few additions and one bisection, no lock): prometheus-client
takes a lock for each counter and histogram it updates, three of them per request, and walks the
buckets in Python. The tallies go into the series before anything reads them (`flush`), so every
reading shows every invocation. The counting and the reading run on the event loop.

Replica processes that take their own connections count theirs the same way; the gateway adds them
in at scrape time (`render`'s `extra`, `counter_samples` on the replica's side), so every process'
`/metrics` shows the whole host.

Read from the platform at scrape time (this process' own): live/busy/idle instances per function,
and per model its load time, resident bytes, runs, inferences, errors and run time, and for a
batching model its batch size and queue delay histograms.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from wasminfer.jobs import JobService
from wasminfer.replicas import Fleet
from wasminfer.service import Platform

# From 100 µs (a warm invoke of a small function) to 10 s (the default timeout).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# The buckets' upper bounds as prometheus-client keeps them (+Inf last): the index `bisect_left`
# finds for a value is that of the bucket `Histogram.observe` adds it to.
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


# The `_created` series (a timestamp per counter) double the output and nothing reads them. The
# switch is process-wide: thrown once, here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class TenantCollector(Protocol):
    def collect(self, tenant: str | None) -> Iterator[Metric]:
        """The metric families, with only `tenant`'s samples and the unlabelled ones (None: all)."""
        ...


class Metrics:
    def __init__(self, platform: Platform, fleet: Fleet | None = None) -> None:
        # The counters of invocations, kept by prometheus-client; read through `_Counted`.
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("tenant", "function")
        self.invocations = Counter(
            "wasminfer_invocations",
            "Invocations by function and outcome ('ok' or the error code)",
            (*labels, "outcome"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "wasminfer_invocation_seconds",
            "Invocation latency inside the gateway (body read to response)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run = Histogram(
            "wasminfer_guest_run_seconds",
            "Time the guest ran, including its infer calls (successes)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_byte_latency = Histogram(
            "wasminfer_stream_first_byte_seconds",
            "Streamed invocations: time from the request to the first part of the answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "wasminfer_cold_starts",
            "Invocations that had to create an instance",
            labels,
            registry=self.registry,
        )
        self._collectors: list[TenantCollector] = [
            _Counted(self.registry),
            _PlatformCollector(platform),
            _MemoryCollector(platform),
        ]
        if fleet is not None:
            self._collectors.append(_FleetCollector(fleet))
        # The labelled children of successful invocations, per (tenant, function): `labels()` takes a
        # lock and builds a tuple on every call, a cost on the hot path.
        self._ok: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._tallies: dict[tuple[str, str], _OkTally] = {}  # successes not in the series yet

    def invoked(
        self,
        tenant: str,
        function: str,
        outcome: str,
        seconds: float,
        run_s: float | None = None,
        cold: bool = False,
    ) -> None:
        if outcome == "ok" and run_s is not None:
            tally = self._tallies.get((tenant, function))
            if tally is None:
                if (tenant, function) not in self._ok:  # its series appear with its first success
                    self._ok[(tenant, function)] = (
                        self.invocations.labels(tenant, function, "ok"),
                        self.latency.labels(tenant, function),
                        self.run.labels(tenant, function),
                    )
                tally = self._tallies[(tenant, function)] = _OkTally()
            tally.count += 1
            tally.latency_sum += seconds
            tally.latency[bisect_left(_BOUNDS, seconds)] += 1
            tally.run_sum += run_s
            tally.run[bisect_left(_BOUNDS, run_s)] += 1
            if cold:
                tally.cold += 1
            return
        self.invocations.labels(tenant, function, outcome).inc()
        self.latency.labels(tenant, function).observe(seconds)
        if run_s is not None:
            self.run.labels(tenant, function).observe(run_s)
        if cold:
            self.cold_starts.labels(tenant, function).inc()

    def flush(self) -> None:
        """Adds the tallies of successful invocations to the series (`render`, `counter_samples` and
        `function_stats` do first)."""
        tallies, self._tallies = self._tallies, {}
        for key, tally in tallies.items():
            count, latency, run = self._ok[key]
            count.inc(tally.count)
            _observed(latency, tally.latency_sum, tally.latency)
            _observed(run, tally.run_sum, tally.run)
            if tally.cold:
                self.cold_starts.labels(*key).inc(tally.cold)

    def function_stats(self, tenant: str) -> dict[str, dict[str, Any]]:
        """`tenant`'s functions as this gateway counted them since it started, by name: invocations
        by outcome, cold starts, and the end-to-end latency histogram (cumulative `[upper bound in
        seconds, count]` pairs ending with `"+Inf"`, as `BatchingStats` gives its own; its sum and
        count). Read from the same series `/metrics` renders."""
        self.flush()
        found: dict[str, dict[str, Any]] = {}

        def entry(labels: dict[str, str]) -> dict[str, Any] | None:
            if labels.get("tenant") != tenant:
                return None
            histogram = {"buckets": [], "sum": 0.0, "count": 0}
            return found.setdefault(
                labels["function"], {"invocations": {}, "cold_starts": 0, "latency_seconds": histogram}
            )

        for family in self.invocations.collect():
            for sample in family.samples:
                e = entry(sample.labels)
                if e is not None and sample.name.endswith("_total"):
                    e["invocations"][sample.labels["outcome"]] = int(sample.value)
        for family in self.cold_starts.collect():
            for sample in family.samples:
                e = entry(sample.labels)
                if e is not None and sample.name.endswith("_total"):
                    e["cold_starts"] = int(sample.value)
        for family in self.latency.collect():
            for sample in family.samples:
                e = entry(sample.labels)
                if e is None:
                    continue
                latency = e["latency_seconds"]
                if sample.name.endswith("_bucket"):
                    le = sample.labels["le"]
                    latency["buckets"].append([le if le == "+Inf" else float(le), int(sample.value)])
                elif sample.name.endswith("_sum"):
                    latency["sum"] = sample.value
                elif sample.name.endswith("_count"):
                    latency["count"] = int(sample.value)
        return found

    def first_byte(self, tenant: str, function: str, seconds: float) -> None:
        """A streamed invocation sent its first part `seconds` after its request came."""
        self.first_byte_latency.labels(tenant, function).observe(seconds)

    def register(self, collector: TenantCollector) -> None:
        self._collectors.append(collector)

    def render(self, tenant: str | None = None, extra: list[list[Any]] | None = None) -> tuple[bytes, str]:
        """The Prometheus text exposition of `tenant`'s series and the unlabelled ones (None: every
        tenant's), and its content type. `extra`: counted elsewhere (`counter_samples` of other
        processes, summed), added to this process' own counts."""
        self.flush()
        scrape = CollectorRegistry(auto_describe=False)  # no describe(): registering costs nothing
        for collector in self._collectors:
            if extra and isinstance(collector, _Counted):
                collector = _Counted(self.registry, extra)
            scrape.register(_Bound(collector, tenant))
        return generate_latest(scrape), CONTENT_TYPE_LATEST

    def counter_samples(self) -> list[list[Any]]:
        """This process' invocation counters as `[sample name, labels, value]` (JSON-able), for the
        gateway of a replica process to add to its own."""
        self.flush()
        return [[s.name, s.labels, s.value] for family in self.registry.collect() for s in family.samples]


class _OkTally:
    """Successful invocations of one function not yet in its series: how many, how many cold, and
    per histogram the sum and the count in each bucket (`_BOUNDS`)."""

    __slots__ = ("count", "cold", "latency_sum", "latency", "run_sum", "run")

    def __init__(self) -> None:
        self.count = self.cold = 0
        self.latency_sum = self.run_sum = 0.0
        self.latency = [0] * len(_BOUNDS)
        self.run = [0] * len(_BOUNDS)


def _observed(child: Any, total: float, counts: list[int]) -> None:
    """Adds to a labelled `Histogram` child what `observe` would have for values whose sum is `total`
    and whose counts per bucket are `counts`. prometheus-client has no call that adds many values
    at once: this writes its child's bucket and sum values (`_buckets`, `_sum`, non-cumulative, as
    `observe` does; tests/test_gateway_metrics.py checks the result against `observe`'s)."""
    child._sum.inc(total)
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class _Bound:
    """A `TenantCollector` bound to one scrape's tenant, as a registry collects it."""

    def __init__(self, collector: TenantCollector, tenant: str | None) -> None:
        self.collector, self.tenant = collector, tenant

    def collect(self) -> Iterator[Metric]:
        return self.collector.collect(self.tenant)


class _Counted:
    """The series prometheus-client's own metrics keep (invocations, latencies, cold starts): the
    caller's tenant's samples of each family, plus the `extra` samples of other processes."""

    def __init__(self, registry: CollectorRegistry, extra: list[list[Any]] | None = None) -> None:
        self.registry = registry
        self.extra = extra or []

    def collect(self, tenant: str | None) -> Iterator[Metric]:
        for family in self.registry.collect():
            if self.extra:
                family = _added(family, self.extra)
            if tenant is not None:
                mine = Metric(family.name, family.documentation, family.type, family.unit)
                mine.samples = [s for s in family.samples if s.labels.get("tenant", tenant) == tenant]
                family = mine
            yield family


def _added(family: Metric, extra: list[list[Any]]) -> Metric:
    """`family` with the values of `extra`'s samples of the same name and labels added (and those
    this process has none of yet appended)."""
    suffixes = _SUFFIXES.get(family.type, ("",))
    names = {s.name for s in family.samples} | {family.name + suffix for suffix in suffixes}
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for name, labels, value in extra:
        if name in names:
            key = (name, tuple(sorted(labels.items())))
            sums[key] = sums.get(key, 0.0) + float(value)
    merged = Metric(family.name, family.documentation, family.type, family.unit)
    for s in family.samples:
        key = (s.name, tuple(sorted(s.labels.items())))
        merged.add_sample(s.name, s.labels, s.value + sums.pop(key, 0.0))
    for (name, labels), value in sums.items():
        merged.add_sample(name, dict(labels), value)
    return merged


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _of(tenant: str | None, by_tenant: dict[str, Any]) -> list[tuple[str, Any]]:
    """The items of `by_tenant` that `tenant` may see (None: all)."""
    if tenant is None:
        return list(by_tenant.items())
    return [(tenant, by_tenant[tenant])] if tenant in by_tenant else []


class _PlatformCollector:
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


class _MemoryCollector:
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


class _FleetCollector:
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
