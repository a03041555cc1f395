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
