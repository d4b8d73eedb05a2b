"""Idle and lifetime expiry of relayed connections.

A relayed connection ends with reason `IDLE_TIMEOUT` when no byte moved in
either direction for ``idle_s``, or `MAX_LIFETIME` when it has existed for
``lifetime_s`` whatever it does (so a policy change or a drained proxy
reaches every connection in bounded time). `check` is pure: it says whether
a connection has expired, and when to look again if not.
"""

from __future__ import annotations

from dataclasses import dataclass

from egressd.limits import IDLE_TIMEOUT, MAX_LIFETIME

#: The flow table's idle expiry: a relay idle longer has lost its flow anyway.
DEFAULT_IDLE_S = 300.0
DEFAULT_LIFETIME_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    idle_s: float = DEFAULT_IDLE_S
    lifetime_s: float = DEFAULT_LIFETIME_S

    def __post_init__(self) -> None:
        if not (self.idle_s > 0 and self.lifetime_s > 0):
            raise ValueError("idle_s and lifetime_s must be positive")


@dataclass(frozen=True, slots=True)
class Expiry:
    reason: str | None  # IDLE_TIMEOUT, MAX_LIFETIME, or None: still alive
    next_check: float  # when to call `check` again (meaningless once expired)


def check(timeouts: Timeouts, *, started: float, last_activity: float, now: float) -> Expiry:
    """Whether a connection started at `started`, last active at `last_activity`, has expired."""
    lifetime_end = started + timeouts.lifetime_s
    idle_end = max(last_activity, started) + timeouts.idle_s
    if now >= lifetime_end:
        return Expiry(MAX_LIFETIME, now)
    if now >= idle_end:
        return Expiry(IDLE_TIMEOUT, now)
    return Expiry(None, min(lifetime_end, idle_end))


__all__ = ["Expiry", "Timeouts", "check"]
