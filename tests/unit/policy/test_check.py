"""`egressd policy check`'s pure logic: every problem at once, each naming its field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from egressd.policy.check import Report, check_document, check_payload, dead_rules
from egressd.policy.jws import sign_payload
from egressd.policy.keys import b64url_encode, generate_signing_key
from egressd.policy.model import parse_policy

NOW = 1_796_572_800  # 2026-12-06T16:00:00Z
GOOD: dict[str, Any] = {
    "v": 1,
    "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
    "account": "acme",
    "nodes": ["node1"],
    "egress": [
        {"host": "api.allowed.test", "ports": [443, 80]},
        {"host": "*.data.allowed.test"},
        {"cidr": "203.0.113.64/28", "ports": [5432]},
    ],
}


def check(payload: dict[str, Any], **kw: Any) -> Report:
    return check_payload(payload, now=NOW, **kw)


def lines(report: Report) -> list[str]:
    return [str(p) for p in report.problems]


def with_rules(*rules: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(GOOD), "egress": list(rules)}


def test_a_good_policy_has_no_problems() -> None:
    report = check(GOOD, known_nodes=["node1", "node2"])
    assert report.ok, lines(report)
    assert report.policy == parse_policy(GOOD, require_timestamps=False)


def test_every_mistake_at_once() -> None:
    bad = {
        "v": 1,
        "job_id": "not-a-uuid",
        "account": "ac me",
        "nodes": ["node1", "Node2", "node1"],
        "mode": "audit",
        "exp": 1000,
        "surprise": True,
        "egress": [
            {"host": "*.test"},
            {"host": "a.test", "ports": [0, "5-1", 443]},
            {"cidr": "10.1.2.7/24"},
            {"host": "a.test", "port": 1},
            {"host": "b.test", "cidr": "203.0.113.0/24"},
        ],
        "limits": {"max_connections": 0, "max_conns": 1},
    }
    fields = [p.field for p in check(bad).problems]
    assert fields == [
        "surprise",
        "job_id",
        "account",
        "nodes[1]",
        "nodes[2]",
        "mode",
        "exp",
        "egress[0].host",
        "egress[1].ports[0]",
        "egress[1].ports[1]",
        "egress[2].cidr",
        "egress[3].port",
        "egress[4]",
        "limits.max_conns",
        "limits.max_connections",
    ]


def test_missing_required_fields_are_each_named() -> None:
    report = check({"v": 1})
    assert [p.field for p in report.problems] == ["job_id", "account", "nodes", "egress"]


@pytest.mark.parametrize(
    ("payload", "line"),
    [
        ([], "$: must be a JSON object, not array"),
        ({}, "v: is required"),
        ({"v": 2, "zz": 1}, "v: unsupported version 2, expected 1"),
    ],
)
def test_stops_where_nothing_else_can_be_judged(payload: object, line: str) -> None:
    assert lines(check_payload(payload, now=NOW)) == [line]


def test_exp_1000_is_in_the_past_not_before_nbf() -> None:
    report = check({**GOOD, "exp": 1000, "nbf": NOW - 60})
    assert lines(report) == ["exp: expired 1970-01-01T00:16:40Z, 56 years ago"]


def test_expired_two_hours_ago() -> None:
    report = check({**GOOD, "iat": NOW - 9000, "nbf": NOW - 9000, "exp": NOW - 7200})
    assert lines(report) == ["exp: expired 2026-12-06T14:00:00Z, 2 h ago"]


def test_exp_before_nbf_in_the_future_names_both_times() -> None:
    report = check({**GOOD, "nbf": NOW + 7200, "exp": NOW + 3600})
    assert lines(report) == [
        (
            "exp: must be after nbf (2026-12-06T17:00:00Z, in 60 min is not after "
            "2026-12-06T18:00:00Z, in 2 h)"
        )
    ]
    assert [str(n) for n in report.notes] == ["nbf: not valid before 2026-12-06T18:00:00Z, in 2 h"]


def test_unknown_nodes_name_the_index_and_the_known_ones() -> None:
    report = check({**GOOD, "nodes": ["node1", "node9", "node2"]}, known_nodes=["node2", "node1"])
    assert lines(report) == ["nodes[1]: no node 'node9' at the control plane (known: node1, node2)"]


def test_unknown_nodes_are_reported_beside_other_problems() -> None:
    report = check({**GOOD, "mode": "x", "nodes": ["node9"]}, known_nodes=[])
    assert [p.field for p in report.problems] == ["mode", "nodes[0]"]
    assert "(known: none)" in lines(report)[1]


def test_nodes_are_not_checked_without_a_node_list() -> None:
    assert check({**GOOD, "nodes": ["node9"]}).ok


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        # an exact duplicate
        (
            [{"host": "a.test.example"}, {"host": "a.test.example"}],
            ["egress[1]: duplicate of egress[0]"],
        ),
        # a wildcard first: the exact name behind it never decides, and its ech never applies
        (
            [{"host": "*.data.test.example"}, {"host": "eu.data.test.example", "ech": "allow"}],
            [
                (
                    "egress[1]: never decides: egress[0] (*.data.test.example) already matches all its "
                    'destinations and ports; its "ech": "allow" never applies'
                )
            ],
        ),
        # covered by two earlier rules together
        (
            [
                {"host": "a.test.example", "ports": [80]},
                {"host": "a.test.example", "ports": [443]},
                {"host": "a.test.example", "ports": [443, 80]},
            ],
            [
                (
                    "egress[2]: never decides: egress[0] (a.test.example), egress[1] (a.test.example) "
                    "already match all its destinations and ports"
                )
            ],
        ),
        # a cidr inside a wider one, outside any denied range
        (
            [{"cidr": "0.0.0.0/0"}, {"cidr": "203.0.113.0/25"}],
            [
                (
                    "egress[1]: never decides: egress[0] (0.0.0.0/0) already matches all its "
                    "destinations and ports"
                )
            ],
        ),
        # a redundant port entry
        (
            [{"host": "a.test.example", "ports": ["1-1024", 443]}],
            ["egress[0].ports[1]: 443 is already covered by ports[0]"],
        ),
        (
            [{"host": "a.test.example", "ports": ["1-100", "101-200", 150]}],
            ["egress[0].ports[2]: 150 is already covered by ports[1]"],
        ),
        (
            [{"host": "a.test.example", "ports": ["1-100", "101-200", "50-150"]}],
            ["egress[0].ports[2]: 50-150 is already covered by the entries before it"],
        ),
        # ranges no policy can open
        (
            [{"cidr": "127.0.0.0/16"}],
            [
                (
                    "egress[0].cidr: 127.0.0.0/16 lies inside 127.0.0.0/8 (deny_loopback), "
                    "which no policy can open"
                )
            ],
        ),
        (
            [{"cidr": "224.0.0.0/24", "ports": [80]}],
            [
                (
                    "egress[0].cidr: 224.0.0.0/24 lies inside 224.0.0.0/4 (deny_multicast), "
                    "which no policy can open"
                )
            ],
        ),
        (
            [{"cidr": "2001:db8::/32"}],
            [
                (
                    "egress[0].cidr: 2001:db8::/32 never matches: the fleet carries IPv4 only "
                    "(tier 1 drops IPv6)"
                )
            ],
        ),
    ],
)
def test_rules_that_never_decide(rules: list[dict[str, Any]], expected: list[str]) -> None:
    assert lines(check(with_rules(*rules))) == expected


@pytest.mark.parametrize(
    "rules",
    [
        # different ports, or only some of them covered
        [{"host": "a.test.example", "ports": [80]}, {"host": "a.test.example", "ports": [80, 443]}],
        # the exact name first, the wildcard after it still covers the other names
        [{"host": "eu.data.test.example"}, {"host": "*.data.test.example"}],
        # a wildcard does not cover its own base name, nor two labels down
        [{"host": "*.test.example"}, {"host": "test.example"}, {"host": "a.b.test.example"}],
        # 10.1/16 opens private addresses that 0.0.0.0/0 cannot: not dead
        [{"cidr": "0.0.0.0/0"}, {"cidr": "10.1.0.0/16"}],
        # the metadata address named exactly
        [{"cidr": "169.254.169.254/32", "ports": [80]}],
        # host and cidr rules never shadow each other
        [{"cidr": "0.0.0.0/0"}, {"host": "a.test.example"}],
    ],
)
def test_rules_that_do_decide(rules: list[dict[str, Any]]) -> None:
    report = check(with_rules(*rules))
    assert report.ok, lines(report)


def test_a_narrower_private_cidr_inside_a_wider_private_one_is_dead() -> None:
    policy = parse_policy(
        with_rules({"cidr": "10.0.0.0/8"}, {"cidr": "10.1.2.0/24"}), require_timestamps=False
    )
    assert [p.field for p in dead_rules(policy)] == ["egress[1]"]


def test_notes_for_an_empty_egress_and_report_mode() -> None:
    report = check({**GOOD, "egress": [], "mode": "report"})
    assert report.ok
    assert [n.field for n in report.notes] == ["egress", "mode"]


# --- documents: JSON or JWS -------------------------------------------------------------


def test_document_that_is_not_json() -> None:
    report = check_document(b"{not json", now=NOW)
    assert [p.field for p in report.problems] == ["$"]
    assert lines(report)[0].startswith("$: not JSON: ")
    assert lines(check_document(b"hello", now=NOW)) == [
        "$: neither a JSON object nor a JWS (header.payload.signature)"
    ]


def test_document_jws_needs_timestamps_and_reports_expiry() -> None:
    key = generate_signing_key()
    token = sign_payload({**GOOD, "iat": NOW - 9000, "nbf": NOW - 9000, "exp": NOW - 7200}, key)
    report = check_document(token.encode() + b"\n", now=NOW, known_nodes=["node2"])
    assert lines(report) == [
        "exp: expired 2026-12-06T14:00:00Z, 2 h ago",
        "nodes[0]: no node 'node1' at the control plane (known: node2)",
    ]
    assert any(n.field == "signature" for n in report.notes)
    untimed = sign_payload(GOOD, key)
    assert [p.field for p in check_document(untimed.encode(), now=NOW).problems] == [
        "iat",
        "nbf",
        "exp",
    ]


def test_document_jws_header_problems() -> None:
    header = b64url_encode(b'{"alg":"none","typ":"JWT"}')
    body = b64url_encode(b'{"v": 1}')
    report = check_document(f"{header}.{body}.".encode(), now=NOW)
    assert [p.field for p in report.problems][:2] == ["header.alg", "header.typ"]


def test_dead_rules_are_found_beside_other_problems() -> None:
    bad = {
        **GOOD,
        "nodes": ["node9"],
        "exp": 1000,
        "egress": [
            {"host": "*.test"},
            {"host": "api.allowed.test", "ports": [443, 80]},
            {"host": "api.allowed.test"},
        ],
    }
    assert lines(check(bad, known_nodes=["node1", "node2"])) == [
        "exp: expired 1970-01-01T00:16:40Z, 56 years ago",
        (
            "egress[0].host: '*.test': a wildcard needs at least 2 labels after '*.' "
            "(it would cover a whole top-level domain)"
        ),
        "nodes[0]: no node 'node9' at the control plane (known: node1, node2)",
        (
            "egress[2]: never decides: egress[1] (api.allowed.test) already matches all its "
            "destinations and ports"
        ),
    ]


def test_http_rules_behind_an_earlier_rule_never_apply() -> None:
    http = {"allow": [{"methods": ["GET"], "paths": ["/repos/acme/*"]}]}
    report = check(
        with_rules(
            {"host": "api.github.example", "ports": [443]},
            {"host": "api.github.example", "ports": [443], "tls": "intercept", "http": http},
        )
    )
    assert lines(report) == [
        (
            "egress[1]: never decides: egress[0] (api.github.example) already matches all its "
            'destinations and ports; its "tls": "intercept" and "http" rules never apply'
        )
    ]


def test_http_rule_problems_name_their_field() -> None:
    http = {"allow": [{"methods": ["get"], "paths": ["/"]}]}
    report = check(
        with_rules(
            {"host": "a.test.example", "ports": [80], "http": http},
            {"host": "b.test.example", "tls": "intercept"},
        )
    )
    assert [p.field for p in report.problems] == [
        "egress[0].http.allow[0].methods[0]",
        "egress[1].tls",
    ]
