"""Table-driven matcher tests, smokescreen style: testdata/matcher_*.json.

Each file holds a policy payload, the fleet's ranges and cases. A case with an
``ip`` goes through `decide` (with its ``host`` or none); ``fn`` selects
`match_host` or `match_address` instead. ``rule`` is the index of the rule the
decision must name (``null``: none).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.policy.addresses import ALWAYS_DENIED
from egressd.policy.matcher import (
    Decision,
    Verdict,
    decide,
    match_address,
    match_host,
    name_allowed,
)
from egressd.policy.model import Policy, parse_policy

TESTDATA = Path(__file__).parent / "testdata"
FILES = sorted(TESTDATA.glob("matcher_*.json"))

KNOWN_REASONS = {
    "allowed_host",
    "allowed_cidr",
    "no_matching_rule",
    "port_not_allowed",
    "invalid_host",
    "invalid_address",
    "deny_fleet_range",
    *(reason for _, reason in ALWAYS_DENIED),
}


def _load(path: Path) -> tuple[Policy, list[Any], list[dict[str, Any]]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    policy = parse_policy(doc["policy"])
    fleet = [ipaddress.ip_network(n) for n in doc.get("fleet_ranges", [])]
    return policy, fleet, doc["cases"]


def _cases() -> list[Any]:
    params = []
    for path in FILES:
        _, _, cases = _load(path)
        for case in cases:
            params.append(pytest.param(path, case, id=f"{path.stem}: {case['name']}"))
    return params


def test_testdata_present() -> None:
    assert len(FILES) >= 3


@pytest.mark.parametrize(("path", "case"), _cases())
def test_table(path: Path, case: dict[str, Any]) -> None:
    policy, fleet, _ = _load(path)
    fn = case.get("fn", "decide" if "ip" in case else "match_host")
    if fn == "decide":
        decision = decide(
            policy, host=case.get("host"), ip=case["ip"], port=case["port"], fleet_ranges=fleet
        )
    elif fn == "match_host":
        decision = match_host(policy, case["host"], case["port"])
    elif fn == "match_address":
        decision = match_address(policy, case["ip"], case["port"], fleet_ranges=fleet)
    else:  # pragma: no cover
        raise AssertionError(f"unknown fn {fn}")
    assert (decision.verdict.value, decision.reason) == (case["verdict"], case["reason"])
    expected_rule = None if case["rule"] is None else policy.egress[case["rule"]]
    assert decision.rule is expected_rule
    assert decision.allowed is (case["verdict"] == "allow")


POLICY, _, _ = _load(TESTDATA / "matcher_design_example.json")


def test_decision_is_a_frozen_value() -> None:
    decision = match_host(POLICY, "api.allowed.test", 443)
    assert decision == Decision(Verdict.ALLOW, "allowed_host", POLICY.egress[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.reason = "x"  # type: ignore[misc]
    assert Verdict.ALLOW == "allow" and Verdict.DENY == "deny"
    assert f"{Verdict.DENY}" == "deny"


def test_report_mode_is_not_applied_by_the_matcher() -> None:
    report = dataclasses.replace(POLICY, mode="report")
    for policy in (POLICY, report):
        assert decide(policy, host="evil.test", ip="203.0.113.99", port=443).verdict is Verdict.DENY
        assert decide(policy, host=None, ip="127.0.0.1", port=443).reason == "deny_loopback"


def test_address_objects_are_accepted() -> None:
    ip = ipaddress.ip_address("203.0.113.70")
    assert decide(POLICY, host=None, ip=ip, port=5432).reason == "allowed_cidr"
    assert match_address(POLICY, ip, 5432).reason == "allowed_cidr"


def test_fleet_ranges_default_to_none() -> None:
    # Without fleet ranges 203.0.113.21 is an ordinary address.
    assert decide(POLICY, host="api.allowed.test", ip="203.0.113.21", port=443).allowed


def test_name_allowed() -> None:
    assert name_allowed(POLICY, "api.allowed.test")
    assert name_allowed(POLICY, "API.allowed.test.")
    assert name_allowed(POLICY, "eu.data.allowed.test")
    assert not name_allowed(POLICY, "data.allowed.test")
    assert not name_allowed(POLICY, "evil.test")
    assert not name_allowed(POLICY, "203.0.113.70")
    assert not name_allowed(POLICY, "")


@given(
    host=st.one_of(
        st.none(),
        st.text(max_size=40),
        st.sampled_from(["api.allowed.test", "x.data.allowed.test"]),
    ),
    ip=st.one_of(st.text(max_size=40), st.ip_addresses().map(str), st.ip_addresses()),
    port=st.one_of(st.integers(-10, 70000), st.just(443)),
)
def test_decide_never_raises(host: str | None, ip: Any, port: int) -> None:
    decision = decide(POLICY, host=host, ip=ip, port=port)
    assert decision.reason in KNOWN_REASONS
    assert (decision.verdict is Verdict.ALLOW) == decision.reason.startswith("allowed_")
    if decision.allowed:
        assert decision.rule is not None and decision.rule.allows_port(port)


@given(st.ip_addresses(), st.integers(1, 65535), st.sampled_from(["api.allowed.test", None]))
def test_denied_addresses_are_never_allowed_without_a_cidr_rule(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, host: str | None
) -> None:
    # The design policy names no always-denied range, so every such address is denied
    # with the classifier's reason whatever the name.
    from egressd.policy.addresses import classify_address

    reason = classify_address(ip)
    decision = decide(POLICY, host=host, ip=ip, port=port)
    if reason is not None:
        assert decision == Decision(Verdict.DENY, reason, None)


@given(st.text(max_size=40), st.integers(-5, 70000))
def test_match_host_never_raises(host: str, port: int) -> None:
    assert match_host(POLICY, host, port).reason in KNOWN_REASONS


def test_odd_ports_do_not_raise() -> None:
    for port in (None, "443", 443.0, True):
        decision = decide(POLICY, host="api.allowed.test", ip="203.0.113.10", port=port)  # type: ignore[arg-type]
        assert decision.verdict is Verdict.DENY
        assert decision.reason == "port_not_allowed"
