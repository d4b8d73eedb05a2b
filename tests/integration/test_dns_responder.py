"""The proxy's DNS responder end to end, over TPROXY, in the world of test_intercept.

The client asks 100.100.100.53 (an address nobody has); nftables in the proxy
namespace TPROXYs UDP and TCP port 53 to the responder, which must answer
from 100.100.100.53:53 and forward only what the policy allows to the
"internet" resolver at 203.0.113.53.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from egressd.metrics_text import metric_value, parse
from tests.support.intercept_world import (
    API,
    CLIENT,
    CLIENT_NO_FLOW,
    EVIL,
    JOB_ID,
    RESOLVER,
    World,
    addresses,
    ask_udp,
    make_world,
    query,
    source,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("dns")) as w:
        yield w


def upstream_saw(world: World, qname: str) -> list[str]:
    return [q["qtype"] for q in world.upstream_queries() if q["qname"] == qname]


def test_allowed_name_answered_from_upstream(world: World) -> None:
    response, src = query(world, "api.allowed.test")
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == [API]
    event = world.wait_event(event="dns", source=src)
    assert event["qname"] == "api.allowed.test" and event["qtype"] == "A"
    assert (event["verdict"], event["reason"]) == ("allow", "allowed_host")
    assert event["answers"] == [API] and event["job_id"] == JOB_ID
    assert event["account"] == "acme" and event["node"] == "node1" and event["proxy"] == "proxy-t"
    assert event["dst"] == RESOLVER and event["level"] == "info"
    # The upstream was asked from the proxy's egress address.
    assert {q["src"] for q in world.upstream_queries()} == {"203.0.113.21"}


def test_cname_flattened(world: World) -> None:
    response, _ = query(world, "Cname.Allowed.Test")
    assert addresses(response) == [API]
    (rrset,) = response.answer
    assert rrset.name.to_text() == "Cname.Allowed.Test."  # the client's own spelling


def test_denied_name_refused_and_never_forwarded(world: World) -> None:
    response, src = query(world, "evil.test")
    assert response.rcode() == dns.rcode.REFUSED and not response.answer
    event = world.wait_event(event="dns", source=src)
    assert (event["verdict"], event["reason"], event["level"]) == (
        "deny",
        "no_matching_rule",
        "warning",
    )
    assert upstream_saw(world, "evil.test") == []


@pytest.mark.parametrize("rdtype", ["TXT", "ANY", "MX"])
def test_other_types_refused(world: World, rdtype: str) -> None:
    response, src = query(world, "api.allowed.test", rdtype)
    assert response.rcode() == dns.rcode.REFUSED
    assert world.wait_event(event="dns", source=src)["reason"] == "qtype_not_allowed"
    assert rdtype not in upstream_saw(world, "api.allowed.test")


def test_aaaa_is_empty_noerror(world: World) -> None:
    response, _ = query(world, "api.allowed.test", "AAAA")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer


def test_rebinding_refused(world: World) -> None:
    response, src = query(world, "rebind.allowed.test")
    assert response.rcode() == dns.rcode.REFUSED
    assert world.wait_event(event="dns", source=src)["reason"] == "rebinding"


def test_nxdomain_passed_through(world: World) -> None:
    response, _ = query(world, "nope.data.allowed.test")
    assert response.rcode() == dns.rcode.NXDOMAIN


def test_upstream_timeout_is_servfail(world: World) -> None:
    started = time.monotonic()
    response, src = query(world, "slow.data.allowed.test", timeout=6.0)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 4.0
    assert world.wait_event(event="dns", source=src)["reason"] == "upstream_timeout"


def test_unknown_flow_refused(world: World) -> None:
    response, src = query(world, "api.allowed.test", src=CLIENT_NO_FLOW)
    assert response.rcode() == dns.rcode.REFUSED
    event = world.wait_event(event="dns", source=src)
    assert (event["reason"], event["job_id"]) == ("unknown_flow", None)


@pytest.mark.parametrize(
    "wire", [b"\x00", b"not a dns message at all", b"\xff" * 40], ids=["short", "text", "junk"]
)
def test_malformed_dropped_and_responder_survives(world: World, wire: bytes) -> None:
    with pytest.raises(TimeoutError):
        ask_udp(world, wire, timeout=0.7)
    response, _ = query(world, "api.allowed.test")
    assert response.rcode() == dns.rcode.NOERROR
    samples = parse(world.metrics())
    # every label is there (zero) from the start: this one must have counted
    assert (metric_value(samples, "egressd_dns_dropped_total", reason="malformed") or 0) >= 1


def test_a_response_is_not_a_query(world: World) -> None:
    q = dns.message.make_query("api.allowed.test", "A")
    with pytest.raises(TimeoutError):
        ask_udp(world, dns.message.make_response(q).to_wire(), timeout=0.7)


def test_tcp(world: World) -> None:
    q = dns.message.make_query("eu.data.allowed.test", "A")
    sock = world.client_socket(CLIENT)
    with sock:
        sock.settimeout(5)
        sock.connect((RESOLVER, 53))
        src = source(sock)
        response = dns.query.tcp(q, RESOLVER, timeout=5, sock=sock)
        assert addresses(response) == ["203.0.113.11"]
        # A second query on the same connection, and a refused one.
        q2 = dns.message.make_query("evil.test", "A")
        assert dns.query.tcp(q2, RESOLVER, timeout=5, sock=sock).rcode() == dns.rcode.REFUSED
        # Garbage ends the connection.
        sock.sendall(struct.pack("!H", 3) + b"abc")
        assert sock.recv(10) == b""
    assert world.wait_event(event="dns", source=src)["answers"] == ["203.0.113.11"]


def test_metrics(world: World) -> None:
    query(world, "api.allowed.test")
    query(world, "evil.test")
    samples = parse(world.metrics())
    assert (metric_value(samples, "egressd_dns_queries_total", verdict="allow") or 0) >= 1
    assert (metric_value(samples, "egressd_dns_queries_total", verdict="deny") or 0) >= 1


def test_report_mode_resolves_unlisted_names(world: World) -> None:
    world.set_policy(mode="report")
    try:
        response, src = query(world, "evil.test")
        assert addresses(response) == [EVIL]
        event = world.wait_event(event="dns", source=src)
        assert (event["verdict"], event["would_deny"], event["level"]) == ("allow", True, "warning")
        txt, _ = query(world, "evil.test", "TXT")
        assert txt.rcode() == dns.rcode.REFUSED  # query types stay enforced
    finally:
        world.set_policy()
