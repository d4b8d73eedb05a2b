"""Per-request decisions on HTTP/1.x (pure): is this request allowed on this connection?

Tier 2 decided the connection by its first request (or its SNI); a keep-alive
connection can carry any number of requests after it, each with its own Host.
`decide_request` decides each of them (the first one too), in this order:

1. The request's authority (`request_target`, with `sniff`'s grammar: an
   absolute-form or ``CONNECT`` target's authority, else the Host header;
   the same disagreements are ``http_malformed``) must be allowed for the
   connection's destination exactly as tier 2 decides a connection
   (`tier2.decide_named`): the address first (always-denied ranges, cidr
   rules), then the name by the host rules, and a name a host rule allows
   must agree with the address: it is the name the connection was allowed
   for (`conn_host`, already checked against the address), a name this job
   resolved to the address through the proxy's DNS, or one the proxy's own
   resolution returns (``host_address_mismatch``; `request_needs_resolution`
   says when the caller must resolve). A name no rule allows is
   ``host_not_allowed``; no name at all (HTTP/1.0 without Host) is decided
   by the address alone, else ``no_host``.
2. ``CONNECT`` is refused (``connect_not_allowed``) unless the rule that
   allows its target has ``http`` with an entry listing ``CONNECT``; such an
   entry's paths do not apply (the target is an authority, already decided
   with its port by step 1). After an allowed ``CONNECT`` the connection is a
   tunnel to that authority.
3. With ``http`` on the deciding rule: the method must be listed
   (``method_not_allowed``) in an entry one of whose paths matches the
   request's path (``path_not_allowed``; `egressd.policy.paths`: query
   stripped, percent-decoded, dot segments and encoded separators refused as
   ``http_malformed``). A rule without ``http`` allows any method and path.

A decision's ``rule`` is the rule that allowed (or the one that matched and
refused) the request, so the interception step can take its credentials.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from egressd.policy.addresses import IPNetwork
from egressd.policy.matcher import NO_MATCHING_RULE, Decision, Verdict
from egressd.policy.model import TLS_INTERCEPT, EgressRule, Policy
from egressd.policy.paths import compiled, path_text, request_path
from egressd.proxy import sniff, tier2
from egressd.proxy.outcome import ConnectionReason

IPv4Address = ipaddress.IPv4Address


class RequestReason(enum.StrEnum):
    """Why an HTTP request was allowed or denied (its audit event's ``reason``).

    The request layer's own; a request whose authority tier 2 denies carries
    tier 2's reason (a `ConnectionReason`: ``port_not_allowed``, ``deny_private``
    ...). ``host_sni_mismatch`` is `tls_intercept`'s, the credential reasons
    `credentials`' (a unit test holds them to these members).
    """

    ALLOWED_REQUEST = "allowed_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PATH_NOT_ALLOWED = "path_not_allowed"
    HOST_NOT_ALLOWED = "host_not_allowed"
    CONNECT_NOT_ALLOWED = "connect_not_allowed"
    #: ``Upgrade: h2c`` would turn the connection into HTTP/2 that the proxy
    #: does not read: every later request would go unchecked.
    UPGRADE_NOT_ALLOWED = "upgrade_not_allowed"
    HTTP_MALFORMED = ConnectionReason.HTTP_MALFORMED
    HOST_ADDRESS_MISMATCH = ConnectionReason.HOST_ADDRESS_MISMATCH
    HOST_SNI_MISMATCH = "host_sni_mismatch"
    CREDENTIAL_EXFILTRATION = "credential_exfiltration"
    CREDENTIAL_UNAVAILABLE = "credential_unavailable"


ALLOWED_REQUEST = RequestReason.ALLOWED_REQUEST
METHOD_NOT_ALLOWED = RequestReason.METHOD_NOT_ALLOWED
PATH_NOT_ALLOWED = RequestReason.PATH_NOT_ALLOWED
HOST_NOT_ALLOWED = RequestReason.HOST_NOT_ALLOWED
CONNECT_NOT_ALLOWED = RequestReason.CONNECT_NOT_ALLOWED
HTTP_MALFORMED = RequestReason.HTTP_MALFORMED
HOST_ADDRESS_MISMATCH = RequestReason.HOST_ADDRESS_MISMATCH
UPGRADE_NOT_ALLOWED = RequestReason.UPGRADE_NOT_ALLOWED
#: A connection's reason (tier 2's outcome), not a request's: a rule with
#: request rules on a connection whose requests are not read.
HTTP_NOT_INSPECTABLE = ConnectionReason.HTTP_NOT_INSPECTABLE

CONNECT = "CONNECT"


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """What one request names: its authority and its path.

    `host` is lower case without port (sniff's form, not yet normalised),
    None without one; `port` the target's port when it names one; `path`
    the decoded segments (None: a path the proxy refuses to interpret);
    `path_text` the path without query (for audit events); `error` set
    when the target and Host cannot be read unambiguously.
    """

    host: str | None
    port: int | None
    path: tuple[str, ...] | None
    path_text: str
    connect: bool = False
    error: str | None = None


def request_target(method: str, target: str, host_header: str | None) -> RequestTarget:
    """The authority and path of a request (pure; never raises)."""
    text = path_text(target)
    try:
        head = f"{method} {target} HTTP/1.1\r\n"
        if host_header is not None:
            head += f"Host: {host_header}\r\n"
        found = sniff.sniff_http_host((head + "\r\n").encode("ascii"))
    except (UnicodeEncodeError, ValueError):
        return RequestTarget(None, None, None, text, error=HTTP_MALFORMED)
    return target_of(found, target)


def target_of(found: sniff.HostResult, target: str) -> RequestTarget:
    """The `RequestTarget` of a request head `sniff` read (its target text `target`)."""
    text = path_text(target)
    if found.status not in (sniff.OK, sniff.NO_HOST):
        return RequestTarget(None, None, None, text, error=HTTP_MALFORMED)
    path = () if found.connect else request_path(target)
    return RequestTarget(found.host, found.port, path, text, connect=found.connect)


def request_needs_resolution(
    policy: Policy,
    request: RequestTarget,
    *,
    dst_port: int,
    conn_host: str | None,
    resolved_names: Collection[str],
) -> str | None:
    """The name the proxy must resolve itself to decide `request`, else None
    (only a name a host rule allows, not already vouched for: `tier2.needs_resolution`)."""
    claim = tier2.claimed_host(None, request.host)
    if claim.name is None or claim.name == conn_host:
        return None
    if tier2.needs_resolution(
        policy,
        name=claim.name,
        dst_port=dst_port,
        resolved_names=resolved_names,
        target_port=request.port,
    ):
        return claim.name
    return None


def decide_request(
    policy: Policy,
    *,
    conn_host: str | None,
    dst_ip: IPv4Address,
    dst_port: int,
    method: str,
    target: str,
    host_header: str | None,
    resolved_names: Collection[str] = (),
    proxy_resolves: tier2.ProxyResolves = (),
    fleet_ranges: Sequence[IPNetwork] = (),
    upgrade: str | None = None,
) -> Decision:
    """The decision for one request; see the module docstring."""
    return decide_target(
        policy,
        request_target(method, target, host_header),
        method=method,
        conn_host=conn_host,
        dst_ip=dst_ip,
        dst_port=dst_port,
        resolved_names=resolved_names,
        proxy_resolves=proxy_resolves,
        fleet_ranges=fleet_ranges,
        upgrade=upgrade,
    )


def decide_target(
    policy: Policy,
    request: RequestTarget,
    *,
    method: str,
    conn_host: str | None,
    dst_ip: IPv4Address,
    dst_port: int,
    resolved_names: Collection[str] = (),
    proxy_resolves: tier2.ProxyResolves = (),
    fleet_ranges: Sequence[IPNetwork] = (),
    upgrade: str | None = None,
) -> Decision:
    """`decide_request` for an already parsed `request_target`."""
    if request.error is not None:
        return Decision(Verdict.DENY, request.error, None)
    by_host = decide_host(
        policy,
        request,
        conn_host=conn_host,
        dst_ip=dst_ip,
        dst_port=dst_port,
        resolved_names=resolved_names,
        proxy_resolves=proxy_resolves,
        fleet_ranges=fleet_ranges,
    )
    return decide_http(by_host, request, method=method, upgrade=upgrade)


def decide_host(
    policy: Policy,
    request: RequestTarget,
    *,
    conn_host: str | None,
    dst_ip: IPv4Address,
    dst_port: int,
    resolved_names: Collection[str] = (),
    proxy_resolves: tier2.ProxyResolves = (),
    fleet_ranges: Sequence[IPNetwork] = (),
) -> Decision:
    """Step 1: the request's authority at this destination (a function of the
    authority, not of the method or path: callers may memoise it per host)."""
    if request.error is not None:
        return Decision(Verdict.DENY, request.error, None)
    vouched: Collection[str] = resolved_names
    if conn_host is not None and conn_host not in resolved_names:
        vouched = {*resolved_names, conn_host}
    by_host = tier2.decide_named(
        policy,
        dst_ip=dst_ip,
        dst_port=dst_port,
        sni=None,
        http_host=request.host,
        resolved_names=vouched,
        proxy_resolves=proxy_resolves,
        fleet_ranges=fleet_ranges,
        protocol=tier2.PROTOCOL_HTTP,
        target_port=request.port,
    ).decision
    if by_host.reason == NO_MATCHING_RULE and request.host is not None:
        return Decision(Verdict.DENY, HOST_NOT_ALLOWED, by_host.rule)
    return by_host


def decide_http(
    by_host: Decision, request: RequestTarget, *, method: str, upgrade: str | None = None
) -> Decision:
    """Steps 2 and 3, after `decide_host` allowed the request's authority."""
    if not by_host.allowed:
        return by_host
    rule = by_host.rule
    if upgrade is not None and "h2c" in upgrade.lower():
        return Decision(Verdict.DENY, UPGRADE_NOT_ALLOWED, rule)
    if request.connect or method == CONNECT:
        if rule is not None and _allows_connect(rule):
            return Decision(Verdict.ALLOW, ALLOWED_REQUEST, rule)
        return Decision(Verdict.DENY, CONNECT_NOT_ALLOWED, rule)
    if rule is None or rule.http is None:
        return by_host
    if request.path is None:
        return Decision(Verdict.DENY, HTTP_MALFORMED, rule)
    return _by_http_rules(rule, method, request.path)


def _allows_connect(rule: EgressRule) -> bool:
    return rule.http is not None and any(CONNECT in a.methods for a in rule.http.allow)


def _by_http_rules(rule: EgressRule, method: str, path: tuple[str, ...]) -> Decision:
    assert rule.http is not None
    method_listed = False
    for entry in rule.http.allow:
        if method not in entry.methods:
            continue
        method_listed = True
        if path and any(compiled(p).matches(path) for p in entry.paths):
            return Decision(Verdict.ALLOW, ALLOWED_REQUEST, rule)
    reason = PATH_NOT_ALLOWED if method_listed else METHOD_NOT_ALLOWED
    return Decision(Verdict.DENY, reason, rule)


def inspectable(decision: Decision, protocol: str | None) -> Decision:
    """A connection allowed by a rule with ``http`` must be one whose requests
    the proxy reads (plain HTTP, or TLS that the rule has intercepted,
    `egressd.proxy.tls_intercept`): anything else there (TLS spliced, another
    protocol, silence) would bypass the request rules, so it is denied
    ``http_not_inspectable``."""
    rule = decision.rule
    if (
        decision.allowed
        and rule is not None
        and rule.http is not None
        and protocol != tier2.PROTOCOL_HTTP
        and not (protocol == tier2.PROTOCOL_TLS and rule.tls == TLS_INTERCEPT)
    ):
        return Decision(Verdict.DENY, HTTP_NOT_INSPECTABLE, rule)
    return decision
