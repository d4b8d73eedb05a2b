"""ISO 8601 times with a relative phrase (egressd.policy.times)."""

from __future__ import annotations

import pytest

from egressd.policy.times import iso, relative, span, when

NOW = 1_796_572_800  # 2026-12-06T16:00:00Z


def test_iso_is_utc_with_z() -> None:
    assert iso(NOW) == "2026-12-06T16:00:00Z"
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(253402300799) == "9999-12-31T23:59:59Z"
    assert iso(NOW + 0.9) == "2026-12-06T16:00:00Z"  # whole seconds


def test_iso_of_an_unrepresentable_time_does_not_raise() -> None:
    assert iso(10**20) == f"{10**20} (epoch seconds)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (59, "59 s"),
        (119, "119 s"),
        (120, "2 min"),
        (7199, "119 min"),
        (7200, "2 h"),
        (47 * 3600, "47 h"),
        (2 * 86400, "2 days"),
        (729 * 86400, "729 days"),
        (2 * 365 * 86400, "2 years"),
        (-7200, "2 h"),
    ],
)
def test_span_units(seconds: int, text: str) -> None:
    assert span(seconds) == text


def test_relative_and_when() -> None:
    assert relative(NOW - 7200, NOW) == "2 h ago"
    assert relative(NOW + 300, NOW) == "in 5 min"
    assert relative(NOW, NOW) == "now"
    assert when(NOW - 7200, NOW) == "2026-12-06T14:00:00Z, 2 h ago"
    assert when(1000, NOW) == "1970-01-01T00:16:40Z, 56 years ago"
