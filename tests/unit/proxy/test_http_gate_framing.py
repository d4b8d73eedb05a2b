"""The gate's response framing: bodies with a Content-Length counted, not parsed;
a fresh request parser per request; every other framing still read by h11."""

from __future__ import annotations

import h11

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy.http_gate import HttpGate, RequestRecord
from egressd.proxy.http_rules import RequestTarget

ALLOW = Decision(Verdict.ALLOW, "allowed_host", None)


def decide(method: str, request: RequestTarget, upgrade: str | None) -> Decision:
    if request.host == "a.test":
        return ALLOW
    return Decision(Verdict.DENY, "host_not_allowed", None)


def gate() -> tuple[HttpGate, list[RequestRecord]]:
    records: list[RequestRecord] = []
    return HttpGate(decide, records.append), records


def req(host: str = "a.test", path: str = "/", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def resp(body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    head = f"HTTP/{version} 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def test_counted_body_split_over_reads_completes_once() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req(path="/2"))
    assert g.take_up() == [req(path="/1")]
    whole = resp(b"x" * 100_000)
    head_end = whole.index(b"\r\n\r\n") + 4
    g.from_upstream(whole[: head_end + 10])  # the head and the body's first bytes
    g.from_upstream(whole[head_end + 10 : 50_000])
    assert records == [] and g.take_up() == []  # /2 held: /1's response is not over
    g.from_upstream(whole[50_000:])
    assert [(r.path, r.status, r.bytes_down) for r in records] == [("/1", 200, len(whole))]
    assert g.take_up() == [req(path="/2")]  # released by the end of the body
    g.from_upstream(resp(b"ok"))
    assert [r.path for r in records] == ["/1", "/2"]
    assert not g.failed and not g.ended


def test_head_only_read_then_body_in_later_reads() -> None:
    g, records = gate()
    g.from_client(req())
    g.take_up()
    whole = resp(b"abcdef")
    g.from_upstream(whole[:-6])
    g.from_upstream(b"abc")
    assert records == []
    g.from_upstream(b"def")
    assert [r.status for r in records] == [200]


def test_bytes_past_a_counted_body_lose_track() -> None:
    g, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp(b"ok") + b"HTTP/1.1 200 OK\r\n")
    assert g.failed and g.ended
    assert [r.status for r in records] == [200]
    g.from_client(req(path="/next"))
    assert g.take_up() == []  # fail closed: nothing more goes up


def test_server_close_inside_a_counted_body_loses_track() -> None:
    g, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp(b"x" * 10)[:-4])
    g.upstream_eof()
    assert g.failed and g.ended
    assert [r.status for r in records] == [200]  # logged, with the bytes that came


def test_counted_response_with_connection_close_ends_requests() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req(path="/2"))
    g.take_up()
    g.from_upstream(resp(b"ok", "Connection: close\r\n"))
    assert [r.path for r in records] == ["/1"]
    assert g.ended and g.take_up() == []


def test_http10_response_with_length_ends_requests() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req(path="/2"))
    g.take_up()
    g.from_upstream(resp(b"ok", version="1.0"))
    assert [r.path for r in records] == ["/1"]
    assert g.ended and g.take_up() == []


def test_chunked_response_still_read_by_h11() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req(path="/2"))
    g.take_up()
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    g.from_upstream(chunked)
    assert records == []
    g.from_upstream(b"0\r\n\r\n")
    assert [r.path for r in records] == ["/1"]
    assert g.take_up() == [req(path="/2")]


def test_no_content_and_not_modified_have_no_body() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req(path="/2") + req(path="/3"))
    g.take_up()
    g.from_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert g.take_up() == [req(path="/2")]
    # A 304 may carry the Content-Length of the body it stands for: still no body.
    g.from_upstream(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
    assert g.take_up() == [req(path="/3")]
    assert [(r.path, r.status) for r in records] == [("/1", 204), ("/2", 304)]


def test_client_close_after_request_ends_after_response() -> None:
    g, records = gate()
    g.from_client(req())
    g.client_eof()
    assert g.take_up() == [req()]
    assert g.ended  # no request will follow; the response is still watched
    g.from_upstream(resp(b"ok"))
    assert [r.status for r in records] == [200]
    assert not g.failed and not g.holds_data()


def test_pipelined_request_after_client_close_is_still_decided() -> None:
    g, records = gate()
    g.from_client(req(path="/1") + req("b.test", "/2"))
    g.client_eof()
    g.take_up()
    g.from_upstream(resp(b"ok"))
    assert g.final is not None and b"host_not_allowed" in g.final
    assert [(r.path, r.status) for r in records] == [("/1", 200), ("/2", 403)]


def test_early_response_before_the_request_body_ends() -> None:
    # The server answers (and completes its response) while the upload still
    # streams: the request parser is told of it and goes on after the body.
    g, records = gate()
    g.from_client(req(method="PUT", extra="Content-Length: 6\r\n") + b"abc")
    g.take_up()
    g.from_upstream(resp(b"no"))
    assert [r.status for r in records] == [200]
    g.from_client(b"def")
    assert g.take_up() == [b"def"]
    g.from_client(req(path="/after"))
    assert g.take_up() == [req(path="/after")]
    g.from_upstream(resp(b"ok"))
    assert [r.path for r in records] == ["/", "/after"]


def test_counted_length_matches_h11_for_a_large_body() -> None:
    # The counting agrees with h11 itself: the same bytes make one response.
    body = b"y" * 70_000
    whole = resp(body)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a.test")]))
    client.send(h11.EndOfMessage())
    client.receive_data(whole)
    events = []
    while (event := client.next_event()) is not h11.NEED_DATA:
        events.append(type(event))
        if event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
            break
    assert events[0] is h11.Response and events[-1] is h11.EndOfMessage
    g, records = gate()
    g.from_client(req())
    g.take_up()
    for i in range(0, len(whole), 4096):
        g.from_upstream(whole[i : i + 4096])
    assert [r.bytes_down for r in records] == [len(whole)] and not g.failed
