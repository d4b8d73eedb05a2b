"""Connection caps: proxy cap, job cap, token bucket, order of checks, pruning (fake clock)."""

from __future__ import annotations

from typing import Any

import pytest

from egressd.limits import (
    IDLE_TIMEOUT,
    JOB_CONNECTION_LIMIT,
    JOB_RATE_LIMIT,
    MAX_LIFETIME,
    PORT_BUDGET_EXHAUSTED,
    PORT_POOL_EXHAUSTED,
    PROXY_CONNECTION_LIMIT,
    REFUSAL_REASONS,
    connections,
    fleet_share,
)
from egressd.limits.connections import ConnectionLimiter, TokenBucket

BIG = 1_000_000


def admit_n(limiter: ConnectionLimiter, job: object, n: int, **kw: Any) -> list[str | None]:
    return [limiter.admit(job, **kw) for _ in range(n)]


# constants and fleet_share


def test_refusal_reasons_are_the_documented_strings() -> None:
    assert REFUSAL_REASONS == (
        "job_connection_limit",
        "job_rate_limit",
        "proxy_connection_limit",
        "port_budget_exhausted",
        "port_pool_exhausted",
    )
    assert REFUSAL_REASONS[:3] == (JOB_CONNECTION_LIMIT, JOB_RATE_LIMIT, PROXY_CONNECTION_LIMIT)
    assert REFUSAL_REASONS[3:] == (PORT_BUDGET_EXHAUSTED, PORT_POOL_EXHAUSTED)
    assert (IDLE_TIMEOUT, MAX_LIFETIME) == ("idle_timeout", "max_lifetime")


@pytest.mark.parametrize(
    ("value", "proxies", "share"),
    [
        (10, 1, 10),
        (10, 3, 4),
        (9, 3, 3),
        (1, 5, 1),
        (0, 3, 1),
        (7, 0, 7),
        (100, 100, 1),
        (101, 100, 2),
    ],
)
def test_fleet_share_is_ceiling_and_at_least_one(value: int, proxies: int, share: int) -> None:
    assert fleet_share(value, proxies) == share


# token bucket


def test_bucket_starts_full_with_one_seconds_worth() -> None:
    bucket = TokenBucket.full(5, now=100.0)
    assert (bucket.capacity, bucket.tokens) == (5, 5)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket.full(4, now=0.0)
    for _ in range(4):
        assert bucket.take(0.0)
    assert not bucket.take(0.2)  # 0.8 token earned
    assert bucket.take(0.25)  # 1.0 token
    assert not bucket.take(0.25)
    assert bucket.tokens == pytest.approx(0.0)
    assert bucket.take(0.5)
    assert not bucket.take(0.5)


def test_bucket_never_exceeds_capacity_after_long_idle() -> None:
    bucket = TokenBucket.full(3, now=0.0)
    for _ in range(3):
        assert bucket.take(0.0)
    bucket.refill(1_000.0)
    assert bucket.tokens == 3
    assert bucket.is_full(1_000.0)
    assert [bucket.take(1_000.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket.full(2, now=10.0)
    assert bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(9.0)  # no tokens from going back
    assert bucket.stamp == 10.0
    assert not bucket.take(10.4)  # 0.8 earned since 10.0, not since 9.0
    assert bucket.take(10.5)


def test_bucket_set_rate_keeps_earned_tokens_and_caps_to_new_capacity() -> None:
    bucket = TokenBucket.full(10, now=0.0)
    for _ in range(10):
        assert bucket.take(0.0)
    bucket.set_rate(20, now=0.5)  # 5 tokens earned at the old rate, kept
    assert (bucket.rate, bucket.capacity) == (20, 20)
    assert bucket.tokens == pytest.approx(5.0)
    bucket.refill(1.0)  # then 0.5 s at the new rate: +10
    assert bucket.tokens == pytest.approx(15.0)
    bucket.set_rate(4, now=1.0)  # a lower rate caps what is kept at one second's worth
    assert bucket.tokens == 4
    assert bucket.capacity == 4


# ConnectionLimiter


def test_max_total_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_total"):
        ConnectionLimiter(0)
    assert ConnectionLimiter(1).max_total == 1


def test_proxy_cap_counts_every_job() -> None:
    limiter = ConnectionLimiter(max_total=3)
    kw: dict[str, Any] = {"max_connections": BIG, "new_per_s": BIG, "now": 0.0}
    assert limiter.admit("a", **kw) is None
    assert limiter.admit("b", **kw) is None
    assert limiter.admit("c", **kw) is None
    assert limiter.total == 3
    assert limiter.admit("d", **kw) == PROXY_CONNECTION_LIMIT
    assert limiter.admit("a", **kw) == PROXY_CONNECTION_LIMIT
    assert limiter.total == 3
    assert limiter.active("d") == 0
    limiter.release("b")
    assert limiter.admit("d", **kw) is None
    assert limiter.jobs() == {"a": 1, "c": 1, "d": 1}


def test_proxy_cap_refusal_spends_no_token() -> None:
    limiter = ConnectionLimiter(max_total=1)
    assert limiter.admit("a", max_connections=BIG, new_per_s=2, now=0.0) is None
    # b's bucket would hold 2 tokens; proxy refusals must not spend them
    for _ in range(5):
        refused = limiter.admit("b", max_connections=BIG, new_per_s=2, now=0.0)
        assert refused == PROXY_CONNECTION_LIMIT
    limiter.release("a")
    assert limiter.admit("b", max_connections=BIG, new_per_s=2, now=0.0) is None
    limiter.release("b")
    assert limiter.admit("b", max_connections=BIG, new_per_s=2, now=0.0) is None


def test_job_cap() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    kw = {"max_connections": 2, "new_per_s": BIG, "now": 0.0}
    assert admit_n(limiter, "a", 3, **kw) == [None, None, JOB_CONNECTION_LIMIT]
    assert limiter.active("a") == 2
    assert limiter.total == 2
    limiter.release("a")
    assert limiter.active("a") == 1
    assert admit_n(limiter, "a", 2, **kw) == [None, JOB_CONNECTION_LIMIT]


def test_job_cap_can_shrink_with_a_policy_refresh() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    assert admit_n(limiter, "a", 4, max_connections=4, new_per_s=BIG, now=0.0) == [None] * 4
    assert limiter.admit("a", max_connections=2, new_per_s=BIG, now=0.0) == JOB_CONNECTION_LIMIT
    for _ in range(3):
        limiter.release("a")
    assert limiter.admit("a", max_connections=2, new_per_s=BIG, now=0.0) is None
    assert limiter.admit("a", max_connections=2, new_per_s=BIG, now=0.0) == JOB_CONNECTION_LIMIT


def test_rate_limit_burst_is_one_seconds_worth_then_refill() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    kw = {"max_connections": BIG, "new_per_s": 5}
    assert admit_n(limiter, "a", 6, now=0.0, **kw) == [None] * 5 + [JOB_RATE_LIMIT]
    assert limiter.active("a") == 5
    assert limiter.admit("a", now=0.1, **kw) == JOB_RATE_LIMIT  # 0.5 token
    assert limiter.admit("a", now=0.2, **kw) is None  # 1 token
    assert limiter.admit("a", now=0.2, **kw) == JOB_RATE_LIMIT
    # long idle: still only one second's worth
    assert admit_n(limiter, "a", 6, now=100.0, **kw) == [None] * 5 + [JOB_RATE_LIMIT]
    assert limiter.active("a") == 11


def test_sustained_rate_matches_new_per_s() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    admitted = 0
    # 10 s in steps of 1/1024 s (exact in binary floating point), one attempt per step
    for step in range(10 * 1024 + 1):
        now = step / 1024
        if limiter.admit("a", max_connections=BIG, new_per_s=64, now=now) is None:
            admitted += 1
    assert admitted == 64 + 64 * 10  # the initial burst, then exactly the rate


def test_sustained_rate_with_inexact_steps_is_within_one() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    admitted = sum(
        limiter.admit("a", max_connections=BIG, new_per_s=50, now=step / 1000) is None
        for step in range(10_001)  # 10 s in 1 ms steps
    )
    assert abs(admitted - (50 + 50 * 10)) <= 1


def test_concurrency_checked_before_a_token_is_spent() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    kw: dict[str, Any] = {"max_connections": 1, "new_per_s": 3, "now": 0.0}
    assert limiter.admit("a", **kw) is None  # 2 tokens left
    for _ in range(10):
        assert limiter.admit("a", **kw) == JOB_CONNECTION_LIMIT
    limiter.release("a")
    assert limiter.admit("a", **kw) is None  # 1 token left
    limiter.release("a")
    assert limiter.admit("a", **kw) is None  # 0 left
    limiter.release("a")
    assert limiter.admit("a", **kw) == JOB_RATE_LIMIT
    assert limiter.active("a") == 0
    assert limiter.total == 0


def test_rate_refusal_takes_no_slot() -> None:
    limiter = ConnectionLimiter(max_total=2)
    assert limiter.admit("a", max_connections=BIG, new_per_s=1, now=0.0) is None
    assert limiter.admit("a", max_connections=BIG, new_per_s=1, now=0.0) == JOB_RATE_LIMIT
    assert (limiter.total, limiter.active("a")) == (1, 1)
    assert limiter.admit("b", max_connections=BIG, new_per_s=1, now=0.0) is None
    assert limiter.total == 2


def test_rate_change_keeps_earned_tokens() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    assert admit_n(limiter, "a", 10, max_connections=BIG, new_per_s=10, now=0.0) == [None] * 10
    # at 0.5 s, 5 tokens were earned at 10/s; the new rate 100/s applies from now on
    results = admit_n(limiter, "a", 7, max_connections=BIG, new_per_s=100, now=0.5)
    assert results == [None] * 5 + [JOB_RATE_LIMIT] * 2
    # 0.01 s later at 100/s: one more token
    assert admit_n(limiter, "a", 2, max_connections=BIG, new_per_s=100, now=0.51) == [
        None,
        JOB_RATE_LIMIT,
    ]


def test_rate_increase_does_not_grant_a_fresh_burst() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    assert admit_n(limiter, "a", 3, max_connections=BIG, new_per_s=2, now=0.0) == [
        None,
        None,
        JOB_RATE_LIMIT,
    ]
    assert limiter.admit("a", max_connections=BIG, new_per_s=1000, now=0.0) == JOB_RATE_LIMIT


def test_rate_decrease_caps_to_new_seconds_worth() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    assert limiter.admit("a", max_connections=BIG, new_per_s=100, now=0.0) is None  # 99 left
    results = admit_n(limiter, "a", 4, max_connections=BIG, new_per_s=3, now=0.0)
    assert results == [None, None, None, JOB_RATE_LIMIT]


def test_release_without_admit_raises() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    with pytest.raises(ValueError, match="release without admit"):
        limiter.release("never")
    assert limiter.admit("a", max_connections=BIG, new_per_s=BIG, now=0.0) is None
    limiter.release("a")
    with pytest.raises(ValueError, match="release without admit"):
        limiter.release("a")
    assert limiter.total == 0
    assert limiter.active("a") == 0


def test_release_of_a_refused_connection_raises() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    assert limiter.admit("a", max_connections=0, new_per_s=BIG, now=0.0) == JOB_CONNECTION_LIMIT
    with pytest.raises(ValueError):
        limiter.release("a")
    assert limiter.total == 0


def test_jobs_lists_only_jobs_holding_connections() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    kw: dict[str, Any] = {"max_connections": BIG, "new_per_s": BIG, "now": 0.0}
    limiter.admit("a", **kw)
    limiter.admit("a", **kw)
    limiter.admit("b", **kw)
    limiter.release("b")
    assert limiter.jobs() == {"a": 2}
    assert limiter.active("b") == 0
    assert limiter.active("unknown") == 0


def test_two_jobs_are_independent() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    assert admit_n(limiter, "a", 3, max_connections=2, new_per_s=BIG, now=0.0) == [
        None,
        None,
        JOB_CONNECTION_LIMIT,
    ]
    assert admit_n(limiter, "b", 2, max_connections=2, new_per_s=BIG, now=0.0) == [None, None]
    assert admit_n(limiter, "c", 3, max_connections=BIG, new_per_s=2, now=0.0) == [
        None,
        None,
        JOB_RATE_LIMIT,
    ]
    assert admit_n(limiter, "d", 2, max_connections=BIG, new_per_s=2, now=0.0) == [None, None]
    assert limiter.jobs() == {"a": 2, "b": 2, "c": 2, "d": 2}
    assert limiter.total == 8


def test_prune_forgets_only_idle_jobs_with_full_buckets() -> None:
    limiter = ConnectionLimiter(max_total=BIG)
    kw = {"max_connections": BIG, "new_per_s": 2}
    limiter.admit("holding", now=0.0, **kw)  # holds a connection
    limiter.admit("drained", now=0.0, **kw)  # connection closed, bucket not yet full
    limiter.release("drained")
    limiter.admit("idle", now=0.0, max_connections=0, new_per_s=2)  # refused, bucket full
    assert limiter.prune(0.1) == 1
    assert limiter._jobs.keys() == {"holding", "drained"}
    # the drained job's bucket is remembered: it cannot get a fresh burst
    assert admit_n(limiter, "drained", 2, now=0.1, **kw) == [None, JOB_RATE_LIMIT]
    limiter.release("drained")
    assert limiter.prune(0.5) == 0  # 0.2 + 0.8 = 1.0 token, not full
    assert limiter.prune(1.1) == 1  # full again (2 tokens)
    assert limiter._jobs.keys() == {"holding"}
    assert limiter.active("holding") == 1
    limiter.release("holding")
    assert limiter.prune(10.0) == 1
    assert limiter._jobs == {}


def test_prune_runs_when_many_jobs_are_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "PRUNE_AT", 4)
    limiter = ConnectionLimiter(max_total=BIG)
    kw = {"max_connections": BIG, "new_per_s": 1}
    for job in ("a", "b", "c"):
        assert limiter.admit(job, now=0.0, **kw) is None
        limiter.release(job)  # idle, bucket empty
    assert limiter.admit("d", now=0.0, **kw) is None  # holds its slot
    assert len(limiter._jobs) == 4
    # a newcomer when PRUNE_AT jobs are tracked: nothing is prunable yet
    assert limiter.admit("e", now=0.5, **kw) is None
    assert len(limiter._jobs) == 5
    # once a, b, c have full buckets, the next newcomer prunes them
    assert limiter.admit("f", now=2.0, **kw) is None
    assert limiter._jobs.keys() == {"d", "e", "f"}
    assert limiter.jobs() == {"d": 1, "e": 1, "f": 1}
