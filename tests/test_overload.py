"""Overload and a short soak against a real server (bench/hardening.py, with a few seconds of load).

Overload: a function of 2 instances and a queue of 4, each call ~40 ms of CPU, offered 5x the load it
was measured to carry. The server must refuse the excess with 429/503 (no other status, nothing
hanging), refuse it no slower than it admits, keep its memory flat, bound the latency of what it
admits, and serve normally once the load stops. The bounds are loose: the test machine is shared,
and the load generator runs on the same cores; `just overload` reports the real figures.

Soak: steady load at half the capacity, no errors, memory flat (`just soak`: 10 minutes).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

# serial: the capacity calibration and the overload must see the same machine; beside a parallel test
# worker the calibration and the run each see a different share of the 2 cores (`just test` runs these
# after the parallel suite, alone).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.serial]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hardening() -> Iterator[ModuleType]:
    bench = str(ROOT / "bench")
    sys.path.insert(0, bench)  # as when it runs as a script: it imports the bench suite's helpers
    try:
        spec = importlib.util.spec_from_file_location("hardening", ROOT / "bench" / "hardening.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["hardening"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(bench)


def test_overload_at_5x_capacity(hardening: ModuleType, tmp_path: Path) -> None:
    r = hardening.overload(seconds=4, factor=5, work=tmp_path, calibrate_s=2.0, after_s=1.0)
    print(r)
    assert r["capacity_rps"] > 0
    assert r["factor"] >= 4.0, r  # the open loop offered what it meant to
    assert r["other_statuses"] == [], r  # only 200, 429 and 503: no 500, no dropped connection
    assert r["refused"] > r["requests"] / 3, r  # most of the excess is refused, not queued
    # refusing is not queued behind serving; both include the load generator's own delays on the
    # same 2 cores (seen: refused 4.3 s vs admitted 3.7 s p50 client-side under a parallel test run)
    assert r["refused_p50_ms"] <= max(2 * r["admitted_p50_ms"], 100), r
    # bounded: a queue of 4 behind 2 instances, not the load (inside the server: the load generator
    # shares the cores, and on a loaded machine its own delays dominate what the client sees)
    assert r["admitted_server_p99_ms"] < 5_000, r
    assert r["rss_peak_mb"] - r["rss_before_mb"] < 150, r
    assert r["after_errors"] == 0 and r["after_ok"] >= 1, r  # it recovers when the load stops


def test_short_soak(hardening: ModuleType, tmp_path: Path) -> None:
    r = hardening.soak(seconds=4, work=tmp_path, progress=False, calibrate_s=1.5)
    print({k: v for k, v in r.items() if k != "rss_series_mb"})
    assert r["requests"] > 0 and r["errors"] == 0, r
    assert r["rss_growth_pct"] < 50, r
