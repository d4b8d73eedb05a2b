"""The policy model and parser (invalid cases: testdata/invalid_policies.json)."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.policy.errors import PolicyError
from egressd.policy.model import (
    DEFAULT_PORTS,
    LIMIT_BOUNDS,
    MAX_EGRESS_RULES,
    MAX_NODES,
    MAX_PORTS_PER_RULE,
    MAX_TIMESTAMP,
    MODES,
    EgressRule,
    Limits,
    Policy,
    PortRange,
    parse_policy,
    policy_to_payload,
)
from egressd.policy.names import normalize_host_pattern

DATA = json.loads(
    (Path(__file__).parent / "testdata" / "invalid_policies.json").read_text(encoding="utf-8")
)
BASE: dict[str, Any] = DATA["base"]


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


# --- invalid payloads ---------------------------------------------------------------


@pytest.mark.parametrize("case", DATA["cases"], ids=[c["name"] for c in DATA["cases"]])
def test_invalid_policy_names_the_field(case: dict[str, Any]) -> None:
    payload = base()
    for key in case.get("unset", []):
        del payload[key]
    payload.update(copy.deepcopy(case.get("set", {})))
    with pytest.raises(PolicyError) as info:
        parse_policy(payload, require_timestamps=case.get("require_timestamps", True))
    assert info.value.field == case["field"]
    assert info.value.reason == "invalid_policy"
    assert str(info.value).startswith(f"invalid_policy: {case['field']}: ")


@pytest.mark.parametrize("obj", [None, [], [BASE], "policy", 1, True, 1.5, b"{}"])
def test_root_must_be_an_object(obj: object) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(obj)
    assert info.value.field == "$"


def test_non_string_keys_are_rejected() -> None:
    payload: dict[Any, Any] = base()
    payload[1] = "x"
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "1"

    payload = base()
    payload["egress"] = [{"host": "a.test", 5: 1}]
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "egress[0].5"

    payload = base()
    payload["limits"] = {None: 1}
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "limits.None"


def test_size_caps() -> None:
    payload = base()
    payload["nodes"] = [f"n{i}" for i in range(MAX_NODES + 1)]
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "nodes"

    payload = base()
    payload["egress"] = [{"host": "a.test"}] * (MAX_EGRESS_RULES + 1)
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "egress"

    payload = base()
    payload["egress"] = [{"host": "a.test", "ports": list(range(1, MAX_PORTS_PER_RULE + 2))}]
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "egress[0].ports"

    payload = base()
    payload["nodes"] = [f"n{i}" for i in range(MAX_NODES)]
    payload["egress"] = [{"host": "a.test", "ports": list(range(1, MAX_PORTS_PER_RULE + 1))}]
    assert len(parse_policy(payload).nodes) == MAX_NODES


def test_host_error_is_chained() -> None:
    payload = base()
    payload["egress"] = [{"host": "💩.test"}]
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "egress[0].host"
    assert info.value.__cause__ is not None


# --- valid payloads -----------------------------------------------------------------


def test_design_example() -> None:
    policy = parse_policy(base())
    assert policy.v == 1
    assert policy.job_id == uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
    assert policy.account == "acme"
    assert policy.nodes == ("node1",)
    assert policy.mode == "enforce"
    assert (policy.iat, policy.nbf, policy.exp) == (1795392000, 1795392000, 1795395600)
    assert policy.egress == (
        EgressRule("api.allowed.test", None, (PortRange(443, 443), PortRange(80, 80))),
        EgressRule("*.data.allowed.test", None, (PortRange(443, 443),)),
        EgressRule(None, ipaddress.ip_network("203.0.113.64/28"), (PortRange(5432, 5432),)),
    )
    assert policy.limits == Limits()
    assert policy_to_payload(policy) == BASE


def test_defaults() -> None:
    payload = base()
    del payload["mode"]
    del payload["limits"]
    payload["egress"] = [{"host": "api.allowed.test"}]
    policy = parse_policy(payload)
    assert policy.mode == "enforce"
    assert policy.limits == Limits(256, 200, 512, 100_000_000)
    assert policy.egress[0].ports == DEFAULT_PORTS == (PortRange(443, 443),)
    assert policy_to_payload(policy)["egress"] == [{"host": "api.allowed.test", "ports": [443]}]


def test_empty_egress_is_deny_all() -> None:
    payload = base()
    payload["egress"] = []
    assert parse_policy(payload).egress == ()


def test_report_mode() -> None:
    payload = base()
    payload["mode"] = "report"
    assert parse_policy(payload).mode == "report"
    assert MODES == ("enforce", "report")


def test_partial_limits_keep_defaults() -> None:
    payload = base()
    payload["limits"] = {"bandwidth_bps": 1_000_000}
    limits = parse_policy(payload).limits
    assert limits == Limits(bandwidth_bps=1_000_000)
    assert limits.max_connections == 256


def test_limit_bounds_are_inclusive() -> None:
    for name, (lo, hi) in LIMIT_BOUNDS.items():
        for value in (lo, hi):
            payload = base()
            payload["limits"] = {name: value}
            assert getattr(parse_policy(payload).limits, name) == value


def test_upper_case_job_id_is_accepted_and_emitted_lower_case() -> None:
    payload = base()
    payload["job_id"] = "2B5C1C64-7C1E-4A9A-9F55-1F0C5AC1D3E2"
    policy = parse_policy(payload)
    assert policy.job_id == uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
    assert policy_to_payload(policy)["job_id"] == "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"


def test_hosts_are_stored_normalised() -> None:
    payload = base()
    payload["egress"] = [
        {"host": "API.Allowed.Test."},
        {"host": "*.Bücher.test"},
        {"host": "localhost"},
    ]
    hosts = [rule.host for rule in parse_policy(payload).egress]
    assert hosts == ["api.allowed.test", "*.xn--bcher-kva.test", "localhost"]


def test_cidrs() -> None:
    payload = base()
    payload["egress"] = [
        {"cidr": "203.0.113.5/32"},
        {"cidr": "0.0.0.0/0", "ports": ["1-65535"]},
        {"cidr": "2001:db8::/32"},
        {"cidr": "10.0.0.0/255.0.0.0"},
    ]
    rules = parse_policy(payload).egress
    assert [r.cidr for r in rules] == [
        ipaddress.ip_network("203.0.113.5/32"),
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    ]
    assert all(r.host is None for r in rules)
    assert policy_to_payload(parse_policy(payload))["egress"][3] == {  # type: ignore[index]
        "cidr": "10.0.0.0/8",
        "ports": [443],
    }


def test_ports_and_ranges() -> None:
    payload = base()
    payload["egress"] = [{"host": "a.test", "ports": [80, "8000-8080", "22-22", 65535, 1, 80]}]
    rule = parse_policy(payload).egress[0]
    assert rule.ports == (
        PortRange(80, 80),
        PortRange(8000, 8080),
        PortRange(22, 22),
        PortRange(65535, 65535),
        PortRange(1, 1),
        PortRange(80, 80),
    )
    assert policy_to_payload(parse_policy(payload))["egress"] == [
        {"host": "a.test", "ports": [80, "8000-8080", 22, 65535, 1, 80]}
    ]
    for port, allowed in [
        (80, True),
        (7999, False),
        (8000, True),
        (8080, True),
        (8081, False),
        (22, True),
        (443, False),
        (0, False),
        (65535, True),
        (65536, False),
    ]:
        assert rule.allows_port(port) is allowed, port


def test_port_range_contains() -> None:
    r = PortRange(10, 20)
    assert 10 in r and 20 in r and 15 in r
    assert 9 not in r and 21 not in r
    assert True not in PortRange(1, 1)
    assert "10" not in r
    assert 10.0 not in r
    assert str(r) == "10-20" and str(PortRange(443, 443)) == "443"


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (1, 65536), (20, 10), (True, 2), (1.0, 2)])
def test_port_range_invariants(lo: Any, hi: Any) -> None:
    with pytest.raises(PolicyError):
        PortRange(lo, hi)


def test_egress_rule_invariants() -> None:
    net = ipaddress.ip_network("203.0.113.0/24")
    with pytest.raises(PolicyError):
        EgressRule(None, None, DEFAULT_PORTS)
    with pytest.raises(PolicyError):
        EgressRule("a.test", net, DEFAULT_PORTS)
    with pytest.raises(PolicyError):
        EgressRule("A.test", None, DEFAULT_PORTS)  # not normalised
    with pytest.raises(PolicyError):
        EgressRule("*.test", None, DEFAULT_PORTS)
    with pytest.raises(PolicyError):
        EgressRule("a.test", None, ())
    with pytest.raises(PolicyError):
        EgressRule(None, "203.0.113.0/24", DEFAULT_PORTS)  # type: ignore[arg-type]
    assert EgressRule("a.test", None).ports == DEFAULT_PORTS


def test_limits_invariants() -> None:
    with pytest.raises(PolicyError) as info:
        Limits(max_connections=0)
    assert info.value.field == "limits.max_connections"
    with pytest.raises(PolicyError):
        Limits(bandwidth_bps=True)


def test_policy_invariants() -> None:
    policy = parse_policy(base())
    with pytest.raises(PolicyError):
        dataclasses.replace(policy, mode="audit")
    with pytest.raises(PolicyError):
        dataclasses.replace(policy, v=2)
    with pytest.raises(PolicyError):
        dataclasses.replace(policy, nodes=())


def test_model_is_frozen() -> None:
    policy = parse_policy(base())
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.mode = "report"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.egress[0].ports = ()  # type: ignore[misc]
    hash(policy)


def test_timestamps_optional_when_not_required() -> None:
    payload = base()
    for name in ("iat", "nbf", "exp"):
        del payload[name]
    with pytest.raises(PolicyError) as info:
        parse_policy(payload)
    assert info.value.field == "iat"
    policy = parse_policy(payload, require_timestamps=False)
    assert (policy.iat, policy.nbf, policy.exp) == (None, None, None)
    out = policy_to_payload(policy)
    assert "iat" not in out and "nbf" not in out and "exp" not in out
    assert parse_policy(out, require_timestamps=False) == policy

    payload["exp"] = 100
    assert parse_policy(payload, require_timestamps=False).exp == 100


def test_nbf_before_iat_is_allowed() -> None:
    payload = base()
    payload["nbf"] = payload["iat"] - 60
    assert parse_policy(payload).nbf == payload["iat"] - 60


def test_payload_is_json_and_input_is_not_mutated() -> None:
    payload = base()
    snapshot = copy.deepcopy(payload)
    policy = parse_policy(payload)
    assert payload == snapshot
    text = json.dumps(policy_to_payload(policy), sort_keys=True)
    assert parse_policy(json.loads(text)) == policy


def test_payload_key_order_follows_design() -> None:
    assert list(policy_to_payload(parse_policy(base()))) == list(BASE)


# --- properties ---------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda label: not label.startswith("xn--")
)
_UNICODE_LABEL = st.sampled_from(["bücher", "münchen", "faß", "пример", "例え", "ÄÖÜ"])
_TLD = st.sampled_from(["test", "example", "com", "xn--bcher-kva", "io"])


@st.composite
def host_patterns(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABEL | _UNICODE_LABEL, min_size=0, max_size=3))
    wildcard = draw(st.booleans())
    if wildcard and not labels:
        labels = [draw(_LABEL)]
    raw = ".".join([*labels, draw(_TLD)])
    if draw(st.booleans()):
        raw = raw.upper() + "."
    return normalize_host_pattern(("*." if wildcard else "") + raw)


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    addr = draw(st.ip_addresses())
    prefix = draw(st.integers(0, addr.max_prefixlen))
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


@st.composite
def port_ranges(draw: st.DrawFn) -> PortRange:
    lo = draw(st.integers(1, 65535))
    hi = draw(st.one_of(st.just(lo), st.integers(lo, 65535)))
    return PortRange(lo, hi)


@st.composite
def egress_rules(draw: st.DrawFn) -> EgressRule:
    ports = tuple(draw(st.lists(port_ranges(), min_size=1, max_size=5)))
    if draw(st.booleans()):
        return EgressRule(draw(host_patterns()), None, ports)
    return EgressRule(None, draw(networks()), ports)


def _limits() -> st.SearchStrategy[Limits]:
    return st.builds(
        Limits, **{name: st.integers(lo, hi) for name, (lo, hi) in LIMIT_BOUNDS.items()}
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    if draw(st.booleans()):
        iat = draw(st.integers(0, MAX_TIMESTAMP - 1))
        nbf = draw(st.integers(0, MAX_TIMESTAMP - 1))
        exp: int | None = draw(st.integers(max(iat, nbf) + 1, MAX_TIMESTAMP))
        stamps: tuple[int | None, int | None, int | None] = (iat, nbf, exp)
    else:
        stamps = (None, None, None)
    return Policy(
        v=1,
        job_id=draw(st.uuids().filter(lambda u: u.int != 0)),
        account=draw(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)),
        nodes=tuple(
            draw(
                st.lists(
                    st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True),
                    min_size=1,
                    max_size=4,
                    unique=True,
                )
            )
        ),
        mode=draw(st.sampled_from(MODES)),
        iat=stamps[0],
        nbf=stamps[1],
        exp=stamps[2],
        egress=tuple(draw(st.lists(egress_rules(), max_size=6))),
        limits=draw(_limits()),
    )


@settings(max_examples=200)
@given(policies())
def test_round_trip(policy: Policy) -> None:
    required = policy.iat is not None
    payload = policy_to_payload(policy)
    assert parse_policy(payload, require_timestamps=required) == policy
    # ... also through actual JSON text.
    assert parse_policy(json.loads(json.dumps(payload)), require_timestamps=required) == policy


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.sampled_from(["203.0.113.0/24", "*.a.test", "1-2", "443", "enforce", "node1"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_JSON, st.booleans())
def test_arbitrary_json_raises_only_policy_error(obj: object, required: bool) -> None:
    try:
        parse_policy(obj, require_timestamps=required)
    except PolicyError as exc:
        assert isinstance(exc.field, str) and exc.field
    else:  # pragma: no cover - a random value is never a valid policy
        pytest.fail("parsed a random value")


_TOP_KEYS = sorted(BASE)
_RULE_KEYS = ["host", "cidr", "ports", "port"]


@settings(max_examples=300)
@given(st.data())
def test_mutated_policies_raise_only_policy_error(data: st.DataObject) -> None:
    payload = base()
    for key in data.draw(st.lists(st.sampled_from(_TOP_KEYS), max_size=3)):
        payload[key] = data.draw(_JSON)
    if isinstance(payload.get("egress"), list) and payload["egress"]:
        index = data.draw(st.integers(0, len(payload["egress"]) - 1))
        rule = payload["egress"][index]
        if isinstance(rule, dict):
            rule[data.draw(st.sampled_from(_RULE_KEYS))] = data.draw(_JSON)
    if data.draw(st.booleans()) and isinstance(payload.get("limits"), dict):
        payload["limits"][data.draw(st.sampled_from([*LIMIT_BOUNDS, "x"]))] = data.draw(_JSON)
    try:
        policy = parse_policy(payload, require_timestamps=data.draw(st.booleans()))
    except PolicyError as exc:
        assert isinstance(exc.field, str) and exc.field
    else:
        assert parse_policy(policy_to_payload(policy), require_timestamps=False) == policy


def test_ech_opt_in_on_a_host_rule_round_trips() -> None:
    payload = base()
    payload["egress"] = [{"host": "front.allowed.test", "ports": [443], "ech": "allow"}]
    policy = parse_policy(payload)
    assert policy.egress[0].ech == "allow"
    assert policy_to_payload(policy)["egress"] == [
        {"host": "front.allowed.test", "ports": [443], "ech": "allow"}
    ]
    # The default is not written out: v1 payloads stay byte-identical.
    payload["egress"] = [{"host": "front.allowed.test", "ports": [443]}]
    assert parse_policy(payload).egress[0].ech == "deny"
    assert "ech" not in policy_to_payload(parse_policy(payload))["egress"][0]  # type: ignore[index]


def test_dns_rate_default_and_bounds() -> None:
    assert Limits().dns_queries_per_s == 50
    payload = base()
    payload["limits"] = {"dns_queries_per_s": 10_000}
    assert parse_policy(payload).limits.dns_queries_per_s == 10_000
