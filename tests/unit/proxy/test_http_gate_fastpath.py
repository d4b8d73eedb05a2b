"""The gate's fast paths take the decisions its slow paths take.

* A read that is exactly one known head (`HttpGate._head_read`) is taken as
  `_repeat` takes it from the held stream;
* a client FIN between requests with nothing due (`HttpGate._idle`) stops the
  gate as a fresh parser reading the FIN would;
* `_Heads.find` checks the last kept head first and `_Heads.exact` looks a whole
  read up, and both say what the lookup by the stream's first blank line says;
* a `Decision` or `tier2.Tier2Outcome` is read without `getattr`.

Each conversation runs twice: as is, and with the fast paths switched off (the
slow path each replaced); the bytes sent up, the final responses, the gate's
state after every step and the records (the audit events) are the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import h11
import pytest

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy import http_gate
from egressd.proxy.http_gate import HttpGate, RequestRecord, SharedHeads
from egressd.proxy.http_rules import RequestTarget
from egressd.proxy.tier2 import Tier2Outcome

ALLOW = Decision(Verdict.ALLOW, "allowed_request", None)
DENY = Decision(Verdict.DENY, "path_not_allowed", None)
OUT_ALLOW = Tier2Outcome(ALLOW, Verdict.ALLOW, False)
OUT_REPORT = Tier2Outcome(DENY, Verdict.ALLOW, True)  # report mode: allowed, flagged
OUT_DENY = Tier2Outcome(DENY, Verdict.DENY, False)

CLOSE_REQ = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
KEEP_REQ = b"GET /k HTTP/1.1\r\nHost: a.test\r\n\r\n"
OTHER_REQ = b"GET /o HTTP/1.1\r\nHost: a.test\r\n\r\n"
CHUNKED_REQ = (
    b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)
BOTH_LENGTHS_REQ = (
    b"POST /s HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)
FOLDED_REQ = b"GET /f HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n"
CLOSE_RESP = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
    b'Connection: close\r\n\r\n{"ok":true}'
)
KEEP_RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_RESP = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"

Step = tuple[str, bytes]  # ("client" | "upstream", data); b"": that side's FIN


class Odd:
    """An outcome of neither known type: read through `getattr`, as before."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def answering(*answers: Any) -> Callable[[str, RequestTarget, str | None], Any]:
    """A decider giving `answers` in turn, then OUT_ALLOW."""
    queue = list(answers)

    def decide(method: str, request: RequestTarget, upgrade: str | None) -> Any:
        return queue.pop(0) if queue else OUT_ALLOW

    return decide


def slow_find(self: Any, stream: bytes | bytearray) -> Any:
    """`_Heads.find` as it was: by the stream's first blank line only."""
    end = stream.find(b"\r\n\r\n")
    if end < 0 or not self._entries:
        return None
    return self._entries.get(bytes(stream[: end + 4]))


def converse(
    steps: list[Step], *, warm: list[Step], decide: Callable[[], Any], fast: bool
) -> tuple[list[Any], list[dict[str, Any]], list[str]]:
    """What the gate says after each step and what it logged; `warm` first fills
    the shared heads on another gate. `taken`: the fast paths that were taken."""
    taken: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        if fast:
            head_read, idle = HttpGate._head_read, HttpGate._idle

            def counting_head_read(self: HttpGate, data: bytes) -> bool:
                took = head_read(self, data)
                if took:
                    taken.append("head_read")
                return took

            def counting_idle(self: HttpGate) -> bool:
                yes = idle(self)
                if yes:
                    taken.append("idle")
                return yes

            mp.setattr(HttpGate, "_head_read", counting_head_read)
            mp.setattr(HttpGate, "_idle", counting_idle)
        else:
            mp.setattr(HttpGate, "_head_read", lambda self, data: False)
            mp.setattr(HttpGate, "_idle", lambda self: False)
            mp.setattr(http_gate._Heads, "find", slow_find)
        shared = SharedHeads()
        steps_of(HttpGate(answering(), lambda _r: None, shared=shared), warm)
        records: list[RequestRecord] = []
        seen = steps_of(HttpGate(decide(), records.append, shared=shared), steps)
    return seen, [dataclasses.asdict(r) for r in records], taken


def steps_of(gate: HttpGate, steps: list[Step]) -> list[Any]:
    async def main() -> list[Any]:
        seen: list[Any] = []
        for side, data in steps:
            if side == "client":
                gate.from_client(data) if data else gate.client_eof()
            else:
                gate.from_upstream(data) if data else gate.upstream_eof()
            for _ in range(3):
                await asyncio.sleep(0)  # asynchronous decisions finish
            seen.append(
                (gate.take_up(), gate.final, gate.tunnel, gate.hold, gate.ended, gate.holds_data())
            )
        pending = [dataclasses.asdict(r) for r in gate.pending_records()]
        seen.append(("end", gate.failed, pending))
        return seen

    return asyncio.run(main())


def same(
    steps: list[Step],
    *,
    warm: list[Step] | None = None,
    decide: Callable[[], Any] = answering,
) -> tuple[list[Any], list[dict[str, Any]], list[str]]:
    """`steps` with and without the fast paths: the same; what the fast run saw."""
    warm = [] if warm is None else warm
    seen, records, taken = converse(steps, warm=warm, decide=decide, fast=True)
    slow_seen, slow_records, _ = converse(steps, warm=warm, decide=decide, fast=False)
    assert (seen, records) == (slow_seen, slow_records)
    return seen, records, taken


WARM_CLOSE = [("client", CLOSE_REQ), ("upstream", CLOSE_RESP)]
WARM_KEEP = [("client", KEEP_REQ), ("upstream", KEEP_RESP)]


def test_the_bench_connection_takes_the_fast_paths_and_logs_the_same() -> None:
    seen, records, taken = same(
        [("client", CLOSE_REQ), ("upstream", CLOSE_RESP), ("upstream", b""), ("client", b"")],
        warm=WARM_CLOSE,
    )
    assert taken == ["head_read"]
    assert seen[0][0] == [CLOSE_REQ]
    assert [(r["path"], r["status"], r["bytes_up"], r["bytes_down"]) for r in records] == [
        ("/", 200, len(CLOSE_REQ), len(CLOSE_RESP))
    ]


def test_keep_alive_requests_then_the_fin() -> None:
    steps = [("client", KEEP_REQ), ("upstream", KEEP_RESP)] * 3 + [("client", b"")]
    seen, records, taken = same(steps, warm=WARM_KEEP)
    assert taken == ["head_read"] * 3 + ["idle"]
    assert len(records) == 3 and {r["status"] for r in records} == {200}
    assert seen[-2][4] is True  # ended at the FIN


def test_a_fin_with_a_response_due_is_not_idle() -> None:
    _, records, taken = same(
        [("client", KEEP_REQ), ("client", b""), ("upstream", KEEP_RESP), ("upstream", b"")],
        warm=WARM_KEEP,
    )
    assert "idle" not in taken
    assert [r["status"] for r in records] == [200]


def test_a_response_head_split_across_reads() -> None:
    cut = CLOSE_RESP.index(b"\r\n\r\n") - 7
    for pieces in (
        [CLOSE_RESP[:cut], CLOSE_RESP[cut:]],
        [CLOSE_RESP[: cut + 9], CLOSE_RESP[cut + 9 :]],  # the whole head, then the body
        [bytes([b]) for b in CLOSE_RESP],
    ):
        steps = [("client", CLOSE_REQ)] + [("upstream", p) for p in pieces]
        _, records, _ = same([*steps, ("upstream", b"")], warm=WARM_CLOSE)
        assert [(r["status"], r["bytes_down"]) for r in records] == [(200, len(CLOSE_RESP))]


def test_a_request_pipelined_behind_another_is_held_until_the_response() -> None:
    for warm in (WARM_KEEP, []):
        seen, records, taken = same(
            [
                ("client", KEEP_REQ + OTHER_REQ),
                ("upstream", KEEP_RESP),
                ("upstream", KEEP_RESP),
                ("client", b""),
            ],
            warm=warm,
        )
        assert "head_read" not in taken  # the read is more than one head
        assert seen[0][0] == [KEEP_REQ] and seen[1][0] == [OTHER_REQ]
        assert [r["path"] for r in records] == ["/k", "/o"]


def test_the_known_head_then_a_pipelined_one_in_the_next_read() -> None:
    steps = [
        ("client", KEEP_REQ),
        ("upstream", KEEP_RESP),
        ("client", KEEP_REQ + KEEP_REQ),  # the last head and more: `_repeat`
        ("upstream", KEEP_RESP),
        ("upstream", KEEP_RESP),
    ]
    seen, records, taken = same(steps, warm=WARM_KEEP)
    assert taken == ["head_read"]
    assert [r["path"] for r in records] == ["/k"] * 3
    assert seen[2][0] == [KEEP_REQ] and seen[3][0] == [KEEP_REQ]


def test_a_chunked_body_goes_through_the_parser() -> None:
    head_end = CHUNKED_REQ.index(b"\r\n\r\n") + 4
    for pieces in ([CHUNKED_REQ], [CHUNKED_REQ[:head_end], CHUNKED_REQ[head_end:]]):
        steps = [("client", p) for p in pieces] + [("upstream", CHUNKED_RESP), ("client", b"")]
        seen, records, taken = same(steps, warm=WARM_KEEP)
        assert "head_read" not in taken
        assert b"".join(b"".join(s[0]) for s in seen[:-1]) == CHUNKED_REQ
        assert [(r["path"], r["status"], r["bytes_up"]) for r in records] == [
            ("/c", 200, len(CHUNKED_REQ))
        ]


@pytest.mark.parametrize("request_bytes", [BOTH_LENGTHS_REQ, FOLDED_REQ])
def test_smuggling_defences_are_unchanged(request_bytes: bytes) -> None:
    seen, records, _ = same(
        [("client", KEEP_REQ), ("upstream", KEEP_RESP), ("client", request_bytes)]
    )
    assert seen[2][0] == [] and seen[2][1] is not None and b"http_malformed" in seen[2][1]
    assert [r["decision"]["reason"] for r in records][-1] == "http_malformed"


@pytest.mark.parametrize(
    "answer", [OUT_REPORT, OUT_DENY, ALLOW, DENY, Odd(ALLOW), Odd(DENY)], ids=repr
)
def test_every_kind_of_outcome_is_read_the_same(answer: Any) -> None:
    _, records, taken = same(
        [("client", CLOSE_REQ), ("upstream", CLOSE_RESP)],
        warm=WARM_CLOSE,
        decide=lambda: answering(answer),
    )
    assert taken == ["head_read"]
    assert records[0]["decision"] == dataclasses.asdict(getattr(answer, "decision", answer))
    assert records[0]["would_deny"] is (answer is OUT_REPORT)


def test_an_asynchronous_decision_on_a_known_head() -> None:
    def pending() -> Callable[[str, RequestTarget, str | None], Any]:
        def decide(method: str, request: RequestTarget, upgrade: str | None) -> Any:
            async def later() -> Tier2Outcome:
                await asyncio.sleep(0)
                return OUT_ALLOW

            return later()

        return decide

    seen, records, taken = same(
        [("client", KEEP_REQ), ("upstream", KEEP_RESP), ("client", b"")],
        warm=WARM_KEEP,
        decide=pending,
    )
    assert taken == ["head_read", "idle"] and seen[0][0] == [KEEP_REQ]
    assert [r["status"] for r in records] == [200]


def test_random_conversations_agree() -> None:
    """Random requests, responses and cuts (pipelined or not, FINs in either
    order): the fast and the slow gate do, say and log the same."""
    requests = [CLOSE_REQ, KEEP_REQ, OTHER_REQ, CHUNKED_REQ, BOTH_LENGTHS_REQ, FOLDED_REQ]
    responses = [CLOSE_RESP, KEEP_RESP, CHUNKED_RESP, b"HTTP/1.1 204 No Content\r\n\r\n"]
    rng = random.Random(10)
    for _ in range(150):
        common = rng.choice(requests[:3])
        reqs = [common if rng.random() < 0.7 else rng.choice(requests) for _ in range(3)]
        resps = [rng.choice(responses) for _ in reqs]
        steps: list[Step] = []
        pipelined = rng.random() < 0.3
        if pipelined:
            steps.append(("client", b"".join(reqs)))
        for q, r in zip(reqs, resps, strict=True):
            if not pipelined:
                cut = rng.choice([len(q), len(q), 7])
                steps += [("client", q[:cut])] + ([("client", q[cut:])] if q[cut:] else [])
            cut = rng.choice([len(r), len(r), 20])
            steps += [("upstream", r[:cut])] + ([("upstream", r[cut:])] if r[cut:] else [])
        ends: list[Step] = [("client", b""), ("upstream", b"")]
        rng.shuffle(ends)
        warm = rng.choice([WARM_CLOSE, WARM_KEEP, []])
        decide = rng.choice([answering, lambda: answering(OUT_REPORT), lambda: answering(DENY)])
        same(steps + ends, warm=warm, decide=decide)


def test_find_and_exact_say_what_the_lookup_by_the_first_blank_line_says() -> None:
    heads: http_gate._Heads[http_gate._ResponseHead] = http_gate._Heads()
    kept = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\n\r\n",  # its first blank line is not its end
    ]
    for head in kept:
        heads.keep(http_gate._ResponseHead(head, 200, (5, False)))
    streams = [k + b"hello" for k in kept] + [
        kept[0][:-2],
        kept[0] + b"\r\n\r\n",
        b"\r\n\r\n" + kept[0],
        b"",
    ]
    for stream in streams:
        for data in (stream, bytearray(stream)):
            assert heads.find(data) == slow_find(heads, data)
        found = heads.exact(stream)
        assert found is None or found == slow_find(heads, stream)
    assert heads.exact(kept[2]) is None and heads.find(kept[2] + b"\r\n\r\n") is None
    heads.clear()
    assert heads.find(kept[1] + b"hello") is None


def test_a_fin_between_requests_makes_no_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    real = http_gate._server

    def counting() -> h11.Connection:
        made.append(None)
        return real()

    monkeypatch.setattr(http_gate, "_server", counting)
    gate = HttpGate(answering(), lambda _r: None, shared=SharedHeads())
    gate.from_client(KEEP_REQ)  # parsed: a fresh parser, read whole
    gate.from_upstream(KEEP_RESP)
    gate.from_client(KEEP_REQ)  # the same head: no parser
    gate.from_upstream(KEEP_RESP)
    gate.client_eof()
    assert len(made) == 1 and gate.ended and not gate.holds_data()
