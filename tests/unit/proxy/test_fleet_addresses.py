"""The fleet's own addresses are always denied (`fleet_address`), whatever a policy says.

Pure: the `FleetAddresses` value, the classifier, tier 2, report mode, DNS
answer filtering, the registry's parsing and its fleet set (with `_fetch`
replaced, no network), the decision cache and `resolve_a`'s cache.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.message
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry

from egressd.policy.addresses import (
    DENY_FLEET_RANGE,
    FLEET_ADDRESS,
    FleetAddresses,
    classify_address,
    denied_unless_exact,
    find_denied,
)
from egressd.policy.matcher import Verdict
from egressd.proxy import audit
from egressd.proxy.dns import REBINDING, UpstreamResolver, filter_answers
from egressd.proxy.intercept import _MISS, _DecisionCache
from egressd.proxy.registry import (
    NodeRegistry,
    RegistryError,
    parse_member_addresses,
    static_members,
)
from egressd.proxy.tier2 import (
    ALWAYS_DENIED_REASONS,
    address_precheck,
    apply_mode,
    decide_connection,
)
from tests.support.policies import make_policy

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network

RANGES = (N("198.18.0.0/24"), N("100.96.0.0/16"), N("100.100.100.53/32"))
EGRESS1, EGRESS2 = A("203.0.113.21"), A("203.0.113.22")
UNDERLAY1, NODE1 = A("198.18.0.21"), A("198.18.0.11")
SITE = A("203.0.113.10")
FLEET = FleetAddresses(RANGES, frozenset({EGRESS1, EGRESS2, UNDERLAY1, NODE1}))
WHOLE_NET = {"cidr": "203.0.113.0/24", "ports": [80, 443, 15001]}


# --- the value -------------------------------------------------------------------------


def test_a_fleet_set_is_its_ranges_as_a_sequence() -> None:
    assert list(FLEET) == list(RANGES)
    assert len(FLEET) == 3 and FLEET[0] == RANGES[0]
    assert bool(FleetAddresses((), frozenset({EGRESS1})))  # members alone deny something
    assert not FleetAddresses()
    assert FLEET.is_member("203.0.113.21") and not FLEET.is_member(SITE)
    assert not FLEET.is_member("not an address")


def test_a_change_is_a_new_object_with_a_higher_version() -> None:
    assert FLEET.with_members(set(FLEET.members)) is FLEET
    changed = FLEET.with_members(FLEET.members | {A("203.0.113.23")})
    assert changed is not FLEET and changed.version == FLEET.version + 1
    assert changed.ranges == FLEET.ranges
    # Equality is identity: an equal-looking set is still another set for caches.
    twin = FleetAddresses(RANGES, FLEET.members)
    assert twin != FLEET


# --- the classifier --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("203.0.113.21", FLEET_ADDRESS),  # inside the test internet, not a denied range
        ("203.0.113.22", FLEET_ADDRESS),
        ("198.18.0.21", FLEET_ADDRESS),  # a member inside a fleet range: the member wins
        ("198.18.0.11", FLEET_ADDRESS),
        ("198.18.0.99", DENY_FLEET_RANGE),
        ("::ffff:203.0.113.21", FLEET_ADDRESS),  # the embedded IPv4 address is what counts
        ("203.0.113.10", None),
        ("203.0.113.23", None),
    ],
)
def test_members_are_denied_first(ip: str, reason: str | None) -> None:
    assert classify_address(ip, fleet_ranges=FLEET) == reason


def test_a_plain_tuple_of_ranges_has_no_members() -> None:
    assert classify_address("203.0.113.21", fleet_ranges=RANGES) is None
    assert classify_address("198.18.0.21", fleet_ranges=RANGES) == DENY_FLEET_RANGE


@pytest.mark.parametrize("cidr", ["203.0.113.0/24", "203.0.113.21/32", "0.0.0.0/0"])
def test_no_cidr_rule_overrides_a_member(cidr: str) -> None:
    assert denied_unless_exact("203.0.113.21", N(cidr), fleet_ranges=FLEET)
    match = find_denied("203.0.113.21", fleet_ranges=FLEET)
    assert match is not None and not match.overridable


# --- tier 2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("dst", [EGRESS1, EGRESS2, UNDERLAY1])
def test_a_cidr_rule_covering_the_fleet_does_not_reach_it(dst: A) -> None:
    policy = make_policy(extra=[WHOLE_NET])
    pre = address_precheck(policy, dst, 80, fleet_ranges=FLEET)
    assert pre is not None and (pre.verdict, pre.reason) == (Verdict.DENY, FLEET_ADDRESS)
    # The rest of the internet is still the rule's.
    assert address_precheck(policy, A("203.0.113.23"), 80, fleet_ranges=FLEET) is None


def test_an_allowed_name_that_resolves_to_the_fleet_is_denied() -> None:
    policy = make_policy()
    decision = decide_connection(
        policy,
        dst_ip=EGRESS1,
        dst_port=443,
        sni="api.allowed.test",
        http_host=None,
        resolved_names={"api.allowed.test"},
        proxy_resolves={EGRESS1},
        fleet_ranges=FLEET,
    )
    assert (decision.verdict, decision.reason) == (Verdict.DENY, FLEET_ADDRESS)


def test_report_mode_still_denies_the_fleet() -> None:
    assert FLEET_ADDRESS in ALWAYS_DENIED_REASONS
    policy = make_policy(mode="report", extra=[WHOLE_NET])
    decision = decide_connection(
        policy,
        dst_ip=EGRESS2,
        dst_port=80,
        sni=None,
        http_host=None,
        resolved_names=set(),
        fleet_ranges=FLEET,
    )
    outcome = apply_mode(policy, decision)
    assert decision.reason == FLEET_ADDRESS
    assert outcome.enforced_verdict is Verdict.DENY and not outcome.would_deny


# --- DNS answers -----------------------------------------------------------------------


def upstream_answer(name: str, *addresses: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text_list(name, 60, "IN", "A", list(addresses)))
    return response


def test_fleet_answers_are_dropped_even_under_a_cidr_rule() -> None:
    policy = make_policy(extra=[WHOLE_NET])
    mixed = filter_answers(
        upstream_answer("api.allowed.test.", "203.0.113.21", "203.0.113.10"),
        FLEET,
        policy=policy,
    )
    assert mixed.kept == ((SITE, 60),)
    assert mixed.dropped == ((EGRESS1, FLEET_ADDRESS),)
    assert mixed.reason is None
    only = filter_answers(
        upstream_answer("api.allowed.test.", "203.0.113.21", "203.0.113.22"),
        FLEET,
        policy=policy,
    )
    assert only.kept == () and only.reason == REBINDING
    assert {reason for _, reason in only.dropped} == {FLEET_ADDRESS}


def test_the_dns_audit_line_lists_what_was_dropped() -> None:
    common: dict[str, Any] = dict(
        job_id=None,
        account=None,
        node=None,
        proxy="proxy1",
        src="100.96.1.2",
        sport=5353,
        dst="100.100.100.53",
        qname="api.allowed.test",
        qtype="A",
        verdict="allow",
        reason="allowed_host",
    )
    event = audit.dns_event(**common, dropped=[("203.0.113.21", FLEET_ADDRESS)])
    assert event[audit.DROPPED] == [{"address": "203.0.113.21", "reason": FLEET_ADDRESS}]
    assert audit.DROPPED not in audit.dns_event(**common)


async def test_resolve_a_filters_and_asks_again_after_the_fleet_changes() -> None:
    resolver = UpstreamResolver(A("203.0.113.53"), source=EGRESS1)
    asked: list[str] = []

    async def query_a(name: Any) -> dns.message.Message:
        asked.append(str(name))
        return upstream_answer("api.allowed.test.", "203.0.113.10", "203.0.113.23")

    resolver.query_a = query_a  # type: ignore[method-assign]
    before = FLEET
    assert await resolver.resolve_a("api.allowed.test", fleet_ranges=before) == {
        SITE,
        A("203.0.113.23"),
    }
    assert await resolver.resolve_a("api.allowed.test", fleet_ranges=before) == {
        SITE,
        A("203.0.113.23"),
    }
    assert len(asked) == 1  # cached
    after = before.with_members(before.members | {A("203.0.113.23")})
    assert await resolver.resolve_a("api.allowed.test", fleet_ranges=after) == {SITE}
    assert len(asked) == 2


# --- the interceptor's decision cache --------------------------------------------------


def test_the_decision_cache_never_serves_a_decision_made_before_the_fleet_changed() -> None:
    cache = _DecisionCache()
    policy = make_policy(extra=[WHOLE_NET])
    key = (A("203.0.113.23"), 80)
    cache.put(policy, FLEET, key, "allowed before")
    assert cache.get(policy, FLEET, key) == "allowed before"
    changed = FLEET.with_members(FLEET.members | {A("203.0.113.23")})
    assert cache.get(policy, changed, key) is _MISS


# --- the registry ----------------------------------------------------------------------


def test_member_addresses_are_taken_leniently() -> None:
    body = {
        "proxies": [
            {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"},
            {"name": "bad name!", "underlay": "198.18.0.22", "egress": "nope"},
            "junk",
        ]
    }
    members, problems = parse_member_addresses(body, "proxies", ("underlay", "egress"))
    assert members == {A("198.18.0.21"), A("203.0.113.21"), A("198.18.0.22")}
    assert problems == ["proxies[1].egress: not an IPv4 address"]
    with pytest.raises(RegistryError):
        parse_member_addresses({"proxies": "x"}, "proxies", ("underlay",))


def test_static_members() -> None:
    kw: dict[str, Any] = dict(
        underlay=UNDERLAY1, egress=(EGRESS1,), resolvers=(A("100.100.100.53"), A("203.0.113.53"))
    )
    assert static_members(control_url="http://198.18.0.2:8080", **kw) == {
        UNDERLAY1,
        EGRESS1,
        A("100.100.100.53"),
        A("203.0.113.53"),
        A("198.18.0.2"),
    }
    # A control plane named by host name adds nothing here (the service warns).
    assert A("198.18.0.2") not in static_members(control_url="http://ctl.example:8080", **kw)


class FakeControl:
    def __init__(self) -> None:
        self.nodes: object = {
            "nodes": [
                {"name": "node1", "underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"},
                # Collides with node1's CIDR: skipped by the node index, but its
                # address is still the fleet's.
                {"name": "odd", "underlay": "198.18.0.13", "sandbox_cidr": "100.96.1.0/25"},
            ]
        }
        self.proxies: object = {
            "proxies": [
                {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"},
                {"name": "proxy2", "underlay": "198.18.0.22", "egress": "203.0.113.22"},
            ]
        }

    async def fetch(self, url: str | None = None) -> object:
        body = self.proxies if url is not None and url.endswith("/v1/proxies") else self.nodes
        if isinstance(body, RegistryError):
            raise body
        return body


async def test_the_registry_keeps_the_fleet_set_current() -> None:
    control = FakeControl()
    changes: list[FleetAddresses] = []
    static = FleetAddresses(RANGES, frozenset({UNDERLAY1, EGRESS1, A("198.18.0.2")}))
    reg = NodeRegistry(
        None,  # type: ignore[arg-type]
        "http://198.18.0.2:8080",
        refresh_s=1.0,
        metrics=CollectorRegistry(),
        fleet=static,
        on_fleet_change=changes.append,
    )
    reg._fetch = control.fetch  # type: ignore[method-assign]
    assert reg.fleet is static  # before the first answer: what the config names

    assert await reg.refresh()
    first = reg.fleet
    assert first.members == {
        UNDERLAY1,
        EGRESS1,
        A("198.18.0.2"),
        A("198.18.0.11"),
        A("198.18.0.13"),
        A("198.18.0.22"),
        A("203.0.113.22"),
    }
    assert first.ranges == RANGES and first.version == 1 and changes == [first]

    assert await reg.refresh()
    assert reg.fleet is first and len(changes) == 1  # unchanged: no new set

    # A proxy joins: its addresses are denied from the next refresh on.
    control.proxies["proxies"].append(  # type: ignore[index]
        {"name": "proxy3", "underlay": "198.18.0.23", "egress": "203.0.113.23"}
    )
    assert await reg.refresh()
    assert reg.fleet.is_member("203.0.113.23") and reg.fleet.version == 2
    assert changes[-1] is reg.fleet

    # The proxies cannot be fetched: the last ones stay denied.
    control.proxies = RegistryError("unreachable", "down")
    assert await reg.refresh()
    assert reg.fleet.is_member("203.0.113.23")

    # A node leaves; static members never go, even when the registry omits them.
    control.proxies = {"proxies": []}
    control.nodes = {"nodes": []}
    assert await reg.refresh()
    assert reg.fleet.members == static.members


def test_the_service_starts_from_the_configured_fleet() -> None:
    from egressd.proxy.config import DEFAULT_FLEET_RANGES, config_from_mapping
    from egressd.proxy.service import static_fleet

    config = config_from_mapping(
        {
            "name": "proxy1",
            "underlay": "198.18.0.21",
            "egress": "203.0.113.21",
            "egress_addresses": ["203.0.113.21", "203.0.113.31"],
        }
    )
    fleet = static_fleet(config)
    assert fleet.ranges == DEFAULT_FLEET_RANGES
    assert fleet.members == {
        UNDERLAY1,
        EGRESS1,
        A("203.0.113.31"),  # every egress address the port pool binds
        A("198.18.0.2"),  # the control plane, from control_url
        A("100.100.100.53"),
        A("203.0.113.53"),  # the upstream resolver
    }
