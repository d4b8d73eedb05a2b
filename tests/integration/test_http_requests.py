"""Per-request decisions on plain HTTP, through the real interceptor (issue 12).

The world of `test_intercept` (TPROXY, the proxy process, the "internet"),
against its keep-alive HTTP server on port 8080, which answers every request
with ``<method> <host> <path> <body length>``. The job's policy allows
``eu.data.allowed.test`` (203.0.113.11) on 8080; ``us.data.allowed.test`` is
another name for the same server that the policy does not allow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from egressd.proxy import tier2
from tests.support.intercept_world import (
    API,
    DATA,
    EU,
    KEEPALIVE_PORT,
    Reader,
    World,
    client_hello,
    expect_reset,
    make_world,
    request,
    requests_of,
    source,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(180)]

PORT = KEEPALIVE_PORT
US = "us.data.allowed.test"
HOST_ONLY = [{"host": EU, "ports": [PORT]}, {"host": "api.allowed.test", "ports": [PORT]}]
WITH_HTTP = [
    {
        "host": EU,
        "ports": [443, PORT],
        "http": {
            "allow": [
                {"methods": ["GET", "HEAD"], "paths": ["/data", "/bytes/*"]},
                {"methods": ["POST"], "paths": ["/upload"]},
            ]
        },
    }
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("httpreq")) as w:
        yield w


@pytest.fixture
def hosts(world: World) -> Iterator[World]:
    world.set_policy(egress=HOST_ONLY)
    time.sleep(0.1)
    yield world
    world.set_policy()


@pytest.fixture
def rules(world: World) -> Iterator[World]:
    world.set_policy(egress=WITH_HTTP)
    time.sleep(0.1)
    yield world
    world.set_policy()


def test_keep_alive_host_switch_denied_on_second_request(hosts: World) -> None:
    with hosts.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(request("GET", EU, "/data"))
        assert reader.response() == (200, f"GET {EU} /data 0".encode())
        sock.sendall(request("GET", US, "/data"))
        status, body = reader.response()
        assert status == 403
        assert json.loads(body)["error"] == "host_not_allowed"
        assert reader.closed()
    events = requests_of(hosts, src, 2)
    assert [
        (e["host"], e["method"], e["path"], e["status"], e["verdict"], e["reason"]) for e in events
    ] == [
        (EU, "GET", "/data", 200, "allow", "allowed_host"),
        (US, "GET", "/data", 403, "deny", "host_not_allowed"),
    ]
    assert events[0]["job_id"] and events[0]["dst"] == DATA and events[0]["port"] == PORT
    assert events[0]["bytes_up"] == len(request("GET", EU, "/data"))
    assert events[1]["level"] == "warning"
    conn = hosts.wait_event(event="connection", source=src)
    assert (conn["verdict"], conn["reason"], conn["host"]) == ("allow", "allowed_host", EU)
    # Only the allowed request went up; down: its response and the proxy's 403.
    assert conn["bytes_up"] == events[0]["bytes_up"]
    assert conn["bytes_down"] == events[0]["bytes_down"] + events[1]["bytes_down"]


def test_allowed_name_at_another_address_is_a_mismatch(hosts: World) -> None:
    # api.allowed.test is allowed on 8080 but lives at API, not at DATA: the
    # proxy resolves it itself (the job never did) and refuses.
    with hosts.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(request("GET", EU, "/"))
        assert reader.response()[0] == 200
        sock.sendall(request("GET", "api.allowed.test", "/"))
        status, body = reader.response()
        assert (status, json.loads(body)["error"]) == (403, tier2.HOST_ADDRESS_MISMATCH)
        assert reader.closed()
    assert requests_of(hosts, src, 2)[1]["reason"] == tier2.HOST_ADDRESS_MISMATCH
    # ... while at its own address, a second request for it is fine.
    with hosts.connect(API, PORT) as sock:
        reader = Reader(sock)
        for path in ("/a", "/b?secret=1"):
            sock.sendall(request("GET", "api.allowed.test", path))
            assert reader.response() == (200, f"GET api.allowed.test {path} 0".encode())
        src = source(sock)
    assert [e["path"] for e in requests_of(hosts, src, 2)] == ["/a", "/b"]


def test_pipelined_requests_are_decided_in_order(hosts: World) -> None:
    with hosts.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(
            request("GET", EU, "/1")
            + request("POST", EU, "/2", b"hello")
            + request("GET", US, "/3")
            + request("GET", EU, "/4")
        )
        assert reader.response() == (200, f"GET {EU} /1 0".encode())
        assert reader.response() == (200, f"POST {EU} /2 5".encode())
        status, body = reader.response()
        assert (status, json.loads(body)["error"]) == (403, "host_not_allowed")
        assert reader.closed()  # /4 never went anywhere
    events = requests_of(hosts, src, 3)
    assert [(e["path"], e["status"]) for e in events] == [("/1", 200), ("/2", 200), ("/3", 403)]


def test_http_rules_methods_and_paths(rules: World) -> None:
    with rules.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(request("GET", EU, "/data?x=1"))
        assert reader.response() == (200, f"GET {EU} /data?x=1 0".encode())
        sock.sendall(request("HEAD", EU, "/bytes/5"))
        assert reader.response(no_body=True)[0] == 200
        sock.sendall(request("POST", EU, "/upload", b"12345"))
        assert reader.response() == (200, f"POST {EU} /upload 5".encode())
        sock.sendall(request("POST", EU, "/data", b"exfiltrate"))
        status, body = reader.response()
        # POST is allowed, but not on /data.
        assert (status, json.loads(body)["error"]) == (403, "path_not_allowed")
        assert reader.closed()
    reasons = [(e["method"], e["path"], e["reason"]) for e in requests_of(rules, src, 4)]
    assert reasons == [
        ("GET", "/data", "allowed_request"),
        ("HEAD", "/bytes/5", "allowed_request"),
        ("POST", "/upload", "allowed_request"),
        ("POST", "/data", "path_not_allowed"),
    ]
    for method, path, reason in [
        ("DELETE", "/data", "method_not_allowed"),
        ("GET", "/admin", "path_not_allowed"),
        ("GET", "/bytes/5/more", "path_not_allowed"),
        ("GET", "/bytes/%2e%2e/admin", "http_malformed"),
        ("GET", "/DATA", "path_not_allowed"),
    ]:
        with rules.connect(DATA, PORT) as sock:
            reader = Reader(sock)
            sock.sendall(request(method, EU, path))
            status, body = reader.response()
            assert (status, json.loads(body)["error"]) == (403, reason), path
            assert reader.closed()


def test_gated_uploads_are_paced_and_counted(world: World) -> None:
    rate_bps = 8_000_000  # 1 MB/s
    limits = {
        "max_connections": 256,
        "max_new_connections_per_s": 1000,
        "ports_per_destination": 512,
        "bandwidth_bps": rate_bps,
        "dns_queries_per_s": 1000,
    }
    world.set_policy(egress=HOST_ONLY, limits=limits)
    time.sleep(0.1)
    size = 2_000_000
    try:
        with world.connect(DATA, PORT, timeout=30) as sock:
            src = source(sock)
            reader = Reader(sock)
            started = time.monotonic()
            sock.sendall(request("POST", EU, "/bulk", b"u" * size))
            assert reader.response() == (200, f"POST {EU} /bulk {size} ".encode().strip())
            elapsed = time.monotonic() - started
        measured = size / elapsed * 8
        assert 0.75 * rate_bps <= measured <= 1.1 * rate_bps, measured
        event = requests_of(world, src, 1)[0]
        assert event["bytes_up"] == len(request("POST", EU, "/bulk", b"u" * size))
        conn = world.wait_event(event="connection", source=src)
        assert conn["bytes_up"] == event["bytes_up"]
        assert conn["bytes_down"] == event["bytes_down"]
    finally:
        world.set_policy()


def test_connect_is_refused_unless_allowed(hosts: World) -> None:
    with hosts.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(f"CONNECT {EU}:{PORT} HTTP/1.1\r\nHost: {EU}:{PORT}\r\n\r\n".encode())
        status, body = reader.response()
        assert (status, json.loads(body)["error"]) == (403, "connect_not_allowed")
        assert reader.closed()
    assert requests_of(hosts, src, 1)[0]["method"] == "CONNECT"


def test_tls_to_a_rule_with_http_rules_is_not_inspectable(rules: World) -> None:
    with rules.connect(DATA, 443) as sock:
        src = source(sock)
        expect_reset(sock, client_hello(EU))
    event = rules.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "http_not_inspectable")


def test_report_mode_lets_the_switch_through_and_flags_it(world: World) -> None:
    world.set_policy(mode="report", egress=HOST_ONLY)
    time.sleep(0.1)
    try:
        with world.connect(DATA, PORT) as sock:
            src = source(sock)
            reader = Reader(sock)
            sock.sendall(request("GET", EU, "/"))
            assert reader.response()[0] == 200
            sock.sendall(request("GET", US, "/"))
            assert reader.response() == (200, f"GET {US} / 0".encode())
        event = requests_of(world, src, 2)[1]
        assert (event["verdict"], event["reason"], event["would_deny"]) == (
            "allow",
            "host_not_allowed",
            True,
        )
    finally:
        world.set_policy()
