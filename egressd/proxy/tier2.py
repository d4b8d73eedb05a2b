"""Tier 2: the proxy's decision for one intercepted TCP connection (pure).

DESIGN.md, packet path step 7. In order:

1. The destination address is classified first. An always-denied address
   (SSRF: link-local, loopback, private, the fleet's own ranges ...) that no
   cidr rule overrides for this port is denied with the range's reason
   (`address_precheck`; the interceptor calls it before peeking, so an
   SSRF attempt costs no wait).
2. What the client's first bytes were decides what may decide (fail
   closed: a TLS or HTTP connection is never decided by a guess):

   * a TLS ClientHello or HTTP request head that could not be read is denied
     with its reason (`sniff_error`: ``tls_malformed``,
     ``client_hello_incomplete`` at the peek deadline or EOF,
     ``client_hello_too_large`` past `sniff.MAX_CLIENT_HELLO`, and
     ``http_malformed``, ``http_head_incomplete``, ``http_head_too_large``);
   * a complete TLS ClientHello or HTTP head is decided only by the name it
     carries (steps 3-5); one without a name (no SNI; HTTP/1.0 without Host;
     an IP literal) only by the address (cidr rules), else ``no_sni`` /
     ``no_host`` (or the address's reason for a literal);
   * only a client that sent nothing readable as TLS or HTTP (another
     protocol, or silence: a server-speaks-first protocol) is decided by the
     names this job resolved to the address (step 6).

   A cidr rule that allows the address allows it whatever is sent to it.
3. The claimed name is the TLS SNI, else the HTTP Host: an absolute-form
   target's authority, a ``CONNECT`` target, else the Host header. (Both
   cannot be seen on one connection: HTTP inside TLS is encrypted. Were both
   given, SNI wins: it is what the TLS server routes by.) An IP literal as SNI
   or Host is not a name claim; a claim that is not a valid host name is
   ``invalid_host``.
4. The claimed name is matched (`matcher.decide`: host rules, or a cidr rule
   for the address). A deny, or an allow by a cidr rule, is final: such a name
   grants nothing, so whether it agrees with the address does not matter.
   When the request names a port (``CONNECT host:port``, an absolute-form
   ``http://host:port/``: where a forward proxy would go), the name must be
   allowed on that port too. A ClientHello with ``encrypted_client_hello``
   (its SNI is a public front; the real name is encrypted) is denied
   ``ech_not_allowed`` unless the rule that allows the front on this port
   says ``"ech": "allow"``.
5. A name that a host rule allows counts only when it agrees with the
   destination: the address is one that the proxy's DNS gave this job for
   that name (`resolved_names`, the names this job resolved to this address),
   or one that the proxy's own resolution of the name returns
   (`proxy_resolves`). Otherwise ``host_address_mismatch`` (domain fronting,
   a forged Host, a ``CONNECT`` to another host). `needs_resolution` tells
   the caller when it must resolve.
6. Without anything readable, the names this job resolved to this address
   through the proxy's DNS are tried (any one allowing is enough); without
   any, the address alone decides (cidr rules).

`decide_named` also says which name the audit event carries: only ever one
the client sent (SNI, Host, target), or in case 6 the one it resolved that
decided; never a resolved name for a connection that spoke TLS or HTTP.

Report mode does not change the decision; `apply_mode` turns it into what is
enforced: in ``report`` mode a deny is allowed and flagged ``would_deny``,
except for always-denied addresses, which are enforced in both modes. The
reasons of step 2 are denies like any other there (as ``tls_malformed``
always was): report mode exists to roll a policy out without breaking
clients, and a deadline or bound set too tight is exactly what it should
reveal rather than enforce.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from egressd.policy.addresses import (
    ALWAYS_DENIED,
    DENY_FLEET_RANGE,
    FLEET_ADDRESS,
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
from egressd.proxy.outcome import ConnectionReason

IPv4Address = ipaddress.IPv4Address

# Tier 2's own reasons: members of the connection reasons (`egressd.proxy.outcome`).
HOST_ADDRESS_MISMATCH = ConnectionReason.HOST_ADDRESS_MISMATCH
TLS_MALFORMED = ConnectionReason.TLS_MALFORMED
HTTP_MALFORMED = ConnectionReason.HTTP_MALFORMED
INVALID_HOST = ConnectionReason.INVALID_HOST
# Fail closed on what cannot be read (step 2 of the module docstring).
CLIENT_HELLO_INCOMPLETE = ConnectionReason.CLIENT_HELLO_INCOMPLETE
CLIENT_HELLO_TOO_LARGE = ConnectionReason.CLIENT_HELLO_TOO_LARGE
HTTP_HEAD_INCOMPLETE = ConnectionReason.HTTP_HEAD_INCOMPLETE
HTTP_HEAD_TOO_LARGE = ConnectionReason.HTTP_HEAD_TOO_LARGE
NO_SNI = ConnectionReason.NO_SNI
NO_HOST = ConnectionReason.NO_HOST
ECH_NOT_ALLOWED = ConnectionReason.ECH_NOT_ALLOWED
#: The reasons a connection's unreadable first bytes are denied with.
SNIFF_ERRORS: frozenset[str] = frozenset(
    {
        TLS_MALFORMED,
        CLIENT_HELLO_INCOMPLETE,
        CLIENT_HELLO_TOO_LARGE,
        HTTP_MALFORMED,
        HTTP_HEAD_INCOMPLETE,
        HTTP_HEAD_TOO_LARGE,
    }
)

#: What the client's first bytes were: a TLS ClientHello, an HTTP/1.x request
#: head, or (None) nothing readable as either.
PROTOCOL_TLS = "tls"
PROTOCOL_HTTP = "http"
_ECH_ALLOW = "allow"  # EgressRule.ech

MODE_ENFORCE = "enforce"
MODE_REPORT = "report"

#: Reasons that report mode never turns into an allow.
ALWAYS_DENIED_REASONS: frozenset[str] = frozenset(
    {reason for _, reason in ALWAYS_DENIED} | {DENY_FLEET_RANGE, FLEET_ADDRESS, INVALID_ADDRESS}
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


@dataclass(frozen=True, slots=True)
class NamedDecision:
    """A decision and the name the audit event carries for it: one the client
    sent, or (nothing readable sent) the name it resolved that decided."""

    decision: Decision
    host: str | None


def claimed_host(sni: str | None, http_host: str | None) -> ClaimedHost:
    """The name claimed by SNI (preferred) or Host, normalised."""
    raw = sni or http_host
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
    protocol: str | None = None,
    ech: bool = False,
    target_port: int | None = None,
) -> Decision:
    """The tier-2 decision; see `decide_named`."""
    return decide_named(
        policy,
        dst_ip=dst_ip,
        dst_port=dst_port,
        sni=sni,
        http_host=http_host,
        resolved_names=resolved_names,
        proxy_resolves=proxy_resolves,
        fleet_ranges=fleet_ranges,
        sniff_error=sniff_error,
        protocol=protocol,
        ech=ech,
        target_port=target_port,
    ).decision


def decide_named(
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
    protocol: str | None = None,
    ech: bool = False,
    target_port: int | None = None,
) -> NamedDecision:
    """The tier-2 decision and its audit name; see the module docstring for
    the order of checks.

    `protocol`: ``tls`` (a complete ClientHello was read: `sni`, `ech`),
    ``http`` (a complete request head: `http_host`, and `target_port` when
    the request target names a port), or None: nothing readable as either
    (inferred as ``tls``/``http`` when `sni`/`http_host` is given).
    `resolved_names`: the names this job resolved to `dst_ip` through the
    proxy's DNS (unexpired). `proxy_resolves`: the addresses the proxy's own
    resolution of the claimed name returns, or a callable giving them for a
    name (called at most once, and only when `resolved_names` does not already
    vouch for the claim). `sniff_error`: one of `SNIFF_ERRORS` when the first
    bytes were unreadable.
    """
    claim = claimed_host(sni, http_host)
    pre = address_precheck(policy, dst_ip, dst_port, fleet_ranges=fleet_ranges)
    if pre is not None:
        return NamedDecision(pre, claim.name or claim.raw)
    by_address = match_address(policy, dst_ip, dst_port, fleet_ranges=fleet_ranges)

    if sniff_error is not None:
        # Nothing the client sent could be read: no name to log either.
        if by_address.allowed:
            return NamedDecision(by_address, None)
        return NamedDecision(Decision(Verdict.DENY, sniff_error, None), None)

    if protocol is None:
        protocol = PROTOCOL_TLS if sni else PROTOCOL_HTTP if http_host else None

    if claim.invalid:
        if by_address.allowed:
            return NamedDecision(by_address, claim.raw)
        return NamedDecision(Decision(Verdict.DENY, INVALID_HOST, None), claim.raw)

    if claim.name is not None:
        by_name = _decide_name(
            policy,
            claim.name,
            dst_ip=dst_ip,
            dst_port=dst_port,
            target_port=target_port,
            ech=ech,
            fleet_ranges=fleet_ranges,
        )
        if by_name.reason == ALLOWED_HOST and not _agrees(
            claim.name, dst_ip, resolved_names, proxy_resolves
        ):
            by_name = Decision(Verdict.DENY, HOST_ADDRESS_MISMATCH, None)
        return NamedDecision(by_name, claim.name)

    if protocol is not None:
        # TLS or HTTP without a name: the address alone, never a name the
        # job resolved (the client may be asking for any other name there).
        if by_address.allowed or claim.raw is not None:
            return NamedDecision(by_address, claim.raw)  # an IP literal: that address decides
        if ech:
            return NamedDecision(Decision(Verdict.DENY, ECH_NOT_ALLOWED, None), None)
        reason = NO_SNI if protocol == PROTOCOL_TLS else NO_HOST
        return NamedDecision(Decision(Verdict.DENY, reason, None), None)

    if not resolved_names:
        return NamedDecision(by_address, None)
    denials: list[tuple[Decision, str]] = []
    for name in sorted(resolved_names):
        decision = decide(policy, host=name, ip=dst_ip, port=dst_port, fleet_ranges=fleet_ranges)
        if decision.allowed:
            return NamedDecision(decision, name)
        denials.append((decision, name))
    decision, name = _most_specific(denials)
    return NamedDecision(decision, name)


def needs_resolution(
    policy: Policy,
    *,
    name: str,
    dst_port: int,
    resolved_names: Collection[str],
    target_port: int | None = None,
    ech: bool = False,
) -> bool:
    """Whether the proxy must resolve claimed `name` itself to decide.

    Only a name that a host rule allows on this port (and on `target_port`,
    and with ECH when `ech`) needs its agreement with the destination
    checked, and only when the job's own DNS answers do not already vouch
    for it. The proxy never resolves any other claimed name: a sandbox could
    otherwise make the proxy look up arbitrary names (an SNI of
    ``<secret>.attacker.example``), a DNS exfiltration channel past the
    responder.
    """
    if name in resolved_names:
        return False
    return _by_host_rules(policy, name, dst_port, target_port=target_port, ech=ech).allowed


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


def _decide_name(
    policy: Policy,
    name: str,
    *,
    dst_ip: IPv4Address,
    dst_port: int,
    target_port: int | None,
    ech: bool,
    fleet_ranges: Sequence[IPNetwork],
) -> Decision:
    """`matcher.decide` for a claimed name, then what only host rules check
    (the request's own target port, ECH); agreement is the caller's."""
    by_name = decide(policy, host=name, ip=dst_ip, port=dst_port, fleet_ranges=fleet_ranges)
    if by_name.reason != ALLOWED_HOST:
        return by_name  # a deny, or a cidr rule's allow: the name grants nothing
    return _by_host_rules(policy, name, dst_port, target_port=target_port, ech=ech)


def _by_host_rules(
    policy: Policy, name: str, dst_port: int, *, target_port: int | None, ech: bool
) -> Decision:
    decision = match_host(policy, name, dst_port)
    if not decision.allowed:
        return decision
    if target_port is not None and target_port != dst_port:
        at_target = match_host(policy, name, target_port)
        if not at_target.allowed:
            return at_target
    if ech and (decision.rule is None or decision.rule.ech != _ECH_ALLOW):
        return Decision(Verdict.DENY, ECH_NOT_ALLOWED, decision.rule)
    return decision


def _most_specific(denials: Sequence[tuple[Decision, str]]) -> tuple[Decision, str]:
    """Among denials, prefer one where something matched (port_not_allowed)."""
    for denial in denials:
        if denial[0].reason == PORT_NOT_ALLOWED:
            return denial
    for denial in denials:
        if denial[0].reason != NO_MATCHING_RULE:
            return denial
    return denials[0]
