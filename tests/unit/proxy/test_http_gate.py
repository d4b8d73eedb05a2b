"""The plain-HTTP request gate, sans I/O: what goes up, when, and the 403."""

from __future__ import annotations

import json

import pytest

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy.http_gate import HttpGate, RequestRecord, deny_response
from egressd.proxy.http_rules import RequestTarget

ALLOW = Decision(Verdict.ALLOW, "allowed_host", None)


def host_rule(allowed: set[str]):  # type: ignore[no-untyped-def]
    def decide(method: str, request: RequestTarget, upgrade: str | None) -> Decision:
        if method == "POST":
            return Decision(Verdict.DENY, "method_not_allowed", None)
        if request.host in allowed:
            return ALLOW
        return Decision(Verdict.DENY, "host_not_allowed", None)

    return decide


def gate(allowed: set[str] | None = None) -> tuple[HttpGate, list[RequestRecord]]:
    records: list[RequestRecord] = []
    return HttpGate(host_rule(allowed or {"a.test"}), records.append), records


def req(host: str = "a.test", path: str = "/", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_keep_alive_requests_each_decided_and_forwarded_as_received() -> None:
    g, records = gate()
    first = b"GET /data?x=1 HTTP/1.1\r\nhOsT: a.test\r\nX-Odd:  spaced \r\n\r\n"
    g.from_client(first)
    assert g.take_up() == [first]
    g.from_upstream(RESP)
    assert [r.status for r in records] == [200]
    assert records[0].path == "/data"
    g.from_client(req(path="/two"))
    assert g.take_up() == [req(path="/two")]
    assert not g.hold and g.final is None


def test_host_switch_on_keep_alive_is_denied_with_403_after_the_response() -> None:
    g, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(RESP)
    g.from_client(req("b.test"))
    assert g.take_up() == []
    assert g.final is not None and g.final.startswith(b"HTTP/1.1 403 ")
    body = json.loads(g.final.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "host_not_allowed"
    assert [(r.host, r.status, r.decision.reason) for r in records] == [
        ("a.test", 200, "allowed_host"),
        ("b.test", 403, "host_not_allowed"),
    ]
    assert g.hold and g.ended


def test_pipelined_requests_wait_for_the_response_before_them() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req(path="/2") + req("b.test", "/3"))
    assert g.take_up() == [req(path="/1")]
    assert g.final is None
    g.from_upstream(RESP[:10])
    assert g.take_up() == []
    g.from_upstream(RESP[10:])
    assert g.take_up() == [req(path="/2")]
    assert g.final is None  # /3's 403 must not land inside /2's response
    g.from_upstream(RESP)
    assert g.final is not None and b"host_not_allowed" in g.final
    assert [r.path for r in records] == ["/1", "/2", "/3"]


def test_request_body_forwarded_and_counted() -> None:
    g, records = gate()
    head = b"PUT /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n"
    g.from_client(head + b"he")
    g.from_client(b"llo")
    assert b"".join(g.take_up()) == head + b"hello"
    g.from_upstream(RESP)
    assert records[0].bytes_up == len(head) + 5
    assert records[0].bytes_down == len(RESP)


def test_chunked_body_then_next_request() -> None:
    g, _ = gate()
    head = b"PUT /u HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\n\r\n"
    g.from_client(head + body + req("b.test"))
    assert b"".join(g.take_up()) == head + body
    g.from_upstream(RESP)
    assert g.final is not None


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a.test\n\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
)
def test_ambiguous_requests_are_malformed(raw: bytes) -> None:
    g, records = gate()
    g.from_client(raw)
    assert g.take_up() == []
    assert g.final is not None and b"http_malformed" in g.final
    assert records[-1].decision.reason == "http_malformed"


def test_method_denied_body_never_forwarded() -> None:
    g, records = gate()
    g.from_client(b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello")
    assert g.take_up() == []
    assert g.final == deny_response("method_not_allowed", host="a.test")
    assert records[0].status == 403


def test_head_response_has_no_body_and_next_request_follows() -> None:
    g, records = gate()
    g.from_client(req(method="HEAD"))
    g.take_up()
    g.from_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    g.from_client(req(path="/next"))
    assert g.take_up() == [req(path="/next")]
    assert records[0].status == 200


def test_informational_then_final_response() -> None:
    g, records = gate()
    head = b"PUT /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    g.from_client(head)
    assert g.take_up() == [head]
    g.from_upstream(b"HTTP/1.1 100 Continue\r\n\r\n")
    g.from_client(b"hi")
    assert g.take_up() == [b"hi"]
    g.from_upstream(RESP)
    assert records[0].status == 200


def test_upgrade_switches_to_a_tunnel() -> None:
    g, records = gate()
    g.from_client(req(path="/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    g.take_up()
    g.from_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert g.tunnel
    assert records[0].status == 101
    g.from_client(b"\x81\x00anything")
    assert g.take_up() == [b"\x81\x00anything"]


def test_upgrade_declined_keeps_deciding() -> None:
    g, _ = gate()
    g.from_client(req(path="/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    g.take_up()
    g.from_upstream(RESP)
    assert not g.tunnel
    g.from_client(req("b.test"))
    assert g.final is not None


def test_connection_close_stops_further_requests() -> None:
    g, _ = gate()
    g.from_client(req(extra="Connection: close\r\n"))
    g.take_up()
    g.from_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    g.from_client(req())
    assert g.take_up() == []
    assert g.ended


def test_unparseable_response_stops_the_client() -> None:
    g, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(b"garbage\r\n\r\n")
    assert g.failed and g.hold
    g.from_client(req())
    assert g.take_up() == []
    assert records[0].status is None


def test_unsolicited_response_bytes_stop_the_client() -> None:
    g, _ = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(RESP + b"HTTP/1.1 200 OK\r\n")
    assert g.failed and g.hold


def test_malformed_body_gets_its_403_after_the_response() -> None:
    g, _ = gate()
    head = b"PUT /u HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    g.from_client(head + b"zz\r\n")  # not a chunk size
    assert g.take_up() == [head]
    assert g.final is None  # the server may still answer what it got
    assert [(r.method, r.host) for r in g.pending_records()] == [("PUT", "a.test")] * 2
    g2, records2 = gate()
    g2.from_client(head + b"zz\r\n")
    g2.take_up()
    g2.from_upstream(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert g2.final is not None and b"http_malformed" in g2.final
    assert [(r.status, r.decision.reason) for r in records2] == [
        (400, "allowed_host"),
        (403, "http_malformed"),
    ]


def test_response_delimited_by_close() -> None:
    g, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(b"HTTP/1.0 200 OK\r\n\r\nbody")
    g.upstream_eof()
    assert records[0].status == 200


def test_large_pipeline_holds_the_client() -> None:
    records: list[RequestRecord] = []
    g = HttpGate(host_rule({"a.test"}), records.append, max_held=1000)
    g.from_client(req() + req(extra="X: " + "a" * 1200 + "\r\n"))
    assert g.hold
    g.from_upstream(RESP)
    assert not g.hold


def test_async_decision_holds_until_done() -> None:
    import asyncio

    async def main() -> None:
        async def later() -> Decision:
            await asyncio.sleep(0)
            return ALLOW

        woken: list[bool] = []
        g = HttpGate(lambda *a: later(), lambda r: None)
        g.wake = lambda: woken.append(True)
        g.from_client(req())
        assert g.hold and g.take_up() == []
        await asyncio.sleep(0.01)
        assert woken and g.take_up() == [req()]
        assert not g.hold

    asyncio.run(main())
