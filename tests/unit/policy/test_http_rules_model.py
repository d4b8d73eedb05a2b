"""A host rule's ``tls`` and ``http``: strict validation with field paths, round trip."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from egressd.policy.errors import PolicyError
from egressd.policy.model import (
    Credential,
    EgressRule,
    HttpAllow,
    HttpRules,
    PortRange,
    parse_policy,
    policy_to_payload,
)

BASE: dict[str, Any] = {
    "v": 1,
    "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
    "account": "acme",
    "nodes": ["node1"],
    "iat": 1795392000,
    "nbf": 1795392000,
    "exp": 1795395600,
}
ISSUE_RULE: dict[str, Any] = {
    "host": "api.allowed.test",
    "ports": [443, 80],
    "tls": "intercept",
    "http": {
        "allow": [
            {"methods": ["GET", "HEAD"], "paths": ["/data", "/bytes/*"]},
            {"methods": ["POST"], "paths": ["/upload"]},
        ],
        "credentials": [
            {"header": "Authorization", "secret": "allowed-api-token", "format": "Bearer {}"}
        ],
    },
}
PLAIN_RULE: dict[str, Any] = {
    "host": "eu.data.allowed.test",
    "ports": [80],
    "http": {"allow": [{"methods": ["GET"], "paths": ["/**"]}]},
}


def payload(*rules: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "egress": copy.deepcopy(list(rules))}


def error(obj: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(obj)
    return info.value.field, str(info.value)


def test_issue_example_parses_and_round_trips() -> None:
    policy = parse_policy(payload(ISSUE_RULE, PLAIN_RULE, {"host": "a.test"}))
    rule = policy.egress[0]
    assert rule.tls == "intercept"
    assert rule.http == HttpRules(
        allow=(
            HttpAllow(("GET", "HEAD"), ("/data", "/bytes/*")),
            HttpAllow(("POST",), ("/upload",)),
        ),
        credentials=(Credential("Authorization", "allowed-api-token", "Bearer {}", None),),
    )
    assert policy.egress[2].tls == "passthrough" and policy.egress[2].http is None
    out = policy_to_payload(policy)
    assert out["egress"][0] == ISSUE_RULE  # type: ignore[index]
    assert "tls" not in out["egress"][1] and "http" not in out["egress"][2]  # type: ignore[index]
    assert parse_policy(out) == policy


def test_design_example_with_placeholder() -> None:
    rule = {
        "host": "api.github.example",
        "ports": [443],
        "tls": "intercept",
        "http": {
            "allow": [{"methods": ["GET"], "paths": ["/repos/acme/*"]}],
            "credentials": [
                {
                    "header": "Authorization",
                    "secret": "gh-token",
                    "format": "Bearer {}",
                    "placeholder": "egressd:gh-token",
                }
            ],
        },
    }
    policy = parse_policy(payload(rule))
    assert policy.egress[0].http.credentials[0].placeholder == "egressd:gh-token"  # type: ignore[union-attr]
    assert policy_to_payload(policy)["egress"] == [rule]


def _with(rule: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    rule = copy.deepcopy(rule)
    target = rule
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return rule


@pytest.mark.parametrize(
    ("path", "value", "field", "detail"),
    [
        (["tls"], "bump", "egress[0].tls", "must be one of"),
        (["tls"], True, "egress[0].tls", "must be one of"),
        (["http"], [], "egress[0].http", "must be an object"),
        (["http", "deny"], [], "egress[0].http.deny", "unknown key"),
        (["http", "allow"], KeyError, "egress[0].http.allow", "is required"),
        (["http", "allow"], [], "egress[0].http.allow", "must not be empty"),
        (["http", "allow", 1], "POST", "egress[0].http.allow[1]", "must be an object"),
        (["http", "allow", 1, "methods"], [], "egress[0].http.allow[1].methods", "not be empty"),
        (["http", "allow", 1, "methods", 0], "post", "egress[0].http.allow[1].methods[0]", "upper"),
        (["http", "allow", 1, "methods", 0], "GE T", "egress[0].http.allow[1].methods[0]", "upper"),
        (["http", "allow", 0, "methods", 1], "GET", "egress[0].http.allow[0].methods[1]", "dupl"),
        (["http", "allow", 0, "paths"], "/data", "egress[0].http.allow[0].paths", "array"),
        (["http", "allow", 0, "paths", 0], "data", "egress[0].http.allow[0].paths[0]", "start"),
        (["http", "allow", 0, "paths", 0], "/a/../b", "egress[0].http.allow[0].paths[0]", "dot"),
        (["http", "allow", 0, "paths", 0], "/a//b", "egress[0].http.allow[0].paths[0]", "empty"),
        (["http", "allow", 0, "paths", 0], "/**/a", "egress[0].http.allow[0].paths[0]", "last"),
        (["http", "allow", 0, "paths", 0], "/a*", "egress[0].http.allow[0].paths[0]", "whole"),
        (["http", "allow", 0, "paths", 0], "/a%20b", "egress[0].http.allow[0].paths[0]", "decoded"),
        (["http", "allow", 0, "paths", 0], "/a?q", "egress[0].http.allow[0].paths[0]", "decoded"),
        (["http", "allow", 0, "paths", 0], 7, "egress[0].http.allow[0].paths[0]", "string"),
        (["http", "allow", 0, "extra"], 1, "egress[0].http.allow[0].extra", "unknown key"),
        (["http", "credentials"], {}, "egress[0].http.credentials", "array"),
        (
            ["http", "credentials", 0, "header"],
            "Host",
            "egress[0].http.credentials[0].header",
            "rout",
        ),
        (
            ["http", "credentials", 0, "header"],
            "A B",
            "egress[0].http.credentials[0].header",
            "token",
        ),
        (
            ["http", "credentials", 0, "secret"],
            "../x",
            "egress[0].http.credentials[0].secret",
            "file",
        ),
        (
            ["http", "credentials", 0, "secret"],
            KeyError,
            "egress[0].http.credentials[0].secret",
            "req",
        ),
        (
            ["http", "credentials", 0, "format"],
            "Bearer",
            "egress[0].http.credentials[0].format",
            "{}",
        ),
        (
            ["http", "credentials", 0, "format"],
            "{}{}",
            "egress[0].http.credentials[0].format",
            "{}",
        ),
        (
            ["http", "credentials", 0, "placeholder"],
            "x",
            "egress[0].http.credentials[0].placeholder",
            "8",
        ),
        (
            ["http", "credentials", 0, "value"],
            "s3cret",
            "egress[0].http.credentials[0].value",
            "unknown",
        ),
    ],
)
def test_field_paths(path: list[Any], value: Any, field: str, detail: str) -> None:
    got_field, message = error(payload(_with(ISSUE_RULE, path, value)))
    assert got_field == field
    assert detail in message


def test_duplicate_credential_header() -> None:
    rule = copy.deepcopy(ISSUE_RULE)
    rule["http"]["credentials"].append({"header": "authorization", "secret": "other"})
    assert error(payload(rule))[0] == "egress[0].http.credentials[1].header"


def test_intercept_needs_http() -> None:
    field, message = error(payload({"host": "a.test", "tls": "intercept"}))
    assert field == "egress[0].tls" and "needs http" in message


@pytest.mark.parametrize("ports", [None, [443], [443, 8443], ["993-995"]])
def test_http_on_tls_only_ports_needs_intercept(ports: list[Any] | None) -> None:
    rule = _with(PLAIN_RULE, ["ports"], KeyError if ports is None else ports)
    field, message = error(payload(rule))
    assert field == "egress[0].http"
    assert "intercept" in message and "never be enforced" in message


@pytest.mark.parametrize("ports", [[80], [443, 80], [8080], ["400-500"]])
def test_http_without_intercept_on_a_plain_port(ports: list[Any]) -> None:
    assert parse_policy(payload(_with(PLAIN_RULE, ["ports"], ports))).egress[0].http is not None


def test_not_on_cidr_rules() -> None:
    cidr = {"cidr": "203.0.113.0/24", "ports": [80]}
    assert error(payload({**cidr, "http": PLAIN_RULE["http"]}))[0] == "egress[0].http"
    assert error(payload({**cidr, "tls": "intercept"}))[0] == "egress[0].tls"


def test_model_invariants() -> None:
    http = HttpRules(allow=(HttpAllow(("GET",), ("/",)),))
    with pytest.raises(PolicyError):
        EgressRule(host="a.test", cidr=None, tls="intercept")
    with pytest.raises(PolicyError):
        EgressRule(host="a.test", cidr=None, tls="bump", http=http)
    rule = EgressRule(host="a.test", cidr=None, ports=(PortRange(80, 80),), http=http)
    assert not rule.tls_only
    assert EgressRule(host="a.test", cidr=None).tls_only
