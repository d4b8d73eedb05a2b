"""The DNS responder's decisions, without sockets: pure functions and `handle`."""

from __future__ import annotations

import ipaddress
import time

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import structlog

from egressd.proxy import dns as pdns
from tests.support.dns_responder import (
    FLEET,
    JOB,
    PEER,
    RESOLVER,
    ZONE,
    FakeFlows,
    FakeUpstream,
    make_policy,
    make_responder,
    query,
    upstream_answer,
)

A = ipaddress.IPv4Address

# --- answer_policy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rdtype", "kind", "rcode", "verdict", "reason"),
    [
        ("api.allowed.test", "A", "forward", "NOERROR", "allow", "allowed_host"),
        ("API.Allowed.TEST.", "A", "forward", "NOERROR", "allow", "allowed_host"),
        ("eu.data.allowed.test", "A", "forward", "NOERROR", "allow", "allowed_host"),
        ("api.allowed.test", "AAAA", "respond", "NOERROR", "allow", "ipv6_unsupported"),
        ("evil.test", "A", "respond", "REFUSED", "deny", "no_matching_rule"),
        ("evil.test", "AAAA", "respond", "REFUSED", "deny", "no_matching_rule"),
        ("a.b.data.allowed.test", "A", "respond", "REFUSED", "deny", "no_matching_rule"),
        ("api.allowed.test", "TXT", "respond", "REFUSED", "deny", "qtype_not_allowed"),
        ("api.allowed.test", "ANY", "respond", "REFUSED", "deny", "qtype_not_allowed"),
        ("api.allowed.test", "MX", "respond", "REFUSED", "deny", "qtype_not_allowed"),
        ("api.allowed.test", "CNAME", "respond", "REFUSED", "deny", "qtype_not_allowed"),
        ("exfil-c2VjcmV0.evil.test", "TXT", "respond", "REFUSED", "deny", "qtype_not_allowed"),
        ("under_score.allowed.test", "A", "respond", "REFUSED", "deny", "invalid_host"),
        ("1.2.3.4", "A", "respond", "REFUSED", "deny", "invalid_host"),
        ("203.0.113.100", "A", "respond", "REFUSED", "deny", "invalid_host"),
    ],
)
def test_answer_policy(
    name: str, rdtype: str, kind: str, rcode: str, verdict: str, reason: str
) -> None:
    action = pdns.answer_policy(make_policy(), query(name, rdtype))
    assert (action.kind, dns.rcode.to_text(action.rcode), action.verdict, action.reason) == (
        kind,
        rcode,
        verdict,
        reason,
    )


def test_multiple_questions_refused() -> None:
    q = query("api.allowed.test")
    q.question.append(
        dns.rrset.RRset(dns.name.from_text("evil.test"), dns.rdataclass.IN, dns.rdatatype.A)
    )
    assert pdns.answer_policy(make_policy(), q).reason == "multiple_questions"


def test_no_question_refused() -> None:
    q = dns.message.Message()
    assert pdns.answer_policy(make_policy(), q).reason == "no_question"


def test_other_class_refused() -> None:
    q = dns.message.make_query("api.allowed.test", "A", rdclass="CH")
    assert pdns.answer_policy(make_policy(), q).reason == "qclass_not_in"


def test_other_opcode_refused() -> None:
    q = query("api.allowed.test")
    q.set_opcode(dns.opcode.UPDATE)
    assert pdns.answer_policy(make_policy(), q).reason == "opcode_not_query"


def test_report_mode_resolves_but_flags() -> None:
    policy = make_policy("report")
    action = pdns.apply_dns_mode(policy, pdns.answer_policy(policy, query("evil.test")))
    assert (action.kind, action.verdict, action.would_deny) == ("forward", "allow", True)
    # Query types stay enforced in report mode.
    txt = pdns.apply_dns_mode(policy, pdns.answer_policy(policy, query("evil.test", "TXT")))
    assert (txt.kind, txt.verdict) == ("respond", "deny")
    enforce = make_policy()
    denied = pdns.apply_dns_mode(enforce, pdns.answer_policy(enforce, query("evil.test")))
    assert denied.verdict == "deny"


# --- filter_answers -------------------------------------------------------------------


def test_filter_keeps_public_answers() -> None:
    q = query("api.allowed.test")
    r = upstream_answer(q, ("api.allowed.test.", 300, "A", "203.0.113.10"))
    out = pdns.filter_answers(r, FLEET)
    assert out.kept == ((A("203.0.113.10"), 300),)
    assert out.reason is None


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "127.0.0.1", "10.0.0.1", "100.96.1.5", "198.18.0.2", "0.0.0.0"]
)
def test_filter_drops_rebinding(address: str) -> None:
    q = query("rebind.allowed.test")
    r = upstream_answer(q, ("rebind.allowed.test.", 60, "A", address))
    out = pdns.filter_answers(r, FLEET)
    assert out.kept == ()
    assert out.reason == "rebinding"


def test_filter_mixed_keeps_the_public_part() -> None:
    q = query("rebind.allowed.test")
    r = upstream_answer(q, ("rebind.allowed.test.", 60, "A", "203.0.113.10"))
    r.answer[0].add(dns.rdata.from_text("IN", "A", "169.254.169.254"))
    out = pdns.filter_answers(r, FLEET)
    assert out.kept == ((A("203.0.113.10"), 60),)
    assert out.dropped == ((A("169.254.169.254"), "deny_link_local"),)
    assert out.reason is None


def test_filter_exact_cidr_override() -> None:
    q = query("inner.allowed.test")
    r = upstream_answer(q, ("inner.allowed.test.", 60, "A", "10.1.2.7"))
    assert pdns.filter_answers(r, FLEET).reason == "rebinding"
    assert pdns.filter_answers(r, FLEET, policy=make_policy()).kept == ((A("10.1.2.7"), 60),)


def test_filter_follows_cname_chain_with_smallest_ttl() -> None:
    q = query("api.allowed.test")
    r = upstream_answer(
        q,
        ("api.allowed.test.", 30, "CNAME", "lb.cdn.test."),
        ("lb.cdn.test.", 300, "CNAME", "edge.cdn.test."),
        ("edge.cdn.test.", 120, "A", "203.0.113.10"),
        ("unrelated.test.", 120, "A", "203.0.113.66"),
    )
    assert pdns.filter_answers(r, FLEET).kept == ((A("203.0.113.10"), 30),)


def test_filter_ignores_unrelated_records() -> None:
    q = query("api.allowed.test")
    r = upstream_answer(q, ("evil.test.", 300, "A", "203.0.113.66"))
    out = pdns.filter_answers(r, FLEET)
    assert out == pdns.FilteredAnswers((), (), None)


def test_cname_loop_terminates() -> None:
    q = query("a.test")
    r = upstream_answer(q, ("a.test.", 30, "CNAME", "b.test."), ("b.test.", 30, "CNAME", "a.test."))
    assert pdns.filter_answers(r, FLEET).kept == ()


# --- wire helpers ---------------------------------------------------------------------


def test_build_response_uses_the_clients_name_and_case() -> None:
    q = query("ApI.AlLoWeD.TeSt")
    response = pdns.build_response(
        q, dns.rcode.NOERROR, [(A("203.0.113.10"), 60), (A("203.0.113.12"), 30)]
    )
    wire = response.to_wire()
    assert b"ApI" in wire
    assert response.id == q.id
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RA
    (rrset,) = response.answer
    assert rrset.ttl == 30 and len(rrset) == 2


def test_to_wire_truncates() -> None:
    q = query("api.allowed.test")
    answers = [(A(f"203.0.113.{i}"), 60) for i in range(1, 60)]
    wire = pdns.to_wire(pdns.build_response(q, dns.rcode.NOERROR, answers), max_size=512)
    parsed = dns.message.from_wire(wire)
    assert len(wire) <= 512 and parsed.flags & dns.flags.TC


@pytest.mark.parametrize(
    "wire",
    [b"", b"\x00", b"garbage that is not dns", b"\xff" * 12 + b"\x01" * 30],
)
def test_parse_query_garbage(wire: bytes) -> None:
    assert pdns.parse_query(wire) is None


def test_parse_query_refuses_responses() -> None:
    q = query("api.allowed.test")
    assert pdns.parse_query(q.to_wire()) is not None
    assert pdns.parse_query(dns.message.make_response(q).to_wire()) is None


def test_udp_payload_limit() -> None:
    assert pdns.udp_payload_limit(query("a.test")) == 512
    edns = dns.message.make_query("a.test", "A", use_edns=0, payload=1232)
    assert pdns.udp_payload_limit(edns) == 1232


# --- handle(): the whole exchange, scripted ------------------------------------------


async def test_handle_allowed_forwards_and_records() -> None:
    responder, resolved, registry, up = make_responder(policy=make_policy())
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(query("api.allowed.test"), PEER)
        assert response is not None
    assert response.rcode() == dns.rcode.NOERROR
    assert [str(r) for rrset in response.answer for r in rrset] == ["203.0.113.10"]
    assert up.asked == ["api.allowed.test"]
    assert resolved.names_for(JOB, A("203.0.113.10"), now=time.monotonic()) == {"api.allowed.test"}
    (event,) = logs
    assert event["event"] == "dns" and event["verdict"] == "allow" and event["log_level"] == "info"
    assert event["answers"] == ["203.0.113.10"] and event["job_id"] == str(JOB)
    assert event["account"] == "acme" and event["node"] == "node1" and event["qtype"] == "A"
    assert registry.get_sample_value("egressd_dns_queries_total", {"verdict": "allow"}) == 1


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "verdict", "reason"),
    [
        ("evil.test", "A", "NXDOMAIN", "deny", "no_matching_rule"),
        ("api.allowed.test", "TXT", "REFUSED", "deny", "qtype_not_allowed"),
        ("api.allowed.test", "AAAA", "NOERROR", "allow", "ipv6_unsupported"),
        ("rebind.allowed.test", "A", "NXDOMAIN", "deny", "rebinding"),
        ("nx.data.allowed.test", "A", "NXDOMAIN", "allow", "nxdomain"),
    ],
)
async def test_handle_outcomes(
    name: str, rdtype: str, rcode: str, verdict: str, reason: str
) -> None:
    responder, resolved, registry, up = make_responder(policy=make_policy())
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(query(name, rdtype), PEER)
        assert response is not None
    assert dns.rcode.to_text(response.rcode()) == rcode
    assert not response.answer
    (event,) = logs
    assert (event["verdict"], event["reason"]) == (verdict, reason)
    assert event["log_level"] == ("info" if verdict == "allow" else "warning")
    if rdtype != "A" or reason == "no_matching_rule":
        assert up.asked == []  # refused names never reach the upstream
    assert resolved.size() == 0
    assert registry.get_sample_value("egressd_dns_queries_total", {"verdict": verdict}) == 1


async def test_handle_unknown_flow() -> None:
    responder, _, _, up = make_responder(policy=make_policy(), flows=FakeFlows(known=False))
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(query("api.allowed.test"), PEER)
        assert response is not None
    assert response.rcode() == dns.rcode.NXDOMAIN  # a refusal of a name: the default rcode
    assert logs[0]["reason"] == "unknown_flow" and logs[0]["job_id"] is None
    assert up.asked == []


async def test_handle_policy_unavailable_fails_closed() -> None:
    responder, _, _, up = make_responder(policy=None, reason="policy_expired")
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(query("api.allowed.test"), PEER)
        assert response is not None
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert logs[0]["reason"] == "policy_expired"
    assert up.asked == []


async def test_handle_upstream_timeout_is_servfail() -> None:
    responder, _, _, _ = make_responder(
        policy=make_policy(), upstream=FakeUpstream(ZONE, error="upstream_timeout")
    )
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(query("api.allowed.test"), PEER)
        assert response is not None
    assert response.rcode() == dns.rcode.SERVFAIL
    assert logs[0]["reason"] == "upstream_timeout"


async def test_handle_report_mode() -> None:
    responder, _, _, _ = make_responder(policy=make_policy("report"))
    with structlog.testing.capture_logs() as logs:
        response = await responder.handle(query("evil.test"), PEER)
        assert response is not None
    assert [str(r) for rrset in response.answer for r in rrset] == ["203.0.113.66"]
    assert logs[0]["would_deny"] is True and logs[0]["log_level"] == "warning"


async def test_flow_lookup_uses_original_destination_and_proto() -> None:
    flows = FakeFlows()
    responder, _, _, _ = make_responder(policy=make_policy(), flows=flows)
    with structlog.testing.capture_logs():
        await responder.handle(query("api.allowed.test"), PEER)
    assert flows.calls == [(A("100.96.1.2"), 40000, RESOLVER, 53, 17)]
