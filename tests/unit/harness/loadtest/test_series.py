"""The per-second latency series the locustfile writes into its summary."""

from __future__ import annotations

import pytest

from egressd_harness.loadtest.series import per_second, percentile


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_per_second_groups_by_start_second() -> None:
    samples = [
        (100.2, 5.0, False),
        (100.9, 1.0, False),
        (100.5, 3.0, True),
        (102.0, 40.0, True),  # a second with one request; 101 had none
        (99.99, 2.0, False),
    ]
    rows = per_second(samples)
    assert [r["t"] for r in rows] == [99, 100, 102]
    by_t = {r["t"]: r for r in rows}
    assert by_t[100] == {"t": 100, "n": 3, "failed": 1, "p50_ms": 3.0, "p99_ms": 5.0, "max_ms": 5.0}
    assert by_t[102]["failed"] == 1 and by_t[102]["p99_ms"] == 40.0
    assert by_t[99]["n"] == 1


def test_per_second_empty() -> None:
    assert per_second([]) == []
