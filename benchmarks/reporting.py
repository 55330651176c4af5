"""What the benchmark scripts share when they write their tables."""

from __future__ import annotations

import math
import statistics

__all__ = ["interval"]


def interval(values: list[float]) -> str:
    """``"mean ± 1.96 sd / sqrt(n)"`` of ``values`` to two decimals (the mean alone for one
    value)."""
    if len(values) < 2:
        return f"{values[0]:.2f}"
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.2f} ± {half:.2f}"
