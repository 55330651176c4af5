"""What the benchmark scripts share when they write their tables."""

from __future__ import annotations

import math
import statistics

__all__ = ["interval", "write_report"]


def interval(values: list[float], digits: int = 2) -> str:
    """``"mean ± 1.96 sd / sqrt(n)"`` of ``values`` to ``digits`` decimals (the mean alone for one
    value)."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.{digits}f} ± {half:.{digits}f}"


def write_report(lines: list[str], output: str | None) -> None:
    """Print the report's lines and, with ``output``, write them to that file."""
    text = "\n".join(lines) + "\n"
    print(text)
    if output:
        with open(output, "w") as handle:
            handle.write(text)
