"""Per-request decisions (pure): the path grammar table and `decide_request` table."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from egressd.policy.matcher import Verdict
from egressd.policy.model import Policy, parse_policy
from egressd.policy.paths import PathPatternError, parse_path_pattern, path_text, request_path
from egressd.proxy import http_rules
from egressd.proxy.http_rules import decide_request, inspectable, request_needs_resolution

A = ipaddress.IPv4Address

# --- the path grammar -----------------------------------------------------------------

PATHS = [
    # pattern, request target, matches
    ("/data", "/data", True),
    ("/data", "/data?x=1", True),
    ("/data", "/data/", False),
    ("/data", "/Data", False),  # case-sensitive
    ("/data", "/d%61ta", True),  # percent-decoded
    ("/data", "//data", False),  # empty segments are not collapsed
    ("/data", "http://h.test/data?q", True),
    ("/data/", "/data/", True),
    ("/data/", "/data", False),
    ("/", "/", True),
    ("/", "/x", False),
    ("/", "http://h.test", True),  # an empty absolute path is "/"
    ("/", "http://h.test?q=1", True),
    ("/bytes/*", "/bytes/5", True),
    ("/bytes/*", "/bytes/", False),  # * is one non-empty segment
    ("/bytes/*", "/bytes/5/6", False),
    ("/bytes/*", "/bytes", False),
    ("/a/*/c", "/a/b/c", True),
    ("/a/*/c", "/a/b%2Fx/c", None),  # an encoded '/' is refused
    ("/data/**", "/data", True),
    ("/data/**", "/data/", True),
    ("/data/**", "/data/a/b/c", True),
    ("/data/**", "/database", False),
    ("/**", "/", True),
    ("/**", "/anything/at/all", True),
    ("/**", "/a/../b", None),  # dot segments refused, never resolved
    ("/**", "/a/%2e%2E/b", None),
    ("/**", "/a/..;/b", None),  # Tomcat's path parameter trick
    ("/**", "/a/./b", None),
    ("/**", "/a\\b", None),
    ("/**", "/a%5cb", None),
    ("/**", "/a%00", None),
    ("/**", "/a%zz", None),
    ("/**", "/a%4", None),
    ("/**", "/caf\u00e9", None),
    ("/**", "*", False),  # asterisk-form: no path
    ("/a;b=c", "/a;b=c", True),
    ("/v1/:id", "/v1/:id", True),
]


@pytest.mark.parametrize(("pattern", "target", "expected"), PATHS)
def test_path_grammar(pattern: str, target: str, expected: bool | None) -> None:
    path = request_path(target)
    if expected is None:
        assert path is None
    else:
        assert path is not None
        assert parse_path_pattern(pattern).matches(path) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "data",
        "/a//b",
        "//",
        "/a/**/b",
        "/**/",
        "/a/.",
        "/../a",
        "/a*",
        "/*a",
        "/a%2f",
        "/a?b",
        "/a#b",
        "/a b",
        "/a\\b",
        "/caf\u00e9",
        "/" + "a" * 1024,
    ],
)
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(PathPatternError):
        parse_path_pattern(pattern)


@pytest.mark.parametrize(
    ("target", "text"),
    [
        ("/a/b?x=1", "/a/b"),
        ("http://h.test/a?q", "/a"),
        ("http://h.test", "/"),
        ("*", "*"),
        ("h.test:443", "h.test:443"),
        ("/a#f", "/a"),
    ],
)
def test_path_text_has_no_query(target: str, text: str) -> None:
    assert path_text(target) == text


# --- decide_request -------------------------------------------------------------------

API = A("203.0.113.10")
DATA = A("203.0.113.11")
WORLD = {"api.allowed.test": {API}, "eu.data.allowed.test": {DATA}, "us.data.allowed.test": {DATA}}


def make_policy(*extra: dict[str, Any]) -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "egress": [
                {"host": "eu.data.allowed.test", "ports": [80]},
                {
                    "host": "api.allowed.test",
                    "ports": [80, 443],
                    "http": {
                        "allow": [
                            {"methods": ["GET", "HEAD"], "paths": ["/data", "/bytes/*"]},
                            {"methods": ["POST"], "paths": ["/upload"]},
                        ]
                    },
                },
                {"cidr": "203.0.113.96/28", "ports": [80]},
                *extra,
            ],
        },
        require_timestamps=False,
    )


POLICY = make_policy()
PROXY_CONNECT = make_policy(
    {
        "host": "proxy.allowed.test",
        "ports": [3128, 443],
        "http": {"allow": [{"methods": ["CONNECT"], "paths": ["/"]}]},
    },
)

CASES = [
    # conn_host, dst, method, target, Host header, verdict, reason
    ("eu.data.allowed.test", DATA, "GET", "/x", "eu.data.allowed.test", "allow", "allowed_host"),
    (
        "eu.data.allowed.test",
        DATA,
        "POST",
        "/x",
        "eu.data.allowed.test:80",
        "allow",
        "allowed_host",
    ),
    ("eu.data.allowed.test", DATA, "GET", "/x", "us.data.allowed.test", "deny", "host_not_allowed"),
    ("eu.data.allowed.test", DATA, "GET", "/x", "EU.Data.Allowed.Test.", "allow", "allowed_host"),
    (
        "eu.data.allowed.test",
        DATA,
        "GET",
        "/data",
        "api.allowed.test",
        "deny",
        "host_address_mismatch",
    ),
    (
        "eu.data.allowed.test",
        DATA,
        "GET",
        "http://us.data.allowed.test/",
        None,
        "deny",
        "host_not_allowed",
    ),
    (
        "eu.data.allowed.test",
        DATA,
        "GET",
        "http://eu.data.allowed.test:81/",
        None,
        "deny",
        "port_not_allowed",
    ),
    (
        "eu.data.allowed.test",
        DATA,
        "GET",
        "http://a.test/",
        "eu.data.allowed.test",
        "deny",
        "http_malformed",
    ),
    ("eu.data.allowed.test", DATA, "GET", "/x", "bad_name!", "deny", "invalid_host"),
    ("eu.data.allowed.test", DATA, "GET", "/x", None, "deny", "no_host"),
    ("eu.data.allowed.test", DATA, "GET", "/x", "203.0.113.11", "deny", "host_not_allowed"),
    (
        "eu.data.allowed.test",
        DATA,
        "CONNECT",
        "eu.data.allowed.test:80",
        None,
        "deny",
        "connect_not_allowed",
    ),
    ("api.allowed.test", API, "GET", "/data", "api.allowed.test", "allow", "allowed_request"),
    (
        "api.allowed.test",
        API,
        "GET",
        "/data?token=1",
        "api.allowed.test",
        "allow",
        "allowed_request",
    ),
    ("api.allowed.test", API, "HEAD", "/bytes/9", "api.allowed.test", "allow", "allowed_request"),
    ("api.allowed.test", API, "GET", "/bytes/9/x", "api.allowed.test", "deny", "path_not_allowed"),
    ("api.allowed.test", API, "POST", "/upload", "api.allowed.test", "allow", "allowed_request"),
    ("api.allowed.test", API, "POST", "/data", "api.allowed.test", "deny", "path_not_allowed"),
    ("api.allowed.test", API, "DELETE", "/data", "api.allowed.test", "deny", "method_not_allowed"),
    ("api.allowed.test", API, "get", "/data", "api.allowed.test", "deny", "method_not_allowed"),
    (
        "api.allowed.test",
        API,
        "GET",
        "/data/../admin",
        "api.allowed.test",
        "deny",
        "http_malformed",
    ),
    ("api.allowed.test", API, "GET", "/Data", "api.allowed.test", "deny", "path_not_allowed"),
    ("api.allowed.test", API, "OPTIONS", "*", "api.allowed.test", "deny", "method_not_allowed"),
    (
        "api.allowed.test",
        API,
        "GET",
        "http://api.allowed.test/data",
        None,
        "allow",
        "allowed_request",
    ),
    (
        "api.allowed.test",
        API,
        "CONNECT",
        "api.allowed.test:443",
        None,
        "deny",
        "connect_not_allowed",
    ),
    (None, A("203.0.113.100"), "GET", "/x", "anything.test", "allow", "allowed_cidr"),
    (None, A("203.0.113.100"), "CONNECT", "x.test:80", None, "deny", "connect_not_allowed"),
    (None, A("169.254.169.254"), "GET", "/x", "eu.data.allowed.test", "deny", "deny_link_local"),
]


@pytest.mark.parametrize(
    ("conn_host", "dst", "method", "target", "host", "verdict", "reason"), CASES
)
def test_decide_request(
    conn_host: str | None,
    dst: A,
    method: str,
    target: str,
    host: str | None,
    verdict: str,
    reason: str,
) -> None:
    decision = decide_request(
        POLICY,
        conn_host=conn_host,
        dst_ip=dst,
        dst_port=80,
        method=method,
        target=target,
        host_header=host,
        proxy_resolves=lambda name: WORLD.get(name, set()),
    )
    assert (str(decision.verdict), decision.reason) == (verdict, reason)


def test_rule_is_the_one_that_decided() -> None:
    decision = decide_request(
        POLICY,
        conn_host="api.allowed.test",
        dst_ip=API,
        dst_port=80,
        method="GET",
        target="/data",
        host_header="api.allowed.test",
    )
    assert decision.rule is POLICY.egress[1]


def test_other_names_agree_by_resolution() -> None:
    # us.data resolved by the job to the same address: a name agreement, allowed by a rule.
    policy = make_policy({"host": "us.data.allowed.test", "ports": [80]})
    common: dict[str, Any] = {
        "conn_host": "eu.data.allowed.test",
        "dst_ip": DATA,
        "dst_port": 80,
        "method": "GET",
        "target": "/",
        "host_header": "us.data.allowed.test",
    }
    assert decide_request(policy, **common).reason == "host_address_mismatch"
    assert decide_request(policy, resolved_names={"us.data.allowed.test"}, **common).allowed
    assert decide_request(policy, proxy_resolves={DATA}, **common).allowed


def test_connect_allowed_explicitly() -> None:
    decision = decide_request(
        PROXY_CONNECT,
        conn_host="proxy.allowed.test",
        dst_ip=A("203.0.113.30"),
        dst_port=3128,
        method="CONNECT",
        target="proxy.allowed.test:443",
        host_header=None,
        resolved_names={"proxy.allowed.test"},
    )
    assert (decision.verdict, decision.reason) == (Verdict.ALLOW, "allowed_request")
    # ... but not to a port the rule does not list
    decision = decide_request(
        PROXY_CONNECT,
        conn_host="proxy.allowed.test",
        dst_ip=A("203.0.113.30"),
        dst_port=3128,
        method="CONNECT",
        target="proxy.allowed.test:22",
        host_header=None,
        resolved_names={"proxy.allowed.test"},
    )
    assert decision.reason == "port_not_allowed"


def test_h2c_upgrade_refused() -> None:
    decision = decide_request(
        POLICY,
        conn_host="eu.data.allowed.test",
        dst_ip=DATA,
        dst_port=80,
        method="GET",
        target="/",
        host_header="eu.data.allowed.test",
        upgrade="h2c",
    )
    assert decision.reason == http_rules.UPGRADE_NOT_ALLOWED
    decision = decide_request(
        POLICY,
        conn_host="eu.data.allowed.test",
        dst_ip=DATA,
        dst_port=80,
        method="GET",
        target="/",
        host_header="eu.data.allowed.test",
        upgrade="websocket",
    )
    assert decision.allowed


def test_needs_resolution_only_for_allowed_unvouched_names() -> None:
    def needs(host: str, learned: set[str] | None = None) -> str | None:
        request = http_rules.request_target("GET", "/", host)
        return request_needs_resolution(
            POLICY,
            request,
            dst_port=80,
            conn_host="eu.data.allowed.test",
            resolved_names=learned or set(),
        )

    assert needs("eu.data.allowed.test") is None  # the connection's own name
    assert needs("api.allowed.test") == "api.allowed.test"
    assert needs("api.allowed.test", {"api.allowed.test"}) is None
    assert needs("secret.attacker.test") is None  # never looked up


def test_inspectable() -> None:
    by_http_rule = decide_request(
        POLICY,
        conn_host="api.allowed.test",
        dst_ip=API,
        dst_port=443,
        method="GET",
        target="/data",
        host_header="api.allowed.test",
    )
    assert inspectable(by_http_rule, "http") is by_http_rule
    for protocol in ("tls", None):
        denied = inspectable(by_http_rule, protocol)
        assert (denied.verdict, denied.reason) == (Verdict.DENY, "http_not_inspectable")
    plain = decide_request(
        POLICY,
        conn_host="eu.data.allowed.test",
        dst_ip=DATA,
        dst_port=80,
        method="GET",
        target="/",
        host_header="eu.data.allowed.test",
    )
    assert inspectable(plain, "tls") is plain
