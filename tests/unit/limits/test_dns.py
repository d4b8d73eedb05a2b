"""`egressd.limits.dns`: the per-job DNS query limits, with a fake clock."""

from __future__ import annotations

import pytest

from egressd.limits.dns import (
    DNS_INFLIGHT_LIMIT,
    DNS_RATE_LIMIT,
    DNS_TCP_CONNECTION_LIMIT,
    LOG_INTERVAL_S,
    MIN_BURST,
    DnsQueryLimiter,
    burst,
)


def admitted(limiter: DnsQueryLimiter, job: str, n: int, *, rate: float, now: float) -> int:
    return sum(limiter.admit(job, rate=rate, now=now) is None for _ in range(n))


def test_burst_is_one_second_at_least_the_minimum() -> None:
    assert burst(50) == 50
    assert burst(1) == MIN_BURST
    assert burst(10_000) == 10_000


def test_rate_and_refill() -> None:
    limiter = DnsQueryLimiter()
    assert admitted(limiter, "a", 80, rate=50, now=0.0) == 50
    assert limiter.admit("a", rate=50, now=0.0) == DNS_RATE_LIMIT
    assert admitted(limiter, "a", 80, rate=50, now=0.5) == 25  # half a second's worth
    assert admitted(limiter, "a", 80, rate=50, now=10.0) == 50  # never more than the burst


def test_small_rate_keeps_the_minimum_burst() -> None:
    limiter = DnsQueryLimiter()
    assert admitted(limiter, "a", 20, rate=1, now=0.0) == MIN_BURST
    assert admitted(limiter, "a", 20, rate=1, now=1.0) == 1


def test_jobs_are_independent() -> None:
    limiter = DnsQueryLimiter()
    assert admitted(limiter, "flood", 1000, rate=50, now=0.0) == 50
    assert admitted(limiter, "victim", 10, rate=50, now=0.0) == 10


def test_rate_change_keeps_earned_tokens_within_the_new_burst() -> None:
    limiter = DnsQueryLimiter()
    assert admitted(limiter, "a", 100, rate=100, now=0.0) == 100
    assert admitted(limiter, "a", 100, rate=100, now=0.05) == 5
    # Lowered: what was earned stays, capped by the new burst.
    assert admitted(limiter, "a", 100, rate=10, now=10.0) == 10
    # Raised: from the call on (half a second at 10/s before it), then at the new rate.
    assert admitted(limiter, "a", 1000, rate=1000, now=10.5) == 5
    assert admitted(limiter, "a", 1000, rate=1000, now=11.0) == 500


def test_take_known_uses_the_rate_last_seen() -> None:
    limiter = DnsQueryLimiter()
    assert limiter.take_known("a", 0.0) is None  # unknown: the caller reads the policy
    assert admitted(limiter, "a", 10, rate=10, now=0.0) == 10
    assert limiter.take_known("a", 0.0) is False
    assert limiter.take_known("a", 0.1) is True  # one token at 10/s
    assert limiter.take_known("a", 0.1) is False
    limiter.set_rate("a", 1000, 0.1)
    assert limiter.take_known("a", 0.2) is True


def test_garbage_spends_tokens_too() -> None:
    limiter = DnsQueryLimiter()
    for _ in range(MIN_BURST):  # a job not seen yet: the minimum rate
        limiter.charge("a", 0.0)
    assert limiter.take_known("a", 0.0) is False
    limiter.admit("b", rate=100, now=0.0)
    for _ in range(100):  # a known job: its own rate
        limiter.charge("b", 0.0)
    assert limiter.take_known("b", 0.0) is False


def test_refusal_budget_then_drops() -> None:
    limiter = DnsQueryLimiter()
    assert admitted(limiter, "a", 100, rate=20, now=0.0) == 20
    answered = sum(limiter.answer_refusal("a", 0.0) for _ in range(100))
    assert answered == 20  # as many refusals answered as the rate; the rest dropped
    assert limiter.answer_refusal("a", 0.5) is True
    assert limiter.answer_refusal("unknown", 0.0) is False


def test_inflight_cap() -> None:
    limiter = DnsQueryLimiter(max_inflight_per_job=2)
    limiter.admit("a", rate=50, now=0.0)
    assert limiter.begin_upstream("a") is None
    assert limiter.begin_upstream("a") is None
    assert limiter.begin_upstream("a") == DNS_INFLIGHT_LIMIT
    assert limiter.begin_upstream("b") is None  # another job has its own
    limiter.end_upstream("a")
    assert limiter.inflight("a") == 1
    assert limiter.begin_upstream("a") is None
    limiter.end_upstream("a")
    limiter.end_upstream("a")
    with pytest.raises(ValueError, match="without begin_upstream"):
        limiter.end_upstream("a")


def test_bad_cap() -> None:
    with pytest.raises(ValueError):
        DnsQueryLimiter(max_inflight_per_job=0)
    with pytest.raises(ValueError):
        DnsQueryLimiter(max_tcp_per_job=0)


def test_tcp_connection_cap() -> None:
    limiter = DnsQueryLimiter(max_tcp_per_job=2)
    assert limiter.begin_tcp("a") is None  # before any query: the job gets a state
    assert limiter.begin_tcp("a") is None
    assert limiter.begin_tcp("a") == DNS_TCP_CONNECTION_LIMIT
    assert limiter.begin_tcp("b") is None
    assert limiter.take_known("a", 0.0) is None  # no rate known yet: read the policy
    # The job gets a full bucket once the policy's rate comes.
    assert admitted(limiter, "a", 100, rate=50, now=100.0) == 50
    assert limiter.prune(1000.0) == 0  # connections open: remembered
    limiter.end_tcp("a")
    limiter.end_tcp("a")
    limiter.end_tcp("b")
    with pytest.raises(ValueError, match="without begin_tcp"):
        limiter.end_tcp("a")
    assert limiter.prune(1000.0) == 2


def test_log_sampling_counts_what_it_leaves_out() -> None:
    limiter = DnsQueryLimiter()
    limiter.admit("a", rate=50, now=0.0)
    assert limiter.log_refusal("a", 0.0) == 0  # the first is logged at once
    assert [limiter.log_refusal("a", 0.1) for _ in range(5)] == [None] * 5
    assert limiter.log_refusal("a", LOG_INTERVAL_S + 0.01) == 5  # with how many were left out
    assert limiter.log_refusal("a", LOG_INTERVAL_S + 0.02) is None
    assert limiter.flush(LOG_INTERVAL_S + 0.5) == {}  # not yet due
    assert limiter.flush(2 * LOG_INTERVAL_S + 0.02) == {"a": 1}
    assert limiter.flush(10.0) == {}


def test_prune_forgets_idle_jobs_only() -> None:
    limiter = DnsQueryLimiter()
    limiter.admit("idle", rate=50, now=0.0)
    limiter.admit("busy", rate=50, now=0.0)
    limiter.begin_upstream("busy")
    limiter.admit("drained", rate=50, now=9.99)
    assert limiter.prune(10.0) == 1
    assert len(limiter) == 2
    limiter.end_upstream("busy")
    assert limiter.prune(20.0) == 2 and len(limiter) == 0
