"""The per-connection path's shortcuts decide exactly as before (issue 10, item 5).

Tier 2 and the gate's host decisions are memoised across connections, also
when they needed the proxy's own resolution (then by its answer too); the
upstream connect needs no getaddrinfo; accepted sockets take their options
from the listener; the audit time is made once per second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import re
import socket
import time
from typing import Any

import pytest
import structlog
from prometheus_client import generate_latest

from egressd.proxy import audit, http_rules, intercept, tier2
from egressd.proxy.connector import Connector
from egressd.proxy.context import FlowInfo, PolicyUnavailable
from egressd.proxy.intercept import (
    KEEPALIVE_IDLE_S,
    USER_TIMEOUT_MS,
    Peeked,
    _Conn,
    _ipv4,
)
from tests.support.interceptor_rig import ADDR, API, ELSEWHERE, JOB, Resolver, conn, interceptor
from tests.support.policies import make_policy


async def test_tier2_memo_follows_the_proxy_resolution_answer() -> None:
    resolver = Resolver({API})
    icpt = interceptor(resolver)
    policy = make_policy()
    peeked = Peeked(b"", tier2.PROTOCOL_HTTP, http_host="api.allowed.test")

    first = await icpt._decide(policy, c1 := conn(), peeked, set())
    assert first.decision.allowed and first.host == "api.allowed.test"
    assert c1.proxy_ips == frozenset({API})
    again = await icpt._decide(policy, c2 := conn(), peeked, set())
    assert again is first  # memoised ...
    assert resolver.asked == ["api.allowed.test"] * 2  # ... but the resolver is asked each time
    assert c2.proxy_ips == frozenset({API})  # and the connection records its answer

    resolver.answer = {ELSEWHERE}  # the name moved: the same key decides afresh
    moved = await icpt._decide(policy, conn(), peeked, set())
    assert not moved.decision.allowed
    assert moved.decision.reason == tier2.HOST_ADDRESS_MISMATCH
    resolver.answer = {API}
    assert await icpt._decide(policy, conn(), peeked, set()) is first

    # A refreshed policy (another object) never sees the old one's results.
    fresh = await icpt._decide(make_policy(), conn(), peeked, set())
    assert fresh is not first and fresh == first


async def test_tier2_memo_without_resolution_asks_nobody() -> None:
    resolver = Resolver(set())
    icpt = interceptor(resolver)
    policy = make_policy()
    peeked = Peeked(b"", tier2.PROTOCOL_HTTP, http_host="api.allowed.test")
    c = conn()
    c.learned = frozenset({"api.allowed.test"})  # the job resolved it through the proxy
    named = await icpt._decide(policy, c, peeked, {"api.allowed.test"})
    assert named.decision.allowed
    assert await icpt._decide(policy, c, peeked, {"api.allowed.test"}) is named
    assert resolver.asked == []
    assert c.proxy_ips == frozenset()


async def test_gate_host_decisions_are_shared_and_follow_the_answer() -> None:
    resolver = Resolver({API})
    icpt = interceptor(resolver)
    policy = make_policy()
    same = http_rules.RequestTarget("api.allowed.test", None, ("",), "/")
    other = http_rules.RequestTarget("eu.data.allowed.test", None, ("",), "/")

    async def decide(
        gate_conn: _Conn,
        request: http_rules.RequestTarget,
        conn_host: str | None = "api.allowed.test",
    ) -> Any:
        gate = icpt._gate(gate_conn, policy, conn_host)
        decided = gate._decide("GET", request, None)
        return await decided if asyncio.iscoroutine(decided) else decided

    # The connection's own name: vouched for, no resolution, one decision for all.
    assert (await decide(conn(), same)).allowed
    assert (await decide(conn(), same)).allowed
    assert resolver.asked == []
    # Another name the policy allows (on 443 only: denied on 80, before any lookup) ...
    assert not (await decide(conn(), other)).allowed
    # ... and on a connection that named nothing, a name not vouched for: resolved
    # each time, decided by its answer.
    resolver.answer = {API}
    assert not (await decide(conn(ELSEWHERE), same, None)).allowed
    resolver.answer = {ELSEWHERE}
    assert (await decide(conn(ELSEWHERE), same, None)).allowed
    assert (await decide(conn(ELSEWHERE), same, None)).allowed
    resolver.answer = {API}
    assert not (await decide(conn(ELSEWHERE), same, None)).allowed
    assert resolver.asked == ["api.allowed.test"] * 4


async def test_gate_outcomes_are_shared_across_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    icpt = interceptor(Resolver(set()))
    policy = make_policy()
    root = http_rules.RequestTarget("api.allowed.test", None, ("",), "/")
    data = http_rules.RequestTarget("api.allowed.test", None, ("data",), "/data")
    made: list[http_rules.RequestTarget] = []
    real = http_rules.decide_http

    def counted(host: Any, request: http_rules.RequestTarget, **kw: Any) -> Any:
        made.append(request)
        return real(host, request, **kw)

    monkeypatch.setattr(http_rules, "decide_http", counted)

    def decide(request: http_rules.RequestTarget, method: str = "GET", p: Any = policy) -> Any:
        return icpt._gate(conn(), p, "api.allowed.test")._decide(method, request, None)

    first = decide(root)
    assert first.allowed and decide(root) is first  # a new connection: the same outcome
    assert made == [root]
    # What the request asked is part of the key: another path or method decides afresh.
    decide(data)
    decide(root, "POST")
    assert made == [root, data, root]
    # A replaced policy (another object) never sees the old one's outcomes.
    again = decide(root, p=make_policy())
    assert again is not first and again == first and len(made) == 4


async def test_accepted_sockets_inherit_the_listener_options() -> None:
    icpt = interceptor(Resolver(set()))
    icpt.listen = ("127.0.0.1", 0)
    accepted: list[socket.socket] = []
    icpt._accepted = lambda conn, addr: accepted.append(conn)  # type: ignore[method-assign]
    try:
        await icpt.start()
        with socket.create_connection(icpt.address):
            for _ in range(100):
                if accepted:
                    break
                await asyncio.sleep(0.01)
            (sock,) = accepted
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
            sock.close()
    finally:
        await icpt.close()


class _FailingOnce(socket.socket):
    """A listener whose first accept fails as a full descriptor table would."""

    failed = False  # per listener: set on the instance by its first accept

    def _accept(self) -> tuple[int, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()  # type: ignore[misc]


async def test_accept_takes_every_queued_connection_and_backs_off_after_an_error() -> None:
    listener = _FailingOnce(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    icpt = interceptor(Resolver(set()))
    icpt._given = listener
    accepted: list[socket.socket] = []
    icpt._accepted = lambda conn, addr: accepted.append(conn)  # type: ignore[method-assign]
    clients: list[socket.socket] = []
    try:
        with structlog.testing.capture_logs() as logs:
            await icpt.start()
            clients = [socket.create_connection(icpt.address) for _ in range(100)]
            started = time.monotonic()
            for _ in range(300):
                if len(accepted) == 100:
                    break
                await asyncio.sleep(0.01)
        # The failed accept paused the listener for the back-off, then all 100 came in.
        assert len(accepted) == 100
        assert time.monotonic() - started >= intercept._ACCEPT_ERROR_PAUSE_S * 0.9
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "intercept_accept_failed"
        ]
        assert {s.getpeername() for s in accepted} == {c.getsockname() for c in clients}
    finally:
        for sock in accepted + clients:
            sock.close()
        await icpt.close()
    assert listener.fileno() == -1


def test_ipv4_from_kernel_text() -> None:
    for text in ("0.0.0.0", "100.96.1.2", "255.255.255.255"):
        assert _ipv4(text) == ADDR(text)


def test_audit_time_is_now_to_the_millisecond() -> None:
    before = dt.datetime.now(dt.UTC)
    stamp = audit._now_iso()
    after = dt.datetime.now(dt.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    at = dt.datetime.fromisoformat(stamp)
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= at <= after


async def test_active_gauge_counts_connections_being_decided() -> None:
    icpt = interceptor(Resolver(set()))
    registry = icpt.ctx.registry
    go = asyncio.Event()

    class Flows:
        def lookup(self, *_key: object) -> FlowInfo:
            return FlowInfo(JOB, b"\0" * 8, "node1")

    class Policies:
        async def get(self, _job: object) -> Any:
            await go.wait()
            raise PolicyUnavailable("policy_missing")

    icpt.ctx.flows = Flows()
    icpt.ctx.policies = Policies()
    ends = [socket.socketpair() for _ in range(2)]
    for ours, _ in ends:
        ours.setblocking(False)
    tasks = [
        asyncio.create_task(icpt._handle(ours, "100.96.1.2", 40000 + i, "203.0.113.10", 80))
        for i, (ours, _) in enumerate(ends)
    ]
    await asyncio.sleep(0.01)
    assert registry.get_sample_value("egressd_connections_active") == 2
    assert b"\negressd_connections_active 2.0\n" in generate_latest(registry)
    go.set()
    await asyncio.gather(*tasks)
    assert registry.get_sample_value("egressd_connections_active") == 0
    denied = {"verdict": "deny", "reason": "policy_missing"}
    assert registry.get_sample_value("egressd_connections_total", denied) == 2
    for _, theirs in ends:
        theirs.close()


def test_composed_outcomes_are_compose_and_kept_per_decision() -> None:
    from egressd.proxy.intercept import _Composed, compose

    def named_http(policy: Any, dst: Any, host: str, resolved: set[str]) -> tier2.NamedDecision:
        return tier2.decide_named(
            policy,
            dst_ip=dst,
            dst_port=80,
            sni=None,
            http_host=host,
            resolved_names=resolved,
            proxy_resolves=frozenset(),
            fleet_ranges=(),
            sniff_error=None,
            protocol=tier2.PROTOCOL_HTTP,
            ech=False,
            target_port=None,
        )

    policy = make_policy()
    named = named_http(policy, API, "api.allowed.test", {"api.allowed.test"})
    http = Peeked(b"GET / HTTP/1.1\r\n\r\n", tier2.PROTOCOL_HTTP, http_host="api.allowed.test")
    tls = Peeked(b"\x16", tier2.PROTOCOL_TLS, sni="api.allowed.test")
    composed = _Composed()
    first = composed.compose(policy, named, http, None)
    assert first == compose(policy, named, http, interception=False)
    assert composed.compose(policy, named, http, None) is first  # kept
    # Another peek with the same protocol and error: the same outcome object.
    other = Peeked(b"GET /x HTTP/1.1\r\n\r\n", tier2.PROTOCOL_HTTP, http_host="api.allowed.test")
    assert composed.compose(policy, named, other, None) is first
    # What compose reads besides: the protocol, the CA, the policy (mode), the decision.
    assert composed.compose(policy, named, tls, None) == compose(
        policy, named, tls, interception=False
    )
    assert composed.compose(policy, named, http, object()) == compose(
        policy, named, http, interception=True
    )
    report = make_policy(mode="report")
    denied = tier2.NamedDecision(
        named_http(policy, ELSEWHERE, "nope.test", set()).decision, "nope.test"
    )
    enforced = composed.compose(policy, denied, http, None)
    reported = composed.compose(report, denied, http, None)
    assert not enforced.allowed and reported.allowed and reported.would_deny
    assert reported == compose(report, denied, http, interception=False)
    # An equal but distinct decision object is composed afresh, not taken by id.
    twin = tier2.NamedDecision(named.decision, named.host)
    assert composed.compose(policy, twin, http, None) == first


async def test_upstream_socket_is_nonblocking_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from egressd.proxy import intercept

    made: list[tuple[socket.socket, int, int, bool]] = []

    async def spy(_connector: Connector, sock: socket.socket, *args: Any, **kw: Any) -> None:
        keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        made.append((sock, sock.type, keepalive, sock.getblocking()))
        raise OSError(111, "refused")

    monkeypatch.setattr(Connector, "connect", spy)
    icpt = interceptor(Resolver(set()))
    c = conn()
    lease = icpt.limits.acquire_port(
        JOB, intercept._destination(API, 80), make_policy().limits, 0.0
    )
    assert not isinstance(lease, str)
    monkeypatch.setattr(icpt.limits.ports, "address_text", lambda _lease: "127.0.0.1")
    result = await icpt._connect_from(c, lease)
    assert result is intercept._CONNECT_FAILED
    ((sock, kind, keepalive, blocking),) = made
    assert kind == socket.SOCK_STREAM and not blocking and keepalive == 1
    assert sock.fileno() == -1  # closed after the failed connect
    icpt._connecting().close()
