"""Tier-1 token buckets from a policy, and their per-sandbox counters in /metrics (pure)."""

from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from egressd.agent.datapath import _tier1_sandbox_family
from egressd.agent.sandboxes import tier1_buckets
from egressd.agent.tier1_maps import MIN_BURST, Bucket, Count, Reason, Tier1Error
from egressd.policy.model import Limits, parse_policy

JOB = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"


class FakeSandbox(NamedTuple):
    sandbox_id: str
    job_id: uuid.UUID


def _policy(**limits: int) -> Any:
    now = int(time.time())
    return parse_policy(
        {
            "v": 1,
            "job_id": JOB,
            "account": "acme",
            "nodes": ["node1"],
            "iat": now - 10,
            "nbf": now - 10,
            "exp": now + 600,
            "egress": [{"host": "api.allowed.test", "ports": [443]}],
            **({"limits": limits} if limits else {}),
        }
    )


def test_default_policy_buckets() -> None:
    dns, syn = tier1_buckets(_policy())
    assert dns == Bucket.per_second(Limits().dns_queries_per_s)
    assert dns == Bucket(20_000_000, 50 * 20_000_000)
    assert syn == Bucket.per_second(Limits().max_new_connections_per_s)
    assert (dns.burst, syn.burst) == (50, 200)


def test_policy_rates_and_minimum_burst() -> None:
    dns, syn = tier1_buckets(_policy(dns_queries_per_s=2, max_new_connections_per_s=1000))
    assert (dns.rate_per_s, dns.burst) == (2, MIN_BURST)
    assert (syn.rate_per_s, syn.burst) == (1000, 1000)


@pytest.mark.parametrize(
    ("name", "value"), [("dns_queries_per_s", 10_000), ("max_new_connections_per_s", 100_000)]
)
def test_policy_bounds_fit_a_bucket(name: str, value: int) -> None:
    # The highest rate a policy accepts must encode (tier 1 would refuse the sandbox).
    buckets = tier1_buckets(_policy(**{name: value}))
    assert max(b.rate_per_s for b in buckets) == value


def test_bucket_refuses_what_policy_bounds_forbid() -> None:
    with pytest.raises(Tier1Error):
        Bucket.per_second(0)


class _Family(Collector):
    def __init__(self, data: dict[Any, dict[Reason, Count]]) -> None:
        self.data = data

    def collect(self):  # type: ignore[no-untyped-def]
        yield _tier1_sandbox_family(lambda: self.data)


def _text(data: dict[Any, dict[Reason, Count]]) -> str:
    registry = CollectorRegistry()
    registry.register(_Family(data))
    return generate_latest(registry).decode()


def test_per_sandbox_family_labels_each_sandbox() -> None:
    job = uuid.UUID(JOB)
    attacker = FakeSandbox("sbx-flood", job)
    quiet = FakeSandbox("sbx-quiet", job)
    text = _text(
        {
            attacker: {
                Reason.SYN_RATE_LIMIT: Count(1290, 77_400),
                Reason.REDIRECTED: Count(210, 1),
            },
            quiet: {Reason.REDIRECTED: Count(7, 420)},
        }
    )
    labels = f'job_id="{JOB}",reason="syn_rate_limit",sandbox_id="sbx-flood",verdict="drop"'
    assert f"egressd_tier1_sandbox_packets_total{{{labels}}} 1290.0" in text
    labels = f'job_id="{JOB}",reason="redirected",sandbox_id="sbx-quiet",verdict="redirect"'
    assert f"egressd_tier1_sandbox_packets_total{{{labels}}} 7.0" in text
    # Only reasons that counted: no zero series per sandbox and reason.
    assert 'reason="syn_rate_limit",sandbox_id="sbx-quiet"' not in text
    assert text.count("egressd_tier1_sandbox_packets_total{") == 3


def test_per_sandbox_family_survives_a_failed_map_read() -> None:
    def broken() -> dict[Any, dict[Reason, Count]]:
        raise Tier1Error("map_failed", "lookup t1_counters: gone")

    registry = CollectorRegistry()

    class Broken(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield _tier1_sandbox_family(broken)

    registry.register(Broken())
    text = generate_latest(registry).decode()
    assert "# TYPE egressd_tier1_sandbox_packets_total counter" in text
    assert "egressd_tier1_sandbox_packets_total{" not in text
