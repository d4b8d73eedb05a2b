"""The proxy's DNS responder without sockets: a policy for one job, fake flows (the GENEVE
flow table), fake policies and a scripted upstream resolver, and the sandbox peer that asks."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rrset
import structlog
from prometheus_client import CollectorRegistry

from egressd.policy.model import Policy, parse_policy
from egressd.proxy import dns as pdns
from egressd.proxy.context import FlowInfo, PolicyUnavailable, ProxyContext, ProxyIdentity
from egressd.proxy.resolved import ResolvedNames

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
FLEET = (N("198.18.0.0/24"), N("100.96.0.0/16"), N("100.100.100.53/32"))
RESOLVER = A("100.100.100.53")


def make_policy(mode: str = "enforce") -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": str(JOB),
            "account": "acme",
            "nodes": ["node1"],
            "mode": mode,
            "egress": [
                {"host": "api.allowed.test", "ports": [443, 80]},
                {"host": "*.data.allowed.test", "ports": [443]},
                {"cidr": "203.0.113.96/28", "ports": [5432]},
                {"cidr": "10.1.2.0/24", "ports": [8080]},
                {"host": "rebind.allowed.test"},
                {"host": "inner.allowed.test"},
            ],
        },
        require_timestamps=False,
    )


def query(name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, rdtype)


def upstream_answer(
    q: dns.message.Message, *records: tuple[str, int, str, str]
) -> dns.message.Message:
    response = dns.message.make_response(q)
    for owner, ttl, rdtype, value in records:
        response.answer.append(dns.rrset.from_text(owner, ttl, dns.rdataclass.IN, rdtype, value))
    return response


class FakeFlows:
    def __init__(self, known: bool = True) -> None:
        self.known = known
        self.calls: list[tuple[Any, ...]] = []

    def lookup(self, src: A, sport: int, dst: A, dport: int, proto: int) -> FlowInfo | None:
        self.calls.append((src, sport, dst, dport, proto))
        return FlowInfo(JOB, b"\x00" * 8, "node1") if self.known else None


class FakePolicies:
    def __init__(self, policy: Policy | None, reason: str = "policy_missing") -> None:
        self.policy = policy
        self.reason = reason

    async def get(self, job_id: uuid.UUID) -> Any:
        if self.policy is None:
            raise PolicyUnavailable(self.reason)

        class _Verified:
            policy = self.policy

        return _Verified()


class FakeUpstream(pdns.UpstreamResolver):
    def __init__(self, zone: dict[str, list[str]], *, error: str | None = None) -> None:
        super().__init__(A("203.0.113.53"), source=A("203.0.113.21"))
        self.zone = zone
        self.error = error
        self.asked: list[str] = []

    async def query_a(self, name: dns.name.Name | str) -> dns.message.Message:
        text = str(name).rstrip(".").lower()
        self.asked.append(text)
        if self.error is not None:
            raise pdns.UpstreamError(self.error)
        q = dns.message.make_query(name, "A")
        if text not in self.zone:
            response = dns.message.make_response(q)
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        return upstream_answer(q, *((text + ".", 120, "A", ip) for ip in self.zone[text]))


ZONE = {
    "api.allowed.test": ["203.0.113.10"],
    "eu.data.allowed.test": ["203.0.113.11"],
    "rebind.allowed.test": ["169.254.169.254"],
    "evil.test": ["203.0.113.66"],
}


def make_responder(
    *,
    policy: Policy | None = None,
    flows: FakeFlows | None = None,
    upstream: FakeUpstream | None = None,
    reason: str = "policy_missing",
) -> tuple[pdns.DnsResponder, ResolvedNames, CollectorRegistry, FakeUpstream]:
    registry = CollectorRegistry()
    ctx = ProxyContext(
        identity=ProxyIdentity("proxy1", A("198.18.0.21"), A("203.0.113.21")),
        flows=flows or FakeFlows(),
        policies=FakePolicies(policy, reason),
        fleet_ranges=FLEET,
        upstream_resolver=A("203.0.113.53"),
        registry=registry,
        audit=structlog.get_logger("audit"),
    )
    resolved = ResolvedNames()
    up = upstream or FakeUpstream(ZONE)
    responder = pdns.DnsResponder(ctx, resolved, listen=("127.0.0.1", 0), upstream=up)
    return responder, resolved, registry, up


PEER = pdns.DnsPeer(A("100.96.1.2"), 40000, RESOLVER, 17)
