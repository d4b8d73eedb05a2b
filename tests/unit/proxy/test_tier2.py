"""Tier 2 decisions, table-driven: SSRF first, name/address agreement, report mode."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from egressd.policy.matcher import Decision, Verdict
from egressd.policy.model import Policy
from egressd.proxy.tier2 import (
    ALWAYS_DENIED_REASONS,
    HOST_ADDRESS_MISMATCH,
    NamedDecision,
    apply_mode,
    claimed_host,
    decide_connection,
    decide_named,
    needs_resolution,
)
from tests.support.policies import make_policy

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network

API = A("203.0.113.10")  # api.allowed.test
DATA = A("203.0.113.11")  # eu.data.allowed.test, us.data.allowed.test
EVIL = A("203.0.113.66")  # evil.test
DB = A("203.0.113.100")  # inside the cidr rule
FLEET = (N("198.18.0.0/24"), N("100.96.0.0/16"), N("100.100.100.53/32"))

# What the proxy's own resolver would say.
WORLD: dict[str, set[A]] = {
    "api.allowed.test": {API},
    "eu.data.allowed.test": {DATA},
    "us.data.allowed.test": {DATA},
    "evil.test": {EVIL},
}


@dataclass(frozen=True)
class Case:
    id: str
    dst: A
    port: int
    verdict: Verdict
    reason: str
    sni: str | None = None
    host: str | None = None
    learned: frozenset[str] = frozenset()
    world: dict[str, set[A]] = field(default_factory=lambda: WORLD)
    sniff_error: str | None = None
    protocol: str | None = None
    target_port: int | None = None


CASES = [
    # SSRF: always-denied addresses first, whatever the name.
    Case("metadata", A("169.254.169.254"), 80, Verdict.DENY, "deny_link_local"),
    Case(
        "metadata with allowed host",
        A("169.254.169.254"),
        80,
        Verdict.DENY,
        "deny_link_local",
        host="api.allowed.test",
        world={"api.allowed.test": {A("169.254.169.254")}},
    ),
    Case("loopback", A("127.0.0.1"), 443, Verdict.DENY, "deny_loopback", sni="api.allowed.test"),
    Case("fleet resolver", A("100.100.100.53"), 53, Verdict.DENY, "deny_fleet_range"),
    Case("underlay", A("198.18.0.21"), 9090, Verdict.DENY, "deny_fleet_range"),
    Case("private", A("10.9.9.9"), 8080, Verdict.DENY, "deny_private"),
    Case("private overridden by exact cidr", A("10.1.2.7"), 8080, Verdict.ALLOW, "allowed_cidr"),
    Case("overridden range, other port", A("10.1.2.7"), 22, Verdict.DENY, "deny_private"),
    # Names that agree with the destination.
    Case("sni allowed", API, 443, Verdict.ALLOW, "allowed_host", sni="api.allowed.test"),
    Case("host allowed", API, 80, Verdict.ALLOW, "allowed_host", host="api.allowed.test"),
    Case(
        "host with case and dot", API, 80, Verdict.ALLOW, "allowed_host", host="API.Allowed.Test."
    ),
    Case("wildcard", DATA, 443, Verdict.ALLOW, "allowed_host", sni="eu.data.allowed.test"),
    Case(
        "wildcard wrong port",
        DATA,
        80,
        Verdict.DENY,
        "port_not_allowed",
        host="eu.data.allowed.test",
    ),
    Case(
        "wildcard needs one label",
        DATA,
        443,
        Verdict.DENY,
        "no_matching_rule",
        sni="data.allowed.test",
        world={"data.allowed.test": {DATA}},
    ),
    Case("port not allowed", API, 8443, Verdict.DENY, "port_not_allowed", sni="api.allowed.test"),
    Case("name not in policy", EVIL, 443, Verdict.DENY, "no_matching_rule", sni="evil.test"),
    Case(
        "agreement via the job's dns",
        A("203.0.113.99"),
        443,
        Verdict.ALLOW,
        "allowed_host",
        sni="api.allowed.test",
        learned=frozenset({"api.allowed.test"}),
    ),
    Case(
        "sni wins over host",
        API,
        443,
        Verdict.ALLOW,
        "allowed_host",
        sni="api.allowed.test",
        host="evil.test",
    ),
    # Domain fronting and forged names.
    Case("fronting sni", EVIL, 443, Verdict.DENY, HOST_ADDRESS_MISMATCH, sni="api.allowed.test"),
    Case("fronting host", EVIL, 80, Verdict.DENY, HOST_ADDRESS_MISMATCH, host="api.allowed.test"),
    Case(
        "fronting despite job dns for another name",
        EVIL,
        443,
        Verdict.DENY,
        HOST_ADDRESS_MISMATCH,
        sni="api.allowed.test",
        learned=frozenset({"evil.test"}),
    ),
    Case(
        "allowed name without dns record",
        API,
        443,
        Verdict.DENY,
        HOST_ADDRESS_MISMATCH,
        sni="new.data.allowed.test",
    ),
    Case("invalid claimed name", API, 443, Verdict.DENY, "invalid_host", sni="bad_name.test"),
    Case("ip literal is no claim", API, 80, Verdict.DENY, "no_matching_rule", host="203.0.113.10"),
    Case(
        # HTTP that names an address: that address decides, never the job's DNS.
        "ip literal, job dns does not decide",
        API,
        80,
        Verdict.DENY,
        "no_matching_rule",
        host="203.0.113.10",
        learned=frozenset({"api.allowed.test"}),
    ),
    # No name: the job's dns, then cidr rules.
    Case(
        "no name, job dns",
        API,
        443,
        Verdict.ALLOW,
        "allowed_host",
        learned=frozenset({"api.allowed.test"}),
    ),
    Case(
        "no name, one of two names allows",
        DATA,
        443,
        Verdict.ALLOW,
        "allowed_host",
        learned=frozenset({"evil.data.test", "us.data.allowed.test"}),
    ),
    Case(
        "no name, job dns, wrong port",
        API,
        22,
        Verdict.DENY,
        "port_not_allowed",
        learned=frozenset({"api.allowed.test"}),
    ),
    Case("no name, nothing known", API, 443, Verdict.DENY, "no_matching_rule"),
    Case("cidr rule", DB, 5432, Verdict.ALLOW, "allowed_cidr"),
    Case("cidr rule wrong port", DB, 5433, Verdict.DENY, "port_not_allowed"),
    Case(
        "cidr rule whatever the sni",
        DB,
        5432,
        Verdict.ALLOW,
        "allowed_cidr",
        sni="db.internal.test",
    ),
    # Unreadable first bytes.
    Case("malformed tls", API, 443, Verdict.DENY, "tls_malformed", sniff_error="tls_malformed"),
    # Fail closed (issue 15): unreadable TLS/HTTP never falls back to the job's DNS.
    *[
        Case(
            f"{error} despite job dns",
            API,
            443,
            Verdict.DENY,
            error,
            learned=frozenset({"api.allowed.test"}),
            sniff_error=error,
            protocol=protocol,
        )
        for error, protocol in [
            ("client_hello_incomplete", "tls"),
            ("client_hello_too_large", "tls"),
            ("tls_malformed", "tls"),
            ("http_head_incomplete", "http"),
            ("http_head_too_large", "http"),
            ("http_malformed", "http"),
        ]
    ],
    Case(
        "incomplete hello to a cidr address",
        DB,
        5432,
        Verdict.ALLOW,
        "allowed_cidr",
        sniff_error="client_hello_incomplete",
        protocol="tls",
    ),
    Case(
        "tls without sni, job dns ignored",
        API,
        443,
        Verdict.DENY,
        "no_sni",
        learned=frozenset({"api.allowed.test"}),
        protocol="tls",
    ),
    Case(
        "http without host, job dns ignored",
        API,
        80,
        Verdict.DENY,
        "no_host",
        learned=frozenset({"api.allowed.test"}),
        protocol="http",
    ),
    Case(
        "tls without sni to a cidr address", DB, 5432, Verdict.ALLOW, "allowed_cidr", protocol="tls"
    ),
    Case(
        "unknown protocol, job dns decides",
        API,
        443,
        Verdict.ALLOW,
        "allowed_host",
        learned=frozenset({"api.allowed.test"}),
        protocol=None,
    ),
    # CONNECT and absolute-form targets: the target's name on the target's port too.
    Case(
        "connect to a denied host",
        API,
        80,
        Verdict.DENY,
        "no_matching_rule",
        host="evil.test",
        target_port=443,
        protocol="http",
    ),
    Case(
        "connect to an allowed host, other port",
        API,
        80,
        Verdict.DENY,
        "port_not_allowed",
        host="api.allowed.test",
        target_port=22,
        protocol="http",
    ),
    Case(
        "connect to an allowed host and port",
        API,
        80,
        Verdict.ALLOW,
        "allowed_host",
        host="api.allowed.test",
        target_port=443,
        protocol="http",
    ),
    Case(
        "connect to an allowed host elsewhere",
        EVIL,
        80,
        Verdict.DENY,
        HOST_ADDRESS_MISMATCH,
        host="api.allowed.test",
        target_port=443,
        protocol="http",
    ),
    Case(
        "absolute form on its own port",
        API,
        80,
        Verdict.ALLOW,
        "allowed_host",
        host="api.allowed.test",
        target_port=80,
        protocol="http",
    ),
    Case(
        "malformed http to cidr",
        DB,
        5432,
        Verdict.ALLOW,
        "allowed_cidr",
        sniff_error="http_malformed",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    decision = decide_connection(
        make_policy(),
        dst_ip=case.dst,
        dst_port=case.port,
        sni=case.sni,
        http_host=case.host,
        resolved_names=case.learned,
        proxy_resolves=lambda name: case.world.get(name, set()),
        fleet_ranges=FLEET,
        sniff_error=case.sniff_error,
        protocol=case.protocol,
        target_port=case.target_port,
    )
    assert (decision.verdict, decision.reason) == (case.verdict, case.reason)


def test_precomputed_resolution_set() -> None:
    policy = make_policy()
    allowed = decide_connection(
        policy,
        dst_ip=API,
        dst_port=443,
        sni="api.allowed.test",
        http_host=None,
        resolved_names=set(),
        proxy_resolves={API},
        fleet_ranges=FLEET,
    )
    fronted = decide_connection(
        policy,
        dst_ip=EVIL,
        dst_port=443,
        sni="api.allowed.test",
        http_host=None,
        resolved_names=set(),
        proxy_resolves={API},
        fleet_ranges=FLEET,
    )
    assert allowed.reason == "allowed_host"
    assert fronted.reason == HOST_ADDRESS_MISMATCH


def test_resolver_not_called_when_job_dns_agrees() -> None:
    def boom(name: str) -> set[A]:
        raise AssertionError("must not resolve")

    decision = decide_connection(
        make_policy(),
        dst_ip=API,
        dst_port=443,
        sni="api.allowed.test",
        http_host=None,
        resolved_names={"api.allowed.test"},
        proxy_resolves=boom,
        fleet_ranges=FLEET,
    )
    assert decision.allowed


@pytest.mark.parametrize(
    ("raw_sni", "raw_host", "name", "invalid"),
    [
        ("A.Test", None, "a.test", False),
        (None, "b.test", "b.test", False),
        ("", "b.test", "b.test", False),
        ("203.0.113.1", None, None, False),
        (None, "[2001:db8::1]", None, False),
        ("bad_name", None, None, True),
        (None, None, None, False),
    ],
)
def test_claimed_host(
    raw_sni: str | None, raw_host: str | None, name: str | None, invalid: bool
) -> None:
    claim = claimed_host(raw_sni, raw_host)
    assert (claim.name, claim.invalid) == (name, invalid)


# --- report mode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "dst", "port", "sni", "enforced", "would_deny", "reason"),
    [
        ("enforce", EVIL, 443, "evil.test", Verdict.DENY, False, "no_matching_rule"),
        ("report", EVIL, 443, "evil.test", Verdict.ALLOW, True, "no_matching_rule"),
        ("report", EVIL, 443, "api.allowed.test", Verdict.ALLOW, True, HOST_ADDRESS_MISMATCH),
        ("report", API, 443, "api.allowed.test", Verdict.ALLOW, False, "allowed_host"),
        # Always-denied addresses are enforced in both modes.
        ("report", A("169.254.169.254"), 80, None, Verdict.DENY, False, "deny_link_local"),
        ("report", A("100.100.100.53"), 53, None, Verdict.DENY, False, "deny_fleet_range"),
        ("report", A("10.1.2.7"), 22, None, Verdict.DENY, False, "deny_private"),
    ],
)
def test_apply_mode(
    mode: str, dst: A, port: int, sni: str | None, enforced: Verdict, would_deny: bool, reason: str
) -> None:
    policy = make_policy(mode)
    decision = decide_connection(
        policy,
        dst_ip=dst,
        dst_port=port,
        sni=sni,
        http_host=None,
        resolved_names=set(),
        proxy_resolves=lambda name: WORLD.get(name, set()),
        fleet_ranges=FLEET,
    )
    outcome = apply_mode(policy, decision)
    assert decision.reason == reason
    assert outcome.enforced_verdict == enforced
    assert outcome.would_deny == would_deny
    assert outcome.decision is decision  # the true decision is kept for the log


def test_apply_mode_never_opens_always_denied_reasons() -> None:
    policy = make_policy("report")
    for reason in ALWAYS_DENIED_REASONS:
        outcome = apply_mode(policy, Decision(Verdict.DENY, reason, None))
        assert not outcome.allowed, reason


def test_names_the_policy_refuses_are_never_resolved() -> None:
    def boom(name: str) -> set[A]:
        raise AssertionError(f"resolved {name}")

    policy = make_policy()
    for sni, dst, port, reason in [
        ("c2VjcmV0.attacker.test", EVIL, 443, "no_matching_rule"),
        ("api.allowed.test", API, 22, "port_not_allowed"),
        ("anything.test", DB, 5432, "allowed_cidr"),
    ]:
        decision = decide_connection(
            policy,
            dst_ip=dst,
            dst_port=port,
            sni=sni,
            http_host=None,
            resolved_names=set(),
            proxy_resolves=boom,
            fleet_ranges=FLEET,
        )
        assert decision.reason == reason


@pytest.mark.parametrize(
    ("name", "port", "learned", "expected"),
    [
        ("api.allowed.test", 443, set(), True),
        ("api.allowed.test", 443, {"api.allowed.test"}, False),
        ("api.allowed.test", 22, set(), False),
        ("evil.test", 443, set(), False),
        ("x.data.allowed.test", 443, set(), True),
    ],
)
def test_needs_resolution(name: str, port: int, learned: set[str], expected: bool) -> None:
    assert (
        needs_resolution(make_policy(), name=name, dst_port=port, resolved_names=learned)
        is expected
    )


# --- fail closed: ECH, audit names, report mode (issue 15) ----------------------------

ECH_FRONT = {"host": "front.allowed.test", "ports": [443], "ech": "allow"}
FRONT = A("203.0.113.12")


def decide_ech(
    policy: Policy, sni: str | None, dst: A, learned: frozenset[str] = frozenset()
) -> Decision:
    return decide_connection(
        policy,
        dst_ip=dst,
        dst_port=443,
        sni=sni,
        http_host=None,
        resolved_names=learned,
        proxy_resolves=lambda name: {FRONT} if name == "front.allowed.test" else set(),
        fleet_ranges=FLEET,
        protocol="tls",
        ech=True,
    )


def test_ech_denied_unless_the_fronts_rule_opts_in() -> None:
    policy = make_policy(extra=[ECH_FRONT])
    # The rule allowing api.allowed.test says nothing of ECH: denied.
    decision = decide_ech(policy, "api.allowed.test", API)
    assert (decision.verdict, decision.reason) == (Verdict.DENY, "ech_not_allowed")
    assert decision.rule is not None and decision.rule.host == "api.allowed.test"
    # The front's rule opts in: allowed, and the front must still agree with the address.
    assert decide_ech(policy, "front.allowed.test", FRONT).reason == "allowed_host"
    assert decide_ech(policy, "front.allowed.test", EVIL).reason == HOST_ADDRESS_MISMATCH
    # A front no rule allows, or no front at all.
    assert decide_ech(policy, "evil.test", EVIL).reason == "no_matching_rule"
    learned = frozenset({"front.allowed.test"})
    assert decide_ech(policy, None, FRONT, learned).reason == "ech_not_allowed"
    # Without ECH the opted-in rule is an ordinary rule.
    plain = decide_connection(
        policy,
        dst_ip=FRONT,
        dst_port=443,
        sni="front.allowed.test",
        http_host=None,
        resolved_names=learned,
        fleet_ranges=FLEET,
    )
    assert plain.reason == "allowed_host"


def test_ech_opt_in_is_per_port_rule() -> None:
    # Another rule allows the same name on 443 first, without the opt-in: it decides.
    policy = make_policy(extra=[{"host": "front.allowed.test", "ports": [443]}, ECH_FRONT])
    assert decide_ech(policy, "front.allowed.test", FRONT).reason == "ech_not_allowed"


def named(**kwargs: object) -> NamedDecision:
    args: dict[str, object] = {
        "dst_ip": API,
        "dst_port": 443,
        "sni": None,
        "http_host": None,
        "resolved_names": frozenset({"api.allowed.test", "zz.other.test"}),
        "proxy_resolves": lambda name: WORLD.get(name, set()),
        "fleet_ranges": FLEET,
    }
    args.update(kwargs)
    return decide_named(make_policy(), **args)  # type: ignore[arg-type]


def test_audit_name_is_only_ever_one_the_client_sent() -> None:
    # Spoke TLS/HTTP: the name it sent, or none; never the job's resolved names.
    assert named(sni="evil.test").host == "evil.test"
    assert named(http_host="API.Allowed.Test", dst_port=80).host == "api.allowed.test"
    assert named(protocol="tls").host is None
    assert named(http_host="203.0.113.10", dst_port=80).host == "203.0.113.10"
    for error in ("client_hello_incomplete", "client_hello_too_large", "tls_malformed"):
        result = named(sniff_error=error, protocol="tls")
        assert (result.decision.reason, result.host) == (error, None)
    # Said nothing readable: the resolved name that decided.
    allowed = named()
    assert (allowed.decision.reason, allowed.host) == ("allowed_host", "api.allowed.test")
    denied = named(dst_port=22)
    assert (denied.decision.reason, denied.host) == ("port_not_allowed", "api.allowed.test")
    assert named(resolved_names=frozenset()).host is None


@pytest.mark.parametrize(
    "reason",
    [
        "client_hello_incomplete",
        "client_hello_too_large",
        "http_head_incomplete",
        "http_head_too_large",
        "no_sni",
        "no_host",
        "ech_not_allowed",
    ],
)
def test_report_mode_reports_the_new_reasons(reason: str) -> None:
    assert reason not in ALWAYS_DENIED_REASONS
    outcome = apply_mode(make_policy("report"), Decision(Verdict.DENY, reason, None))
    assert outcome.allowed and outcome.would_deny
    enforced = apply_mode(make_policy(), Decision(Verdict.DENY, reason, None))
    assert not enforced.allowed


@pytest.mark.parametrize(
    ("name", "port", "target_port", "ech", "extra", "expected"),
    [
        ("api.allowed.test", 80, 443, False, [], True),
        ("api.allowed.test", 80, 22, False, [], False),  # denied on the target port
        ("api.allowed.test", 443, None, True, [], False),  # ECH denied: nothing to check
        ("front.allowed.test", 443, None, True, [ECH_FRONT], True),
    ],
)
def test_needs_resolution_only_for_what_could_be_allowed(
    name: str,
    port: int,
    target_port: int | None,
    ech: bool,
    extra: list[dict[str, object]],
    expected: bool,
) -> None:
    policy = make_policy(extra=extra)
    got = needs_resolution(
        policy, name=name, dst_port=port, resolved_names=set(), target_port=target_port, ech=ech
    )
    assert got is expected
