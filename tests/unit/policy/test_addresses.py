"""The always-denied classifier and the exact-CIDR override (table: testdata/addresses.json)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.policy.addresses import (
    ALWAYS_DENIED,
    OVERRIDABLE_REASONS,
    classify_address,
    denied_unless_exact,
    find_denied,
)

TABLE = json.loads(
    (Path(__file__).parent / "testdata" / "addresses.json").read_text(encoding="utf-8")
)
FLEET = [ipaddress.ip_network(n) for n in TABLE["fleet"]["ranges"]]


@pytest.mark.parametrize(("ip", "reason"), TABLE["cases"])
def test_classify(ip: str, reason: str | None) -> None:
    assert classify_address(ip) == reason


@pytest.mark.parametrize(("ip", "reason"), TABLE["fleet"]["cases"])
def test_classify_with_fleet_ranges(ip: str, reason: str | None) -> None:
    assert classify_address(ip, fleet_ranges=FLEET) == reason


@pytest.mark.parametrize(("ip", "reason"), [c for c in TABLE["cases"] if c[1] != "invalid_address"])
def test_address_objects_classify_like_strings(ip: str, reason: str | None) -> None:
    assert classify_address(ipaddress.ip_address(ip)) == reason


def test_fleet_ranges_are_checked_first() -> None:
    fleet = [ipaddress.ip_network("10.0.0.0/16")]
    assert classify_address("10.0.0.1", fleet_ranges=fleet) == "deny_fleet_range"
    assert classify_address("10.1.0.1", fleet_ranges=fleet) == "deny_private"


def test_every_design_range_is_denied() -> None:
    design = [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ]
    table = {net for net, _ in ALWAYS_DENIED}
    for text in design:
        net = ipaddress.ip_network(text)
        assert net in table
        assert classify_address(net.network_address) is not None
        assert classify_address(net.broadcast_address) is not None


def test_table_reasons_are_tokens() -> None:
    for net, reason in ALWAYS_DENIED:
        assert reason.startswith("deny_"), net
        assert reason == reason.lower() and " " not in reason
    assert {reason for _, reason in ALWAYS_DENIED} >= OVERRIDABLE_REASONS


def test_every_table_row_is_reachable() -> None:
    # Each row's reason is returned for some address in it (rows are not shadowed).
    seen = set()
    for net, _reason in ALWAYS_DENIED:
        match = find_denied(net[-1])
        assert match is not None
        seen.add(match.network)
    assert seen == {net for net, _ in ALWAYS_DENIED}


@pytest.mark.parametrize("value", [None, 2130706433, b"\x7f\x00\x00\x01", 3.5, ["127.0.0.1"]])
def test_non_addresses_are_invalid(value: object) -> None:
    assert classify_address(value) == "invalid_address"  # type: ignore[arg-type]


# (ip, rule cidr or None, still denied?)
OVERRIDE_CASES = [
    ("10.1.2.7", "10.1.2.0/24", False),
    ("10.1.2.7", "10.0.0.0/8", False),
    ("10.1.2.7", "10.1.2.7/32", False),
    ("10.1.2.7", "10.1.3.0/24", True),  # does not contain the address
    ("10.1.2.7", "0.0.0.0/0", True),  # contains the range, not inside it
    ("10.1.2.7", "8.0.0.0/6", True),
    ("10.1.2.7", None, True),  # host rules never override
    ("172.16.0.1", "172.16.0.0/12", False),
    ("172.16.0.1", "172.0.0.0/8", True),
    ("169.254.169.254", "169.254.169.254/32", False),
    ("169.254.169.254", "169.254.0.0/16", False),
    ("169.254.169.254", "169.0.0.0/8", True),
    ("100.96.1.7", "100.96.1.0/24", False),
    ("198.18.5.5", "198.18.0.0/15", False),
    ("198.18.5.5", "198.16.0.0/13", True),
    ("127.0.0.1", "127.0.0.0/8", True),  # loopback: never
    ("0.0.0.0", "0.0.0.0/8", True),  # this network: never
    ("224.0.0.1", "224.0.0.0/4", True),  # multicast: never
    ("255.255.255.255", "255.255.255.255/32", True),  # reserved/broadcast: never
    ("::1", "::1/128", True),
    ("::", "::/128", True),
    ("::ffff:10.1.2.7", "::ffff:10.1.2.0/120", True),  # embedding forms: never
    ("::ffff:10.1.2.7", "10.1.2.0/24", True),  # other family
    ("64:ff9b::a01:207", "64:ff9b::/96", True),
    ("fd00::1", "fd00::/8", False),
    ("fd00::1", "fc00::/7", False),
    ("fd00::1", "fc00::/6", True),
    ("fe80::1", "fe80::/64", False),
    ("8.8.8.8", None, False),  # not denied at all
    ("8.8.8.8", "10.0.0.0/8", False),
    ("not-an-ip", "10.0.0.0/8", True),
]


@pytest.mark.parametrize(("ip", "cidr", "denied"), OVERRIDE_CASES)
def test_denied_unless_exact(ip: str, cidr: str | None, denied: bool) -> None:
    rule = ipaddress.ip_network(cidr) if cidr is not None else None
    assert denied_unless_exact(ip, rule) is denied


def test_fleet_ranges_are_never_overridable() -> None:
    fleet = [ipaddress.ip_network("198.18.0.0/24")]
    rule = ipaddress.ip_network("198.18.0.0/24")
    assert denied_unless_exact("198.18.0.21", rule) is False
    assert denied_unless_exact("198.18.0.21", rule, fleet_ranges=fleet) is True


def test_zone_ids_are_ignored() -> None:
    assert classify_address("fe80::1%eth0") == "deny_link_local"
    assert classify_address("2606:4700:4700::1111%3") is None


@given(st.ip_addresses(v=4))
def test_mapped_form_never_allowed_and_keeps_embedded_reason(v4: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + v4.packed)
    inner = classify_address(v4)
    assert classify_address(mapped) == (inner if inner is not None else "deny_ipv4_mapped")


@given(st.ip_addresses(v=4))
def test_nat64_form_keeps_embedded_reason(v4: ipaddress.IPv4Address) -> None:
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(v4))
    inner = classify_address(v4)
    assert classify_address(nat64) == (inner if inner is not None else "deny_nat64")


@given(st.ip_addresses(v=4))
def test_v4_classification_matches_the_table(v4: ipaddress.IPv4Address) -> None:
    expected = next((reason for net, reason in ALWAYS_DENIED if v4 in net), None)
    assert classify_address(v4) == expected
    assert classify_address(str(v4)) == expected


@given(st.ip_addresses())
def test_classifier_is_total(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    reason = classify_address(ip, fleet_ranges=FLEET)
    assert reason is None or reason.startswith("deny_")


@given(st.text(max_size=60))
def test_classifier_never_raises_on_text(text: str) -> None:
    reason = classify_address(text)
    assert reason is None or reason.startswith("deny_") or reason == "invalid_address"
