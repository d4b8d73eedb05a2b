"""Tier 2's outcome as a value: the reasons' enum, the counter's closed label
set, and the composition of a decision into what is enforced (all pure)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from egressd import limits
from egressd.policy import addresses, matcher
from egressd.policy.matcher import Decision, Verdict
from egressd.policy.model import EgressRule, Policy
from egressd.proxy import http_rules, tier2, tls_intercept, workers
from egressd.proxy.intercept import Peeked, compose
from egressd.proxy.outcome import (
    CONNECTION_LABELS,
    LIMIT_REASONS,
    ConnectionReason,
    LabelledCounter,
    NotConnected,
    Outcome,
    connection_reason,
)
from tests.support.policies import make_policy

INTERCEPTED = {
    "host": "secure.allowed.test",
    "ports": [443],
    "tls": "intercept",
    "http": {"allow": [{"methods": ["GET"], "paths": ["/**"]}]},
}
GATED = {
    "host": "gated.allowed.test",
    "ports": [80, 443],
    "http": {"allow": [{"methods": ["GET"], "paths": ["/**"]}]},
}
TLS = Peeked(b"\x16", tier2.PROTOCOL_TLS, sni="secure.allowed.test")
HTTP = Peeked(b"GET", tier2.PROTOCOL_HTTP, http_host="api.allowed.test")


def _rule(policy: Policy, host: str) -> EgressRule:
    return next(rule for rule in policy.egress if rule.host == host)


def _allowed(policy: Policy, host: str) -> tier2.NamedDecision:
    return tier2.NamedDecision(Decision(Verdict.ALLOW, "allowed_host", _rule(policy, host)), host)


# --- the reasons -------------------------------------------------------------------


def test_every_reason_a_connection_can_carry_is_a_member() -> None:
    """Each module's reason constants are members: a new one cannot be counted
    (or audited) until it is added to the enum."""
    produced = {
        matcher.ALLOWED_HOST,
        matcher.ALLOWED_CIDR,
        matcher.NO_MATCHING_RULE,
        matcher.PORT_NOT_ALLOWED,
        matcher.INVALID_HOST,
        matcher.INVALID_ADDRESS,
        addresses.DENY_FLEET_RANGE,
        addresses.FLEET_ADDRESS,
        *(reason for _, reason in addresses.ALWAYS_DENIED),
        *tier2.SNIFF_ERRORS,
        tier2.HOST_ADDRESS_MISMATCH,
        tier2.INVALID_HOST,
        tier2.NO_SNI,
        tier2.NO_HOST,
        tier2.ECH_NOT_ALLOWED,
        http_rules.HTTP_NOT_INSPECTABLE,
        limits.JOB_CONNECTION_LIMIT,
        limits.JOB_RATE_LIMIT,
        limits.PROXY_CONNECTION_LIMIT,
        limits.PORT_BUDGET_EXHAUSTED,
        limits.PORT_POOL_EXHAUSTED,
        tls_intercept.INTERCEPTION_UNAVAILABLE,
        tls_intercept.UPSTREAM_TLS_UNVERIFIED,
        tls_intercept.UPSTREAM_TLS_FAILED,
        tls_intercept.CLIENT_TLS_FAILED,
        # PolicyUnavailable's (egressd.proxy.policies)
        "policy_missing",
        "policy_unverifiable",
        "policy_expired",
        "control_unreachable",
        workers.WRONG_WORKER,  # egressd.proxy.workers.WorkerPolicies
    }
    missing = {reason for reason in produced if connection_reason(reason) is None}
    assert not missing
    # and nothing in the enum that nothing produces, but the interceptor's own
    own = {"unknown_flow", "upstream_connect_failed", "proxy_shutdown", "error"}
    assert {str(reason) for reason in ConnectionReason} == produced | own


def test_members_are_their_strings() -> None:
    assert ConnectionReason.NO_SNI == "no_sni"
    assert f"{ConnectionReason.NO_SNI}" == "no_sni"
    assert tier2.NO_SNI is ConnectionReason.NO_SNI
    assert {"no_sni": 1}[ConnectionReason.NO_SNI] == 1
    assert connection_reason("made_up") is None


def test_limit_reasons_are_the_limits_refusals() -> None:
    assert {
        limits.JOB_CONNECTION_LIMIT,
        limits.JOB_RATE_LIMIT,
        limits.PROXY_CONNECTION_LIMIT,
        limits.PORT_BUDGET_EXHAUSTED,
        limits.PORT_POOL_EXHAUSTED,
    } == LIMIT_REASONS


# --- the counter's label sets ------------------------------------------------------


def _counter() -> tuple[CollectorRegistry, LabelledCounter]:
    registry = CollectorRegistry()
    counter = Counter("egressd_connections_total", "test", ["verdict", "reason"], registry=registry)
    return registry, LabelledCounter(counter, CONNECTION_LABELS)


def test_every_label_set_is_there_from_the_start() -> None:
    registry, _ = _counter()
    text = generate_latest(registry).decode()
    samples = [line for line in text.splitlines() if line.startswith("egressd_connections_total{")]
    assert len(samples) == len(CONNECTION_LABELS) == 2 * len(ConnectionReason)
    assert all(line.endswith(" 0.0") for line in samples)
    assert 'egressd_connections_total{reason="no_sni",verdict="deny"} 0.0' in samples


def test_counts_and_refuses_a_reason_not_in_the_enum() -> None:
    registry, counts = _counter()
    counts.inc(Verdict.DENY, ConnectionReason.NO_SNI)
    counts.inc("allow", "allowed_host")
    assert (
        registry.get_sample_value(
            "egressd_connections_total", {"verdict": "deny", "reason": "no_sni"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "egressd_connections_total", {"verdict": "allow", "reason": "allowed_host"}
        )
        == 1
    )
    with pytest.raises(ValueError, match="made_up"):
        counts.inc("deny", "made_up")
    with pytest.raises(ValueError):
        counts.inc("drop", "no_sni")  # not a connection verdict
    text = generate_latest(registry).decode()
    assert "made_up" not in text and 'verdict="drop"' not in text


# --- composing the outcome ---------------------------------------------------------


def test_an_allow_carries_its_host_and_rule() -> None:
    policy = make_policy()
    outcome = compose(policy, _allowed(policy, "api.allowed.test"), HTTP, interception=False)
    assert outcome == Outcome(
        Verdict.ALLOW,
        ConnectionReason.ALLOWED_HOST,
        "api.allowed.test",
        _rule(policy, "api.allowed.test"),
    )
    assert outcome.allowed and isinstance(outcome.reason, ConnectionReason)


def test_report_mode_allows_a_deny_but_not_an_always_denied_address() -> None:
    policy = make_policy(mode="report")
    deny = tier2.NamedDecision(Decision(Verdict.DENY, "no_matching_rule", None), "x.test")
    outcome = compose(policy, deny, HTTP, interception=True)
    assert (outcome.verdict, outcome.reason, outcome.would_deny) == (
        Verdict.ALLOW,
        ConnectionReason.NO_MATCHING_RULE,
        True,
    )
    ssrf = tier2.NamedDecision(Decision(Verdict.DENY, "deny_link_local", None), None)
    outcome = compose(policy, ssrf, Peeked(b""), interception=True)
    assert (outcome.verdict, outcome.reason, outcome.would_deny) == (
        Verdict.DENY,
        ConnectionReason.DENY_LINK_LOCAL,
        False,
    )


def test_request_rules_need_the_requests() -> None:
    policy = make_policy(extra=[GATED])
    named = _allowed(policy, "gated.allowed.test")
    spliced = Peeked(b"\x16", tier2.PROTOCOL_TLS, sni="gated.allowed.test")
    outcome = compose(policy, named, spliced, interception=True)
    assert outcome == Outcome(
        Verdict.DENY,
        ConnectionReason.HTTP_NOT_INSPECTABLE,
        "gated.allowed.test",
        _rule(policy, "gated.allowed.test"),
    )


@pytest.mark.parametrize(
    ("interception", "peeked", "host", "reason"),
    [
        (True, TLS, "secure.allowed.test", None),
        (False, TLS, "secure.allowed.test", ConnectionReason.TLS_INTERCEPTION_UNAVAILABLE),
        (True, TLS, None, ConnectionReason.NO_SNI),
        (
            True,
            Peeked(b"\x16", tier2.PROTOCOL_TLS, sni="secure.allowed.test", ech=True),
            "secure.allowed.test",
            ConnectionReason.HTTP_NOT_INSPECTABLE,
        ),
    ],
)
def test_an_intercepting_rule_needs_interception(
    interception: bool, peeked: Peeked, host: str | None, reason: ConnectionReason | None
) -> None:
    policy = make_policy(extra=[INTERCEPTED])
    rule = _rule(policy, "secure.allowed.test")
    named = tier2.NamedDecision(Decision(Verdict.ALLOW, "allowed_host", rule), host)
    outcome = compose(policy, named, peeked, interception=interception)
    if reason is None:
        assert outcome == Outcome(Verdict.ALLOW, ConnectionReason.ALLOWED_HOST, host, rule)
    else:
        assert outcome == Outcome(Verdict.DENY, reason, host, rule)


def test_a_decision_with_a_reason_not_in_the_enum_is_refused() -> None:
    with pytest.raises(ValueError):
        Outcome.decided(
            Decision(Verdict.DENY, "made_up", None),
            enforced=Verdict.DENY,
            would_deny=False,
            host=None,
        )


def test_not_connected() -> None:
    decided = Outcome(Verdict.ALLOW, ConnectionReason.NO_MATCHING_RULE, "x.test", None, True)
    failed = NotConnected(ConnectionReason.UPSTREAM_CONNECT_FAILED).applied_to(decided)
    assert failed == Outcome(
        Verdict.ALLOW, ConnectionReason.UPSTREAM_CONNECT_FAILED, "x.test", None, True
    )
    refused = NotConnected(ConnectionReason.FLEET_ADDRESS).applied_to(decided)
    assert refused == Outcome(Verdict.DENY, ConnectionReason.FLEET_ADDRESS, "x.test", None, True)
    assert Outcome.deny(ConnectionReason.UNKNOWN_FLOW) == Outcome(
        Verdict.DENY, ConnectionReason.UNKNOWN_FLOW, None, None, False
    )
    # a frozen value: steps return new ones
    with pytest.raises(AttributeError):
        decided.reason = ConnectionReason.ERROR  # type: ignore[misc]
