"""The "internet"'s DNS server: authoritative for `test.`, nothing else.

Three layers, each testable alone:

- `Zone`: the records, built from the layout (`Zone.from_layout`): an A record
  per site, the wildcard `*.data.allowed.test`, TXT records for a few names,
  `<proxy>.fleet.test` with each proxy's egress address (a name that
  resolves to the fleet), `many.data.allowed.test` with 150 A records (too
  large for a UDP answer: TC, then TCP), SOA and NS at the apex; TTL 60.
- `answer(query, zone) -> response`: pure, dnspython message in, message out.
  NOERROR with the records; NODATA (NOERROR, SOA in authority) for a name
  that exists without the asked type; NXDOMAIN (SOA in authority) for a name
  in `test.` that does not exist; REFUSED outside `test.` (no recursion);
  NOTIMP for opcodes other than QUERY; FORMERR for a question count != 1.
  Wildcards follow RFC 4592: `*.data.allowed.test` answers any name below
  `data.allowed.test` whose closest existing ancestor is `data.allowed.test`
  (so `x.data.allowed.test` and `a.b.data.allowed.test`, but not
  `a.eu.data.allowed.test`, because `eu.data.allowed.test` exists). Whether a
  name is *allowed* is the proxy's business, not this server's.
- `handle_wire(bytes) -> bytes | None`: parses, answers, encodes with the
  transport's size limit (TC set on overflow). A datagram that does not parse,
  or is itself a response, is dropped and counted in `DnsStats.dropped`; it
  never raises.

`DnsServer` binds UDP and TCP (RFC 1035 2-byte length framing, several queries
per connection, idle timeout) on one address, 203.0.113.53:53 in `egd-inet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import MappingProxyType
from typing import Any, Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import structlog

from egressd.layout import INET_DNS, Layout

ORIGIN = "test."
#: `<proxy name>.fleet.test` resolves to that proxy's egress address.
FLEET_ZONE = "fleet.test"
TTL = 60
#: A name with more A records than fit in a UDP answer (1232 bytes hold ~70).
#: The first is the layout's data site (connections to the name work); the
#: rest are unused addresses of the "internet" range.
MANY_NAME = "many.data.allowed.test"
MANY_COUNT = 150
#: Wildcard site names served by the "internet" (DNS and the TLS certificate).
WILDCARD_SITES = ("*.data.allowed.test",)
#: Names with a TXT record (a test can show TXT passes or is refused).
TXT_RECORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "api.allowed.test": ("egressd-test=api.allowed.test",),
        "evil.test": ("egressd-test=evil.test",),
    }
)
NS_NAME = "ns.test."
SOA_TEXT = f"{NS_NAME} hostmaster.test. 1 3600 600 86400 {TTL}"
UDP_PLAIN_LIMIT = 512
UDP_MAX_LIMIT = 4096
OUR_PAYLOAD = 1232
TCP_LIMIT = 65535
TCP_IDLE_TIMEOUT_S = 10.0

Transport = Literal["udp", "tcp"]
Node = Mapping[dns.rdatatype.RdataType, dns.rdataset.Rdataset]

# What dnspython's parser raises for bytes that are not a DNS message.
_PARSE_ERRORS = (dns.exception.DNSException, ValueError, struct.error, IndexError)
_REFUSED_QTYPES = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})

_log = structlog.get_logger("egressd_harness.topology.dns")


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name)  # relative to the root: always absolute


@dataclass(frozen=True, slots=True)
class Zone:
    """An immutable authoritative zone: owner name -> rdtype -> rdataset."""

    origin: dns.name.Name
    nodes: Mapping[dns.name.Name, Node]
    # Every name that exists: owners and their ancestors up to the origin
    # (empty non-terminals exist too: NODATA, not NXDOMAIN).
    existing: frozenset[dns.name.Name]
    ttl: int = TTL

    @classmethod
    def build(
        cls,
        records: Iterable[tuple[str, str, str]],
        origin: str = ORIGIN,
        ttl: int = TTL,
    ) -> Zone:
        """A zone from (owner, rdtype, rdata text) triples; the apex SOA and NS are added."""
        apex = _absolute(origin)
        texts: dict[dns.name.Name, dict[dns.rdatatype.RdataType, list[str]]] = {}
        everything = [
            (origin, "SOA", SOA_TEXT),
            (origin, "NS", NS_NAME),
            *records,
        ]
        for owner, rdtype, text in everything:
            name = _absolute(owner)
            if not name.is_subdomain(apex):
                raise ValueError(f"{owner} is outside {origin}")
            texts.setdefault(name, {}).setdefault(dns.rdatatype.from_text(rdtype), []).append(text)
        nodes: dict[dns.name.Name, Node] = {}
        existing: set[dns.name.Name] = set()
        for name, by_type in texts.items():
            nodes[name] = MappingProxyType(
                {
                    rdtype: dns.rdataset.from_text_list(
                        dns.rdataclass.IN, rdtype, ttl, sorted(set(values))
                    )
                    for rdtype, values in by_type.items()
                }
            )
            ancestor = name
            while ancestor.is_subdomain(apex):
                existing.add(ancestor)
                if ancestor == apex:
                    break
                ancestor = ancestor.parent()
        return cls(
            origin=apex, nodes=MappingProxyType(nodes), existing=frozenset(existing), ttl=ttl
        )

    @classmethod
    def from_layout(cls, layout: Layout, dns_address: Any = INET_DNS) -> Zone:
        records: list[tuple[str, str, str]] = [(NS_NAME, "A", str(dns_address))]
        records += [(site.name, "A", str(site.address)) for site in layout.sites]
        for wildcard in WILDCARD_SITES:
            parent = _absolute(wildcard).parent()
            # The wildcard answers with the address of the layout's sites below it.
            for site in layout.sites:
                if _absolute(site.name).parent() == parent:
                    records.append((wildcard, "A", str(site.address)))
        records += [
            (owner, "TXT", f'"{text}"') for owner, values in TXT_RECORDS.items() for text in values
        ]
        # A name per proxy that resolves to its egress address, so tests can
        # show that the proxies filter such answers (``fleet_address``).
        records += [(f"{p.name}.{FLEET_ZONE}", "A", str(p.egress)) for p in layout.proxies]
        records += [(MANY_NAME, "A", str(ip)) for ip in many_addresses(layout)]
        return cls.build(records)

    @property
    def soa(self) -> dns.rrset.RRset:
        return _rrset(self.origin, self.nodes[self.origin][dns.rdatatype.SOA])

    def find(self, qname: dns.name.Name) -> tuple[Node | None, bool]:
        """(the node answering `qname`, whether the name exists).

        An existing name without records (empty non-terminal) gives (None, True);
        a name covered by a wildcard gives the wildcard's node.
        """
        if not qname.is_subdomain(self.origin):
            return None, False
        node = self.nodes.get(qname)
        if node is not None:
            return node, True
        if qname in self.existing:
            return None, True
        encloser = qname
        while encloser != self.origin:
            encloser = encloser.parent()
            if encloser in self.existing:
                break
        wildcard = self.nodes.get(dns.name.Name((b"*", *encloser.labels)))
        return (wildcard, True) if wildcard is not None else (None, False)


def many_addresses(layout: Layout) -> list[IPv4Address]:
    """The `MANY_COUNT` addresses of `MANY_NAME`: the data site's, then 203.0.113.101 on."""
    parent = _absolute(MANY_NAME).parent()
    site = next(s.address for s in layout.sites if _absolute(s.name).parent() == parent)
    rest = (IPv4Address(f"203.0.113.{i}") for i in range(101, 256))
    return [site, *(ip for ip in rest if ip != site)][:MANY_COUNT]


def _rrset(owner: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(owner, rdataset.ttl, list(rdataset))


def answer(query: dns.message.Message, zone: Zone) -> dns.message.Message:
    """The response to `query`; pure (no I/O, no clock, no state)."""
    response = dns.message.make_response(query, recursion_available=False, our_payload=OUR_PAYLOAD)
    if query.edns > 0:
        response.set_rcode(dns.rcode.BADVERS)
        return response
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    question = query.question[0]
    qname, qtype = question.name, question.rdtype
    if (
        question.rdclass != dns.rdataclass.IN
        or not qname.is_subdomain(zone.origin)
        or qtype in _REFUSED_QTYPES
    ):
        response.set_rcode(dns.rcode.REFUSED)
        return response
    response.flags |= dns.flags.AA
    node, exists = zone.find(qname)
    if not exists:
        response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(zone.soa)
        return response
    if node is not None:
        if qtype == dns.rdatatype.ANY:
            response.answer += [_rrset(qname, rdataset) for rdataset in node.values()]
        elif qtype in node:
            response.answer.append(_rrset(qname, node[qtype]))
    if not response.answer:  # NODATA
        response.authority.append(zone.soa)
    return response


# --- wire --------------------------------------------------------------------


@dataclass(slots=True)
class DnsStats:
    """Counters: answered queries by rcode, dropped datagrams by reason."""

    answered: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


def _size_limit(query: dns.message.Message, transport: Transport) -> int:
    if transport == "tcp":
        return TCP_LIMIT
    if query.edns >= 0:
        return max(UDP_PLAIN_LIMIT, min(query.payload, UDP_MAX_LIMIT))
    return UDP_PLAIN_LIMIT


def handle_wire(
    data: bytes,
    zone: Zone,
    stats: DnsStats,
    transport: Transport = "udp",
    client: str = "",
) -> bytes | None:
    """Parse, answer and encode one query; None (and a count) if it is dropped."""
    try:
        query = dns.message.from_wire(data)
    except _PARSE_ERRORS as exc:
        _drop(stats, "malformed", client, transport, type(exc).__name__)
        return None
    if query.flags & dns.flags.QR:
        _drop(stats, "not_a_query", client, transport, "")
        return None
    if query.had_tsig:
        _drop(stats, "tsig", client, transport, "")
        return None
    response = answer(query, zone)
    try:
        wire = response.to_wire(max_size=_size_limit(query, transport))
    except dns.exception.TooBig:
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        wire = response.to_wire()
    rcode = dns.rcode.to_text(response.rcode())
    stats.answered[rcode] += 1
    question = query.question[0] if len(query.question) == 1 else None
    _log.debug(
        "dns_query",
        client=client,
        transport=transport,
        qname=question.name.to_text() if question is not None else None,
        qtype=dns.rdatatype.to_text(question.rdtype) if question is not None else None,
        rcode=rcode,
    )
    return wire


def _drop(stats: DnsStats, reason: str, client: str, transport: str, error: str) -> None:
    stats.dropped[reason] += 1
    _log.info("dns_dropped", reason=reason, client=client, transport=transport, error=error)


# --- sockets -----------------------------------------------------------------


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone, stats: DnsStats) -> None:
        self._zone = zone
        self._stats = stats
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not an asyncio.DatagramTransport subclass.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = handle_wire(data, self._zone, self._stats, "udp", str(addr[0]))
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        _log.info("dns_udp_error", error=str(exc))


class DnsServer:
    """UDP and TCP DNS on one address; `start()` binds, `stop()` closes."""

    def __init__(self, zone: Zone, host: str, port: int = 53) -> None:
        self.zone = zone
        self.stats = DnsStats()
        self._host = host
        self._port = port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def udp_address(self) -> tuple[str, int]:
        assert self._udp is not None, "not started"
        host, port = self._udp.get_extra_info("sockname")[:2]
        return host, port

    @property
    def tcp_address(self) -> tuple[str, int]:
        assert self._tcp is not None, "not started"
        host, port = self._tcp.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(
            self._serve_tcp, self._host, self._port, reuse_address=True
        )
        # Port 0: UDP takes the port that TCP got, so both answer on one port.
        port = self._port or self._tcp.sockets[0].getsockname()[1]
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self.zone, self.stats), local_addr=(self._host, port)
        )

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else ""
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT_S)
                length = int.from_bytes(header, "big")
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT_S)
                reply = handle_wire(data, self.zone, self.stats, "tcp", client)
                if reply is None:
                    break  # a malformed stream cannot be resynchronised
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
