"""The transparent TCP interceptor: tier 2 for every TCP connection from a sandbox.

nftables TPROXYs TCP arriving on ``gnv0`` to a listening socket with
``IP_TRANSPARENT`` (DESIGN.md, packet path step 6); an accepted socket's
``getsockname()`` is the original destination. For each connection, in a
named task that `Interceptor.close` cancels and awaits:

1. the flow (``ctx.flows.lookup``) says which job it is; none: deny
   ``unknown_flow``;
2. the job's verified policy (``ctx.policies.get``); `PolicyUnavailable`:
   deny with its reason (fail closed);
2b. admission (`egressd.proxy.limiting`): proxy-wide and per-job concurrent
   connections and the job's new-connection rate; a refusal is a deny with
   the limit's reason (``job_connection_limit``, ``job_rate_limit``,
   ``proxy_connection_limit``), in report mode too;
3. an always-denied destination is denied at once (`tier2.address_precheck`),
   and a destination that a cidr rule allows is allowed at once: no name can
   change either, so neither waits for the client's first bytes (this keeps
   server-speaks-first protocols on cidr rules fast);
4. otherwise the client's first bytes are read (`peek_client`) until they
   are a complete TLS ClientHello (reassembled across TCP segments and TLS
   records, up to `sniff.MAX_CLIENT_HELLO`) or HTTP/1.x request head (up to
   `sniff.MAX_HTTP_HEAD`), until they are something else, or until
   `peek_timeout_s` after the accept. Fail closed: a ClientHello or head
   still incomplete at that deadline (or at the client's FIN) is denied
   ``client_hello_incomplete`` / ``http_head_incomplete``, one past its
   bound ``client_hello_too_large`` / ``http_head_too_large``; a complete one
   is decided by its SNI / Host / request target alone, never by the names
   the job resolved for the address. Only a client that sent nothing
   readable as TLS or HTTP (another protocol, or silence: server speaks
   first) is decided by those names (`tier2.decide_named`). The audit
   ``host`` is only ever a name the client sent, or in that last case the
   name it resolved; connections decided by the address alone before any
   byte is read (step 3) have none.
5. when a claimed name that the policy allows is not among the names this
   job resolved to this address through the proxy's DNS, the proxy resolves
   the name itself (`UpstreamResolver.resolve_a`, cached) to check that they
   agree (`tier2.needs_resolution`; names the policy does not allow are never
   looked up, so SNI/Host cannot smuggle data out through DNS);
6. `tier2.decide_connection`, then `tier2.apply_mode` (report mode);
7. allowed: take a source (address, port) from the allocator (refused:
   deny ``port_budget_exhausted`` / ``port_pool_exhausted``), bind it, connect
   upstream within `connect_timeout_s`, send the bytes read so far, relay
   both ways (`egressd.proxy.relay`) paced by the job's EDT pacers and ended
   by the idle/lifetime timeouts; a failed connect resets the client
   (verdict allow, reason ``upstream_connect_failed``); denied: a TCP reset.
   A destination that is one of this proxy's own addresses is never
   connected to (deny ``fleet_address``), whatever tier 2 decided: a
   connect from the egress address to itself is a TCP self-connect that
   echoes the client's bytes back.

A bind that finds the port taken on this host (EADDRINUSE) or a connect whose
4-tuple is still in use (EADDRNOTAVAIL) quarantines that port and tries the
next one, a few times; it never reaches the client as an unhandled error.

8. a connection whose first bytes were an HTTP/1.x request head is relayed
   through an `http_gate.HttpGate`: every request on it (the first one too,
   keep-alive and pipelining included) is decided by
   `http_rules.decide_request` before its bytes go upstream, and a denied one
   gets a ``403`` and the end of the connection. A rule with ``http`` allows
   only connections whose requests the proxy reads (plain HTTP, or TLS the
   rule intercepts): anything else there is denied ``http_not_inspectable``.
   A TLS connection allowed by a rule with ``"tls": "intercept"`` is ended
   on both sides (`egressd.proxy.tls_intercept`: upstream verified first,
   ``upstream_tls_unverified`` else; a leaf for the SNI to the client) and
   its decrypted requests go through the same gate, each Host equal to the
   SNI (``host_sni_mismatch``). Connections
   allowed by a cidr rule before any byte is read are not gated: such a
   rule allows every name at that address.
   The gate sets the job's ``http.credentials`` from the proxy's secrets
   (``ctx.secrets``) and refuses credentials sent elsewhere
   (`egressd.proxy.credentials`).

The steps return frozen `Outcome` values (`egressd.proxy.outcome`: verdict,
reason, host, rule, would_deny; `compose` is the pure part); `_handle` writes
the counters and the audit event once, from the final one. `_Conn` holds only
what the connection is and holds (addresses, flow, policy, slot, lease, the
relay's counters).

One ``connection`` audit event per connection, when it is over (with
``end``: ``idle_timeout`` or ``max_lifetime`` when a timeout ended it;
``policy_revoked``, ``policy_changed`` or ``policy_expired`` when its job's
policy no longer allows it, `egressd.proxy.live`), and
on gated connections one ``http_request`` event per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from egressd.limits.ports import Destination, Lease
from egressd.policy.matcher import Decision, Verdict, match_address
from egressd.policy.model import TLS_INTERCEPT, Policy
from egressd.proxy import (
    audit,
    http_rules,
    job_metrics,
    live,
    sniff,
    tcp_socket,
    tier2,
    tls_intercept,
)
from egressd.proxy.connector import Connector
from egressd.proxy.context import FlowInfo, PolicyUnavailable, ProxyContext
from egressd.proxy.credentials import RequestCredentials
from egressd.proxy.dns import DNS_PORT, UpstreamResolver
from egressd.proxy.h2_proxy import H2Proxy
from egressd.proxy.http_gate import HttpGate, RequestRecord, SharedHeads
from egressd.proxy.limiting import JobPacing, LimitsConfig, ProxyLimits
from egressd.proxy.outcome import (
    CONNECTION_LABELS,
    LIMIT_REASONS,
    ConnectionReason,
    LabelledCounter,
    NotConnected,
    Outcome,
    connection_reason,
)
from egressd.proxy.relay import DOWN, RELAY_BUFFER, UP, Endpoint, RelayStats, relay, reset
from egressd.proxy.resolved import ResolvedNames
from egressd.proxy.transport import Reactor

IPv4Address = ipaddress.IPv4Address

log = structlog.get_logger(__name__)

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
#: Source ports tried per connection when the kernel finds one taken.
PORT_ATTEMPTS = 4
_PORT_TAKEN = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
# A sandbox that vanishes (its namespace deleted) never answers again: without
# these, its relayed connections would hold proxy memory until TCP's own
# retransmission limit (~15 min). Keepalive finds a silent dead peer in
# 60 + 3*10 s; TCP_USER_TIMEOUT bounds unacknowledged data to 30 s.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
USER_TIMEOUT_MS = 30_000


def bound_dead_peers(sock: socket.socket) -> None:
    """Make a relayed socket give up on a peer that stopped answering."""
    # try/except rather than `contextlib.suppress`: one upstream socket a connection.
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except OSError:
        pass


_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


_ADDRESSES: dict[str, IPv4Address] = {}
_ADDRESSES_LIMIT = 4096
_DESTINATIONS: dict[tuple[IPv4Address, int], Destination] = {}


def _ipv4(text: str) -> IPv4Address:
    """A dotted quad from the kernel (accept, getsockname) as an address: from
    its 32-bit value, a tenth of what parsing the text costs; the same few
    addresses (a sandbox's, its destinations) come again and again, and an
    address is immutable, so one object per text is kept (bounded: emptied
    when full)."""
    address = _ADDRESSES.get(text)
    if address is None:
        address = IPv4Address(int.from_bytes(socket.inet_aton(text), "big"))
        if len(_ADDRESSES) >= _ADDRESSES_LIMIT:
            _ADDRESSES.clear()
        _ADDRESSES[text] = address
    return address


def _destination(ip: IPv4Address, port: int) -> Destination:
    """`Destination(ip, port)`, one object per pair (bounded: emptied when full):
    an immutable value whose hash it computes when made, keyed several times
    per connection by the limits."""
    key = (ip, port)
    destination = _DESTINATIONS.get(key)
    if destination is None:
        destination = Destination(ip, port)
        if len(_DESTINATIONS) >= _ADDRESSES_LIMIT:
            _DESTINATIONS.clear()
        _DESTINATIONS[key] = destination
    return destination


UNKNOWN_FLOW = ConnectionReason.UNKNOWN_FLOW
UPSTREAM_CONNECT_FAILED = ConnectionReason.UPSTREAM_CONNECT_FAILED
PROXY_SHUTDOWN = ConnectionReason.PROXY_SHUTDOWN

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_BACKLOG = 4096
_ACCEPT_ERROR_PAUSE_S = 0.1
#: Connections taken from the listen queue per wake-up of the accept loop.
_ACCEPT_BATCH = 64


@dataclass(slots=True)
class _Metrics:
    connections: LabelledCounter  # every (verdict, reason) of `CONNECTION_LABELS`
    bytes: Counter
    active: Gauge
    ended: Counter
    paced: Counter

    @classmethod
    def on(cls, ctx: ProxyContext) -> _Metrics:
        connections = Counter(
            "egressd_connections_total",
            "TCP connections decided by tier 2, by enforced verdict and reason",
            ["verdict", "reason"],
            registry=ctx.registry,
        )
        return cls(
            connections=LabelledCounter(connections, CONNECTION_LABELS),
            bytes=Counter(
                "egressd_bytes_total",
                "Bytes relayed, by direction (up: sandbox to internet)",
                ["direction"],
                registry=ctx.registry,
            ),
            active=Gauge(
                "egressd_connections_active",
                "TCP connections being decided or relayed",
                registry=ctx.registry,
            ),
            ended=Counter(
                "egressd_connections_expired_total",
                "Relayed connections ended by the proxy (a timeout or the policy), by reason",
                ["end"],
                registry=ctx.registry,
            ),
            paced=Counter(
                "egressd_paced_chunks_total",
                "Relayed chunks that waited for their EDT departure time",
                registry=ctx.registry,
            ),
        )


#: How long a client has, from the accept, to send its whole ClientHello or
#: request head; a silent client is decided by its resolved names after it.
#: Real clients send either in their first flight, one RTT (well under 1 ms
#: inside the fleet) after the handshake; 1 s is 1000x that and survives a
#: descheduled sandbox. Longer would only delay server-speaks-first
#: protocols on host rules, which wait out the whole deadline. A deadline
#: too short for some client now denies (``client_hello_incomplete``,
#: counted), so it is visible rather than a silent fallback.
DEFAULT_PEEK_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Peeked:
    """The client's first bytes and what they said.

    `protocol` is ``tls``/``http`` when they were a ClientHello / request
    head (then only what they carry decides), None when they were neither
    (or nothing came): then the job's resolved names may decide.
    """

    data: bytes
    protocol: str | None = None
    sni: str | None = None
    http_host: str | None = None
    target_port: int | None = None  # a CONNECT or absolute-form target's port
    ech: bool = False
    sniff_error: str | None = None  # one of tier2.SNIFF_ERRORS
    eof: bool = False
    alpn: tuple[str, ...] = ()  # the ClientHello's ALPN offer


@dataclass(slots=True)
class _Conn:
    """One connection's addresses, what it holds (slot, source port, the relay's
    counters) and, once known, its job's flow and policy.

    Its outcome is not here: the decision steps return `Outcome` values and
    `_handle` writes the audit event and counters from the final one.
    """

    src: IPv4Address
    sport: int
    dst: IPv4Address
    dport: int
    started: float = field(default_factory=time.monotonic)
    flow: FlowInfo | None = None
    policy: Policy | None = None
    relay: RelayStats = field(default_factory=RelayStats)
    relaying: bool = False  # the client socket belongs to the relay now
    admitted: bool = False  # holds a connection slot (`ProxyLimits.admit`)
    lease: Lease | None = None  # the upstream socket's source port
    # What tier 2 decided from, for `live.redecide` on a policy change.
    learned: frozenset[str] = frozenset()
    proxy_ips: frozenset[IPv4Address] = frozenset()
    # Its http_request events' fixed fields, formatted at its first request.
    requests_audit: audit.HttpRequests | None = None
    # Its request gate's hand-over to a replaced policy that still allows the
    # connection (`live.redecide`): the next request is decided under it.
    repolicy: Callable[[Policy], None] | None = None
    # The addresses as the kernel wrote them (`str` of `src`, `dst`), for the
    # audit lines: not formatted again from the addresses.
    src_text: str | None = None
    dst_text: str | None = None


async def peek_client(
    sock: socket.socket,
    *,
    timeout_s: float,
    tls_limit: int = sniff.MAX_CLIENT_HELLO,
    http_limit: int = sniff.MAX_HTTP_HEAD,
    known: PeekedHeads | None = None,
) -> Peeked:
    """Read the client's first bytes until they are a complete ClientHello or
    HTTP request head (or cannot become one: over its bound, malformed, not
    that protocol), the client sends FIN, or `timeout_s` passes.

    Never reads past the bound of what it is reading; what it read is
    forwarded upstream as is when the connection is allowed.

    `known`: request heads that were read whole by one first read before (with
    these bounds), and what they said (`PeekedHeads`).
    """
    buf = bytearray()
    eof = False
    kind = sniff.KIND_INCOMPLETE
    tls = sniff.ClientHelloReader(tls_limit)
    http = sniff.HttpHeadReader(http_limit)
    result: sniff.SniResult | sniff.HostResult | None = None

    def room() -> int:
        """How much more may be read (0: the reader has said too_large already)."""
        if kind == sniff.KIND_TLS:
            limit = tls_limit
        elif kind == sniff.KIND_HTTP:
            limit = http_limit
        else:
            limit = max(tls_limit, http_limit)
        return max(limit - len(buf), 0)

    def take(chunk: bytes) -> bool:
        """Add `chunk` (b"": the client's FIN); True when reading is over."""
        nonlocal eof, kind, result
        if not chunk:
            eof = True
            return True
        buf.extend(chunk)
        if kind == sniff.KIND_INCOMPLETE:
            kind = sniff.classify_first_bytes(buf)
        if kind == sniff.KIND_TLS:
            result = tls.update(buf)
        elif kind == sniff.KIND_HTTP:
            result = http.update(buf)
        elif kind == sniff.KIND_UNKNOWN:
            return True
        return result is not None and result.final

    # Usually the whole head is there already: read it without a timeout scope
    # (one costs ~5-10 µs) and without adding a reader to the loop and removing it.
    try:
        first = sock.recv(room())
    except (BlockingIOError, InterruptedError):
        pass
    else:
        if known is not None:
            peeked = known.get(first)
            if peeked is not None:
                return peeked
        if take(first):
            peeked = _peeked(first, kind, result, eof)
            if known is not None:
                known.keep(peeked)
            return peeked
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            while size := room():
                try:
                    chunk = sock.recv(size)
                except (BlockingIOError, InterruptedError):
                    chunk = await loop.sock_recv(sock, size)
                if take(chunk):
                    break
    except TimeoutError:
        pass
    return _peeked(bytes(buf), kind, result, eof)


class PeekedHeads:
    """Plain-HTTP request heads that one first read of a connection brought
    whole, with what `peek_client` made of them, by their bytes: what it makes
    of a first read that ends the reading is a pure function of those bytes
    (and the bounds, one pair per interceptor), and clients send the same head
    on connection after connection. TLS is not kept (every ClientHello has its
    own random). Bounded: emptied when full."""

    __slots__ = ("_entries",)

    LIMIT = 256

    def __init__(self) -> None:
        self._entries: dict[bytes, Peeked] = {}

    def get(self, data: bytes) -> Peeked | None:
        return self._entries.get(data) if self._entries else None

    def keep(self, peeked: Peeked) -> None:
        if peeked.protocol != tier2.PROTOCOL_HTTP or peeked.sniff_error is not None or peeked.eof:
            return
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        self._entries[peeked.data] = peeked


def _peeked(
    data: bytes, kind: str, result: sniff.SniResult | sniff.HostResult | None, eof: bool
) -> Peeked:
    """What `peek_client` read, as tier 2 takes it (pure)."""
    if kind == sniff.KIND_INCOMPLETE:
        kind = sniff.pending_kind(data)  # stopped after a byte or two
    if kind == sniff.KIND_TLS:
        status = result.status if result is not None else sniff.INCOMPLETE
        if isinstance(result, sniff.SniResult) and status in (sniff.OK, sniff.NO_SNI):
            return Peeked(
                data, tier2.PROTOCOL_TLS, sni=result.host, ech=result.ech, eof=eof, alpn=result.alpn
            )
        if status != sniff.NOT_TLS:
            error = _TLS_ERRORS.get(status, tier2.TLS_MALFORMED)
            return Peeked(data, tier2.PROTOCOL_TLS, sniff_error=error, eof=eof)
    elif kind == sniff.KIND_HTTP:
        status = result.status if result is not None else sniff.INCOMPLETE
        if isinstance(result, sniff.HostResult) and status in (sniff.OK, sniff.NO_HOST):
            return Peeked(
                data,
                tier2.PROTOCOL_HTTP,
                http_host=result.host,
                target_port=result.port,
                eof=eof,
            )
        if status != sniff.NOT_HTTP:
            error = _HTTP_ERRORS.get(status, tier2.HTTP_MALFORMED)
            return Peeked(data, tier2.PROTOCOL_HTTP, sniff_error=error, eof=eof)
    return Peeked(data, eof=eof)


_TLS_ERRORS = {
    sniff.INCOMPLETE: tier2.CLIENT_HELLO_INCOMPLETE,
    sniff.TOO_LARGE: tier2.CLIENT_HELLO_TOO_LARGE,
    sniff.MALFORMED: tier2.TLS_MALFORMED,
}
_HTTP_ERRORS = {
    sniff.INCOMPLETE: tier2.HTTP_HEAD_INCOMPLETE,
    sniff.TOO_LARGE: tier2.HTTP_HEAD_TOO_LARGE,
    sniff.MALFORMED: tier2.HTTP_MALFORMED,
}


def compose(
    policy: Policy, named: tier2.NamedDecision, peeked: Peeked, *, interception: bool
) -> Outcome:
    """Tier 2's decision as the connection's outcome before the connect (pure).

    A rule with request rules must see the requests (`http_rules.inspectable`);
    report mode turns a deny into an allow flagged ``would_deny``
    (`tier2.apply_mode`); a connection that a ``"tls": "intercept"`` rule
    allows is denied when it cannot be intercepted here (`interception`: this
    proxy has an interception CA; `_interception_refusal`).
    """
    decision = http_rules.inspectable(named.decision, peeked.protocol)
    enforced = tier2.apply_mode(policy, decision)
    outcome = Outcome.decided(
        decision,
        enforced=enforced.enforced_verdict,
        would_deny=enforced.would_deny,
        host=named.host,
    )
    if _intercepts(outcome, peeked):
        refusal = _interception_refusal(outcome, peeked, interception=interception)
        if refusal is not None:
            return outcome.denied(refusal)
    return outcome


def _intercepts(outcome: Outcome, peeked: Peeked) -> bool:
    """Whether an allowed connection is to be intercepted: a ClientHello, and
    the rule that allowed it (not report mode's allow) says ``"tls": "intercept"``."""
    rule = outcome.rule
    return (
        outcome.allowed
        and not outcome.would_deny
        and peeked.protocol == tier2.PROTOCOL_TLS
        and peeked.sniff_error is None
        and rule is not None
        and rule.tls == TLS_INTERCEPT
    )


def _interception_refusal(
    outcome: Outcome, peeked: Peeked, *, interception: bool
) -> ConnectionReason | None:
    """Why an intercepting rule's connection cannot be intercepted here, if it cannot."""
    if not interception:
        return ConnectionReason.TLS_INTERCEPTION_UNAVAILABLE
    if outcome.host is None:
        return ConnectionReason.NO_SNI
    if peeked.ech:
        # The visible SNI is a front; the client's real name is encrypted:
        # a leaf for the front would be refused, and requests not read.
        return ConnectionReason.HTTP_NOT_INSPECTABLE
    return None


def _policy_reason(reason: str) -> ConnectionReason:
    """`PolicyUnavailable`'s reason as a connection reason (still a deny if it is none)."""
    member = connection_reason(reason)
    if member is None:
        log.error("unknown_policy_reason", reason=reason)
        return ConnectionReason.ERROR
    return member


#: Frozen values every connection starts from (made once, not per connection).
_ERROR = Outcome.deny(ConnectionReason.ERROR)
_NOTHING_PEEKED = Peeked(b"")
_TO_OWN_ADDRESS = NotConnected(ConnectionReason.FLEET_ADDRESS)
_CONNECT_FAILED = NotConnected(ConnectionReason.UPSTREAM_CONNECT_FAILED)


_MISS = object()


#: The first item of the memo keys of `_gate`'s host decisions (apart from `_decide`'s).
_GATE_HOST = "gate_host"


class _GateMemo:
    """One request gate's outcomes, by what a request asked (its target, method
    and upgrade) and the names the job had resolved to the address when it was
    decided. A gate decides under one policy object and one set of fleet
    ranges, so an outcome is a pure function of that key: a repeated request
    skips the decision cache's key, `decide_http` and `apply_mode`. Every
    request still asks `ResolvedNames` first (an expired name changes the key);
    one that needed the proxy's own resolution is not kept (its answer is part
    of the decision). Bounded: emptied when full."""

    __slots__ = ("_entries",)

    LIMIT = 64

    def __init__(self) -> None:
        self._entries: dict[object, tuple[set[str], tier2.Tier2Outcome]] = {}

    def get(self, asked: object, learned: set[str]) -> tier2.Tier2Outcome | None:
        hit = self._entries.get(asked)
        if hit is None or hit[0] != learned:
            return None
        return hit[1]

    def clear(self) -> None:
        self._entries.clear()

    def put(
        self, asked: object, learned: set[str], outcome: tier2.Tier2Outcome
    ) -> tier2.Tier2Outcome:
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        self._entries[asked] = (learned, outcome)
        return outcome


@dataclass(frozen=True, slots=True)
class _Resolve:
    """A memoised "tier 2 needs the proxy's own resolution of `name` here"."""

    name: str


def _resolution_needed(policy: Policy, dport: int, peeked: Peeked, learned: set[str]) -> str | None:
    """The claimed name the proxy must resolve itself before tier 2 decides,
    else None (`tier2.needs_resolution`; pure)."""
    claim = tier2.claimed_host(peeked.sni, peeked.http_host)
    if (
        claim.name is not None
        and peeked.sniff_error is None
        and tier2.needs_resolution(
            policy,
            name=claim.name,
            dst_port=dport,
            resolved_names=learned,
            target_port=peeked.target_port,
            ech=peeked.ech,
        )
    ):
        return claim.name
    return None


def _no_secret(_name: str) -> None:
    return None  # a proxy without `secrets_dir`: every credential is unavailable


class _DecisionCache:
    """Tier-2 results memoised per policy object and fleet ranges.

    Tier 2 is pure: for one policy, one set of fleet ranges and the same
    inputs (destination, port, everything tier 2 takes from what the client
    sent: protocol, SNI, Host, target port, ECH, sniff error; the names the
    job resolved to the address; and the proxy's own resolution's answer, if
    it needed one) it decides the same. An entry holds its policy and fleet
    ranges and is used only while they are the very objects in use (``is``):
    a refreshed or revoked policy is a new object, so its connections never
    see the old one's results.
    Bounded: emptied when full.
    """

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._entries: dict[tuple[int, int, object], tuple[Policy, object, object]] = {}
        self._limit = limit

    def get(self, policy: Policy, fleet_ranges: object, key: object) -> object:
        hit = self._entries.get((id(policy), id(fleet_ranges), key))
        if hit is None or hit[0] is not policy or hit[1] is not fleet_ranges:
            return _MISS
        return hit[2]

    def put(self, policy: Policy, fleet_ranges: object, key: object, value: object) -> None:
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[(id(policy), id(fleet_ranges), key)] = (policy, fleet_ranges, value)


class _Composed:
    """`compose`'s outcomes for tier 2's memoised decisions (`_DecisionCache` hands
    out the same `NamedDecision` object for the same key): `compose` is a pure
    function of the policy, that decision, the peek's protocol and sniff error
    (all it reads of `Peeked`) and whether there is an interception CA, and its
    `Outcome` is immutable, so one is kept per (policy, decision) object pair and
    those two fields. Entries hold their policy and decision, so the ids in a
    key name live objects; they are checked by identity. Bounded: emptied when
    full."""

    __slots__ = ("_entries",)

    LIMIT = 4096

    def __init__(self) -> None:
        self._entries: dict[
            tuple[int, int, str | None, str | None, bool],
            tuple[Policy, tier2.NamedDecision, Outcome],
        ] = {}

    def compose(
        self,
        policy: Policy,
        named: tier2.NamedDecision,
        peeked: Peeked,
        interception: object | None,
    ) -> Outcome:
        can_intercept = interception is not None
        key = (id(policy), id(named), peeked.protocol, peeked.sniff_error, can_intercept)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is policy and entry[1] is named:
            return entry[2]
        outcome = compose(policy, named, peeked, interception=can_intercept)
        if len(self._entries) >= self.LIMIT:
            self._entries.clear()
        self._entries[key] = (policy, named, outcome)
        return outcome


class Interceptor:
    """The transparent listener and its connection tasks."""

    def __init__(
        self,
        ctx: ProxyContext,
        resolved: ResolvedNames,
        *,
        listen: tuple[str, int],
        resolver: UpstreamResolver,
        peek_timeout_s: float = DEFAULT_PEEK_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        backlog: int = DEFAULT_BACKLOG,
        limits: ProxyLimits | None = None,
        interception: tls_intercept.Interception | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.ctx = ctx
        self._given = sock  # a proxy worker's: bound and listening, made by its supervisor
        self.interception = interception
        self.limits = limits or ProxyLimits(
            LimitsConfig.default(ctx.identity.egress), registry=ctx.registry
        )
        self.resolved = resolved
        self.listen = listen
        self.resolver = resolver
        self.peek_timeout_s = peek_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backlog = backlog
        self._metrics = _Metrics.on(ctx)
        self._sock: socket.socket | None = None
        self._resume: asyncio.TimerHandle | None = None  # accepting again after an error
        self._connector: Connector | None = None
        self._reactor: Reactor | None = None  # the relays' sockets (`_relaying`)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # The loop, once started: asked once, not per connection (on Python
        # 3.11 `asyncio.get_running_loop` makes a ``getpid`` system call).
        self._loop: asyncio.AbstractEventLoop | None = None
        # Connections being decided or relayed, read when scraped
        # (``egressd_connections_active``): not a locked gauge update twice
        # per connection.
        self._active = 0
        self._metrics.active.set_function(lambda: self._active)
        # One read buffer for every relay of this interceptor (see relay.relay).
        self._scratch = bytearray(RELAY_BUFFER)
        # Metric children and the egress bind address, looked up once on first
        # use (as `labels()` would create them) rather than once per connection.
        self._count_up: Any = None
        self._count_down: Any = None
        self._decisions = _DecisionCache()
        self._composed = _Composed()
        # Request and response heads read whole, for every gate (`SharedHeads`),
        # and the first reads that were a whole request head (`PeekedHeads`).
        self._heads = SharedHeads()
        self._peeks = PeekedHeads()
        self._job_denials = job_metrics.on(ctx)
        # Open relayed connections, re-decided when their job's policy changes.
        self.live = live.LiveConnections(
            lookup=getattr(ctx.policies, "cached", lambda _job: None),
            fleet_ranges=lambda: self.ctx.fleet_ranges,
        )
        listeners = getattr(ctx.policies, "listeners", None)
        if listeners is not None:
            listeners.append(self.live.policy_changed)
        # This proxy's own addresses: never connected to, whatever tier 2 said
        # (defence in depth under `fleet_address`, e.g. with an empty registry).
        self._own: frozenset[IPv4Address] = frozenset(
            {ctx.identity.underlay, ctx.identity.egress, *self.limits.config.port_pool.addresses}
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        address: tuple[str, int] = self._sock.getsockname()
        return address

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        sock = self._given or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self._given is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            # Accepted sockets inherit these from the listener (Linux copies the
            # listener's socket): no per-connection setsockopt calls for them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bound_dead_peers(sock)
            sock.setblocking(False)
            if self._given is None:
                sock.bind(self.listen)
            sock.listen(self.backlog)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.limits.start()
        self._loop = asyncio.get_running_loop()
        # A reader that stays registered, not `sock_accept`: uvloop starts and
        # stops a poll handle around every `sock_accept` (three epoll_ctl calls a
        # connection) and wakes a task for each.
        self._loop.add_reader(sock.fileno(), self._on_listener_readable)

    async def close(self) -> None:
        """Stop accepting, cancel every connection (their clients are reset), wait for them."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.live.close()
        if self._connector is not None:
            self._connector.close()
        if self._reactor is not None:
            self._reactor.close()
        await self.limits.close()

    def _on_listener_readable(self) -> None:
        """Take what the listen queue holds, at most a batch a wake-up so that
        other work keeps running (the reader is level-triggered: the rest wakes
        it again)."""
        lsock = self._sock
        assert lsock is not None and self._loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = tcp_socket.accept(lsock)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: back off, keep serving
                log.error("intercept_accept_failed", error=str(exc))
                self._loop.remove_reader(lsock.fileno())
                self._resume = self._loop.call_later(_ACCEPT_ERROR_PAUSE_S, self._resume_accepting)
                return
            self._accepted(conn, addr)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._closed and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_listener_readable)

    def _accepted(self, conn: socket.socket, addr: Any) -> None:
        try:
            dst, dport = conn.getsockname()[:2]
        except OSError:
            reset(conn)
            return
        conn.setblocking(False)  # TCP_NODELAY and `bound_dead_peers`: from the listener
        self._spawn(
            self._handle(conn, addr[0], addr[1], dst, dport),
            f"egressd-conn-{addr[0]}:{addr[1]}->{dst}:{dport}",
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = (self._loop or asyncio.get_running_loop()).create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a network condition: the client was reset and the
            # connection logged (`_handle`'s finally); say where it broke.
            log.error("connection_task_failed", task=task.get_name(), exc_info=task.exception())

    # one connection

    async def _handle(
        self, sock: socket.socket, src: str, sport: int, dst: str, dport: int
    ) -> None:
        """One connection (its addresses as the kernel wrote them): the decision
        steps' outcome, carried out; then the audit event and counters, written
        once from the final outcome."""
        conn = _Conn(_ipv4(src), sport, _ipv4(dst), dport, src_text=src, dst_text=dst)
        self._active += 1
        decided: Outcome | None = None  # tier 2's, once made (an error later keeps its host)
        outcome = _ERROR
        try:
            decided, peeked = await self._decide_steps(sock, conn)
            outcome = decided
            if decided.allowed:
                outcome = await self._carry_out(sock, conn, decided, peeked)
        except BaseException as exc:
            if conn.relaying and decided is not None:
                outcome = decided  # the peers' connection stands; the relay closed it
            else:
                reason = (
                    PROXY_SHUTDOWN
                    if isinstance(exc, asyncio.CancelledError)
                    else ConnectionReason.ERROR
                )
                outcome = Outcome.deny(reason) if decided is None else decided.denied(reason)
            raise
        finally:
            if not conn.relaying:
                reset(sock)  # a deny, a failure or an error: the client sees a reset
            self._active -= 1
            self._give_back(conn)
            self._finish(conn, outcome)

    def _give_back(self, conn: _Conn) -> None:
        """Return the connection's slot and source port (its sockets are closed by now)."""
        if conn.lease is not None:
            self.limits.release_port(conn.lease, time.monotonic(), time_wait=conn.relay.time_wait)
            conn.lease = None
        if conn.admitted and conn.flow is not None:
            self.limits.release(conn.flow.job_id)
            conn.admitted = False

    async def _decide_steps(self, sock: socket.socket, conn: _Conn) -> tuple[Outcome, Peeked]:
        """The flow, the job's policy, admission, the address, what the client
        sent, tier 2: the outcome before any upstream connect (a deny is final)."""
        ctx = self.ctx
        peeked = _NOTHING_PEEKED
        flow = ctx.flows.lookup(conn.src, conn.sport, conn.dst, conn.dport, 6)
        if flow is None:
            return Outcome.deny(UNKNOWN_FLOW), peeked
        conn.flow = flow
        try:
            verified = await ctx.policies.get(flow.job_id)
        except PolicyUnavailable as exc:
            return Outcome.deny(_policy_reason(exc.reason)), peeked
        policy = conn.policy = verified.policy

        now = time.monotonic()
        refusal = self.limits.admit(flow.job_id, policy.limits, now)
        if refusal is not None:
            return Outcome.deny(ConnectionReason(refusal)), peeked
        conn.admitted = True
        learned = self.resolved.names_for(flow.job_id, conn.dst, now)
        conn.learned = frozenset(learned)
        by_address = self._by_address(policy, conn.dst, conn.dport)
        if by_address is None:
            peeked = await peek_client(sock, timeout_s=self.peek_timeout_s, known=self._peeks)
            named = await self._decide(policy, conn, peeked, learned)
            return self._composed.compose(policy, named, peeked, self.interception), peeked
        named = tier2.NamedDecision(by_address, None)  # no byte read: no name
        return compose(policy, named, peeked, interception=self.interception is not None), peeked

    async def _carry_out(
        self, sock: socket.socket, conn: _Conn, outcome: Outcome, peeked: Peeked
    ) -> Outcome:
        """An allowed connection: connect upstream, then relay (gated, or
        intercepted); the outcome changes only when that cannot be done."""
        policy = conn.policy
        assert policy is not None
        upstream = await self._connect(conn, policy)
        if isinstance(upstream, NotConnected):
            return upstream.applied_to(outcome)
        if _intercepts(outcome, peeked):
            return await self._intercepted(sock, upstream, conn, policy, peeked, outcome)
        conn.relaying = True
        if self._count_up is None:
            self._count_up = self._metrics.bytes.labels(direction=UP).inc
            self._count_down = self._metrics.bytes.labels(direction=DOWN).inc
        gate = None
        if peeked.protocol == tier2.PROTOCOL_HTTP and peeked.sniff_error is None:
            gate = self._gate(conn, policy, outcome.host)
        try:
            await self._relay(sock, upstream, conn, policy, peeked, gate)
        finally:
            if gate is not None:
                for record in gate.pending_records():
                    self._request_done(conn, record)
        return outcome

    async def _intercepted(
        self,
        sock: socket.socket,
        upstream: socket.socket,
        conn: _Conn,
        policy: Policy,
        peeked: Peeked,
        outcome: Outcome,
    ) -> Outcome:
        """TLS ended on both sides (`egressd.proxy.tls_intercept`), requests gated;
        `outcome` changed when a handshake fails (the client is reset by `_handle`)."""
        interception = self.interception
        host = outcome.host
        assert interception is not None and host is not None
        try:
            offer = tls_intercept.alpn_offer(peeked.alpn, tls_intercept.supported_alpn(policy))
            assert conn.flow is not None
            resume = (conn.flow.job_id, host, conn.dst, conn.dport, offer)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    server = await tls_intercept.TlsEnd.connect(
                        upstream,
                        interception.upstream_context(offer),
                        host,
                        interception.session(resume),
                    )
            except ssl.SSLCertVerificationError as exc:
                log.info(
                    "upstream_tls_unverified",
                    host=host,
                    dst=str(conn.dst),
                    port=conn.dport,
                    error=exc.verify_message or str(exc),
                )
                reset(upstream)
                return outcome.denied(ConnectionReason.UPSTREAM_TLS_UNVERIFIED)
            except (ssl.SSLError, OSError) as exc:  # TimeoutError included
                log.info("upstream_tls_failed", host=host, dst=str(conn.dst), error=repr(exc))
                reset(upstream)
                return outcome.failed(ConnectionReason.UPSTREAM_TLS_FAILED)
            ctx = interception.leaves.context(host, tls_intercept.client_alpn(server.selected_alpn))
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    client = await tls_intercept.TlsEnd.accept(sock, ctx, peeked.data)
            except (ssl.SSLError, OSError) as exc:
                log.info("client_tls_failed", host=host, src=str(conn.src), error=repr(exc))
                reset(upstream)
                return outcome.failed(ConnectionReason.CLIENT_TLS_FAILED)
        except BaseException:
            reset(upstream)  # the client is reset by `_handle`
            raise
        conn.relaying = True
        if self._count_up is None:
            self._count_up = self._metrics.bytes.labels(direction=UP).inc
            self._count_down = self._metrics.bytes.labels(direction=DOWN).inc
        gate = self._gate(conn, policy, host, sni=host)
        decrypted = dataclasses.replace(peeked, data=b"")  # the ClientHello is not forwarded
        if server.selected_alpn == tls_intercept.H2:
            # The same decisions (the gate's own `decide`), on each HTTP/2 stream.
            h2 = H2Proxy(gate._decide, lambda record: self._request_done(conn, record))

            async def run_h2(plain_client: socket.socket, plain_server: socket.socket) -> None:
                toward, back = socket.socketpair()
                toward.setblocking(False)
                back.setblocking(False)
                task = asyncio.get_running_loop().create_task(h2.run(back, plain_server))
                try:
                    await self._relay(plain_client, toward, conn, policy, decrypted, None)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    back.close()
                    plain_server.close()

            await tls_intercept.bridge(client, server, run_h2)
            interception.keep_session(resume, server)
            return outcome

        # HTTP/1.1: the relay reads and writes the TLS connections themselves
        # (`tls_intercept.TlsLink`), in callbacks, as it does TCP sockets.
        try:
            await self._relay(
                tls_intercept.TlsLink(client, self._scratch),
                tls_intercept.TlsLink(server, self._scratch),
                conn,
                policy,
                decrypted,
                gate,
            )
        finally:
            interception.keep_session(resume, server)
            for record in gate.pending_records():
                self._request_done(conn, record)
        return outcome

    async def _relay(
        self,
        sock: socket.socket | Endpoint,
        upstream: socket.socket | Endpoint,
        conn: _Conn,
        policy: Policy,
        peeked: Peeked,
        gate: HttpGate | None,
    ) -> None:
        assert conn.flow is not None
        flow = conn.flow
        pacing = self.limits.pacing(flow.job_id, policy.limits)
        recorded = live.Recorded(
            conn.dst,
            conn.dport,
            flow.node,
            peeked.protocol,
            peeked.sni,
            peeked.http_host,
            peeked.target_port,
            peeked.ech,
            peeked.sniff_error,
            conn.learned,
            conn.proxy_ips,
        )
        # The task given, not looked up by `track` (`asyncio.current_task()`
        # without a loop asks `get_running_loop`: a ``getpid`` on Python 3.11).
        task = asyncio.current_task(self._loop or asyncio.get_running_loop())
        tracking = self.live.track(
            flow.job_id, recorded, conn.relay, policy, self._retune(conn, pacing), task=task
        )
        with tracking:
            await relay(
                sock,
                upstream,
                first_up=peeked.data,
                count_up=self._count_up,
                count_down=self._count_down,
                stats=conn.relay,
                scratch=self._scratch,
                pacing=pacing,
                timeouts=self.limits.timeouts,
                gate=gate,
                loop=self._loop,
                reactor=self._relaying(),
            )

    def _retune(self, conn: _Conn, pacing: JobPacing) -> Callable[[Policy], None]:
        """What a replaced policy that still allows the open connection changes
        (`live.redecide`): its job's pacing and its request gate's policy."""
        limits = self.limits

        def retune(new: Policy) -> None:
            limits.retune(pacing, new.limits)
            if conn.repolicy is not None:
                conn.repolicy(new)

        return retune

    def _gate(
        self, conn: _Conn, policy: Policy, conn_host: str | None, *, sni: str | None = None
    ) -> HttpGate:
        """The request gate of a plain-HTTP (or intercepted, `sni`) connection (`http_rules`),
        whose tier-2 outcome named `conn_host`.

        On an intercepted connection a request's Host must be the SNI itself
        (``host_sni_mismatch``): the leaf and the upstream TLS were made for
        that name only.

        The authority's decision is memoised in the interceptor's `_DecisionCache`
        (per policy object) by (the connection's name and destination, the
        request's host, port and error, the names the job resolved to the
        address), as tier 2's is: a name is decided once for all the job's
        connections and requests to it, and each request's method and path
        every time. One that needs the proxy's own resolution asks the
        (caching) resolver every time and is memoised by its answer too.
        """
        assert conn.flow is not None
        job_id = conn.flow.job_id
        fleet_ranges = self.ctx.fleet_ranges
        decisions = self._decisions
        # The job's policy now: a replaced one that still allows the connection
        # decides its next request (`repolicy`), so an open keep-alive
        # connection cannot keep methods or paths the new policy took away.
        current = [policy]

        def host_decision(
            policy: Policy,
            request: http_rules.RequestTarget,
            learned: set[str],
            proxy_ips: frozenset[IPv4Address],
        ) -> Decision:
            return http_rules.decide_host(
                policy,
                request,
                conn_host=conn_host,
                dst_ip=conn.dst,
                dst_port=conn.dport,
                resolved_names=learned,
                proxy_resolves=proxy_ips,
                fleet_ranges=fleet_ranges,
            )

        def outcome(
            policy: Policy,
            request: http_rules.RequestTarget,
            method: str,
            upgrade: str | None,
            host: Decision,
        ) -> tier2.Tier2Outcome:
            decision = http_rules.decide_http(host, request, method=method, upgrade=upgrade)
            return tier2.apply_mode(policy, decision)

        names_sni: dict[str | None, bool] = {}  # a request's Host -> it is the SNI
        # This connection's outcomes by what a request asked and the names the
        # job had resolved to the address then (`_GateMemo`).
        memo = _GateMemo()

        def decide(method: str, request: http_rules.RequestTarget, upgrade: str | None) -> Any:
            policy = current[0]
            if sni is not None:
                same = names_sni.get(request.host)
                if same is None:  # normalised once per connection, not per request
                    same = names_sni[request.host] = (
                        tier2.claimed_host(None, request.host).name == sni
                    )
                if not same:
                    mismatch = Decision(Verdict.DENY, tls_intercept.HOST_SNI_MISMATCH, None)
                    return tier2.apply_mode(policy, mismatch)
            learned = self.resolved.names_for(job_id, conn.dst, time.monotonic())
            asked = (request, method, upgrade)
            known = memo.get(asked, learned)
            if known is not None:
                return known
            key = (
                _GATE_HOST,
                conn_host,
                conn.dst,
                conn.dport,
                request.host,
                request.port,
                request.error,
                frozenset(learned),
            )
            # The outcome itself, for every connection of the policy: a pure function
            # of the host decision's key and what the request asked (a new connection's
            # own memo is empty; this skips `decide_http` and `apply_mode` on it).
            whole = (key, asked)
            done = decisions.get(policy, fleet_ranges, whole)
            if isinstance(done, tier2.Tier2Outcome):
                return memo.put(asked, learned, done)
            cached = decisions.get(policy, fleet_ranges, key)
            if isinstance(cached, Decision):
                made = outcome(policy, request, method, upgrade, cached)
                decisions.put(policy, fleet_ranges, whole, made)
                return memo.put(asked, learned, made)
            if isinstance(cached, _Resolve):
                name: str | None = cached.name
            else:
                name = http_rules.request_needs_resolution(
                    policy,
                    request,
                    dst_port=conn.dport,
                    conn_host=conn_host,
                    resolved_names=learned,
                )
                if name is None:
                    host = host_decision(policy, request, learned, frozenset())
                    decisions.put(policy, fleet_ranges, key, host)
                    made = outcome(policy, request, method, upgrade, host)
                    decisions.put(policy, fleet_ranges, whole, made)
                    return memo.put(asked, learned, made)
                decisions.put(policy, fleet_ranges, key, _Resolve(name))
            assert name is not None
            resolve = name

            async def resolving() -> tier2.Tier2Outcome:
                # As in `_decide`: memoised by the resolver's answer too.
                ips = frozenset(await self.resolver.resolve_a(resolve, fleet_ranges=fleet_ranges))
                answered = (key, ips)
                host = decisions.get(policy, fleet_ranges, answered)
                if not isinstance(host, Decision):
                    host = host_decision(policy, request, learned, ips)
                    decisions.put(policy, fleet_ranges, answered, host)
                return outcome(policy, request, method, upgrade, host)

            return resolving()

        store = self.ctx.secrets
        secret = _no_secret if store is None else store.get
        gate = HttpGate(
            decide,
            lambda record: self._request_done(conn, record),
            credentials=RequestCredentials.of(policy, secret),
            shared=self._heads,
        )

        def repolicy(new: Policy) -> None:
            current[0] = new
            memo.clear()
            gate.use_credentials(RequestCredentials.of(new, secret))

        conn.repolicy = repolicy
        return gate

    def _request_done(self, conn: _Conn, record: RequestRecord) -> None:
        requests = conn.requests_audit
        if requests is None:
            flow, policy = conn.flow, conn.policy
            requests = conn.requests_audit = audit.HttpRequests(
                self.ctx.audit,
                job_id=None if flow is None else flow.job_id,
                account=None if policy is None else policy.account,
                node=None if flow is None else flow.node,
                proxy=self.ctx.identity.name,
                src=conn.src_text or conn.src,
                sport=conn.sport,
                dst=conn.dst_text or conn.dst,
                port=conn.dport,
                mode=None if policy is None else policy.mode,
            )
        decision = record.decision
        allowed = decision.allowed or record.would_deny
        requests.emit(
            host=record.host,
            method=record.method,
            path=record.path,
            status=record.status,
            verdict=audit.VERDICT_ALLOW if allowed else audit.VERDICT_DENY,
            reason=decision.reason,
            would_deny=record.would_deny,
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
            injected=record.injected,
            credential=record.credential,
        )

    def _by_address(self, policy: Policy, dst: IPv4Address, dport: int) -> Decision | None:
        """The decision the address alone makes final (always-denied, or a
        cidr rule's allow), else None; memoised (`_DecisionCache`)."""
        fleet_ranges = self.ctx.fleet_ranges
        key = (dst, dport)
        cached = self._decisions.get(policy, fleet_ranges, key)
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        decision = tier2.address_precheck(policy, dst, dport, fleet_ranges=fleet_ranges)
        if decision is None:
            by_address = match_address(policy, dst, dport, fleet_ranges=fleet_ranges)
            if by_address.allowed:
                decision = by_address
        self._decisions.put(policy, fleet_ranges, key, decision)
        return decision

    async def _decide(
        self,
        policy: Policy,
        conn: _Conn,
        peeked: Peeked,
        learned: set[str],
    ) -> tier2.NamedDecision:
        """Tier 2 for what the client sent, with the audit name; records the
        proxy's own resolution, if it made one, in ``conn.proxy_ips``."""
        fleet_ranges = self.ctx.fleet_ranges
        key = (
            conn.dst,
            conn.dport,
            peeked.protocol,
            peeked.sni,
            peeked.http_host,
            peeked.target_port,
            peeked.ech,
            peeked.sniff_error,
            conn.learned,
        )
        cached = self._decisions.get(policy, fleet_ranges, key)
        if isinstance(cached, tier2.NamedDecision):
            return cached
        if isinstance(cached, _Resolve):
            name: str | None = cached.name
        else:
            name = _resolution_needed(policy, conn.dport, peeked, learned)
            if name is None:
                named = self._decide_now(policy, conn, peeked, learned, frozenset())
                self._decisions.put(policy, fleet_ranges, key, named)
                return named
            self._decisions.put(policy, fleet_ranges, key, _Resolve(name))
        # The proxy's own resolution (cached by the resolver, never memoised
        # here) is asked every time; the decision is a pure function of the key
        # and its answer, memoised by both: a changed answer decides afresh.
        assert name is not None
        conn.proxy_ips = frozenset(await self.resolver.resolve_a(name, fleet_ranges=fleet_ranges))
        answered = (key, conn.proxy_ips)
        cached = self._decisions.get(policy, fleet_ranges, answered)
        if isinstance(cached, tier2.NamedDecision):
            return cached
        named = self._decide_now(policy, conn, peeked, learned, conn.proxy_ips)
        self._decisions.put(policy, fleet_ranges, answered, named)
        return named

    def _decide_now(
        self,
        policy: Policy,
        conn: _Conn,
        peeked: Peeked,
        learned: set[str],
        proxy_ips: frozenset[IPv4Address],
    ) -> tier2.NamedDecision:
        return tier2.decide_named(
            policy,
            dst_ip=conn.dst,
            dst_port=conn.dport,
            sni=peeked.sni,
            http_host=peeked.http_host,
            resolved_names=learned,
            proxy_resolves=proxy_ips,
            fleet_ranges=self.ctx.fleet_ranges,
            sniff_error=peeked.sniff_error,
            protocol=peeked.protocol,
            ech=peeked.ech,
            target_port=peeked.target_port,
        )

    async def _connect(self, conn: _Conn, policy: Policy) -> socket.socket | NotConnected:
        """The connected upstream socket, or why there is none: no source port
        may be had (a limit's reason), ``fleet_address`` when the destination
        is this proxy itself (never attempted), ``upstream_connect_failed``."""
        assert conn.flow is not None
        if conn.dst in self._own:
            return _TO_OWN_ADDRESS
        destination = _destination(conn.dst, conn.dport)
        for _ in range(PORT_ATTEMPTS):
            now = time.monotonic()
            lease = self.limits.acquire_port(conn.flow.job_id, destination, policy.limits, now)
            if isinstance(lease, str):
                return NotConnected(ConnectionReason(lease))
            conn.lease = lease
            try:
                return await self._connect_from(conn, lease)
            except OSError as exc:
                if exc.errno not in _PORT_TAKEN:
                    raise
                # Taken outside the allocator's knowledge (another socket on
                # this host, or a 4-tuple still in TIME_WAIT): set it aside.
                conn.lease = None
                self.limits.quarantine_port(lease, time.monotonic())
                log.warning(
                    "source_port_taken",
                    egress=str(lease.address),
                    port=lease.port,
                    destination=str(destination),
                    error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                )
        return NotConnected(ConnectionReason.PORT_POOL_EXHAUSTED)

    async def _connect_from(self, conn: _Conn, lease: Lease) -> socket.socket | NotConnected:
        """Connect from the lease's (address, port); ``upstream_connect_failed``
        if the connect failed; ``fleet_address`` (not attempted) when the
        destination is the source address itself: a TCP self-connect would
        echo the client's bytes back; OSError(EADDRINUSE/EADDRNOTAVAIL) if that
        source cannot be used."""
        # `_connect` has checked `_own`, which holds every pool address (and
        # so the lease's); checked again here for a caller that did not.
        if conn.dst in self._own or conn.dst == lease.address:
            return _TO_OWN_ADDRESS
        # Non-blocking from its creation (no separate `setblocking` call); Python
        # keeps SOCK_NONBLOCK out of `upstream.type`, which the relay's transport checks.
        upstream = tcp_socket.TcpSocket(socket.AF_INET, _STREAM_NONBLOCK)
        try:
            # Shared with connections to other destinations (the allocator
            # keeps 4-tuples unique), and usable while an old one is in TIME_WAIT.
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bound_dead_peers(upstream)
            upstream.bind((self.limits.ports.address_text(lease), lease.port))
            await self._connecting().connect(
                upstream, (conn.dst_text or str(conn.dst), conn.dport), self.connect_timeout_s
            )
        except OSError as exc:  # TimeoutError (the connect timeout) included
            upstream.close()
            if exc.errno in _PORT_TAKEN:
                raise
            # The audit line says upstream_connect_failed; this says why.
            log.debug("upstream_connect_error", dst=str(conn.dst), port=conn.dport, error=repr(exc))
            return _CONNECT_FAILED
        except BaseException:
            upstream.close()
            raise
        return upstream

    def _connecting(self) -> Connector:
        """The interceptor's `Connector`, made on the first upstream connect."""
        if self._connector is None:
            self._loop = self._loop or asyncio.get_running_loop()
            self._connector = Connector(self._loop)
        return self._connector

    def _relaying(self) -> Reactor:
        """The interceptor's `Reactor` (one epoll set for every relay's sockets),
        made on the first relay."""
        if self._reactor is None:
            self._loop = self._loop or asyncio.get_running_loop()
            self._reactor = Reactor(self._loop)
        return self._reactor

    def _finish(self, conn: _Conn, outcome: Outcome) -> None:
        """The connection's counters and its one audit event, from its final outcome."""
        verdict, reason = outcome.verdict.value, outcome.reason.value
        if outcome.reason in LIMIT_REASONS:
            self.limits.refused(None if conn.flow is None else conn.flow.job_id, reason)
        self._metrics.connections.inc(verdict, reason)
        self._job_denials.connection(conn.flow, verdict, reason)
        if conn.relay.end is not None:
            self._metrics.ended.labels(conn.relay.end).inc()
        if conn.relay.paced_chunks:
            self._metrics.paced.inc(conn.relay.paced_chunks)
        flow, policy = conn.flow, conn.policy
        audit.emit(
            self.ctx.audit,
            audit.connection_event(
                job_id=None if flow is None else flow.job_id,
                account=None if policy is None else policy.account,
                node=None if flow is None else flow.node,
                proxy=self.ctx.identity.name,
                src=conn.src_text or conn.src,
                sport=conn.sport,
                dst=conn.dst_text or conn.dst,
                port=conn.dport,
                host=outcome.host,
                verdict=verdict,
                reason=reason,
                mode=None if policy is None else policy.mode,
                would_deny=outcome.would_deny,
                bytes_up=conn.relay.bytes_up,
                bytes_down=conn.relay.bytes_down,
                duration_ms=(time.monotonic() - conn.started) * 1000.0,
                end=conn.relay.end,
            ),
        )


async def start_interceptor(
    ctx: ProxyContext,
    resolved: ResolvedNames,
    *,
    listen: tuple[str, int],
    peek_timeout_s: float = DEFAULT_PEEK_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    resolver: UpstreamResolver | None = None,
    upstream_dns_port: int = DNS_PORT,
    limits: ProxyLimits | None = None,
    interception: tls_intercept.Interception | None = None,
    sock: socket.socket | None = None,
) -> Interceptor:
    """Bind the transparent listener on `listen` and start accepting; `close()` stops it."""
    if resolver is None:
        resolver = UpstreamResolver(
            ctx.upstream_resolver, source=ctx.identity.egress, port=upstream_dns_port
        )
    interceptor = Interceptor(
        ctx,
        resolved,
        listen=listen,
        resolver=resolver,
        peek_timeout_s=peek_timeout_s,
        connect_timeout_s=connect_timeout_s,
        limits=limits,
        interception=interception,
        sock=sock,
    )
    await interceptor.start()
    return interceptor


__all__ = ["Interceptor", "Peeked", "PeekedHeads", "peek_client", "start_interceptor"]
