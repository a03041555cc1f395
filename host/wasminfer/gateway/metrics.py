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

Read from the platform at scrape time by the collectors of `gateway/collectors.py` (this process'
own): live/busy/idle instances per function, and per model its load time, resident bytes, runs,
inferences, errors and run time, and for a batching model its batch size and queue delay
histograms.
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
from prometheus_client.core import Metric

from wasminfer.gateway.collectors import FleetCollector, MemoryCollector, PlatformCollector
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
            PlatformCollector(platform),
            MemoryCollector(platform),
        ]
        if fleet is not None:
            self._collectors.append(FleetCollector(fleet))
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
            if tally is None:  # (its series are made by `flush`: a new function's first answer waits less)
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
            children = self._ok.get(key)
            if children is None:  # its first successes: its series appear now
                children = self._ok[key] = (
                    self.invocations.labels(*key, "ok"), self.latency.labels(*key), self.run.labels(*key)
                )
            count, latency, run = children
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
