"""A request gate keeps its outcomes per connection (`intercept._GateMemo`): a request
asked again with the same names resolved is not decided again; another method,
target or set of resolved names is; a name the proxy must resolve is asked every time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy import http_rules, tier2
from egressd.proxy.intercept import _GateMemo
from egressd.proxy.resolved import ResolvedNames
from tests.support.interceptor_rig import API, ELSEWHERE, JOB, Resolver, conn, interceptor
from tests.support.policies import make_policy

TARGET = http_rules.RequestTarget("api.allowed.test", None, ("",), "/")


def outcome(reason: str) -> tier2.Tier2Outcome:
    return tier2.Tier2Outcome(Decision(Verdict.ALLOW, reason, None), Verdict.ALLOW, False)


def test_memo_hits_only_for_the_same_request_and_names_and_is_bounded() -> None:
    memo = _GateMemo()
    asked = (TARGET, "GET", None)
    assert memo.get(asked, set()) is None
    kept = memo.put(asked, {"api.allowed.test"}, outcome("a"))
    assert memo.get(asked, {"api.allowed.test"}) is kept
    assert memo.get(asked, set()) is None  # the name expired: decided again
    assert memo.get((TARGET, "POST", None), {"api.allowed.test"}) is None
    for i in range(_GateMemo.LIMIT):
        memo.put((TARGET, f"M{i}", None), set(), outcome(str(i)))
    assert memo.get(asked, {"api.allowed.test"}) is None  # emptied when full
    assert len(memo._entries) <= _GateMemo.LIMIT


async def test_gate_decides_a_repeated_request_once_per_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decided: list[str] = []
    real = http_rules.decide_http

    def counting(*args: Any, **kw: Any) -> Decision:
        decided.append(kw["method"])
        return real(*args, **kw)

    monkeypatch.setattr(http_rules, "decide_http", counting)
    resolver = Resolver({API})
    icpt = interceptor(resolver)
    # The job resolved the name to ELSEWHERE through the proxy: vouched for, no lookup.
    icpt.resolved.record(JOB, "api.allowed.test", [ELSEWHERE], 300, time.monotonic())
    gate = icpt._gate(conn(ELSEWHERE), make_policy(), None)

    first = gate._decide("GET", TARGET, None)
    assert first.allowed
    assert gate._decide("GET", TARGET, None) is first
    assert decided == ["GET"]
    assert gate._decide("POST", TARGET, None).allowed  # another method: decided
    assert decided == ["GET", "POST"]
    assert resolver.asked == []

    # The job's resolution is gone: the proxy resolves (API, not ELSEWHERE) each time.
    icpt.resolved = ResolvedNames()
    for _ in range(2):
        asking = gate._decide("GET", TARGET, None)
        assert asyncio.iscoroutine(asking)
        assert not (await asking).allowed
    assert resolver.asked == ["api.allowed.test"] * 2
    # Resolved by the job again: the memo's outcome for those names holds again.
    icpt.resolved.record(JOB, "api.allowed.test", [ELSEWHERE], 300, time.monotonic())
    assert gate._decide("GET", TARGET, None) is first

    # Another connection's gate (a refreshed policy object) decides for itself.
    other = icpt._gate(conn(ELSEWHERE), make_policy(mode="report"), None)
    assert other._decide("GET", TARGET, None) is not first


def http_policy(methods: list[str], *, token: bool) -> Any:
    from egressd.policy.model import parse_policy

    rule: dict[str, Any] = {
        "host": "api.allowed.test",
        "ports": [80],
        "http": {"allow": [{"methods": methods, "paths": ["/", "/data"]}]},
    }
    if token:
        rule["http"]["credentials"] = [{"header": "Authorization", "secret": "api-token"}]
    return parse_policy(
        {
            "v": 1,
            "job_id": str(JOB),
            "account": "acme",
            "nodes": ["node1"],
            "mode": "enforce",
            "egress": [rule],
        },
        require_timestamps=False,
    )


def test_a_replaced_policy_decides_the_open_connections_next_request() -> None:
    """`live.redecide` keeps a connection the new policy still allows and hands
    the policy to its gate (`_Conn.repolicy`): the next request is decided
    under it (methods, paths, credentials), not under the one it opened with."""
    icpt = interceptor(Resolver({API}))
    icpt.resolved.record(JOB, "api.allowed.test", [API], 300, time.monotonic())
    c = conn(API)
    gate = icpt._gate(c, http_policy(["GET", "POST"], token=True), None)
    assert gate._decide("POST", TARGET, None).allowed
    assert gate._credentials is not None

    assert c.repolicy is not None
    c.repolicy(http_policy(["GET"], token=False))
    refused = gate._decide("POST", TARGET, None)
    assert not refused.allowed
    assert refused.decision.reason == "method_not_allowed"
    assert gate._decide("GET", TARGET, None).allowed
    assert gate._credentials is None  # the new policy has no credentials


def test_the_live_retune_hands_the_replaced_policy_to_the_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    icpt = interceptor(Resolver({API}))
    retuned: list[Any] = []
    monkeypatch.setattr(icpt.limits, "retune", lambda pacing, limits: retuned.append(limits))
    c = conn(API)
    first = http_policy(["GET", "POST"], token=False)
    icpt.resolved.record(JOB, "api.allowed.test", [API], 300, time.monotonic())
    gate = icpt._gate(c, first, None)
    retune = icpt._retune(c, icpt.limits.pacing(JOB, first.limits))
    assert gate._decide("POST", TARGET, None).allowed
    second = http_policy(["GET"], token=False)
    retune(second)
    assert retuned == [second.limits]
    assert not gate._decide("POST", TARGET, None).allowed
