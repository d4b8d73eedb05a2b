"""Heads shared across an interceptor's gates (`http_gate.SharedHeads`): a
request or response head that another connection's fresh parser read whole is
taken without h11 or `sniff`, and the gate then decides, forwards, answers and
logs exactly as one that parses it itself: the same bytes upstream and
downstream, the same records (the audit events), the same denials."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import h11
import pytest

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy.http_gate import HttpGate, RequestRecord, SharedHeads
from egressd.proxy.http_rules import RequestTarget

ALLOW = Decision(Verdict.ALLOW, "allowed_host", None)
NOT_ALLOWED = Decision(Verdict.DENY, "host_not_allowed", None)

CLOSE_REQ = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
KEEP_REQ = b"GET /k HTTP/1.1\r\nHost: a.test\r\n\r\n"
OLD_REQ = b"GET /old HTTP/1.0\r\nHost: a.test\r\n\r\n"
HEAD_REQ = b"HEAD / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
OTHER_REQ = b"GET / HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n"
CLOSE_RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
KEEP_RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Step = tuple[str, bytes]  # ("client" | "upstream", data); b"": that side's FIN


class Decider:
    """Allows a.test; `answers`: the next decisions instead (one per call);
    `pending`: decide asynchronously."""

    def __init__(self, answers: tuple[Decision, ...] = (), *, pending: bool = False) -> None:
        self.answers = list(answers)
        self.pending = pending
        self.calls: list[tuple[str, str | None, str]] = []

    def __call__(self, method: str, request: RequestTarget, upgrade: str | None) -> Any:
        self.calls.append((method, request.host, request.path_text))
        decision = self.answers.pop(0) if self.answers else None
        if decision is None:
            decision = ALLOW if request.host == "a.test" else NOT_ALLOWED
        if self.pending:

            async def later() -> Decision:
                await asyncio.sleep(0)
                return decision

            return later()
        return decision


def run(gate: HttpGate, steps: list[Step]) -> list[tuple[Any, ...]]:
    """What the gate says after each step: the bytes it lets go up, its final
    response, whether it is a tunnel. (Not `failed`: a watcher that read a
    counted body's first bytes with its head holds them and says so at the
    server's FIN, a watcher that never saw them does not; neither changes what
    is sent, decided or logged.)"""

    async def main() -> list[tuple[Any, ...]]:
        seen: list[tuple[Any, ...]] = []
        for side, data in steps:
            if side == "client":
                gate.from_client(data) if data else gate.client_eof()
            else:
                gate.from_upstream(data) if data else gate.upstream_eof()
            for _ in range(3):
                await asyncio.sleep(0)  # asynchronous decisions finish
            seen.append((gate.take_up(), gate.final, gate.tunnel))
        seen.append(("end", gate.ended, gate.hold, [dataclasses.asdict(r) for r in pending(gate)]))
        return seen

    return asyncio.run(main())


def pending(gate: HttpGate) -> list[RequestRecord]:
    return gate.pending_records()


def both(
    steps: list[Step],
    *,
    warm: list[Step],
    decider: Callable[[], Decider] = Decider,
) -> tuple[Any, Any, int]:
    """`steps` on a gate that parses everything itself and on one whose shared
    heads were filled by `warm` on another gate: what each did and logged, and
    how many h11 events the warm one parsed."""
    cold_records: list[RequestRecord] = []
    cold = run(HttpGate(decider(), cold_records.append), steps)
    shared = SharedHeads()
    run(HttpGate(Decider(), lambda _r: None, shared=shared), warm)
    warm_records: list[RequestRecord] = []
    parsed = [0]
    next_event = h11.Connection.next_event

    def counted(self: h11.Connection) -> Any:
        parsed[0] += 1
        return next_event(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h11.Connection, "next_event", counted)
        hot = run(HttpGate(decider(), warm_records.append, shared=shared), steps)
    as_dicts = (
        [dataclasses.asdict(r) for r in cold_records],
        [dataclasses.asdict(r) for r in warm_records],
    )
    return (cold, as_dicts[0]), (hot, as_dicts[1]), parsed[0]


def same(steps: list[Step], *, warm: list[Step], **kw: Any) -> tuple[Any, int]:
    cold, hot, parsed = both(steps, warm=warm, **kw)
    assert hot == cold
    return cold, parsed


WARM = [("client", CLOSE_REQ), ("upstream", CLOSE_RESP)]


def test_a_connection_close_request_and_response_need_no_parser() -> None:
    (seen, records), parsed = same([("client", CLOSE_REQ), ("upstream", CLOSE_RESP)], warm=WARM)
    assert parsed == 0
    assert seen[0][0] == [CLOSE_REQ] and seen[1][1] is None
    assert [(r["method"], r["path"], r["host"], r["status"]) for r in records] == [
        ("GET", "/", "a.test", 200)
    ]
    assert records[0]["bytes_up"] == len(CLOSE_REQ) and records[0]["bytes_down"] == len(CLOSE_RESP)


def test_a_shared_head_is_still_decided_and_denied() -> None:
    (seen, records), parsed = same(
        [("client", CLOSE_REQ)], warm=WARM, decider=lambda: Decider((NOT_ALLOWED,))
    )
    assert parsed == 0
    assert seen[0][0] == [] and seen[0][1] is not None and b" 403 " in seen[0][1]
    assert records[0]["decision"]["reason"] == "host_not_allowed"


def test_a_denied_host_is_never_shared() -> None:
    # A refused head ends the gate before h11 ends it: never kept, parsed every time.
    (_seen, records), parsed = same(
        [("client", OTHER_REQ)], warm=[("client", OTHER_REQ), ("upstream", CLOSE_RESP)]
    )
    assert parsed > 0 and records[0]["decision"]["reason"] == "host_not_allowed"


def test_asynchronous_decision_on_a_shared_head() -> None:
    (seen, records), _ = same(
        [("client", CLOSE_REQ), ("upstream", CLOSE_RESP)],
        warm=WARM,
        decider=lambda: Decider(pending=True),
    )
    assert seen[0][0] == [CLOSE_REQ] and records[0]["status"] == 200


def test_more_after_a_closing_request_is_refused_as_h11_refuses_it() -> None:
    # The server did not close: the client's next request breaks its own
    # "Connection: close", which h11 refuses (http_malformed, after the response).
    steps = [("client", CLOSE_REQ), ("upstream", KEEP_RESP), ("client", KEEP_REQ)]
    (_seen, records), _ = same(steps, warm=WARM)
    assert [r["decision"]["reason"] for r in records] == ["allowed_host", "http_malformed"]
    # Pipelined in the same read, and after the response.
    (_seen, records), _ = same(
        [("client", CLOSE_REQ + KEEP_REQ), ("upstream", KEEP_RESP)], warm=WARM
    )
    assert [r["decision"]["reason"] for r in records] == ["allowed_host", "http_malformed"]
    (_seen, records), _ = same(
        [("client", CLOSE_REQ), ("client", KEEP_REQ), ("upstream", KEEP_RESP)], warm=WARM
    )
    assert [r["decision"]["reason"] for r in records] == ["allowed_host", "http_malformed"]


def test_client_fin_after_a_closing_shared_head() -> None:
    for response in (CLOSE_RESP, KEEP_RESP):
        (seen, records), _ = same(
            [("client", CLOSE_REQ), ("client", b""), ("upstream", response), ("upstream", b"")],
            warm=WARM,
        )
        assert [r["status"] for r in records] == [200] and seen[-1][1] is True


def test_informational_response_to_a_closing_shared_head() -> None:
    (_seen, records), _ = same(
        [
            ("client", CLOSE_REQ),
            ("upstream", CONTINUE),
            ("upstream", KEEP_RESP),
            ("client", KEEP_REQ),
        ],
        warm=WARM,
    )
    assert [r["decision"]["reason"] for r in records] == ["allowed_host", "http_malformed"]


def test_keep_alive_heads_shared_across_connections() -> None:
    steps = [
        ("client", KEEP_REQ),
        ("upstream", KEEP_RESP),
        ("client", KEEP_REQ),
        ("upstream", KEEP_RESP),
        ("client", CLOSE_REQ),
        ("upstream", CLOSE_RESP),
    ]
    warm = [("client", KEEP_REQ), ("upstream", KEEP_RESP), *WARM]
    (_seen, records), parsed = same(steps, warm=warm)
    assert parsed == 0 and [r["status"] for r in records] == [200, 200, 200]


def test_http_1_0_request_shared() -> None:
    (_seen, records), _parsed = same(
        [("client", OLD_REQ), ("upstream", KEEP_RESP), ("client", KEEP_REQ)],
        warm=[("client", OLD_REQ), ("upstream", CLOSE_RESP)],
    )
    assert [r["decision"]["reason"] for r in records] == ["allowed_host", "http_malformed"]


def test_a_shared_response_head_is_not_taken_for_a_head_request() -> None:
    # The same head bytes answer a HEAD request with no body: h11 reads it.
    head_only = CLOSE_RESP[: -len(b"hello")]
    (_seen, records), parsed = same([("client", HEAD_REQ), ("upstream", head_only)], warm=WARM)
    assert parsed > 0 and records[0]["status"] == 200 and records[0]["bytes_down"] == len(head_only)


def test_a_different_or_split_head_is_parsed() -> None:
    whole = CLOSE_REQ
    for steps in (
        [("client", whole[:10]), ("client", whole[10:]), ("upstream", CLOSE_RESP)],
        [("client", whole.replace(b"a.test", b"A.test")), ("upstream", CLOSE_RESP)],
        [("client", whole), ("upstream", CLOSE_RESP[:20]), ("upstream", CLOSE_RESP[20:])],
        [("client", whole), ("upstream", CLOSE_RESP + b"extra")],
    ):
        (_seen, records), _ = same(steps, warm=WARM)
        assert records and records[0]["host"] in ("a.test", "A.test")


def test_a_body_is_never_shared() -> None:
    post = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    (_seen, records), parsed = same(
        [("client", post), ("upstream", CLOSE_RESP)],
        warm=[("client", post), ("upstream", CLOSE_RESP)],
    )
    assert parsed > 0 and records[0]["bytes_up"] == len(post)


def test_shared_heads_are_bounded() -> None:
    shared = SharedHeads()
    for i in range(shared.requests.LIMIT + 5):
        head = f"GET /{i} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".encode()
        run(HttpGate(Decider(), lambda _r: None, shared=shared), [("client", head)])
    assert 0 < len(shared.requests._entries) <= shared.requests.LIMIT
