"""`gateway.metrics`: the series a scrape shows are filtered per tenant by the collectors, before
anything is rendered: a tenant sees its own labelled samples and the unlabelled process-wide ones,
the operator (None) every tenant's."""

from __future__ import annotations

from pathlib import Path

from wasminfer.gateway.metrics import Metrics
from wasminfer.service import Platform


def test_each_tenant_sees_only_its_own_samples_and_the_process_wide_ones(tmp_path: Path) -> None:
    with Platform(tmp_path / "data") as platform:
        platform.start()
        metrics = Metrics(platform)
        metrics.invoked("alice", "resize", "ok", 0.002, 0.001, cold=True)
        metrics.invoked("bob", "secret-fn", "guest_trap", 0.003)
        alice = metrics.render("alice")[0].decode()
        bob = metrics.render("bob")[0].decode()
        everyone, content_type = metrics.render(None)
    assert content_type.startswith("text/plain")
    assert 'wasminfer_invocations_total{function="resize",outcome="ok",tenant="alice"} 1.0' in alice
    assert 'wasminfer_cold_starts_total{function="resize",tenant="alice"} 1.0' in alice
    assert "secret-fn" not in alice and 'tenant="bob"' not in alice
    assert 'wasminfer_invocations_total{function="secret-fn",outcome="guest_trap",tenant="bob"} 1.0' in bob
    assert "resize" not in bob
    for text in (alice, bob, everyone.decode()):
        assert "wasminfer_ready 1.0" in text  # unlabelled: every tenant sees it
        assert "# HELP wasminfer_invocations_total" in text  # families stay, emptied of others' samples
        assert "_created" not in text  # disabled once, at import
    assert "resize" in everyone.decode() and "secret-fn" in everyone.decode()


def test_a_second_app_in_the_process_shares_no_counters(tmp_path: Path) -> None:
    with Platform(tmp_path / "data") as platform:
        first, second = Metrics(platform), Metrics(platform)
        first.invoked("alice", "f", "ok", 0.001, 0.001)
        assert 'function="f"' in first.render(None)[0].decode()
        assert 'function="f"' not in second.render(None)[0].decode()


def test_tallied_successes_render_as_observe_would_have_counted_them(tmp_path: Path) -> None:
    """Successes are tallied and added to the series when read: the samples must be those
    prometheus-client's own `observe` and `inc` give, bucket edges included."""
    from prometheus_client import CollectorRegistry, Histogram

    from wasminfer.gateway.metrics import LATENCY_BUCKETS

    values = [0.0001, 0.00010001, 0.001, 0.0042, 10.0, 25.0, 0.0]  # edges, between, past the last
    reference = CollectorRegistry()
    latency = Histogram("ref_latency", "", ("tenant", "function"), buckets=LATENCY_BUCKETS,
                        registry=reference).labels("alice", "f")
    run = Histogram("ref_run", "", ("tenant", "function"), buckets=LATENCY_BUCKETS,
                    registry=reference).labels("alice", "f")
    with Platform(tmp_path / "data") as platform:
        metrics = Metrics(platform)
        for i, v in enumerate(values):
            metrics.invoked("alice", "f", "ok", v, v / 2, cold=i < 2)
            latency.observe(v)
            run.observe(v / 2)
        metrics.invoked("alice", "f", "guest_trap", 0.003)  # straight into the series, as before
        latency.observe(0.003)
        ours = {(name, labels.get("le")): value for name, labels, value in metrics.counter_samples()
                if labels.get("function") == "f" and labels.get("outcome", "ok") == "ok"}
        stats = metrics.function_stats("alice")["f"]
    theirs = {(s.name.replace("ref_latency", "wasminfer_invocation_seconds")
               .replace("ref_run", "wasminfer_guest_run_seconds"), s.labels.get("le")): s.value
              for f in reference.collect() for s in f.samples}
    for key, value in theirs.items():
        assert ours[key] == value, key
    assert ours[("wasminfer_invocation_seconds_bucket", "+Inf")] == len(values) + 1
    assert ours[("wasminfer_invocation_seconds_bucket", "0.0001")] == 2  # 0.0 and 0.0001 itself
    assert ours[("wasminfer_invocations_total", None)] == len(values)
    assert stats["invocations"] == {"ok": len(values), "guest_trap": 1}
    assert stats["cold_starts"] == 2
    assert stats["latency_seconds"]["count"] == len(values) + 1
