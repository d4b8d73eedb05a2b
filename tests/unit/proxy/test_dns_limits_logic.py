"""The DNS responder's refusal rcode, truncation and per-job limits, without sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from types import SimpleNamespace
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
import structlog

from egressd.policy.model import Policy, parse_policy
from egressd.proxy import dns as pdns
from egressd.proxy.config import ConfigError, config_from_mapping
from egressd.proxy.context import FlowInfo
from tests.support.dns_responder import (
    JOB,
    PEER,
    FakeUpstream,
    make_policy,
    make_responder,
    query,
)

A = ipaddress.IPv4Address
OTHER_JOB = uuid.UUID("7d2f0a51-3e8b-4c1d-a6f2-90b1c4e5d7a8")


def limited_policy(rate: int) -> Policy:
    payload: dict[str, Any] = {
        "v": 1,
        "job_id": str(JOB),
        "account": "acme",
        "nodes": ["node1"],
        "egress": [{"host": "api.allowed.test"}, {"host": "*.data.allowed.test"}],
        "limits": {"dns_queries_per_s": rate},
    }
    return parse_policy(payload, require_timestamps=False)


# --- refusal rcode --------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    ["no_matching_rule", "invalid_host", "rebinding", "unknown_flow", "policy_expired"],
)
def test_refusals_of_a_name_take_the_configured_rcode(reason: str) -> None:
    assert pdns.refusal_rcode(reason) == dns.rcode.NXDOMAIN  # the default
    assert pdns.refusal_rcode(reason, "NXDOMAIN") == dns.rcode.NXDOMAIN
    assert pdns.refusal_rcode(reason, "REFUSED") == dns.rcode.REFUSED


@pytest.mark.parametrize(
    "reason",
    [
        "qtype_not_allowed",
        "qclass_not_in",
        "opcode_not_query",
        "no_question",
        "multiple_questions",
        "dns_rate_limit",
        "dns_inflight_limit",
    ],
)
def test_other_refusals_stay_refused(reason: str) -> None:
    assert pdns.refusal_rcode(reason) == dns.rcode.REFUSED
    assert pdns.refusal_rcode(reason, "NXDOMAIN") == dns.rcode.REFUSED


async def test_handle_with_nxdomain_configured() -> None:
    responder, _, _, _up = make_responder(policy=make_policy())
    responder.refusal_rcode = "NXDOMAIN"
    with structlog.testing.capture_logs() as logs:
        denied = await responder.handle(query("evil.test"), PEER)
        txt = await responder.handle(query("api.allowed.test", "TXT"), PEER)
        aaaa = await responder.handle(query("api.allowed.test", "AAAA"), PEER)
    assert denied is not None and denied.rcode() == dns.rcode.NXDOMAIN
    assert logs[0]["rcode"] == "NXDOMAIN" and logs[0]["reason"] == "no_matching_rule"
    assert txt is not None and txt.rcode() == dns.rcode.REFUSED
    assert aaaa is not None and aaaa.rcode() == dns.rcode.NOERROR
    servfail, _, _, _ = make_responder(
        policy=make_policy(), upstream=FakeUpstream({}, error="upstream_timeout")
    )
    servfail.refusal_rcode = "NXDOMAIN"
    with structlog.testing.capture_logs():
        response = await servfail.handle(query("api.allowed.test"), PEER)
    assert response is not None and response.rcode() == dns.rcode.SERVFAIL


def test_responder_rejects_a_bad_rcode() -> None:
    responder, *_ = make_responder(policy=make_policy())
    with pytest.raises(ValueError, match="refusal_rcode"):
        pdns.DnsResponder(
            responder.ctx,
            responder.resolved,
            listen=("127.0.0.1", 0),
            upstream=responder.upstream,
            limits=responder.limits,
            refusal_rcode="SERVFAIL",
        )


BASE = {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"}


def test_config_rcode() -> None:
    assert config_from_mapping(BASE).dns_refusal_rcode == "NXDOMAIN"
    assert config_from_mapping({**BASE, "dns_refusal_rcode": "REFUSED"}).dns_refusal_rcode == (
        "REFUSED"
    )


@pytest.mark.parametrize("value", ["nxdomain", "SERVFAIL", "", 3, None])
def test_config_rcode_rejected_with_the_field_name(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**BASE, "dns_refusal_rcode": value})
    assert info.value.detail.startswith("dns_refusal_rcode: ")


def test_policy_dns_rate() -> None:
    assert make_policy().limits.dns_queries_per_s == 50  # the default
    assert limited_policy(7).limits.dns_queries_per_s == 7


# --- truncation -----------------------------------------------------------------------


def many(n: int) -> list[tuple[ipaddress.IPv4Address, int]]:
    return [(A(f"203.0.{100 + i // 250}.{1 + i % 250}"), 60) for i in range(n)]


@pytest.mark.parametrize("limit", [512, 1232])
def test_to_wire_keeps_what_fits_with_tc(limit: int) -> None:
    q = dns.message.make_query("many.data.allowed.test", "A")
    wire = pdns.to_wire(pdns.build_response(q, dns.rcode.NOERROR, many(150)), max_size=limit)
    parsed = dns.message.from_wire(wire)
    assert len(wire) <= limit
    assert parsed.flags & dns.flags.TC and parsed.rcode() == dns.rcode.NOERROR
    got = [r.address for rrset in parsed.answer for r in rrset]
    assert 0 < len(got) < 150 and set(got) <= {str(ip) for ip, _ in many(150)}
    # One more would not have fit: the most that fit.
    more = pdns.build_response(q, dns.rcode.NOERROR, many(len(got) + 1))
    assert len(more.to_wire()) > limit


def test_to_wire_whole_over_tcp() -> None:
    q = dns.message.make_query("many.data.allowed.test", "A")
    wire = pdns.to_wire(pdns.build_response(q, dns.rcode.NOERROR, many(150)), max_size=65535)
    parsed = dns.message.from_wire(wire)
    assert not parsed.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in parsed.answer) == 150


def test_to_wire_fits_untouched() -> None:
    q = dns.message.make_query("api.allowed.test", "A")
    wire = pdns.to_wire(pdns.build_response(q, dns.rcode.NOERROR, many(3)), max_size=512)
    assert not dns.message.from_wire(wire).flags & dns.flags.TC


def test_udp_payload_is_capped_against_fragmentation() -> None:
    big = dns.message.make_query("a.test", "A", use_edns=0, payload=4096)
    assert pdns.udp_payload_limit(big) == pdns.MAX_UDP_PAYLOAD == 1232
    small = dns.message.make_query("a.test", "A", use_edns=0, payload=100)
    assert pdns.udp_payload_limit(small) == 512


class ManyUpstream(FakeUpstream):
    """Answers one A RRset of 150 records, as a resolver does."""

    async def query_a(self, name: dns.name.Name | str) -> dns.message.Message:
        response = dns.message.make_response(dns.message.make_query(name, "A"))
        response.answer.append(
            dns.rrset.from_text_list(name, 60, "IN", "A", [str(ip) for ip, _ in many(150)])
        )
        return response


async def test_upstream_answer_with_150_records_reaches_the_client() -> None:
    responder, _, _, _ = make_responder(policy=make_policy(), upstream=ManyUpstream({}))
    q = query("many.data.allowed.test")
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(q, PEER)
    assert response is not None and response.rcode() == dns.rcode.NOERROR
    assert len(logs[0]["answers"]) == 150
    udp = dns.message.from_wire(pdns.to_wire(response, max_size=pdns.udp_payload_limit(q)))
    assert udp.flags & dns.flags.TC and udp.answer


# --- per-job limits in handle() -------------------------------------------------------


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The responder's clock stands still: a rate of 10/s admits exactly 10 of a
    burst however long the burst takes (on a loaded machine 40 queries can take
    long enough for the bucket to refill a few tokens). Only the DNS module's
    `time` is replaced; the event loop's clock runs on."""
    monkeypatch.setattr(pdns, "time", SimpleNamespace(monotonic=lambda: 1000.0))


@pytest.mark.usefixtures("frozen_clock")
async def test_rate_limit_refuses_then_drops_and_counts() -> None:
    responder, _, registry, up = make_responder(policy=limited_policy(10))
    with structlog.testing.capture_logs() as logs:
        results = [await responder.handle(query("api.allowed.test"), PEER) for _ in range(40)]
    answered = [r for r in results[:10] if r is not None and r.rcode() == dns.rcode.NOERROR]
    assert len(answered) == 10 and len(up.asked) == 10  # nothing past the rate went upstream
    refused = [r for r in results[10:] if r is not None]
    assert len(refused) == 10 and all(r.rcode() == dns.rcode.REFUSED for r in refused)
    assert results[20:] == [None] * 20  # past the refusal budget: dropped
    labels = {"job_id": str(JOB), "reason": "dns_rate_limit"}
    assert registry.get_sample_value("egressd_limit_refusals_total", labels) == 30
    assert registry.get_sample_value("egressd_dns_queries_total", {"verdict": "drop"}) == 20
    assert registry.get_sample_value("egressd_dns_queries_total", {"verdict": "deny"}) == 10
    dropped = registry.get_sample_value("egressd_dns_dropped_total", {"reason": "dns_rate_limit"})
    assert dropped == 20
    limited = [e for e in logs if e["reason"] == "dns_rate_limit"]
    assert len(limited) == 1 and limited[0]["suppressed"] == 0  # sampled, not one per query
    assert limited[0]["job_id"] == str(JOB) and limited[0]["log_level"] == "warning"


@pytest.mark.usefixtures("frozen_clock")
async def test_denied_names_spend_the_rate_too() -> None:
    responder, _, _, up = make_responder(policy=limited_policy(10))
    with structlog.testing.capture_logs():
        for _ in range(10):
            await responder.handle(query("evil.test"), PEER)
        response = await responder.handle(query("api.allowed.test"), PEER)
    assert response is not None and response.rcode() == dns.rcode.REFUSED
    assert up.asked == []


class SlowUpstream(FakeUpstream):
    def __init__(self) -> None:
        super().__init__({"api.allowed.test": ["203.0.113.10"]})
        self.release = asyncio.Event()

    async def query_a(self, name: dns.name.Name | str) -> dns.message.Message:
        await self.release.wait()
        return await super().query_a(name)


async def test_inflight_cap_per_job() -> None:
    upstream = SlowUpstream()
    responder, _, registry, _ = make_responder(policy=limited_policy(1000), upstream=upstream)
    responder.limits.dns.max_inflight_per_job = 3
    with structlog.testing.capture_logs():
        waiting = [
            asyncio.create_task(responder.handle(query("api.allowed.test"), PEER)) for _ in range(3)
        ]
        await asyncio.sleep(0)
        over = await responder.handle(query("api.allowed.test"), PEER)
        assert over is not None and over.rcode() == dns.rcode.REFUSED
        upstream.release.set()
        done = await asyncio.gather(*waiting)
    assert all(r is not None and r.rcode() == dns.rcode.NOERROR for r in done)
    assert responder.limits.dns.inflight(JOB) == 0  # released, also on the way out
    labels = {"job_id": str(JOB), "reason": "dns_inflight_limit"}
    assert registry.get_sample_value("egressd_limit_refusals_total", labels) == 1


async def test_admitted_on_receipt_is_not_charged_twice() -> None:
    responder, _, _, up = make_responder(policy=limited_policy(8))
    with structlog.testing.capture_logs():
        assert await responder.handle(query("api.allowed.test"), PEER) is not None
        for _ in range(7):  # the fast path took these tokens
            assert responder.limits.dns.take_known(JOB, 0.0) is not None
        response = await responder.handle(query("api.allowed.test"), PEER, admitted=True)
    assert response is not None and response.rcode() == dns.rcode.NOERROR
    assert len(up.asked) == 2


class CountingFlows:
    def __init__(self) -> None:
        self.calls = 0

    def lookup(self, src: Any, sport: int, dst: Any, dport: int, proto: int) -> FlowInfo:
        self.calls += 1
        return FlowInfo(JOB, b"\x00" * 8, "node1")


def test_flood_on_receipt_costs_no_task() -> None:
    responder, _, registry, _ = make_responder(policy=limited_policy(8))
    wire = query("x.evil.test").to_wire()
    assert responder._admit_on_receipt(wire, PEER) == (None, JOB)  # rate unknown: policy first
    responder.limits.dns.admit(JOB, rate=8, now=0.0)
    for _ in range(7):
        responder.limits.dns.admit(JOB, rate=8, now=0.0)
    sent: list[bytes] = []
    responder._send_udp = lambda wire, peer: sent.append(wire)  # type: ignore[method-assign]
    with structlog.testing.capture_logs():
        results = [responder._admit_on_receipt(wire, PEER)[0] for _ in range(100)]
    assert results.count(False) >= 90
    assert 1 <= len(sent) <= 10  # the refusal budget; the rest dropped without a reply
    assert all(dns.message.from_wire(w).rcode() == dns.rcode.REFUSED for w in sent)
    assert registry.get_sample_value(
        "egressd_limit_refusals_total", {"job_id": str(JOB), "reason": "dns_rate_limit"}
    ) == results.count(False)


def test_other_jobs_are_not_limited_by_a_flood() -> None:
    responder, *_ = make_responder(policy=limited_policy(8))
    for _ in range(100):
        responder.limits.dns.admit(JOB, rate=8, now=0.0)
    assert responder.limits.dns.admit(OTHER_JOB, rate=8, now=0.0) is None


async def test_a_jobs_burst_waits_in_its_own_lane() -> None:
    """A burst from one job (within its rate: it holds tokens) is answered
    `LANE_WIDTH` at a time; another job's query that comes after the burst is
    answered among the burst's first queries, not behind all of it."""
    responder, *_ = make_responder()
    order: list[uuid.UUID] = []

    async def answer(wire: bytes, peer: pdns.DnsPeer, *, admitted: bool = False) -> None:
        await asyncio.sleep(0)  # parse, policy, upstream: the query yields at least once
        order.append(JOB if peer.sport < 50000 else OTHER_JOB)

    responder._udp_query = answer  # type: ignore[method-assign]
    burst = 50
    for i in range(burst):
        responder._start_udp(b"", pdns.DnsPeer(PEER.src, 40000 + i, PEER.dst, 17), True, JOB)
    responder._start_udp(b"", pdns.DnsPeer(PEER.src, 50001, PEER.dst, 17), True, OTHER_JOB)
    assert responder._lane_active == {JOB: pdns.LANE_WIDTH, OTHER_JOB: 1}
    for _ in range(10 * burst):
        if len(order) == burst + 1:
            break
        await asyncio.sleep(0)
    assert len(order) == burst + 1
    assert order.index(OTHER_JOB) <= pdns.LANE_WIDTH
    for _ in range(5):  # the last tasks' done callbacks
        await asyncio.sleep(0)
    assert responder._lane_active == {} and responder._lane_waiting == {}
