"""Policy decisions as values: ``decide(...) -> Decision(verdict, reason, rule)``.

Pure functions, no I/O, never raise: anything unusable (a name that does not
normalise, a string that is not an address) is a deny with its own reason.

Reasons (exact strings, used verbatim by counters and audit lines):

* ``allowed_host``, ``allowed_cidr``: the rule that allowed it is in ``rule``;
* ``no_matching_rule``: no rule names this host / contains this address;
* ``port_not_allowed``: a rule matched the host or address but none of the
  matching rules lists the port; ``rule`` is the first such rule;
* ``invalid_host``, ``invalid_address``: the input could not be parsed;
* every `egressd.policy.addresses.classify_address` reason (``deny_private``,
  ``deny_link_local``, ``deny_fleet_range`` ...) for an always-denied address
  that no cidr rule overrides (see that module for the override rule).

Rules are tried in policy order; the first rule that matches both the
destination and the port decides. Report mode is not applied here: the
matcher returns the true decision and the proxy turns a deny into
``would_deny`` when ``policy.mode == "report"``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from egressd.policy.addresses import (
    INVALID_ADDRESS,
    DeniedMatch,
    IPAddress,
    IPNetwork,
    find_denied,
    overrides,
    parse_address,
)
from egressd.policy.model import EgressRule, Policy
from egressd.policy.names import HostError, host_matches, normalize_host

ALLOWED_HOST = "allowed_host"
ALLOWED_CIDR = "allowed_cidr"
NO_MATCHING_RULE = "no_matching_rule"
PORT_NOT_ALLOWED = "port_not_allowed"
INVALID_HOST = "invalid_host"

__all__ = [
    "ALLOWED_CIDR",
    "ALLOWED_HOST",
    "INVALID_ADDRESS",
    "INVALID_HOST",
    "NO_MATCHING_RULE",
    "PORT_NOT_ALLOWED",
    "Decision",
    "Verdict",
    "decide",
    "match_address",
    "match_host",
    "name_allowed",
]


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of matching one destination against one policy."""

    verdict: Verdict
    reason: str
    rule: EgressRule | None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


def match_host(policy: Policy, host: str, port: int) -> Decision:
    """Decide by name rules only. `host` is normalised here; never raises."""
    try:
        name = normalize_host(host)
    except HostError:
        return Decision(Verdict.DENY, INVALID_HOST, None)
    rules = (r for r in policy.egress if r.host is not None and host_matches(r.host, name))
    return _first_for_port(rules, port, ALLOWED_HOST)


def name_allowed(policy: Policy, host: str) -> bool:
    """Whether any host rule names `host`, whatever the port (for the DNS responder)."""
    try:
        name = normalize_host(host)
    except HostError:
        return False
    return any(r.host is not None and host_matches(r.host, name) for r in policy.egress)


def match_address(
    policy: Policy,
    ip: IPAddress | str,
    port: int,
    *,
    fleet_ranges: Sequence[IPNetwork] = (),
) -> Decision:
    """Decide by address: always-denied ranges first (with the override), then cidr rules."""
    addr = parse_address(ip)
    if addr is None:
        return Decision(Verdict.DENY, INVALID_ADDRESS, None)
    return _match_address(policy, addr, find_denied(addr, fleet_ranges=fleet_ranges), port)


def decide(
    policy: Policy,
    *,
    host: str | None,
    ip: IPAddress | str,
    port: int,
    fleet_ranges: Sequence[IPNetwork] = (),
) -> Decision:
    """The tier-2 decision for a connection to `ip`:`port`, known by name `host` if any.

    1. The address is classified first, always: an always-denied address that
       no cidr rule overrides (for this port) is denied with the range's
       reason even when `host` is allowed (SSRF, DNS rebinding).
    2. Without a host, the address decides (`match_address`).
    3. With a host, the name rules decide (`match_host`), except that a cidr
       rule allowing the address still allows the connection: a cidr rule
       allows an address whatever name is used for it, and a client could
       always connect without sending a name. When neither allows, the
       reason prefers ``port_not_allowed`` (something matched) over
       ``no_matching_rule``, and the name's decision over the address's.

    The caller checks separately that `host` and `ip` agree
    (``host_address_mismatch``); an ``allowed_cidr`` decision does not depend
    on the name.
    """
    addr = parse_address(ip)
    if addr is None:
        return Decision(Verdict.DENY, INVALID_ADDRESS, None)
    denied = find_denied(addr, fleet_ranges=fleet_ranges)
    by_address = _match_address(policy, addr, denied, port)
    if host is None or (denied is not None and not by_address.allowed):
        return by_address
    by_host = match_host(policy, host, port)
    if by_host.allowed:
        return by_host
    if by_address.allowed:
        return by_address
    if by_address.reason == PORT_NOT_ALLOWED and by_host.reason != PORT_NOT_ALLOWED:
        return by_address
    return by_host


def _match_address(
    policy: Policy, addr: IPAddress, denied: DeniedMatch | None, port: int
) -> Decision:
    rules = [
        r
        for r in policy.egress
        if r.cidr is not None and r.cidr.version == addr.version and addr in r.cidr
    ]
    if denied is not None:
        rules = [r for r in rules if overrides(denied, addr, r.cidr)]
        if not rules:
            return Decision(Verdict.DENY, denied.reason, None)
    return _first_for_port(rules, port, ALLOWED_CIDR)


def _first_for_port(rules: Iterable[EgressRule], port: int, allowed_reason: str) -> Decision:
    first_match: EgressRule | None = None
    for rule in rules:
        if rule.allows_port(port):
            return Decision(Verdict.ALLOW, allowed_reason, rule)
        if first_match is None:
            first_match = rule
    if first_match is None:
        return Decision(Verdict.DENY, NO_MATCHING_RULE, None)
    return Decision(Verdict.DENY, PORT_NOT_ALLOWED, first_match)
