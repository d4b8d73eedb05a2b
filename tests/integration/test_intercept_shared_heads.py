"""Heads shared across connections (`http_gate.SharedHeads`, `intercept.PeekedHeads`),
through the real interceptor: the first connection's request and response heads
are read by h11 and `sniff`, the next ones with the same bytes are not, and
every connection is still decided, answered and logged the same way: the same
audit events (but for source, time and duration), a ``Connection: close``
request still ends what the client may send (h11's ``MUST_CLOSE``: a second
request on it is refused ``http_malformed``), another Host still its own
decision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.intercept_world import (
    API,
    KEEPALIVE_PORT,
    Reader,
    World,
    make_world,
    requests_of,
    source,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(180)]

NAME = "api.allowed.test"
CLOSE = f"GET /bytes/5 HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
OTHER = b"GET /bytes/5 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
AGAIN = f"GET /again HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()
VARYING = ("source", "time", "duration_ms")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("shared")) as w:
        w.set_policy(egress=[{"host": NAME, "ports": [80, KEEPALIVE_PORT]}])
        time.sleep(0.1)
        yield w


def events_of(world: World, src: str, requests: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    found = requests_of(world, src, requests)
    assert len(found) == requests
    conn = world.wait_event(event="connection", source=src)
    return found, conn


def same(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in VARYING}


def once(world: World, data: bytes, port: int = 80) -> tuple[bytes | None, str]:
    """The response, or None when the proxy reset the connection."""
    with world.connect(API, port) as sock:
        src = source(sock)
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            return None, src
    return got, src


def test_repeated_connections_decided_and_logged_alike(world: World) -> None:
    results = [once(world, CLOSE) for _ in range(6)]
    first_requests, first_conn = events_of(world, results[0][1], 1)
    assert first_requests[0]["status"] == 200 and first_conn["reason"] == "allowed_host"
    for got, src in results:
        assert got is not None and got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"xxxxx")
        requests, conn = events_of(world, src, 1)
        assert [same(e) for e in requests] == [same(e) for e in first_requests]
        assert same(conn) == same(first_conn)
    # A head the proxy has not seen is read, and decided, on its own.
    got, src = once(world, OTHER)
    assert got is None  # tier 2 denies the name: a reset
    conn = world.wait_event(event="connection", source=src)
    assert (conn["verdict"], conn["host"]) == ("deny", "evil.test")
    got, src = once(world, CLOSE)
    assert got is not None and got.startswith(b"HTTP/1.1 200 OK\r\n")


def test_more_after_a_closing_request_refused_every_time(world: World) -> None:
    # The keep-alive server answers without closing; the client's second request
    # breaks its own "Connection: close": refused, on the first connection (h11
    # read the head) and on those after it (the head was shared).
    seen = []
    for _ in range(3):
        with world.connect(API, KEEPALIVE_PORT) as sock:
            src = source(sock)
            reader = Reader(sock)
            sock.sendall(CLOSE)
            assert reader.response()[0] == 200
            sock.sendall(AGAIN)
            status, body = reader.response()
            assert status == 403 and json.loads(body)["error"] == "http_malformed"
            assert reader.closed()
        requests, conn = events_of(world, src, 2)
        assert [(e["status"], e["reason"]) for e in requests] == [
            (200, "allowed_host"),
            (403, "http_malformed"),
        ]
        seen.append(([same(e) for e in requests], same(conn)))
    assert seen[1:] == seen[:1] * 2
