"""Policy times for people: ISO 8601 UTC and a relative phrase.

Policies carry times as epoch seconds (`iat`, `nbf`, `exp`); messages show
them as ``2026-12-06T16:00:00Z`` followed by how far that is from now
(``"2 h ago"``, ``"in 5 min"``), so that an expired policy reads
``expired 2026-12-06T16:00:00Z, 2 h ago``. Pure functions, no clock: the
caller passes ``now``.
"""

from __future__ import annotations

import datetime as dt

_MINUTE = 60
_HOUR = 3600
_DAY = 86400
_YEAR = 365 * _DAY


def iso(ts: float) -> str:
    """``ts`` (epoch seconds) as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds)."""
    try:
        when = dt.datetime.fromtimestamp(int(ts), dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{int(ts)} (epoch seconds)"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration, rounded down to its largest sensible unit: ``45 s``, ``2 h``, ``3 days``."""
    s = int(abs(seconds))
    if s < 2 * _MINUTE:
        return f"{s} s"
    if s < 2 * _HOUR:
        return f"{s // _MINUTE} min"
    if s < 2 * _DAY:
        return f"{s // _HOUR} h"
    if s < 2 * _YEAR:
        return f"{s // _DAY} days"
    return f"{s // _YEAR} years"


def relative(ts: float, now: float) -> str:
    """``"2 h ago"``, ``"in 5 min"`` or ``"now"`` for ``ts`` seen at ``now``."""
    delta = ts - now
    if abs(delta) < 1:
        return "now"
    return f"in {span(delta)}" if delta > 0 else f"{span(delta)} ago"


def when(ts: float, now: float) -> str:
    """``"2026-12-06T16:00:00Z, 2 h ago"``."""
    return f"{iso(ts)}, {relative(ts, now)}"
