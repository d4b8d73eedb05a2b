"""`ProxyLimits`' metrics: the admitted gauge read when scraped, refusals counted per label set."""

from __future__ import annotations

import ipaddress
import uuid

from prometheus_client import CollectorRegistry

from egressd.limits.ports import PortPoolConfig
from egressd.policy.model import Limits
from egressd.proxy.limiting import LimitsConfig, ProxyLimits

JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")


def _limits() -> tuple[ProxyLimits, CollectorRegistry]:
    registry = CollectorRegistry()
    pool = PortPoolConfig(addresses=(ipaddress.IPv4Address("203.0.113.21"),))
    return ProxyLimits(LimitsConfig(port_pool=pool), registry=registry), registry


def test_admitted_gauge_follows_admissions_and_releases() -> None:
    limits, registry = _limits()
    policy_limits = Limits(max_connections=8)
    for _ in range(3):
        assert limits.admit(JOB, policy_limits, 100.0) is None
    assert registry.get_sample_value("egressd_connections_admitted") == 3
    assert registry.get_sample_value("egressd_job_connections", {"job_id": str(JOB)}) == 3
    limits.release(JOB)
    assert registry.get_sample_value("egressd_connections_admitted") == 2
    assert registry.get_sample_value("egressd_job_connections", {"job_id": str(JOB)}) == 2


def test_refusals_counted_per_job_and_reason_with_and_without_a_job() -> None:
    limits, registry = _limits()
    for _ in range(3):
        limits.refused(JOB, "job_connection_limit")
    limits.refused(None, "proxy_connection_limit")
    limits.dns_refused(JOB, "dns_rate_limit")
    limits.dns_refused(JOB, "dns_rate_limit")

    def refusals(job: str, reason: str) -> float | None:
        labels = {"job_id": job, "reason": reason}
        return registry.get_sample_value("egressd_limit_refusals_total", labels)

    assert refusals(str(JOB), "job_connection_limit") == 3
    assert refusals("", "proxy_connection_limit") == 1
    assert refusals(str(JOB), "dns_rate_limit") == 2
