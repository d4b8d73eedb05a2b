"""`egressd.proxy.job_metrics`: denials per job, with bounded label sets."""

from __future__ import annotations

import ipaddress
import uuid

import aiohttp
import pytest
import structlog
from prometheus_client import CollectorRegistry

from egressd.proxy import job_metrics
from egressd.proxy.context import FlowInfo, ProxyContext, ProxyIdentity
from egressd.proxy.job_metrics import CONNECTION, DNS, IDLE_S, SWEEP_INTERVAL_S, JobDenials
from tests.support.control import (
    JOB,
    OTHER,
    T0,
    TTL,
    Env,
    FakeControl,
    settle,
    token,
)

A = uuid.UUID("11111111-1111-4111-8111-111111111111")
B = uuid.UUID("22222222-2222-4222-8222-222222222222")
C = uuid.UUID("33333333-3333-4333-8333-333333333333")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def value(registry: CollectorRegistry, job: uuid.UUID, kind: str, reason: str) -> float | None:
    return registry.get_sample_value(
        "egressd_job_denials_total", {"job_id": str(job), "kind": kind, "reason": reason}
    )


def labelled_jobs(registry: CollectorRegistry) -> set[str]:
    return {
        sample.labels["job_id"]
        for family in registry.collect()
        if family.name == "egressd_job_denials"
        for sample in family.samples
    }


def flow(job: uuid.UUID) -> FlowInfo:
    return FlowInfo(job, b"\0" * 8, "node1")


def test_denials_are_counted_by_job_kind_and_reason() -> None:
    registry = CollectorRegistry()
    denials = JobDenials(registry)
    denials.connection(flow(A), "deny", "no_matching_rule")
    denials.connection(flow(A), "deny", "no_matching_rule")
    denials.dns(flow(A), "deny", "no_matching_rule")
    denials.dns(flow(B), "drop", "dns_rate_limit")  # dropped over a limit: a denial too
    assert value(registry, A, CONNECTION, "no_matching_rule") == 2
    assert value(registry, A, DNS, "no_matching_rule") == 1
    assert value(registry, B, DNS, "dns_rate_limit") == 1
    assert labelled_jobs(registry) == {str(A), str(B)}


def test_allowed_and_jobless_are_not_counted() -> None:
    registry = CollectorRegistry()
    denials = JobDenials(registry)
    denials.connection(flow(A), "allow", "allowed_host")
    denials.dns(flow(A), "allow", "no_matching_rule")  # report mode: would_deny, allowed
    denials.dns(None, "deny", "unknown_flow")
    denials.connection(None, "deny", "unknown_flow")
    assert labelled_jobs(registry) == set()


def test_a_revoked_policy_removes_the_jobs_series_at_once() -> None:
    registry = CollectorRegistry()
    denials = JobDenials(registry)
    denials.dns(flow(A), "deny", "no_matching_rule")
    denials.connection(flow(A), "deny", "denied_range")
    denials.dns(flow(B), "deny", "no_matching_rule")
    denials.policy_changed(A, object(), object())  # replaced: the job goes on
    assert labelled_jobs(registry) == {str(A), str(B)}
    denials.policy_changed(A, object(), None)  # revoked
    assert labelled_jobs(registry) == {str(B)}
    assert value(registry, A, CONNECTION, "denied_range") is None
    assert denials.jobs() == [B]
    denials.dns(flow(A), "deny", "policy_missing")  # counted again, from zero
    assert value(registry, A, DNS, "policy_missing") == 1
    assert value(registry, A, DNS, "no_matching_rule") is None


def test_the_cap_evicts_the_job_denied_least_recently() -> None:
    registry = CollectorRegistry()
    denials = JobDenials(registry, max_jobs=2)
    denials.dns(flow(A), "deny", "no_matching_rule")
    denials.dns(flow(B), "deny", "no_matching_rule")
    denials.dns(flow(A), "deny", "invalid_host")  # A is now the most recent
    denials.dns(flow(C), "deny", "no_matching_rule")
    assert labelled_jobs(registry) == {str(A), str(C)}
    assert registry.get_sample_value("egressd_job_denials_evicted_total") == 1
    assert value(registry, A, DNS, "invalid_host") == 1
    with pytest.raises(ValueError, match="max_jobs"):
        JobDenials(CollectorRegistry(), max_jobs=0)


def test_sweep_removes_idle_jobs_whose_policy_is_gone() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    held = {B}
    denials = JobDenials(registry, holds=held.__contains__, monotonic=clock)
    denials.dns(flow(A), "deny", "policy_missing")
    denials.dns(flow(B), "deny", "no_matching_rule")
    clock.now += IDLE_S - 1
    assert denials.sweep() == []  # A: not held, but denied recently (a scrape may see it)
    clock.now += 2
    assert denials.sweep() == [A]
    assert labelled_jobs(registry) == {str(B)}
    held.clear()  # B's policy expired or was evicted
    denials.dns(flow(C), "deny", "no_matching_rule")  # within SWEEP_INTERVAL_S: no sweep
    assert str(B) in labelled_jobs(registry)
    clock.now += SWEEP_INTERVAL_S
    denials.dns(flow(C), "deny", "no_matching_rule")  # a denial runs the due sweep
    assert labelled_jobs(registry) == {str(C)}


def test_without_holds_sweep_removes_nothing() -> None:
    clock = Clock()
    denials = JobDenials(CollectorRegistry(), monotonic=clock)
    denials.dns(flow(A), "deny", "no_matching_rule")
    clock.now += 10 * IDLE_S
    assert denials.sweep() == [] and denials.jobs() == [A]


class Policies:
    def __init__(self) -> None:
        self.listeners: list[object] = []

    def holds(self, job_id: uuid.UUID) -> bool:
        return False

    async def get(self, job_id: uuid.UUID) -> object:
        raise AssertionError("not used")


def context(registry: CollectorRegistry, policies: object) -> ProxyContext:
    addr = ipaddress.IPv4Address
    return ProxyContext(
        identity=ProxyIdentity("proxy1", addr("198.18.0.21"), addr("203.0.113.21")),
        flows=None,  # type: ignore[arg-type]
        policies=policies,  # type: ignore[arg-type]
        fleet_ranges=(),
        upstream_resolver=addr("203.0.113.53"),
        registry=registry,
        audit=structlog.get_logger("audit"),
    )


def test_on_is_one_instance_per_registry_subscribed_once() -> None:
    registry, policies = CollectorRegistry(), Policies()
    first = job_metrics.on(context(registry, policies))
    assert job_metrics.on(context(registry, policies)) is first
    assert policies.listeners == [first.policy_changed]
    assert job_metrics.on(context(CollectorRegistry(), policies)) is not first


async def test_with_a_policy_store(control: FakeControl, session: aiohttp.ClientSession) -> None:
    """The store's revocation (a 404) and expiry reach the series."""
    control.policies[str(JOB)] = token()
    control.policies[str(OTHER)] = token(OTHER)
    env = Env(control, session)
    denials = JobDenials(env.metrics, holds=env.store.holds, monotonic=env.mono)
    env.store.listeners.append(denials.policy_changed)
    assert not env.store.holds(JOB)
    await env.store.get(JOB)
    await env.store.get(OTHER)
    assert env.store.holds(JOB) and env.store.holds(OTHER)
    denials.dns(flow(JOB), "deny", "no_matching_rule")
    denials.connection(flow(OTHER), "deny", "no_matching_rule")
    # The job is deleted at the control plane: the 404 revokes it, and its series go.
    control.policies[str(JOB)] = 404
    env.mono.now += 10
    env.store.request_refresh(JOB)
    await settle()
    assert labelled_jobs(env.metrics) == {str(OTHER)}
    # OTHER's policy expires: no longer held (and holds() fetched nothing), swept.
    hits = control.hits[str(OTHER)]
    env.clock.now = T0 + TTL
    assert not env.store.holds(OTHER)
    await settle()
    assert control.hits[str(OTHER)] == hits
    env.mono.now += IDLE_S
    assert denials.sweep() == [OTHER]
    assert labelled_jobs(env.metrics) == set()
