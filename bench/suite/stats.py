"""The statistics every benchmark reports, computed one way."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def pct(values: Iterable[float], q: float, empty: float = math.nan) -> float:
    """The `q`-quantile (0..1) of `values` by nearest rank: the value at index `int(q * n)` of the
    `n` sorted values (the largest for q=1); `empty` when there are none."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else empty


def p50(values: Iterable[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return statistics.median(values)
