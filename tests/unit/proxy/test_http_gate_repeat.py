"""The gate's repeated heads: a request head byte for byte the same as the last
bodiless one is taken without the parser, a response head the same as the last
counted one without the watcher; every request is still decided, every
response still framed and ordered."""

from __future__ import annotations

import asyncio
import json

import h11
import pytest

from egressd.policy.matcher import Decision, Verdict
from egressd.policy.model import Policy, parse_policy
from egressd.proxy.credentials import RequestCredentials
from egressd.proxy.http_gate import HttpGate, RequestRecord
from egressd.proxy.http_rules import RequestTarget

ALLOW = Decision(Verdict.ALLOW, "allowed_request", None)
DENY = Decision(Verdict.DENY, "path_not_allowed", None)


class Decider:
    """Allows a.test, except the answers queued in `next` (one per call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, str]] = []
        self.next: list[Decision] = []

    def __call__(self, method: str, request: RequestTarget, upgrade: str | None) -> Decision:
        self.calls.append((method, request.host, request.path_text))
        if self.next:
            return self.next.pop(0)
        return (
            ALLOW if request.host == "a.test" else Decision(Verdict.DENY, "host_not_allowed", None)
        )


def gate() -> tuple[HttpGate, Decider, list[RequestRecord]]:
    decider = Decider()
    records: list[RequestRecord] = []
    return HttpGate(decider, records.append), decider, records


def req(host: str = "a.test", path: str = "/", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def resp(body: bytes = b"hello", status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def error_of(final: bytes | None) -> str:
    assert final is not None and final.startswith(b"HTTP/1.1 403 ")
    return str(json.loads(final.split(b"\r\n\r\n", 1)[1])["error"])


def test_every_repeated_request_is_decided_and_logged() -> None:
    g, decider, records = gate()
    for _ in range(5):
        g.from_client(req())
        assert g.take_up() == [req()]
        g.from_upstream(resp())
    assert len(decider.calls) == 5
    assert [(r.method, r.path, r.host, r.status) for r in records] == [
        ("GET", "/", "a.test", 200)
    ] * 5
    assert all(r.bytes_up == len(req()) and r.bytes_down == len(resp()) for r in records)
    assert not g.failed and not g.ended


def test_a_repeated_head_denied_when_the_decision_changes() -> None:
    g, decider, records = gate()
    for _ in range(2):
        g.from_client(req())
        g.take_up()
        g.from_upstream(resp())
    decider.next = [DENY]
    g.from_client(req())
    assert g.take_up() == []
    assert error_of(g.final) == "path_not_allowed"
    assert records[-1].decision.reason == "path_not_allowed" and g.ended


def test_repeated_heads_pipelined_are_released_one_response_at_a_time() -> None:
    g, decider, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())  # the head is now known
    g.from_client(req() * 3 + req("b.test"))
    assert g.take_up() == [req()]
    assert len(decider.calls) == 2  # the others wait for the response
    g.from_upstream(resp())
    assert g.take_up() == [req()]
    g.from_upstream(resp())
    assert g.take_up() == [req()]
    g.from_upstream(resp())
    # b.test differs from the repeated head: parsed, decided, denied
    assert g.take_up() == [] and error_of(g.final) == "host_not_allowed"
    assert [r.status for r in records] == [200, 200, 200, 200, 403]
    assert [c[1] for c in decider.calls] == ["a.test"] * 4 + ["b.test"]


def test_a_repeated_head_split_over_reads() -> None:
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    whole = req()
    g.from_client(whole[:7])
    assert g.take_up() == []
    g.from_client(whole[7:])
    assert g.take_up() == [whole]
    g.from_upstream(resp())
    assert len(records) == 2 and not g.failed


def test_a_head_longer_than_the_repeated_one_is_parsed() -> None:
    # The same bytes and then a header more: not a repeat (h11 reads it whole).
    g, decider, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    longer = req(extra="X-More: 1\r\n")
    g.from_client(longer)
    assert g.take_up() == [longer]
    g.from_upstream(resp())
    assert len(records) == 2 and len(decider.calls) == 2


def test_malformed_after_a_repeated_head_is_refused() -> None:
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    g.from_client(req() + b"GET / HTTP/1.1\nHost: a.test\n\n")  # bare LF
    assert g.take_up() == [req()]
    g.from_upstream(resp())
    assert g.take_up() == [] and error_of(g.final) == "http_malformed"
    assert records[-1].decision.reason == "http_malformed"


def test_bodies_are_never_taken_for_repeats() -> None:
    g, _, records = gate()
    post = req(method="POST", extra="Content-Length: 3\r\n") + b"abc"
    for _ in range(3):
        g.from_client(post)
        assert b"".join(g.take_up()) == post
        g.from_upstream(resp())
    assert [r.bytes_up for r in records] == [len(post)] * 3


def test_a_closing_request_is_not_repeated() -> None:
    # h11 reads `Connection: close` as the client's last request: a second one
    # identical to it is refused as before, never taken as a repeat.
    g, _, records = gate()
    closing = req(extra="Connection: close\r\n")
    g.from_client(closing)
    assert g.take_up() == [closing]
    g.from_upstream(resp())
    g.from_client(closing)
    assert g.take_up() == []
    assert len(records) <= 2 and records[0].status == 200


def test_client_fin_after_repeated_requests() -> None:
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    g.from_client(req())
    g.client_eof()
    assert g.take_up() == [req()]
    g.from_upstream(resp())
    assert len(records) == 2 and g.ended and not g.holds_data()


def test_informational_response_to_a_repeated_request() -> None:
    g, _, records = gate()
    for _ in range(2):
        g.from_client(req())
        g.take_up()
        g.from_upstream(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + resp())
    g.from_client(req())
    assert g.take_up() == [req()]
    assert [r.status for r in records] == [200, 200] and not g.failed


def test_a_repeated_response_head_counts_its_body() -> None:
    g, _, records = gate()
    big = resp(b"x" * 1000)
    for _ in range(3):
        g.from_client(req())
        g.take_up()
        g.from_upstream(big[:300])
        assert len(g.take_up()) == 0
        g.from_client(req())  # held until the body ends
        assert g.take_up() == []
        g.from_upstream(big[300:])
        assert g.take_up() == [req()]
        g.from_upstream(resp())
    assert [r.bytes_down for r in records] == [len(big), len(resp())] * 3


def test_bytes_past_a_repeated_response_lose_track() -> None:
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp() + b"HTTP/1.1 200 OK\r\n")  # answers no request
    assert g.failed and g.ended and len(records) == 2


def test_head_request_after_a_repeated_response_head_has_no_body() -> None:
    # The same head answering HEAD frames no body: never taken as a repeat.
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    g.from_client(req(method="HEAD"))
    assert g.take_up() == [req(method="HEAD")]
    head_only = resp().removesuffix(b"hello")
    g.from_upstream(head_only)
    g.from_client(req())
    assert g.take_up() == [req()]
    g.from_upstream(resp())
    assert [(r.method, r.status, r.bytes_down) for r in records] == [
        ("GET", 200, len(resp())),
        ("HEAD", 200, len(head_only)),
        ("GET", 200, len(resp())),
    ]
    assert not g.failed


def test_a_different_length_is_read_again() -> None:
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp(b"12345"))
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp(b"123456789"))
    g.from_client(req())
    assert g.take_up() == [req()]
    assert [r.bytes_down for r in records] == [len(resp(b"12345")), len(resp(b"123456789"))]


def test_a_repeated_closing_response_stops_the_gate() -> None:
    g, _, records = gate()
    closing = resp(extra="Connection: close\r\n")
    g.from_client(req())
    g.take_up()
    g.from_upstream(closing)
    assert g.ended and len(records) == 1
    # A second connection's gate: the repeat of a closing head stops it too.
    g2, _, records2 = gate()
    for _ in range(1):
        g2.from_client(req())
        g2.take_up()
        g2.from_upstream(resp())
    g2.from_client(req())
    g2.take_up()
    g2.from_upstream(closing)
    g2.from_client(req())
    assert g2.take_up() == [] and g2.ended and len(records2) == 2


def test_async_decision_on_a_repeated_head() -> None:
    async def main() -> None:
        pending: list[asyncio.Future[Decision]] = []

        def decide(method: str, request: RequestTarget, upgrade: str | None) -> object:
            if not pending:
                fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
                pending.append(fut)
                return fut
            return ALLOW

        records: list[RequestRecord] = []
        g = HttpGate(decide, records.append)
        g.from_client(req())
        assert g.take_up() == [] and g.hold
        pending[0].set_result(ALLOW)
        await asyncio.sleep(0.01)
        assert g.take_up() == [req()]
        g.from_upstream(resp())
        pending.clear()  # the repeat is decided asynchronously too
        g.from_client(req())
        assert g.take_up() == [] and g.hold
        pending[0].set_result(ALLOW)
        await asyncio.sleep(0.01)
        assert g.take_up() == [req()]
        g.from_upstream(resp())
        g.from_client(req())  # decided at once this time
        assert g.take_up() == [req()]
        g.from_upstream(resp())
        assert [r.status for r in records] == [200, 200, 200] and not g.hold

    asyncio.run(main())


def policy() -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "egress": [
                {
                    "host": "api.test",
                    "ports": [80],
                    "http": {
                        "allow": [{"methods": ["GET"], "paths": ["/**"]}],
                        "credentials": [{"header": "Authorization", "secret": "tok"}],
                    },
                },
                {"host": "other.test", "ports": [80]},
            ],
        },
        require_timestamps=False,
    )


def test_credentials_set_on_every_repeated_request_and_exfiltration_denied() -> None:
    p = policy()
    secrets = {"tok": "value-one-abcdef"}

    def decide(method: str, request: RequestTarget, upgrade: str | None) -> Decision:
        rule = {"api.test": p.egress[0], "other.test": p.egress[1]}[request.host or ""]
        return Decision(Verdict.ALLOW, "allowed_request", rule)

    records: list[RequestRecord] = []
    g = HttpGate(decide, records.append, credentials=RequestCredentials.of(p, secrets.get))
    sent = req("api.test", extra="Authorization: mine\r\n")
    for value in ("value-one-abcdef", "value-one-abcdef", "value-two-abcdef"):
        secrets["tok"] = value  # a secret re-read between requests
        g.from_client(sent)
        (head,) = g.take_up()
        assert f"Authorization: {value}\r\n".encode() in head and b"mine" not in head
        g.from_upstream(resp())
    assert [r.injected for r in records] == [("Authorization",)] * 3
    # The same bytes to another host, twice: the marker is found each time.
    g2 = HttpGate(decide, records.append, credentials=RequestCredentials.of(p, secrets.get))
    other = req("other.test", "/x?k=egressd:tok")
    g2.from_client(other)
    assert g2.take_up() == [] and error_of(g2.final) == "credential_exfiltration"


def test_repeats_skip_the_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    # What makes repeats cheap: no request parse, no Host read, no response watcher.
    from egressd.proxy import sniff

    counts = {"sniff": 0, "parse": 0}
    sniff_host = sniff.sniff_http_host
    next_event = h11.Connection.next_event

    def counted_sniff(head: bytes) -> object:
        counts["sniff"] += 1
        return sniff_host(head)

    def counted_next_event(self: h11.Connection) -> object:
        counts["parse"] += 1
        return next_event(self)

    monkeypatch.setattr(sniff, "sniff_http_host", counted_sniff)
    monkeypatch.setattr(h11.Connection, "next_event", counted_next_event)
    g, decider, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    first = dict(counts)
    assert first["sniff"] == 1 and first["parse"] > 0
    for _ in range(10):
        g.from_client(req())
        assert g.take_up() == [req()]
        g.from_upstream(resp())
    whole = req()
    for piece in (whole[:5], whole[5:20], whole[20:]):  # a repeat in pieces
        g.from_client(piece)
    assert g.take_up() == [whole]
    g.from_upstream(resp())
    assert counts == first
    assert len(decider.calls) == 12 and len(records) == 12


def test_a_start_like_the_repeat_that_turns_out_different() -> None:
    g, decider, _ = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    other = req("b.test")
    g.from_client(other[:20])  # "GET / HTTP/1.1\r\nHost": the repeat's start too
    assert g.take_up() == [] and not g.ended
    g.from_client(other[20:])
    assert g.take_up() == [] and error_of(g.final) == "host_not_allowed"
    assert [c[1] for c in decider.calls] == ["a.test", "b.test"]


def test_a_start_of_the_repeat_then_fin_is_never_sent() -> None:
    g, _, records = gate()
    g.from_client(req())
    g.take_up()
    g.from_upstream(resp())
    g.from_client(req()[:20])
    g.client_eof()
    assert g.take_up() == [] and g.ended
    assert [r.status for r in records][:1] == [200]
