"""Tier 2: the proxy's decision for one intercepted TCP connection (pure).

DESIGN.md, packet path step 7. In order:

1. The destination address is classified first. An always-denied address
   (SSRF: link-local, loopback, private, the fleet's own ranges ...) that no
   cidr rule overrides for this port is denied with the range's reason
   (`address_precheck`; the interceptor calls it before peeking, so an
   SSRF attempt costs no wait).
2. Bytes that look like TLS or HTTP but cannot be read unambiguously are
   denied (``tls_malformed``, ``http_malformed``), unless a cidr rule allows
   the address: a cidr rule allows an address whatever is sent to it.
3. The claimed name is the TLS SNI, else the HTTP Host. (Both cannot be seen
   on one connection: HTTP inside TLS is encrypted. Were both given, SNI wins:
   it is what the TLS server routes by.) An IP literal as SNI or Host is not a
   name claim; a claim that is not a valid host name is ``invalid_host``.
4. The claimed name is matched (`matcher.decide`: host rules, or a cidr rule
   for the address). A deny, or an allow by a cidr rule, is final: such a name
   grants nothing, so whether it agrees with the address does not matter.
5. A name that a host rule allows counts only when it agrees with the
   destination: the address is one that the proxy's DNS gave this job for
   that name (`resolved_names`, the names this job resolved to this address),
   or one that the proxy's own resolution of the name returns
   (`proxy_resolves`). Otherwise ``host_address_mismatch`` (domain fronting,
   a forged Host). `needs_resolution` tells the caller when it must resolve.
6. Without a claimed name, the names this job resolved to this address
   through the proxy's DNS are tried (any one allowing is enough); without
   any, the address alone decides (cidr rules).

Report mode does not change the decision; `apply_mode` turns it into what is
enforced: in ``report`` mode a deny is allowed and flagged ``would_deny``,
except for always-denied addresses, which are enforced in both modes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from egressd.policy.addresses import (
    ALWAYS_DENIED,
    DENY_FLEET_RANGE,
    INVALID_ADDRESS,
    IPNetwork,
    find_denied,
    parse_address,
)
from egressd.policy.matcher import (
    ALLOWED_HOST,
    NO_MATCHING_RULE,
    PORT_NOT_ALLOWED,
    Decision,
    Verdict,
    decide,
    match_address,
    match_host,
)
from egressd.policy.model import Policy
from egressd.policy.names import HostError, normalize_host

IPv4Address = ipaddress.IPv4Address

HOST_ADDRESS_MISMATCH = "host_address_mismatch"
TLS_MALFORMED = "tls_malformed"
HTTP_MALFORMED = "http_malformed"
INVALID_HOST = "invalid_host"

MODE_ENFORCE = "enforce"
MODE_REPORT = "report"

#: Reasons that report mode never turns into an allow.
ALWAYS_DENIED_REASONS: frozenset[str] = frozenset(
    {reason for _, reason in ALWAYS_DENIED} | {DENY_FLEET_RANGE, INVALID_ADDRESS}
)

ProxyResolves = Callable[[str], Collection[IPv4Address]] | Collection[IPv4Address]


@dataclass(frozen=True, slots=True)
class ClaimedHost:
    """The name a connection claims (normalised), if any.

    ``invalid`` is set when SNI/Host was given but is neither a valid host
    name nor an IP literal.
    """

    name: str | None
    raw: str | None
    invalid: bool = False


@dataclass(frozen=True, slots=True)
class Tier2Outcome:
    """A decision and what is enforced for it under the policy's mode."""

    decision: Decision
    enforced_verdict: Verdict
    would_deny: bool

    @property
    def allowed(self) -> bool:
        return self.enforced_verdict is Verdict.ALLOW


def claimed_host(sni: str | None, http_host: str | None) -> ClaimedHost:
    """The name claimed by SNI (preferred) or Host, normalised."""
    raw = sni if sni else http_host
    if not raw:
        return ClaimedHost(None, None)
    literal = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    if parse_address(literal) is not None:
        return ClaimedHost(None, raw)  # an address, not a name: no claim
    try:
        return ClaimedHost(normalize_host(raw), raw)
    except HostError:
        return ClaimedHost(None, raw, invalid=True)


def address_precheck(
    policy: Policy,
    dst_ip: IPv4Address,
    dst_port: int,
    *,
    fleet_ranges: Sequence[IPNetwork] = (),
) -> Decision | None:
    """A final deny for an always-denied destination, else None (decide on).

    An always-denied address that a cidr rule overrides, but not for this
    port, is denied with the range's reason too (it is still always-denied
    for this port, and report mode must not open it).
    """
    denied = find_denied(dst_ip, fleet_ranges=fleet_ranges)
    if denied is None:
        return None
    by_address = match_address(policy, dst_ip, dst_port, fleet_ranges=fleet_ranges)
    if by_address.allowed:
        return None
    return Decision(Verdict.DENY, denied.reason, by_address.rule)


def decide_connection(
    policy: Policy,
    *,
    dst_ip: IPv4Address,
    dst_port: int,
    sni: str | None,
    http_host: str | None,
    resolved_names: Collection[str],
    proxy_resolves: ProxyResolves = (),
    fleet_ranges: Sequence[IPNetwork] = (),
    sniff_error: str | None = None,
) -> Decision:
    """The tier-2 decision; see the module docstring for the order of checks.

    `resolved_names`: the names this job resolved to `dst_ip` through the
    proxy's DNS (unexpired). `proxy_resolves`: the addresses the proxy's own
    resolution of the claimed name returns, or a callable giving them for a
    name (called at most once, and only when `resolved_names` does not already
    vouch for the claim). `sniff_error`: ``tls_malformed``/``http_malformed``
    when the first bytes were unreadable.
    """
    pre = address_precheck(policy, dst_ip, dst_port, fleet_ranges=fleet_ranges)
    if pre is not None:
        return pre
    by_address = match_address(policy, dst_ip, dst_port, fleet_ranges=fleet_ranges)

    if sniff_error is not None:
        return by_address if by_address.allowed else Decision(Verdict.DENY, sniff_error, None)

    claim = claimed_host(sni, http_host)
    if claim.invalid:
        return by_address if by_address.allowed else Decision(Verdict.DENY, INVALID_HOST, None)

    if claim.name is not None:
        by_name = decide(
            policy, host=claim.name, ip=dst_ip, port=dst_port, fleet_ranges=fleet_ranges
        )
        if by_name.reason != ALLOWED_HOST:
            return by_name  # a deny, or a cidr rule's allow: the name grants nothing
        if not _agrees(claim.name, dst_ip, resolved_names, proxy_resolves):
            return Decision(Verdict.DENY, HOST_ADDRESS_MISMATCH, None)
        return by_name

    if not resolved_names:
        return by_address
    denials: list[Decision] = []
    for name in sorted(resolved_names):
        decision = decide(policy, host=name, ip=dst_ip, port=dst_port, fleet_ranges=fleet_ranges)
        if decision.allowed:
            return decision
        denials.append(decision)
    return _most_specific(denials)


def needs_resolution(
    policy: Policy, *, name: str, dst_port: int, resolved_names: Collection[str]
) -> bool:
    """Whether the proxy must resolve claimed `name` itself to decide.

    Only a name that a host rule allows on this port needs its agreement with
    the destination checked, and only when the job's own DNS answers do not
    already vouch for it. The proxy never resolves any other claimed name: a
    sandbox could otherwise make the proxy look up arbitrary names (an SNI of
    ``<secret>.attacker.example``), a DNS exfiltration channel past the
    responder.
    """
    if name in resolved_names:
        return False
    return match_host(policy, name, dst_port).allowed


def apply_mode(policy: Policy, decision: Decision) -> Tier2Outcome:
    """What is enforced for `decision` under `policy.mode`."""
    if decision.allowed:
        return Tier2Outcome(decision, Verdict.ALLOW, would_deny=False)
    if policy.mode == MODE_REPORT and decision.reason not in ALWAYS_DENIED_REASONS:
        return Tier2Outcome(decision, Verdict.ALLOW, would_deny=True)
    return Tier2Outcome(decision, Verdict.DENY, would_deny=False)


def _agrees(
    name: str,
    dst_ip: IPv4Address,
    resolved_names: Collection[str],
    proxy_resolves: ProxyResolves,
) -> bool:
    if name in resolved_names:
        return True
    addresses = proxy_resolves(name) if callable(proxy_resolves) else proxy_resolves
    return dst_ip in addresses


def _most_specific(denials: Sequence[Decision]) -> Decision:
    """Among denials, prefer one where something matched (port_not_allowed)."""
    for decision in denials:
        if decision.reason == PORT_NOT_ALLOWED:
            return decision
    for decision in denials:
        if decision.reason != NO_MATCHING_RULE:
            return decision
    return denials[0]
