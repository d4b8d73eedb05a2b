"""ResolvedNames: per-job name <-> address memory with TTLs and bounds."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from egressd.proxy.resolved import MAX_TTL_S, MIN_TTL_S, ResolvedNames, clamp_ttl

JOB_A = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
JOB_B = uuid.UUID("3c6d2d75-8d2f-4b0b-8a66-2a1d6bd2e4f3")
IP1 = ipaddress.IPv4Address("203.0.113.10")
IP2 = ipaddress.IPv4Address("203.0.113.11")
IP3 = ipaddress.IPv4Address("203.0.113.12")


def test_both_directions() -> None:
    names = ResolvedNames()
    names.record(JOB_A, "api.allowed.test", [IP1], 60, now=0)
    names.record(JOB_A, "eu.data.allowed.test", [IP2], 60, now=0)
    names.record(JOB_A, "us.data.allowed.test", [IP2], 60, now=0)
    assert names.names_for(JOB_A, IP1, now=1) == {"api.allowed.test"}
    assert names.names_for(JOB_A, IP2, now=1) == {"eu.data.allowed.test", "us.data.allowed.test"}
    assert names.addresses_for(JOB_A, "api.allowed.test", now=1) == {IP1}
    assert names.names_for(JOB_A, IP3, now=1) == set()


def test_jobs_are_separate() -> None:
    names = ResolvedNames()
    names.record(JOB_A, "api.allowed.test", [IP1], 60, now=0)
    assert names.names_for(JOB_B, IP1, now=1) == set()
    assert names.addresses_for(JOB_B, "api.allowed.test", now=1) == set()


def test_expiry() -> None:
    names = ResolvedNames()
    names.record(JOB_A, "api.allowed.test", [IP1, IP2], 30, now=100)
    assert names.names_for(JOB_A, IP1, now=129.9) == {"api.allowed.test"}
    assert names.names_for(JOB_A, IP1, now=130) == set()
    assert names.addresses_for(JOB_A, "api.allowed.test", now=130) == set()
    assert names.size(JOB_A) == 0  # expired entries met on read are removed


def test_refresh_extends() -> None:
    names = ResolvedNames()
    names.record(JOB_A, "a.test", [IP1], 10, now=0)
    names.record(JOB_A, "a.test", [IP1], 10, now=8)
    assert names.names_for(JOB_A, IP1, now=15) == {"a.test"}


@pytest.mark.parametrize(
    ("ttl", "clamped"),
    [
        (0, MIN_TTL_S),
        (-5, MIN_TTL_S),
        (float("nan"), MIN_TTL_S),
        (4.9, MIN_TTL_S),
        (300, 300),
        (86400, MAX_TTL_S),
    ],
)
def test_clamp(ttl: float, clamped: float) -> None:
    assert clamp_ttl(ttl) == clamped


def test_ttl_zero_still_usable_then_gone() -> None:
    names = ResolvedNames()
    names.record(JOB_A, "lb.test", [IP1], 0, now=0)
    assert names.names_for(JOB_A, IP1, now=MIN_TTL_S - 0.1) == {"lb.test"}
    names.record(JOB_A, "long.test", [IP2], 10**9, now=0)
    assert names.names_for(JOB_A, IP2, now=MAX_TTL_S + 1) == set()


def test_bounded_per_job_evicts_oldest() -> None:
    names = ResolvedNames(max_per_job=3)
    for i in range(5):
        names.record(JOB_A, f"n{i}.test", [ipaddress.IPv4Address(f"203.0.113.{i}")], 60, now=i)
    assert names.size(JOB_A) == 3
    assert names.addresses_for(JOB_A, "n0.test", now=5) == set()
    assert names.addresses_for(JOB_A, "n1.test", now=5) == set()
    assert names.addresses_for(JOB_A, "n4.test", now=5) == {ipaddress.IPv4Address("203.0.113.4")}
    names.record(JOB_B, "other.test", [IP1], 60, now=5)
    assert names.size(JOB_B) == 1  # another job's budget is its own


def test_refresh_protects_from_eviction() -> None:
    names = ResolvedNames(max_per_job=2)
    names.record(JOB_A, "keep.test", [IP1], 60, now=0)
    names.record(JOB_A, "b.test", [IP2], 60, now=1)
    names.record(JOB_A, "keep.test", [IP1], 60, now=2)
    names.record(JOB_A, "c.test", [IP3], 60, now=3)
    assert names.names_for(JOB_A, IP1, now=4) == {"keep.test"}
    assert names.names_for(JOB_A, IP2, now=4) == set()


def test_one_job_flooding_is_bounded() -> None:
    names = ResolvedNames(max_per_job=100)
    for i in range(10_000):
        names.record(JOB_A, f"x{i}.flood.test", [IP1, IP2], 3600, now=0)
    assert names.size(JOB_A) == 100
    assert len(names.names_for(JOB_A, IP1, now=1)) == 50


def test_bounded_jobs() -> None:
    names = ResolvedNames(max_jobs=2)
    jobs = [uuid.uuid4() for _ in range(3)]
    for job in jobs:
        names.record(job, "a.test", [IP1], 60, now=0)
    assert len(names) == 2
    assert names.names_for(jobs[0], IP1, now=1) == set()
    assert names.names_for(jobs[2], IP1, now=1) == {"a.test"}


def test_prune() -> None:
    names = ResolvedNames()
    names.record(JOB_A, "short.test", [IP1], 5, now=0)
    names.record(JOB_A, "long.test", [IP2], 500, now=0)
    names.record(JOB_B, "short.test", [IP1], 5, now=0)
    assert names.prune(now=10) == 2
    assert len(names) == 1
    assert names.size() == 1


def test_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        ResolvedNames(max_per_job=0)
