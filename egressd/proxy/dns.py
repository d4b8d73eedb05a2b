"""The proxy's DNS responder: answers only names a job's policy allows.

DESIGN.md: "the proxy's DNS responder answers only names that the job's policy
allows (forwarding them to the upstream resolver, recording answer addresses
with their TTL for that job); other names get REFUSED and a log line. This
closes DNS tunnelling as an exfiltration path."

Two layers, as elsewhere in the proxy:

* Pure: `answer_policy(policy, query) -> DnsAction` (what to do with a
  query), `apply_dns_mode` (report mode), `filter_answers(response, ...)`
  (drop always-denied addresses: DNS rebinding) and `build_response`.
* I/O: `DnsResponder`, started by `start_dns`, on a transparent UDP socket
  and a transparent TCP listener (nftables TPROXYs port 53 from ``gnv0`` to
  them), and `UpstreamResolver`, which asks the upstream resolver from the
  proxy's egress address.

Rules of `answer_policy`, first match wins (REFUSED in the table; a refusal of
a name is answered with the proxy's ``dns_refusal_rcode``, NXDOMAIN by default:
see `refusal_rcode`):

========================  ===================  =========================
query                     answer               reason
========================  ===================  =========================
opcode other than QUERY   REFUSED              ``opcode_not_query``
no / several questions    REFUSED              ``no_question`` / ``multiple_questions``
class other than IN       REFUSED              ``qclass_not_in``
type other than A, AAAA   REFUSED              ``qtype_not_allowed``
name not a host name      REFUSED              ``invalid_host``
no host rule names it     REFUSED              ``no_matching_rule``
AAAA                      NOERROR, no answer   ``ipv6_unsupported``
A                         forward upstream     ``allowed_host``
========================  ===================  =========================

A name is allowed when any host rule matches it, whatever the port (the
port is checked when the connection comes). A cidr rule never makes a name
resolvable. AAAA gets an empty NOERROR (not REFUSED): clients then fall back
to A quickly, where a refusal makes some resolvers give up on the name.

Report mode (`apply_dns_mode`) forwards a name that no host rule names and
flags it ``would_deny``; without that, report mode would be useless (a
client must resolve a name before it connects). Everything else (query
types, malformed queries, rebinding) is enforced in both modes.

The upstream query is built afresh (same name, type A, class IN, RD, a new
id): nothing the client put in its query (EDNS options, extra records,
flags) reaches the upstream resolver. CNAME chains in the upstream answer are
followed and flattened: the client gets A records owned by the name it asked
for (in its own letter case, for 0x20-randomising resolvers), with the
smallest TTL on the chain; those addresses are recorded for the job under
that name. Addresses in always-denied ranges are dropped unless a cidr rule of
the policy overrides that range (`egressd.policy.addresses`); a fleet
member's address (``fleet_address``) is dropped whatever the policy says. The
audit line lists what was dropped and why (``dropped``); when none remain the
answer is REFUSED ``rebinding``.

A datagram that does not parse as a DNS query (including responses, which
have QR set) is dropped, counted (``egressd_dns_dropped_total{reason=
"malformed"}``) and logged; nothing is raised past the receive loop.

Refusal rcode (`refusal_rcode`): NXDOMAIN by default (``dns_refusal_rcode``,
or REFUSED), because that is what glibc and musl both turn into an immediate,
final EAI_NONAME ("Name or service not known"), one query per search-list
candidate. REFUSED makes glibc retry each candidate (``attempts``) and then
report EAI_AGAIN ("Temporary failure in name resolution", which invites
retries), and musl ignores a REFUSED answer and waits out its timeout
(measured: docs/decisions.md). It applies to refusals of a *name* (no rule names it, not a host
name, rebinding, unknown flow, no usable policy). Refusals that are not about
the name (query type, class, opcode, question count) and the limits stay
REFUSED: NXDOMAIN says that the name has no records of any type (RFC 8020),
which would be false for an allowed name asked with another type, and for a
rate limit, which is temporary. SERVFAIL (upstream failures) and the empty
NOERROR for AAAA are never changed.

Limits (`egressd.limits.dns`, through `ProxyLimits.dns`): after the flow
and policy lookup and before anything else, each query (UDP or TCP) takes a
token from its job's bucket (``limits.dns_queries_per_s``, a burst of one
second's worth, at least 10). A query over the rate is answered REFUSED
(reason ``dns_rate_limit``) within a refusal budget of the same rate, and
dropped beyond it (a TCP connection is closed): refusing tells a
well-behaved client at once, while a flood stops costing the proxy a reply
per datagram. Once a job's bucket is empty, its UDP queries are refused or
dropped on receipt (flow lookup only: no task, no policy read, no parse for
a drop), so a flood costs the other jobs little; a datagram that is not DNS
spends a token too (a garbage flood is limited, and its audit lines with
it). A job's upstream queries in flight are capped (``dns_inflight_limit``),
so one job cannot hold the task pool or the upstream path, and so are its
DNS-over-TCP connections
(``dns_tcp_connection_limit``: the connection is closed at once). Each is
counted in ``egressd_limit_refusals_total{job_id,reason}`` and
``egressd_dns_queries_total{verdict="deny"|"drop"}`` (drops also in
``egressd_dns_dropped_total{reason}``); the audit log gets the first such
query of a job and then one event a second at most, with ``suppressed``:
how many were not logged since the previous one.

Large answers: over UDP a response larger than the client's payload size
(512 without EDNS; at most `MAX_UDP_PAYLOAD`, so that no answer is
IP-fragmented on the GENEVE path) carries as many A records as fit and TC,
so glibc and dnspython ask again over TCP, and a client without TCP (older
musl) still gets addresses; over TCP the whole filtered answer. The
upstream query itself falls back to TCP when the upstream sets TC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import socket
import struct
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog
from prometheus_client import Counter

from egressd.limits.dns import (
    DNS_INFLIGHT_LIMIT,
    DNS_RATE_LIMIT,
    DNS_TCP_CONNECTION_LIMIT,
    LOG_INTERVAL_S,
)
from egressd.policy.addresses import IPNetwork, find_denied, overrides
from egressd.policy.matcher import ALLOWED_HOST, INVALID_HOST, NO_MATCHING_RULE, name_allowed
from egressd.policy.model import Policy
from egressd.policy.names import HostError, normalize_host
from egressd.proxy import audit, job_metrics
from egressd.proxy.context import FlowInfo, PolicyUnavailable, ProxyContext
from egressd.proxy.limiting import LimitsConfig, ProxyLimits
from egressd.proxy.outcome import LabelledCounter
from egressd.proxy.resolved import ResolvedNames, clamp_ttl

IPv4Address = ipaddress.IPv4Address

log = structlog.get_logger(__name__)

DNS_PORT = 53
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR  # the cmsg type equals the option


class DnsReason(enum.StrEnum):
    """Why a query was answered, refused or dropped (verbatim in logs and counters).

    The responder's own; a query also carries the policy's (``allowed_host``,
    ``no_matching_rule``, ``invalid_host``), the policy store's and the DNS
    limits' reasons, all of them members here (a unit test holds the modules
    to it).
    """

    ALLOWED_HOST = ALLOWED_HOST
    NO_MATCHING_RULE = NO_MATCHING_RULE
    INVALID_HOST = INVALID_HOST
    OPCODE_NOT_QUERY = "opcode_not_query"
    NO_QUESTION = "no_question"
    MULTIPLE_QUESTIONS = "multiple_questions"
    QCLASS_NOT_IN = "qclass_not_in"
    QTYPE_NOT_ALLOWED = "qtype_not_allowed"
    IPV6_UNSUPPORTED = "ipv6_unsupported"
    REBINDING = "rebinding"
    UNKNOWN_FLOW = "unknown_flow"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_NXDOMAIN = "nxdomain"
    MALFORMED = "malformed"
    OVERLOAD = "overload"
    DNS_RATE_LIMIT = DNS_RATE_LIMIT
    DNS_INFLIGHT_LIMIT = DNS_INFLIGHT_LIMIT
    DNS_TCP_CONNECTION_LIMIT = DNS_TCP_CONNECTION_LIMIT
    POLICY_MISSING = "policy_missing"
    POLICY_UNVERIFIABLE = "policy_unverifiable"
    POLICY_EXPIRED = "policy_expired"
    CONTROL_UNREACHABLE = "control_unreachable"
    WRONG_WORKER = "wrong_worker"  # egressd.proxy.workers: another worker's job


OPCODE_NOT_QUERY = DnsReason.OPCODE_NOT_QUERY
NO_QUESTION = DnsReason.NO_QUESTION
MULTIPLE_QUESTIONS = DnsReason.MULTIPLE_QUESTIONS
QCLASS_NOT_IN = DnsReason.QCLASS_NOT_IN
QTYPE_NOT_ALLOWED = DnsReason.QTYPE_NOT_ALLOWED
IPV6_UNSUPPORTED = DnsReason.IPV6_UNSUPPORTED
REBINDING = DnsReason.REBINDING
UNKNOWN_FLOW = DnsReason.UNKNOWN_FLOW
UPSTREAM_TIMEOUT = DnsReason.UPSTREAM_TIMEOUT
UPSTREAM_ERROR = DnsReason.UPSTREAM_ERROR
UPSTREAM_NXDOMAIN = DnsReason.UPSTREAM_NXDOMAIN
MALFORMED = DnsReason.MALFORMED
OVERLOAD = DnsReason.OVERLOAD
#: ``egressd_dns_queries_total``'s verdicts and ``egressd_dns_dropped_total``'s
#: reasons: every one there (zero) from the start, nothing else countable.
DNS_VERDICTS: tuple[str, ...] = (audit.VERDICT_ALLOW, audit.VERDICT_DENY, audit.VERDICT_DROP)
DROP_REASONS: tuple[DnsReason, ...] = (
    DnsReason.MALFORMED,
    DnsReason.OVERLOAD,
    DnsReason.DNS_RATE_LIMIT,
    DnsReason.DNS_INFLIGHT_LIMIT,
    DnsReason.DNS_TCP_CONNECTION_LIMIT,
)

FORWARD = "forward"
RESPOND = "respond"

DEFAULT_UPSTREAM_TIMEOUT_S = 2.0
DEFAULT_TCP_IDLE_TIMEOUT_S = 10.0
DEFAULT_MAX_INFLIGHT = 1024  # UDP queries being answered at once; more are dropped
#: UDP queries of one job answered at once; the job's others wait in its own
#: queue (they hold their rate tokens already). A burst a job may send (its
#: bucket's worth) then delays other jobs' queries by a few queries' work, not
#: by the whole burst: the event loop serves the jobs round-robin.
LANE_WIDTH = 4
#: A job's queue of waiting UDP queries; beyond it they are dropped (overload).
LANE_QUEUE = 256
DEFAULT_MAX_TCP_CONNECTIONS = 256
MAX_UDP_QUERY = 4096
UDP_RCVBUF = 1 << 20
#: The largest UDP response (DNS Flag Day 2020: no IP fragmentation).
MAX_UDP_PAYLOAD = 1232
#: What ``dns_refusal_rcode`` may say.
REFUSAL_RCODES = ("REFUSED", "NXDOMAIN")
#: NXDOMAIN: glibc and musl both fail at once with EAI_NONAME, one query per
#: search-list candidate; REFUSED gives glibc EAI_AGAIN after retrying every
#: candidate, and musl ignores it and waits out its timeout (docs/decisions.md).
DEFAULT_REFUSAL_RCODE = "NXDOMAIN"
#: Refusals that are not about the name: always REFUSED (see the module docstring).
_NOT_ABOUT_THE_NAME = frozenset(
    {
        OPCODE_NOT_QUERY,
        NO_QUESTION,
        MULTIPLE_QUESTIONS,
        QCLASS_NOT_IN,
        QTYPE_NOT_ALLOWED,
        DNS_RATE_LIMIT,
        DNS_INFLIGHT_LIMIT,
    }
)
_CNAME_CHAIN_LIMIT = 16
_REPLY_SOCKETS = 64
_CMSG_SPACE = socket.CMSG_SPACE(16)  # struct sockaddr_in


# --- pure -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsAction:
    """What to do with one query: forward it, or respond with `rcode` and no answers."""

    kind: str  # FORWARD | RESPOND
    rcode: dns.rcode.Rcode
    verdict: str  # audit.VERDICT_ALLOW | audit.VERDICT_DENY
    reason: str
    qname: str | None  # normalised, when it is a host name
    qtype: str | None  # "A", "TXT", ...
    would_deny: bool = False
    #: Upstream answer addresses kept from the client, with the reason (audit).
    dropped: tuple[tuple[IPv4Address, str], ...] = ()


@dataclass(frozen=True, slots=True)
class FilteredAnswers:
    """The A answers that may reach a client, and what was dropped."""

    kept: tuple[tuple[IPv4Address, int], ...]
    dropped: tuple[tuple[IPv4Address, str], ...]
    reason: str | None  # REBINDING when answers existed and none was kept


def _refuse(reason: str, qname: str | None, qtype: str | None) -> DnsAction:
    return DnsAction(RESPOND, dns.rcode.REFUSED, audit.VERDICT_DENY, reason, qname, qtype)


def question_text(query: dns.message.Message) -> tuple[str | None, str | None]:
    """(qname, qtype) of the first question as text, for logs; never raises."""
    if not query.question:
        return None, None
    rrset = query.question[0]
    try:
        name = rrset.name.to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError):
        name = None
    return name, dns.rdatatype.to_text(rrset.rdtype)


def answer_policy(policy: Policy, query: dns.message.Message) -> DnsAction:
    """The true decision for `query` under `policy` (the table in the module docstring)."""
    raw_name, qtype = question_text(query)
    if query.opcode() != dns.opcode.QUERY:
        return _refuse(OPCODE_NOT_QUERY, raw_name, qtype)
    if not query.question:
        return _refuse(NO_QUESTION, None, None)
    if len(query.question) > 1:
        return _refuse(MULTIPLE_QUESTIONS, raw_name, qtype)
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return _refuse(QCLASS_NOT_IN, raw_name, qtype)
    if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return _refuse(QTYPE_NOT_ALLOWED, raw_name, qtype)
    try:
        text = question.name.to_text(omit_final_dot=True)
        name = normalize_host(text)
    except (HostError, dns.exception.DNSException, UnicodeError):
        return _refuse(INVALID_HOST, raw_name, qtype)
    if not name_allowed(policy, name):
        return _refuse(NO_MATCHING_RULE, name, qtype)
    if question.rdtype == dns.rdatatype.AAAA:
        return DnsAction(
            RESPOND, dns.rcode.NOERROR, audit.VERDICT_ALLOW, IPV6_UNSUPPORTED, name, qtype
        )
    return DnsAction(FORWARD, dns.rcode.NOERROR, audit.VERDICT_ALLOW, ALLOWED_HOST, name, qtype)


def apply_dns_mode(policy: Policy, action: DnsAction) -> DnsAction:
    """Report mode: resolve a name no rule names (an A query for a valid name), flag it."""
    if policy.mode != "report" or action.reason != NO_MATCHING_RULE or action.qname is None:
        return action
    reason: str
    if action.qtype == "AAAA":
        kind, reason = RESPOND, IPV6_UNSUPPORTED
    else:
        kind, reason = FORWARD, NO_MATCHING_RULE
    return DnsAction(
        kind,
        dns.rcode.NOERROR,
        audit.VERDICT_ALLOW,
        reason,
        action.qname,
        action.qtype,
        would_deny=True,
    )


def filter_answers(
    response: dns.message.Message,
    fleet_ranges: Sequence[IPNetwork] = (),
    *,
    qname: dns.name.Name | None = None,
    policy: Policy | None = None,
) -> FilteredAnswers:
    """The A records for `qname` (default: the response's question), CNAMEs
    followed, minus always-denied addresses (unless a cidr rule of `policy`
    overrides the range). TTL per address is the smallest on its chain."""
    if qname is None:
        if not response.question:
            return FilteredAnswers((), (), None)
        qname = response.question[0].name
    cidrs = [r.cidr for r in policy.egress if r.cidr is not None] if policy is not None else []
    name, chain_ttl = qname, None
    found: list[tuple[IPv4Address, int]] = []
    for _ in range(_CNAME_CHAIN_LIMIT):
        a_rrset = _find(response, name, dns.rdatatype.A)
        if a_rrset is not None:
            ttl = a_rrset.ttl if chain_ttl is None else min(chain_ttl, a_rrset.ttl)
            found.extend((IPv4Address(rdata.address), ttl) for rdata in a_rrset)
            break
        cname = _find(response, name, dns.rdatatype.CNAME)
        if cname is None or len(cname) != 1:
            break
        chain_ttl = cname.ttl if chain_ttl is None else min(chain_ttl, cname.ttl)
        name = next(iter(cname)).target
    kept: list[tuple[IPv4Address, int]] = []
    dropped: list[tuple[IPv4Address, str]] = []
    for ip, ttl in found:
        denied = find_denied(ip, fleet_ranges=fleet_ranges)
        if denied is not None and not any(overrides(denied, ip, c) for c in cidrs):
            dropped.append((ip, denied.reason))
        else:
            kept.append((ip, ttl))
    reason = REBINDING if dropped and not kept else None
    return FilteredAnswers(tuple(kept), tuple(dropped), reason)


def _find(
    response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> dns.rrset.RRset | None:
    for rrset in response.answer:
        if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == rdtype and rrset.name == name:
            return rrset
    return None


def build_response(
    query: dns.message.Message,
    rcode: dns.rcode.Rcode,
    answers: Sequence[tuple[IPv4Address, int]] = (),
) -> dns.message.Message:
    """A response to `query`: `rcode`, and A records for its question name."""
    response = dns.message.make_response(query, recursion_available=True)
    response.set_rcode(rcode)
    if answers and query.question:
        qname = query.question[0].name
        ttl = min(ttl for _, ttl in answers)
        rrset = dns.rrset.from_text_list(
            qname, ttl, dns.rdataclass.IN, dns.rdatatype.A, [str(ip) for ip, _ in answers]
        )
        response.answer.append(rrset)
    return response


def refusal_rcode(reason: str, configured: str = DEFAULT_REFUSAL_RCODE) -> dns.rcode.Rcode:
    """The rcode of a refusal for `reason`: the proxy's `configured` one (REFUSED or
    NXDOMAIN) for a refusal of the name, REFUSED for the rest (module docstring)."""
    if reason in _NOT_ABOUT_THE_NAME:
        return dns.rcode.REFUSED
    return dns.rcode.from_text(configured)


def to_wire(response: dns.message.Message, *, max_size: int) -> bytes:
    """`response` in at most `max_size` bytes. If it does not fit: TC, and as many
    of the answer's records as fit (RFC 2181 9 lets a partial RRset stand), so a
    client that retries over TCP gets them all and one that cannot still gets some."""
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        pass
    rrsets = list(response.answer)
    response.flags |= dns.flags.TC
    response.answer.clear()
    response.authority.clear()
    response.additional.clear()
    if len(rrsets) == 1:  # ours: one A RRset (build_response); keep its first records that fit
        rrset = rrsets[0]
        records = list(rrset)
        lo, hi = 0, len(records) - 1  # the largest count known to fit / not known
        best: bytes | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            response.answer[:] = [dns.rrset.from_rdata_list(rrset.name, rrset.ttl, records[:mid])]
            try:
                best = response.to_wire(max_size=max_size)
                lo = mid
            except dns.exception.TooBig:
                hi = mid - 1
        if best is not None:
            response.answer[:] = [dns.rrset.from_rdata_list(rrset.name, rrset.ttl, records[:lo])]
            return best
        response.answer.clear()
    return response.to_wire(max_size=max_size)


def parse_query(wire: bytes) -> dns.message.Message | None:
    """A DNS query from `wire`, or None for anything else (never raises)."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - dnspython raises many types on garbage
        return None
    if query.flags & dns.flags.QR:
        return None
    return query


def udp_payload_limit(query: dns.message.Message) -> int:
    """How large a UDP response the client gets: what it accepts (RFC 6891; 512
    without EDNS), at most `MAX_UDP_PAYLOAD`."""
    if query.edns >= 0:
        return max(512, min(query.payload, MAX_UDP_PAYLOAD))
    return 512


# --- upstream -------------------------------------------------------------------------


class UpstreamError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamResolver:
    """Asks the upstream resolver, from the proxy's egress address.

    `resolve_a` keeps a small cache (clamped TTLs, bounded size) for tier 2's
    own check that a claimed name agrees with a destination.
    """

    def __init__(
        self,
        server: IPv4Address,
        *,
        source: IPv4Address,
        port: int = DNS_PORT,
        timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S,
        cache_size: int = 4096,
    ) -> None:
        self.server = server
        self.source = source
        self.port = port
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        # name -> (expiry, the fleet set the answer was filtered with, addresses)
        self._cache: OrderedDict[str, tuple[float, Sequence[IPNetwork], frozenset[IPv4Address]]] = (
            OrderedDict()
        )

    async def query_a(self, name: dns.name.Name | str) -> dns.message.Message:
        """The upstream's response to a fresh A query for `name`; UpstreamError."""
        # EDNS with our own payload size: medium answers come in one datagram;
        # larger ones come with TC and are asked again over TCP.
        request = dns.message.make_query(name, dns.rdatatype.A, use_edns=0, payload=MAX_UDP_PAYLOAD)
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):
                response, _ = await dns.asyncquery.udp_with_fallback(
                    request,
                    str(self.server),
                    timeout=self.timeout_s,
                    port=self.port,
                    source=str(self.source),
                    ignore_unexpected=True,
                )
        except (TimeoutError, dns.exception.Timeout) as exc:
            raise UpstreamError(UPSTREAM_TIMEOUT) from exc
        except (OSError, EOFError, dns.exception.DNSException, ValueError) as exc:
            # EOFError: the upstream closed a TCP connection (after TC) without an answer.
            raise UpstreamError(UPSTREAM_ERROR) from exc
        return response

    async def resolve_a(
        self, name: str, *, fleet_ranges: Sequence[IPNetwork] = ()
    ) -> set[IPv4Address]:
        """Addresses of `name` (normalised), minus always-denied ones (fleet
        addresses included), cached; empty on any failure. A cached answer is
        used only with the very `fleet_ranges` it was filtered with: a changed
        fleet set asks again."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and hit[0] > now and hit[1] is fleet_ranges:
            self._cache.move_to_end(name)
            return set(hit[2])
        try:
            response = await self.query_a(name)
        except UpstreamError:
            return set()
        filtered = filter_answers(response, fleet_ranges, qname=dns.name.from_text(name))
        ips = frozenset(ip for ip, _ in filtered.kept)
        ttl = min((t for _, t in filtered.kept), default=0)
        self._cache[name] = (now + clamp_ttl(ttl), fleet_ranges, ips)
        self._cache.move_to_end(name)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return set(ips)


# --- the responder --------------------------------------------------------------------


@dataclass(slots=True)
class _Metrics:
    # Every child created up front (`DNS_VERDICTS`, `DROP_REASONS`): the per-datagram
    # path of a flood is one dict lookup, and another label cannot be counted.
    queries: LabelledCounter
    dropped: LabelledCounter

    def count(self, verdict: str, dropped: str | None = None) -> None:
        """One query with `verdict`, and, if it was dropped, its reason."""
        self.queries.inc(verdict)
        if dropped is not None:
            self.dropped.inc(dropped)

    @classmethod
    def on(cls, ctx: ProxyContext) -> _Metrics:
        queries = Counter(
            "egressd_dns_queries_total",
            "DNS queries answered by the proxy, by verdict",
            ["verdict"],
            registry=ctx.registry,
        )
        dropped = Counter(
            "egressd_dns_dropped_total",
            "DNS datagrams dropped without an answer, by reason",
            ["reason"],
            registry=ctx.registry,
        )
        return cls(
            queries=LabelledCounter(queries, [(verdict,) for verdict in DNS_VERDICTS]),
            dropped=LabelledCounter(dropped, [(reason,) for reason in DROP_REASONS]),
        )


@dataclass(frozen=True, slots=True)
class DnsPeer:
    src: IPv4Address
    sport: int
    dst: IPv4Address
    proto: int  # 6 or 17


def transparent_socket(kind: socket.SocketKind, bind: tuple[str, int]) -> socket.socket:
    """A non-blocking IPv4 socket with IP_TRANSPARENT and SO_REUSEADDR, bound to `bind`."""
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setblocking(False)
        sock.bind(bind)
    except BaseException:
        sock.close()
        raise
    return sock


def _origdst(ancdata: list[tuple[int, int, bytes]]) -> IPv4Address | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            return IPv4Address(data[4:8])
    return None


class DnsResponder:
    """UDP and TCP DNS on a transparent listen address; see the module docstring."""

    def __init__(
        self,
        ctx: ProxyContext,
        resolved: ResolvedNames,
        *,
        listen: tuple[str, int],
        upstream: UpstreamResolver,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_tcp_connections: int = DEFAULT_MAX_TCP_CONNECTIONS,
        tcp_idle_timeout_s: float = DEFAULT_TCP_IDLE_TIMEOUT_S,
        limits: ProxyLimits | None = None,
        refusal_rcode: str = DEFAULT_REFUSAL_RCODE,
        socks: tuple[socket.socket, socket.socket] | None = None,
        steer: Callable[[bytes, DnsPeer], bool] | None = None,
    ) -> None:
        if refusal_rcode not in REFUSAL_RCODES:
            raise ValueError(f"refusal_rcode must be one of {', '.join(REFUSAL_RCODES)}")
        self.ctx = ctx
        self.resolved = resolved
        self.listen = listen
        self.upstream = upstream
        self.max_inflight = max_inflight
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.refusal_rcode = refusal_rcode
        # Shared with the interceptor in a proxy (one refusals counter per registry);
        # its own when alone (tests, tools).
        self._own_limits = limits is None
        self.limits = limits or ProxyLimits(
            LimitsConfig.default(ctx.identity.egress), registry=ctx.registry
        )
        self._metrics = _Metrics.on(ctx)
        self._job_denials = job_metrics.on(ctx)  # per job, bounded
        self._udp: socket.socket | None = None
        self._tcp_server: asyncio.Server | None = None
        self._reply_socks: OrderedDict[IPv4Address, socket.socket] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()  # UDP queries in flight
        # Per job: UDP queries being answered, and the ones waiting (`LANE_WIDTH`).
        self._lane_active: dict[uuid.UUID, int] = {}
        self._lane_waiting: dict[uuid.UUID, deque[tuple[bytes, DnsPeer, bool]]] = {}
        self._tcp_tasks: set[asyncio.Task[None]] = set()  # TCP connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        # A proxy worker's: (UDP, TCP) sockets made and bound by its supervisor, and the
        # hook that hands a UDP query of another worker's job to that worker (True: taken).
        self._given = socks
        self.steer = steer

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._given is not None:
            udp, tcp = self._given
            udp.setblocking(False)
            tcp.setblocking(False)
            udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            tcp.listen(512)
            self._tcp_server = await asyncio.start_server(self._serve_tcp, sock=tcp)
            self._started(udp)
            return
        udp = transparent_socket(socket.SOCK_DGRAM, self.listen)
        try:
            udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            # Room for a burst or a short stall at flood rates: a query lost in the
            # kernel costs its client a timeout (seconds), a queued one milliseconds.
            # Not more: under a sustained overload a deep queue is only delay (about
            # a thousand queries). The kernel caps it at net.core.rmem_max.
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            tcp = transparent_socket(socket.SOCK_STREAM, self.listen)
        except BaseException:
            udp.close()
            raise
        try:
            tcp.listen(512)
            self._tcp_server = await asyncio.start_server(self._serve_tcp, sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        self._started(udp)

    def _started(self, udp: socket.socket) -> None:
        assert self._loop is not None
        self._udp = udp
        self._loop.add_reader(udp.fileno(), self._on_readable)
        if self._own_limits:
            self.limits.start()
        self._flusher = self._loop.create_task(self._flush_suppressed(), name="egressd-dns-flush")

    @property
    def udp_address(self) -> tuple[str, int]:
        assert self._udp is not None
        address: tuple[str, int] = self._udp.getsockname()
        return address

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lane_waiting.clear()
        if self._udp is not None and self._loop is not None:
            self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        tasks = [*self._tasks, *self._tcp_tasks]
        if self._flusher is not None:
            tasks.append(self._flusher)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp_server.wait_closed(), 1.0)
        for sock in self._reply_socks.values():
            sock.close()
        self._reply_socks.clear()
        if self._own_limits:
            await self.limits.close()

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        if len(self._tasks) >= self.max_inflight:
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # UDP

    def _on_readable(self) -> None:
        sock = self._udp
        if sock is None:
            return
        for _ in range(64):  # bounded batch, then let others run
            try:
                data, ancdata, flags, addr = sock.recvmsg(MAX_UDP_QUERY, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("dns_udp_recv_failed", error=str(exc))
                return
            origdst = _origdst(ancdata)
            if origdst is None or flags & socket.MSG_TRUNC:
                self._drop(MALFORMED, addr, origdst)
                continue
            peer = DnsPeer(IPv4Address(addr[0]), addr[1], origdst, 17)
            if self.steer is not None and self.steer(data, peer):
                continue
            self.deliver(data, peer)

    def deliver(self, data: bytes, peer: DnsPeer) -> None:
        """A UDP query received (here, or by another worker that steered it here)."""
        if self._closed:
            return
        admitted, job = self._admit_on_receipt(data, peer)
        if admitted is False:
            return
        self._start_udp(data, peer, admitted is True, job)

    def _start_udp(self, data: bytes, peer: DnsPeer, admitted: bool, job: uuid.UUID | None) -> None:
        """Answer a UDP query now, or queue it behind its job's `LANE_WIDTH`."""
        if job is not None and self._lane_active.get(job, 0) >= LANE_WIDTH:
            waiting = self._lane_waiting.setdefault(job, deque())
            if len(waiting) >= LANE_QUEUE:
                self._drop(OVERLOAD, (str(peer.src), peer.sport), peer.dst)
            else:
                waiting.append((data, peer, admitted))
            return
        coro = self._udp_query(data, peer, admitted=admitted)
        task = self._spawn_task(coro, f"egressd-dns-udp-{peer.src}:{peer.sport}")
        if task is None:
            coro.close()
            self._drop(OVERLOAD, (str(peer.src), peer.sport), peer.dst)
            return
        if job is not None:
            self._lane_active[job] = self._lane_active.get(job, 0) + 1
            task.add_done_callback(lambda _: self._lane_done(job))

    def _lane_done(self, job: uuid.UUID) -> None:
        """A query of `job` is answered: start its next waiting one, if any."""
        active = self._lane_active.get(job, 1) - 1
        if active <= 0:
            self._lane_active.pop(job, None)
        else:
            self._lane_active[job] = active
        waiting = self._lane_waiting.get(job)
        if not waiting:
            self._lane_waiting.pop(job, None)
            return
        data, peer, admitted = waiting.popleft()
        if self._closed:
            return
        self._start_udp(data, peer, admitted, job)

    async def _udp_query(self, wire: bytes, peer: DnsPeer, *, admitted: bool = False) -> None:
        query = parse_query(wire)
        if query is None:
            if not admitted:  # its job's rate pays for it: a garbage flood is limited too
                flow = self.ctx.flows.lookup(peer.src, peer.sport, peer.dst, DNS_PORT, 17)
                if flow is not None:
                    self.limits.dns.charge(flow.job_id, time.monotonic())
            self._drop(MALFORMED, (str(peer.src), peer.sport), peer.dst)
            return
        response = await self.handle(query, peer, admitted=admitted)
        if response is not None:
            self._send_udp(to_wire(response, max_size=udp_payload_limit(query)), peer)

    def _admit_on_receipt(self, wire: bytes, peer: DnsPeer) -> tuple[bool | None, uuid.UUID | None]:
        """The rate check on receipt, at the job's rate last seen (no policy read, no
        task, no parse for a drop: what a flood costs): True if a token was taken,
        False if the datagram was refused or dropped here, None if its job's rate is
        not known yet (`handle` checks after the policy lookup); and the job, if any."""
        flow = self.ctx.flows.lookup(peer.src, peer.sport, peer.dst, DNS_PORT, peer.proto)
        if flow is None:
            return None, None
        now = time.monotonic()
        taken = self.limits.dns.take_known(flow.job_id, now)
        if taken is not False:
            return taken, flow.job_id
        if self._over_limit(peer, flow, None, DNS_RATE_LIMIT, now, None, None):
            query = parse_query(wire)
            if query is None:
                self._drop(MALFORMED, (str(peer.src), peer.sport), peer.dst)
            else:
                response = build_response(query, dns.rcode.REFUSED)
                self._send_udp(to_wire(response, max_size=udp_payload_limit(query)), peer)
        return False, flow.job_id

    def _send_udp(self, wire: bytes, peer: DnsPeer) -> None:
        sock = self._reply_socket(peer.dst)
        if sock is None:
            return
        try:
            sock.sendto(wire, (str(peer.src), peer.sport))
        except OSError as exc:  # full buffer, unreachable: UDP, the client retries
            log.warning("dns_udp_send_failed", error=str(exc), dst=str(peer.dst))

    def _reply_socket(self, origdst: IPv4Address) -> socket.socket | None:
        """A socket that sends from (origdst, 53), so the answer comes from where the query went."""
        sock = self._reply_socks.get(origdst)
        if sock is not None:
            self._reply_socks.move_to_end(origdst)
            return sock
        try:
            sock = transparent_socket(socket.SOCK_DGRAM, (str(origdst), DNS_PORT))
            # Never read: keep what stray datagrams it may get small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        except OSError as exc:
            log.error("dns_reply_socket_failed", error=str(exc), dst=str(origdst))
            return None
        self._reply_socks[origdst] = sock
        while len(self._reply_socks) > _REPLY_SOCKETS:
            _, old = self._reply_socks.popitem(last=False)
            old.close()
        return sock

    def _drop(self, reason: str, addr: tuple[str, int], origdst: IPv4Address | None) -> None:
        self._metrics.count(audit.VERDICT_DROP, reason)
        audit.emit(
            self.ctx.audit,
            audit.dns_event(
                job_id=None,
                account=None,
                node=None,
                proxy=self.ctx.identity.name,
                src=addr[0],
                sport=addr[1],
                dst=origdst,
                qname=None,
                qtype=None,
                verdict=audit.VERDICT_DROP,
                reason=reason,
            ),
        )

    # TCP

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            if len(self._tcp_tasks) >= self.max_tcp_connections:
                self._metrics.dropped.inc(OVERLOAD)
                writer.close()
                return
            self._tcp_tasks.add(task)
            task.add_done_callback(self._tcp_tasks.discard)
        tcp_job: uuid.UUID | None = None  # holds one of its job's TCP slots
        try:
            src, sport = writer.get_extra_info("peername")[:2]
            dst = writer.get_extra_info("sockname")[0]
            peer = DnsPeer(IPv4Address(src), sport, IPv4Address(dst), 6)
            if task is not None:
                task.set_name(f"egressd-dns-tcp-{src}:{sport}")
            flow = self.ctx.flows.lookup(peer.src, peer.sport, peer.dst, DNS_PORT, 6)
            if flow is not None:
                refusal = self.limits.dns.begin_tcp(flow.job_id)
                if refusal is not None:
                    self.limits.dns_refused(flow.job_id, refusal)
                    self._metrics.dropped.inc(refusal)
                    self._job_denials.dns(flow, audit.VERDICT_DROP, refusal)
                    return
                tcp_job = flow.job_id
            while True:
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout_s):
                        head = await reader.readexactly(2)
                        wire = await reader.readexactly(struct.unpack("!H", head)[0])
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                query = parse_query(wire)
                if query is None:
                    self._drop(MALFORMED, (src, sport), peer.dst)
                    return
                response = await self.handle(query, peer)
                if response is None:  # far over a limit: no more work for this connection
                    return
                out = to_wire(response, max_size=65535)
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            if tcp_job is not None:
                self.limits.dns.end_tcp(tcp_job)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # the decision, for one parsed query

    async def handle(
        self, query: dns.message.Message, peer: DnsPeer, *, admitted: bool = False
    ) -> dns.message.Message | None:
        """Answer one query from `peer` and log it (never raises for bad input);
        None: drop it (its job is over a limit and past its refusal budget).
        `admitted`: the query already has its token (`_admit_on_receipt`)."""
        qname, qtype = question_text(query)
        flow = self.ctx.flows.lookup(peer.src, peer.sport, peer.dst, DNS_PORT, peer.proto)
        if flow is None:
            return self._finish(query, peer, None, None, _refuse(UNKNOWN_FLOW, qname, qtype))
        try:
            verified = await self.ctx.policies.get(flow.job_id)
        except PolicyUnavailable as exc:
            return self._finish(query, peer, flow, None, _refuse(exc.reason, qname, qtype))
        policy = verified.policy
        now = time.monotonic()
        job = flow.job_id
        rate = policy.limits.dns_queries_per_s
        if admitted:
            self.limits.dns.set_rate(job, rate, now)
            limited = None
        else:
            limited = self.limits.dns.admit(job, rate=rate, now=now)
        if limited is not None:
            return self._limited(query, peer, flow, policy, limited, now)
        action = apply_dns_mode(policy, answer_policy(policy, query))
        if action.kind == RESPOND:
            return self._finish(query, peer, flow, policy, action)
        limited = self.limits.dns.begin_upstream(job)
        if limited is not None:
            return self._limited(query, peer, flow, policy, limited, now)
        try:
            action, answers = await self._forward(query, action, policy)
        finally:
            self.limits.dns.end_upstream(job)
        if answers and action.qname is not None:
            self.resolved.record(
                flow.job_id,
                action.qname,
                [ip for ip, _ in answers],
                min(ttl for _, ttl in answers),
                time.monotonic(),
            )
        return self._finish(query, peer, flow, policy, action, answers)

    async def _forward(
        self, query: dns.message.Message, action: DnsAction, policy: Policy
    ) -> tuple[DnsAction, tuple[tuple[IPv4Address, int], ...]]:
        """Ask the upstream; the action that results and the answers the client may see."""
        qname = query.question[0].name
        try:
            upstream = await self.upstream.query_a(qname)
        except UpstreamError as exc:
            return _respond_like(action, dns.rcode.SERVFAIL, exc.reason), ()
        rcode = upstream.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return _respond_like(action, rcode, UPSTREAM_NXDOMAIN), ()
        if rcode != dns.rcode.NOERROR:
            reason = f"upstream_{dns.rcode.to_text(rcode).lower()}"
            return _respond_like(action, dns.rcode.SERVFAIL, reason), ()
        filtered = filter_answers(upstream, self.ctx.fleet_ranges, qname=qname, policy=policy)
        if filtered.reason is not None:
            action = _refuse(filtered.reason, action.qname, action.qtype)
            return dataclasses.replace(action, dropped=filtered.dropped), ()
        return dataclasses.replace(action, dropped=filtered.dropped), filtered.kept

    def _limited(
        self,
        query: dns.message.Message,
        peer: DnsPeer,
        flow: FlowInfo,
        policy: Policy,
        reason: str,
        now: float,
    ) -> dns.message.Message | None:
        qname, qtype = question_text(query)
        if self._over_limit(peer, flow, policy, reason, now, qname, qtype):
            return build_response(query, dns.rcode.REFUSED)
        return None

    def _over_limit(
        self,
        peer: DnsPeer,
        flow: FlowInfo,
        policy: Policy | None,
        reason: str,
        now: float,
        qname: str | None,
        qtype: str | None,
    ) -> bool:
        """Count (and sample into the audit log) a query over a limit; True: answer
        it REFUSED, False: drop it (past the job's refusal budget)."""
        job = flow.job_id
        self.limits.dns_refused(job, reason)
        answer = self.limits.dns.answer_refusal(job, now)
        verdict = audit.VERDICT_DENY if answer else audit.VERDICT_DROP
        self._metrics.count(verdict, None if answer else reason)
        self._job_denials.dns(flow, verdict, reason)
        suppressed = self.limits.dns.log_refusal(job, now)
        if suppressed is not None:
            event = audit.dns_event(
                job_id=job,
                account=None if policy is None else policy.account,
                node=flow.node,
                proxy=self.ctx.identity.name,
                src=peer.src,
                sport=peer.sport,
                dst=peer.dst,
                qname=qname,
                qtype=qtype,
                verdict=verdict,
                reason=reason,
                rcode="REFUSED" if answer else None,
                mode=None if policy is None else policy.mode,
            )
            event["suppressed"] = suppressed
            audit.emit(self.ctx.audit, event)
        return answer

    async def _flush_suppressed(self) -> None:
        """Every `LOG_INTERVAL_S`: one summary event per job whose limited queries
        went unlogged (a flood that stopped; counts of answered and dropped ones)."""
        while True:
            await asyncio.sleep(LOG_INTERVAL_S)
            for job, count in self.limits.dns.flush(time.monotonic()).items():
                event = audit.dns_event(
                    job_id=job,  # type: ignore[arg-type]
                    account=None,
                    node=None,
                    proxy=self.ctx.identity.name,
                    src=None,  # type: ignore[arg-type]
                    sport=0,
                    dst=None,
                    qname=None,
                    qtype=None,
                    verdict=audit.VERDICT_DENY,
                    reason=DNS_RATE_LIMIT,
                )
                event["suppressed"] = count
                audit.emit(self.ctx.audit, event)

    def _finish(
        self,
        query: dns.message.Message,
        peer: DnsPeer,
        flow: FlowInfo | None,
        policy: Policy | None,
        action: DnsAction,
        answers: Sequence[tuple[IPv4Address, int]] = (),
    ) -> dns.message.Message:
        rcode = action.rcode
        if rcode == dns.rcode.REFUSED:
            rcode = refusal_rcode(action.reason, self.refusal_rcode)
        self._metrics.count(action.verdict)
        self._job_denials.dns(flow, action.verdict, action.reason)
        audit.emit(
            self.ctx.audit,
            audit.dns_event(
                job_id=None if flow is None else flow.job_id,
                account=None if policy is None else policy.account,
                node=None if flow is None else flow.node,
                proxy=self.ctx.identity.name,
                src=peer.src,
                sport=peer.sport,
                dst=peer.dst,
                qname=action.qname,
                qtype=action.qtype,
                verdict=action.verdict,
                reason=action.reason,
                rcode=dns.rcode.to_text(rcode),
                answers=[str(ip) for ip, _ in answers],
                mode=None if policy is None else policy.mode,
                would_deny=action.would_deny,
                dropped=[(str(ip), reason) for ip, reason in action.dropped],
            ),
        )
        return build_response(query, rcode, answers)


def _respond_like(action: DnsAction, rcode: dns.rcode.Rcode, reason: str) -> DnsAction:
    return DnsAction(
        RESPOND, rcode, action.verdict, reason, action.qname, action.qtype, action.would_deny
    )


async def start_dns(
    ctx: ProxyContext,
    resolved: ResolvedNames,
    *,
    listen: tuple[str, int],
    upstream_port: int = DNS_PORT,
    upstream_timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    limits: ProxyLimits | None = None,
    refusal_rcode: str = DEFAULT_REFUSAL_RCODE,
    socks: tuple[socket.socket, socket.socket] | None = None,
    steer: Callable[[bytes, DnsPeer], bool] | None = None,
) -> DnsResponder:
    """Bind and start the DNS responder on `listen` (UDP and TCP); `close()` stops it.
    `limits`: the proxy's (shared with the interceptor), else its own."""
    upstream = UpstreamResolver(
        ctx.upstream_resolver,
        source=ctx.identity.egress,
        port=upstream_port,
        timeout_s=upstream_timeout_s,
    )
    responder = DnsResponder(
        ctx,
        resolved,
        listen=listen,
        upstream=upstream,
        max_inflight=max_inflight,
        limits=limits,
        refusal_rcode=refusal_rcode,
        socks=socks,
        steer=steer,
    )
    await responder.start()
    return responder


__all__ = [
    "DnsAction",
    "DnsResponder",
    "FilteredAnswers",
    "UpstreamResolver",
    "answer_policy",
    "apply_dns_mode",
    "build_response",
    "filter_answers",
    "parse_query",
    "refusal_rcode",
    "start_dns",
]
