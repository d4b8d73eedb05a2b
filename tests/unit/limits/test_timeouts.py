"""Idle and lifetime expiry of relayed connections (fake clock)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.limits import IDLE_TIMEOUT, MAX_LIFETIME
from egressd.limits.timeouts import Expiry, Timeouts, check

T = Timeouts(idle_s=30.0, lifetime_s=300.0)


@pytest.mark.parametrize(
    ("idle_s", "lifetime_s"),
    [(0, 10), (10, 0), (-1, 10), (10, -1), (math.nan, 10), (10, math.nan), (0, 0)],
)
def test_validation(idle_s: float, lifetime_s: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Timeouts(idle_s=idle_s, lifetime_s=lifetime_s)


def test_small_and_infinite_values_are_valid() -> None:
    assert Timeouts(idle_s=0.001, lifetime_s=0.001).idle_s == 0.001
    forever = Timeouts(idle_s=math.inf, lifetime_s=math.inf)
    assert check(forever, started=0.0, last_activity=0.0, now=1e9) == Expiry(None, math.inf)


def test_fresh_connection_is_alive_until_idle_end() -> None:
    assert check(T, started=100.0, last_activity=100.0, now=100.0) == Expiry(None, 130.0)
    assert check(T, started=100.0, last_activity=100.0, now=129.999) == Expiry(None, 130.0)


def test_idle_timeout() -> None:
    assert check(T, started=100.0, last_activity=100.0, now=130.0) == Expiry(IDLE_TIMEOUT, 130.0)
    assert check(T, started=100.0, last_activity=150.0, now=180.0) == Expiry(IDLE_TIMEOUT, 180.0)
    assert check(T, started=100.0, last_activity=150.0, now=500.0).reason == MAX_LIFETIME


def test_activity_postpones_idle() -> None:
    assert check(T, started=100.0, last_activity=150.0, now=170.0) == Expiry(None, 180.0)
    assert check(T, started=100.0, last_activity=179.0, now=180.0) == Expiry(None, 209.0)


def test_last_activity_before_start_counts_from_start() -> None:
    assert check(T, started=100.0, last_activity=0.0, now=120.0) == Expiry(None, 130.0)
    assert check(T, started=100.0, last_activity=0.0, now=130.0).reason == IDLE_TIMEOUT


def test_lifetime_whatever_the_activity() -> None:
    busy = {"started": 100.0, "last_activity": 399.9}
    assert check(T, **busy, now=399.9) == Expiry(None, 400.0)  # lifetime end comes first
    assert check(T, **busy, now=400.0) == Expiry(MAX_LIFETIME, 400.0)
    assert check(T, **busy, now=1000.0) == Expiry(MAX_LIFETIME, 1000.0)


def test_lifetime_wins_when_both_expire() -> None:
    t = Timeouts(idle_s=10.0, lifetime_s=10.0)
    assert check(t, started=0.0, last_activity=0.0, now=10.0).reason == MAX_LIFETIME
    assert check(t, started=0.0, last_activity=0.0, now=50.0).reason == MAX_LIFETIME


def test_next_check_is_the_earlier_end() -> None:
    t = Timeouts(idle_s=60.0, lifetime_s=100.0)
    assert check(t, started=0.0, last_activity=0.0, now=1.0).next_check == 60.0
    assert check(t, started=0.0, last_activity=50.0, now=51.0).next_check == 100.0
    assert check(t, started=0.0, last_activity=30.0, now=31.0).next_check == 90.0


def test_checking_at_next_check_repeatedly_finds_the_expiry() -> None:
    """A poller that sleeps until next_check ends an idle connection exactly on time."""
    t = Timeouts(idle_s=7.0, lifetime_s=1000.0)
    activity = [0.0, 3.0, 9.5, 16.0]
    now, last = 0.0, 0.0
    for _ in range(10):
        last = max(a for a in activity if a <= now)
        expiry = check(t, started=0.0, last_activity=last, now=now)
        if expiry.reason:
            break
        assert expiry.next_check > now
        now = expiry.next_check
    assert (expiry.reason, now) == (IDLE_TIMEOUT, 23.0)


@given(
    idle=st.floats(min_value=0.001, max_value=1e4),
    lifetime=st.floats(min_value=0.001, max_value=1e4),
    started=st.floats(min_value=0, max_value=1e6),
    since_start=st.floats(min_value=0, max_value=2e4),
    activity_at=st.floats(min_value=0, max_value=1),
)
def test_expiry_properties(
    idle: float, lifetime: float, started: float, since_start: float, activity_at: float
) -> None:
    t = Timeouts(idle_s=idle, lifetime_s=lifetime)
    now = started + since_start
    last = started + since_start * activity_at
    expiry = check(t, started=started, last_activity=last, now=now)
    lifetime_end = started + lifetime
    idle_end = max(last, started) + idle
    if now >= lifetime_end:
        assert expiry == Expiry(MAX_LIFETIME, now)
    elif now >= idle_end:
        assert expiry == Expiry(IDLE_TIMEOUT, now)
    else:
        assert expiry.reason is None
        assert now < expiry.next_check == min(lifetime_end, idle_end)
        # and at next_check it has expired (with no further activity)
        later = check(t, started=started, last_activity=last, now=expiry.next_check)
        assert later.reason in (IDLE_TIMEOUT, MAX_LIFETIME)
