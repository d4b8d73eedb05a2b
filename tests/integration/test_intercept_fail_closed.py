"""Tier 2 fails closed on TLS and HTTP it cannot read (issue 15), end to end.

The real interceptor behind TPROXY in the namespaces of test_intercept.py (its
world, subprocesses and helpers). The attack of the issue: the job resolves an
allowed name through the proxy's DNS, so the proxy has learned that name for
the address; then it sends a ClientHello (or HTTP head) naming a *denied* host
to that address, slowly (a pause past the peek deadline) or padded past the
old 16 KiB peek. Before, tier 2 then decided without a name and fell back to
the learned name: allowed, and logged under the allowed name.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from egressd.metrics_text import metric_value, parse
from egressd.proxy.sniff import MAX_CLIENT_HELLO, MAX_HTTP_HEAD
from tests.support import tls_hellos
from tests.support.intercept_world import (
    API,
    CLIENT,
    EGRESS_RULES,
    RESOLVER,
    World,
    expect_reset,
    make_world,
    recv_all,
    source,
)
from tests.support.root import NETNS_TOOLS

PEEK_S = 0.5  # make_world's peek timeout
pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("failclosed"), peek_timeout_s=PEEK_S) as w:
        yield w


@pytest.fixture
def resolved(world: World) -> Iterator[World]:
    """The job has resolved api.allowed.test -> API through the proxy's DNS."""
    import dns.message
    import dns.query

    world.set_policy()
    udp = world.client_socket(CLIENT, socket.SOCK_DGRAM)
    with udp:
        answer = dns.query.udp(
            dns.message.make_query("api.allowed.test", "A"), RESOLVER, timeout=5, sock=udp
        )
    assert [r.address for rrset in answer.answer for r in rrset] == [API]
    yield world
    world.set_policy()


def audit(world: World, src: str) -> dict[str, Any]:
    return world.wait_event(event="connection", source=src)


def test_slow_hello_naming_a_denied_host_is_denied(resolved: World) -> None:
    hello = tls_hellos.client_hello("evil.test")
    with resolved.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(hello[:200])  # the SNI is further on
        time.sleep(PEEK_S + 0.4)
        expect_reset(sock, hello[200:])
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"]) == ("deny", "client_hello_incomplete")
    assert event["host"] is None  # never the learned api.allowed.test
    assert event["bytes_up"] == 0 and event["duration_ms"] >= PEEK_S * 1000 * 0.9


@pytest.mark.parametrize("first", [b"\x16", b"\x16\x03\x01"])
def test_a_few_bytes_then_the_rest_later(resolved: World, first: bytes) -> None:
    hello = tls_hellos.client_hello("evil.test")
    with resolved.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(first)
        time.sleep(PEEK_S + 0.4)
        expect_reset(sock, hello[len(first) :])
    assert audit(resolved, src)["reason"] == "client_hello_incomplete"


def test_hello_padded_past_16k_is_decided_by_its_sni(resolved: World) -> None:
    denied = tls_hellos.client_hello("evil.test", total=20_000)
    src = resolved.expect_reset(API, 443, denied)
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "deny",
        "no_matching_rule",
        "evil.test",
    )

    allowed = tls_hellos.client_hello("api.allowed.test", total=20_000)
    with resolved.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(allowed)
        assert recv_all(sock).startswith(b"TLS-OK ")
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "allow",
        "allowed_host",
        "api.allowed.test",
    )
    assert event["bytes_up"] == len(allowed)


def test_hello_at_and_over_the_bound(resolved: World) -> None:
    at = tls_hellos.client_hello("api.allowed.test", total=MAX_CLIENT_HELLO)
    with resolved.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(at)
        assert recv_all(sock).startswith(b"TLS-OK ")
    assert audit(resolved, src)["reason"] == "allowed_host"

    over = tls_hellos.client_hello("api.allowed.test", total=MAX_CLIENT_HELLO + 1)
    src = resolved.expect_reset(API, 443, over)
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "deny",
        "client_hello_too_large",
        None,
    )


def test_post_quantum_sized_hello_in_small_segments(resolved: World) -> None:
    hello = tls_hellos.client_hello("api.allowed.test")
    assert 2500 < len(hello) < 3500
    with resolved.connect(API, 443) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        src = source(sock)
        for i in range(0, len(hello), 500):
            sock.sendall(hello[i : i + 500])
            time.sleep(0.02)
        assert recv_all(sock) == b"TLS-OK %d" % len(hello)
    event = audit(resolved, src)
    assert (event["verdict"], event["host"]) == ("allow", "api.allowed.test")


def test_hello_without_sni_is_not_decided_by_learned_names(resolved: World) -> None:
    src = resolved.expect_reset(API, 443, tls_hellos.client_hello(None))
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["host"]) == ("deny", "no_sni", None)


def test_ech_denied_unless_the_rule_opts_in(resolved: World) -> None:
    hello = tls_hellos.client_hello("api.allowed.test", ech=True)
    src = resolved.expect_reset(API, 443, hello)
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "deny",
        "ech_not_allowed",
        "api.allowed.test",
    )

    opted_in = [
        {**rule, "ech": "allow"} if rule.get("host") == "api.allowed.test" else rule
        for rule in EGRESS_RULES
    ]
    resolved.set_policy(egress=opted_in)
    time.sleep(0.1)
    with resolved.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(hello)
        assert recv_all(sock) == b"TLS-OK %d" % len(hello)
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"]) == ("allow", "allowed_host")


def test_slow_and_huge_http_heads(resolved: World) -> None:
    with resolved.connect(API, 80) as sock:
        src = source(sock)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(PEEK_S + 0.4)
        expect_reset(sock, b"Host: evil.test\r\n\r\n")
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "deny",
        "http_head_incomplete",
        None,
    )

    huge = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HTTP_HEAD + b"\r\nHost: evil.test\r\n\r\n"
    src = resolved.expect_reset(API, 80, huge)
    assert audit(resolved, src)["reason"] == "http_head_too_large"

    src = resolved.expect_reset(API, 80, b"GET / HTTP/1.0\r\n\r\n")
    event = audit(resolved, src)
    assert (event["reason"], event["host"]) == ("no_host", None)

    # h2c prior knowledge cannot be read: refused, not decided by the learned name.
    src = resolved.expect_reset(API, 80, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert audit(resolved, src)["reason"] == "http_malformed"


def test_head_padded_past_16k_is_decided_by_its_host(resolved: World) -> None:
    head = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\nHost: evil.test\r\n\r\n"
    src = resolved.expect_reset(API, 80, head)
    event = audit(resolved, src)
    assert (event["reason"], event["host"]) == ("no_matching_rule", "evil.test")


def test_connect_and_absolute_form_are_decided_by_their_target(resolved: World) -> None:
    # CONNECT to another host with the allowed Host header: the Host disagrees.
    src = resolved.expect_reset(
        API, 80, b"CONNECT evil.test:443 HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n"
    )
    event = audit(resolved, src)
    assert (event["reason"], event["host"]) == ("http_malformed", None)
    # Without a Host: the target decides.
    src = resolved.expect_reset(API, 80, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
    event = audit(resolved, src)
    assert (event["reason"], event["host"]) == ("no_matching_rule", "evil.test")
    # The allowed host, on a port its rule does not list.
    src = resolved.expect_reset(API, 80, b"CONNECT api.allowed.test:22 HTTP/1.1\r\n\r\n")
    event = audit(resolved, src)
    assert (event["reason"], event["host"]) == ("port_not_allowed", "api.allowed.test")
    # Absolute form naming another host, without and with a Host header.
    src = resolved.expect_reset(API, 80, b"GET http://evil.test/ HTTP/1.1\r\n\r\n")
    event = audit(resolved, src)
    assert (event["reason"], event["host"]) == ("no_matching_rule", "evil.test")
    src = resolved.expect_reset(
        API, 80, b"GET http://evil.test/ HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n"
    )
    assert audit(resolved, src)["reason"] == "http_malformed"
    # An absolute-form request for the allowed host itself goes through (with
    # a Host: HTTP/1.1 requires one, and the request gate refuses it without).
    with resolved.connect(API, 80) as sock:
        src = source(sock)
        sock.sendall(
            b"GET http://api.allowed.test/bytes/5 HTTP/1.1\r\nHost: api.allowed.test\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert recv_all(sock).startswith(b"HTTP/1.1 200 OK")
    assert audit(resolved, src)["reason"] == "allowed_host"


def test_report_mode_reports_an_incomplete_hello(resolved: World) -> None:
    resolved.set_policy(mode="report")
    time.sleep(0.1)
    hello = tls_hellos.client_hello("evil.test")
    with resolved.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(hello[:200])
        time.sleep(PEEK_S + 0.4)
        sock.sendall(hello[200:])
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock).startswith(b"TLS-OK ")
    event = audit(resolved, src)
    assert (event["verdict"], event["reason"], event["would_deny"]) == (
        "allow",
        "client_hello_incomplete",
        True,
    )
    assert event["host"] is None


def test_metrics_count_the_new_reasons(resolved: World) -> None:
    src = resolved.expect_reset(API, 443, tls_hellos.client_hello(None))
    audit(resolved, src)
    samples = parse(resolved.metrics())
    no_sni = metric_value(samples, "egressd_connections_total", reason="no_sni", verdict="deny")
    assert no_sni is not None and no_sni >= 1  # a zero is there from the start
