"""Per-second latency series of the well-behaved jobs (pure).

The locustfile keeps each phase-labelled request's (start time, milliseconds,
failed) and writes `per_second(...)` into its summary as `latency_per_second`;
the JSON report carries it in `observed.summaries[ROLE]`, and
`egressd_harness.loadtest.plots` draws latency and requests/s over time from it.
Locust's own stats history holds cumulative or 10 s-windowed percentiles,
too coarse for 5 s windows: hence this series.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

KEY = "latency_per_second"


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ascending values (p in 0..100, values not empty)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def per_second(samples: Iterable[tuple[float, float, bool]]) -> list[dict[str, Any]]:
    """(Unix start time, ms, failed) per request into one row per whole second
    that started a request: `t` (the second), `n`, `failed`, `p50_ms`,
    `p99_ms`, `max_ms` (every request counts, failed ones too, as in locust's
    percentiles that the verdicts use). Ascending by `t`."""
    by_second: dict[int, list[float]] = defaultdict(list)
    failed: dict[int, int] = defaultdict(int)
    for start, ms, bad in samples:
        second = math.floor(start)
        by_second[second].append(ms)
        if bad:
            failed[second] += 1
    rows = []
    for second in sorted(by_second):
        values = sorted(by_second[second])
        rows.append(
            {
                "t": second,
                "n": len(values),
                "failed": failed[second],
                "p50_ms": round(percentile(values, 50), 2),
                "p99_ms": round(percentile(values, 99), 2),
                "max_ms": round(values[-1], 2),
            }
        )
    return rows
