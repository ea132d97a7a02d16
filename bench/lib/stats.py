"""Percentiles, summaries and Markdown table cells (milliseconds unless said otherwise)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["MIB", "MS_HEADER", "fmt", "mib", "ms_row", "pct", "ratio", "summary"]

MIB = 1024 * 1024


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0-100) of ``values`` (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of a list of milliseconds (for JSON and tables)."""
    if not values:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; ``-`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def mib(n: float | None, digits: int = 0) -> str:
    """Bytes as MiB for a table cell; ``-`` when missing or zero."""
    return "-" if not n else f"{n / MIB:.{digits}f}"


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``1.23x``; ``-`` when either is missing or ``b`` is 0."""
    return "-" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


MS_HEADER = "| measurement (ms) | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|"


def ms_row(name: str, values: Sequence[float], digits: int = 2) -> str:
    """``| name | n | p50 | p90 | p99 | max |`` in milliseconds (under :data:`MS_HEADER`)."""
    s = summary(values)
    cells = [fmt(s[k], digits) for k in ("p50", "p90", "p99", "max")]
    return f"| {name} | {s['n']} | " + " | ".join(cells) + " |"
