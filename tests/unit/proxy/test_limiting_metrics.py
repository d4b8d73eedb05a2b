"""`ProxyLimits`' metrics: the admitted gauge read when scraped, refusals counted per label set."""

from __future__ import annotations

import ipaddress
import uuid

from prometheus_client import CollectorRegistry

from egressd.limits.ports import Destination, PortPoolConfig
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


def test_shares_follow_the_proxy_count_and_the_limits_object() -> None:
    registry = CollectorRegistry()
    pool = PortPoolConfig(addresses=(ipaddress.IPv4Address("203.0.113.21"),))
    proxies = [1]
    limits = ProxyLimits(
        LimitsConfig(port_pool=pool), registry=registry, proxy_count=lambda: proxies[0]
    )
    four = Limits(max_connections=4, bandwidth_bps=8_000)
    for _ in range(4):
        assert limits.admit(JOB, four, 100.0) is None
    assert limits.admit(JOB, four, 100.0) == "job_connection_limit"
    assert limits.pacing(JOB, four)._rate_bps == 8_000
    proxies[0] = 2  # the same Limits object, another fleet size: this proxy's share halves
    assert limits.pacing(JOB, four)._rate_bps == 4_000
    for _ in range(3):
        limits.release(JOB)
    assert limits.admit(JOB, four, 100.0) is None
    assert limits.admit(JOB, four, 100.0) == "job_connection_limit"  # 2 of ceil(4 / 2)
    # Another Limits object (a refreshed policy), equal or not, is shared afresh.
    assert limits.admit(JOB, Limits(max_connections=6), 100.0) is None  # 3 of ceil(6 / 2)
    assert limits.admit(JOB, Limits(max_connections=6), 100.0) == "job_connection_limit"
    assert registry.get_sample_value("egressd_job_connections", {"job_id": str(JOB)}) == 3


def test_source_port_gauges_follow_leases() -> None:
    limits, registry = _limits()
    dst = Destination(ipaddress.IPv4Address("198.51.100.1"), 443)
    leases = [limits.acquire_port(JOB, dst, Limits(), 100.0) for _ in range(3)]
    job_ports = {"job_id": str(JOB), "destination": str(dst)}
    in_use = {"egress": "203.0.113.21", "destination": str(dst)}
    assert registry.get_sample_value("egressd_job_source_ports", job_ports) == 3
    assert registry.get_sample_value("egressd_source_ports_in_use", in_use) == 3
    for lease in leases:
        assert not isinstance(lease, str)
        limits.release_port(lease, 100.0, time_wait=False)
    assert registry.get_sample_value("egressd_job_source_ports", job_ports) == 0
    assert registry.get_sample_value("egressd_source_ports_in_use", in_use) == 0
    limits.prune(200.0, 200.0)  # at zero: the series go
    assert registry.get_sample_value("egressd_job_source_ports", job_ports) is None
    assert registry.get_sample_value("egressd_source_ports_in_use", in_use) is None
