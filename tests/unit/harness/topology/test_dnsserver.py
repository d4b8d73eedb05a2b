"""The "internet"'s DNS answers, without sockets: A, wildcard, NXDOMAIN, REFUSED, TXT, malformed."""

from __future__ import annotations

import random

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from egressd.layout import default_layout
from egressd_harness.topology.dnsserver import TTL, DnsStats, Zone, answer, handle_wire

ZONE = Zone.from_layout(default_layout())


def ask(name: str, rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    return answer(dns.message.make_query(name, rdtype, **kwargs), ZONE)  # type: ignore[arg-type]


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(
        rd.to_text() for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset
    )


def has_soa(response: dns.message.Message) -> bool:
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)


@pytest.mark.parametrize("site", default_layout().sites, ids=lambda s: s.name)
def test_a_record_for_every_site(site: object) -> None:
    response = ask(site.name)  # type: ignore[attr-defined]
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == [str(site.address)]  # type: ignore[attr-defined]
    assert response.answer[0].ttl == TTL == 60


def test_answer_is_authoritative_not_recursive_and_echoes_the_query() -> None:
    query = dns.message.make_query("api.allowed.test", "A")
    response = answer(query, ZONE)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    assert response.flags & dns.flags.AA
    assert not response.flags & dns.flags.RA
    assert response.question == query.question
    assert query.is_response(response)


def test_names_are_case_insensitive_and_keep_the_asked_case() -> None:
    response = ask("API.Allowed.TEST")
    assert addresses(response) == ["203.0.113.10"]
    assert response.answer[0].name.to_text() == "API.Allowed.TEST."


@pytest.mark.parametrize(
    "name", ["x.data.allowed.test", "eu-west-1.data.allowed.test", "a.b.data.allowed.test"]
)
def test_wildcard_answers_below_data_allowed_test(name: str) -> None:
    response = ask(name)
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == ["203.0.113.11"]
    assert response.answer[0].name == dns.name.from_text(name)


def test_wildcard_does_not_cover_names_below_an_existing_name() -> None:
    # eu.data.allowed.test exists, so it is the closest encloser (RFC 4592).
    response = ask("a.eu.data.allowed.test")
    assert response.rcode() == dns.rcode.NXDOMAIN


def test_empty_non_terminal_is_nodata_not_nxdomain() -> None:
    for name in ("data.allowed.test", "allowed.test"):
        response = ask(name)
        assert response.rcode() == dns.rcode.NOERROR
        assert response.answer == []
        assert has_soa(response)


def test_existing_name_without_the_type_is_nodata() -> None:
    response = ask("api.allowed.test", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert has_soa(response)


@pytest.mark.parametrize("name", ["nope.test", "api.denied.test", "x.api.allowed.test"])
def test_unknown_name_in_test_is_nxdomain_with_soa(name: str) -> None:
    response = ask(name)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    assert response.answer == []
    assert has_soa(response)
    assert response.authority[0].ttl == 60


@pytest.mark.parametrize("name", ["example.com", "api.allowed.test.example.com", "test.com", "."])
def test_names_outside_test_are_refused(name: str) -> None:
    response = ask(name)
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA
    assert response.answer == [] and response.authority == []


def test_other_classes_and_zone_transfers_are_refused() -> None:
    assert ask("api.allowed.test", "A", rdclass=dns.rdataclass.CH).rcode() == dns.rcode.REFUSED
    assert ask("test", "AXFR").rcode() == dns.rcode.REFUSED


def test_txt_record() -> None:
    response = ask("api.allowed.test", "TXT")
    assert response.rcode() == dns.rcode.NOERROR
    texts = [rd.strings for rrset in response.answer for rd in rrset]
    assert texts == [(b"egressd-test=api.allowed.test",)]


def test_any_returns_every_type_at_the_name() -> None:
    response = ask("api.allowed.test", "ANY")
    assert {rrset.rdtype for rrset in response.answer} == {dns.rdatatype.A, dns.rdatatype.TXT}


def test_apex_has_soa_and_ns_and_the_ns_has_an_address() -> None:
    assert ask("test", "SOA").answer[0].rdtype == dns.rdatatype.SOA
    ns = ask("test", "NS").answer[0]
    assert [rd.to_text() for rd in ns] == ["ns.test."]
    assert addresses(ask("ns.test")) == ["203.0.113.53"]


def test_other_opcodes_are_notimp_and_two_questions_formerr() -> None:
    query = dns.message.make_query("api.allowed.test", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    assert answer(query, ZONE).rcode() == dns.rcode.NOTIMP
    query = dns.message.make_query("api.allowed.test", "A")
    query.question.append(
        dns.rrset.RRset(dns.name.from_text("evil.test"), dns.rdataclass.IN, dns.rdatatype.A)
    )
    assert answer(query, ZONE).rcode() == dns.rcode.FORMERR


def test_edns_is_echoed_and_unknown_versions_get_badvers() -> None:
    response = ask("api.allowed.test", use_edns=0, payload=1232)
    assert response.edns == 0
    assert ask("api.allowed.test", use_edns=1).rcode() == dns.rcode.BADVERS


def test_answer_is_pure() -> None:
    query = dns.message.make_query("x.data.allowed.test", "A")
    assert answer(query, ZONE).to_wire() == answer(query, ZONE).to_wire()


# --- wire ----------------------------------------------------------------------


def test_handle_wire_answers_and_counts() -> None:
    stats = DnsStats()
    wire = handle_wire(dns.message.make_query("api.allowed.test", "A").to_wire(), ZONE, stats)
    assert wire is not None
    assert addresses(dns.message.from_wire(wire)) == ["203.0.113.10"]
    handle_wire(dns.message.make_query("example.com", "A").to_wire(), ZONE, stats)
    assert stats.answered == {"NOERROR": 1, "REFUSED": 1}
    assert not stats.dropped


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x12\x34\x01\x00\x00\x01",  # short header
        dns.message.make_query("api.allowed.test", "A").to_wire()[:-3],  # truncated question
        dns.message.make_query("api.allowed.test", "A").to_wire() + b"junk",  # trailing junk
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x7f" + b"a" * 20,  # label past the end
    ],
    ids=[
        "empty",
        "one-byte",
        "short-header",
        "truncated",
        "trailing-junk",
        "pointer-loop",
        "long-label",
    ],
)
def test_malformed_queries_are_dropped_and_counted(data: bytes) -> None:
    stats = DnsStats()
    assert handle_wire(data, ZONE, stats) is None
    assert stats.dropped == {"malformed": 1}
    assert not stats.answered


def test_responses_are_not_answered() -> None:
    query = dns.message.make_query("api.allowed.test", "A")
    stats = DnsStats()
    assert handle_wire(answer(query, ZONE).to_wire(), ZONE, stats) is None
    assert stats.dropped == {"not_a_query": 1}


def test_random_and_mutated_input_never_raises() -> None:
    rng = random.Random(20261123)
    base = dns.message.make_query("x.data.allowed.test", "TXT", use_edns=0).to_wire()
    stats = DnsStats()
    for i in range(5000):
        if i % 2:
            data = rng.randbytes(rng.randrange(0, 64))
        else:
            mutated = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
            data = bytes(mutated)
        for transport in ("udp", "tcp"):
            handle_wire(data, ZONE, stats, transport)
    assert stats.dropped["malformed"] > 0
    assert sum(stats.answered.values()) + sum(stats.dropped.values()) == 10000


def test_udp_overflow_sets_tc_and_tcp_carries_everything() -> None:
    big = Zone.build([("big.test", "TXT", f'"{i:04d}{"x" * 200}"') for i in range(20)])
    query = dns.message.make_query("big.test", "TXT").to_wire()
    udp = dns.message.from_wire(handle_wire(query, big, DnsStats(), "udp"))  # type: ignore[arg-type]
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    tcp = dns.message.from_wire(handle_wire(query, big, DnsStats(), "tcp"))  # type: ignore[arg-type]
    assert not tcp.flags & dns.flags.TC
    assert len(tcp.answer[0]) == 20


def test_zone_rejects_records_outside_the_origin() -> None:
    with pytest.raises(ValueError, match="outside"):
        Zone.build([("example.com", "A", "192.0.2.1")])
