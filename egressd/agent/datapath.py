"""The agent's data path: TUN `egr0` <-> GENEVE to the proxies, and its metrics.

Outbound (DESIGN.md, packet path step 4). Tier 1 `bpf_redirect`s every
allowed IPv4 packet of a sandbox to `egr0`; the event loop's reader callback
drains the TUN in a batch (until EAGAIN or `BATCH` packets) into one
preallocated buffer, at offset 64, and for each packet:

1. checks that it is IPv4 (``tun_not_ipv4``: the kernel's own IPv6 chatter on
   a fresh device) of at least 20 bytes (``tun_malformed``), and finds the
   sandbox by the inner source address (unknown: dropped as
   ``unknown_source``; tier 1 should have made that impossible);
2. looks the flow up in the flow cache by its 13-byte key
   (`egressd.agent.hashing`); on a miss, picks the proxy by rendezvous hashing
   over the healthy proxies (none: dropped as ``no_healthy_proxy``) and
   caches the proxy with a ready-made outer header;
3. writes, in front of the packet in the same buffer, the outer IPv4 + UDP
   header (28 bytes) and the GENEVE header with the job option (36 bytes,
   fixed per sandbox: `header_for(vni, JobOption(job, digest))`), and sends
   the whole with one `sendto` on a raw socket. No copy of the packet is made.

Why a raw socket (``SOCK_RAW``, ``IPPROTO_RAW``, which implies
``IP_HDRINCL``): the outer UDP source port must follow the inner flow (RFC
8926 section 3.3), i.e. take any of 16384 values per flow; a bound UDP socket
has one source port, and a pool of them would give few distinct ports and
many sockets. With ``IP_HDRINCL`` the kernel fills the IPv4 total length,
identification and header checksum; the UDP checksum is left 0, which
IPv4 allows (RFC 768; RFC 8926 section 3.3 permits it for GENEVE over
IPv4). DF is set: the sandbox MTU leaves room for the overhead, and a packet
that still does not fit is counted (``too_big``), not fragmented.

Flow cache: two generations of dicts. Lookups hit the current one, or move an
entry up from the previous one; every `flow_idle_s` the current becomes the
previous and the previous is dropped. An idle flow is thus forgotten after
between one and two `flow_idle_s`, at no per-packet clock cost. While a flow
is cached it keeps its proxy even if another proxy comes up (its TCP state
lives on that proxy); when its proxy goes down, the health monitor calls
`proxy_health` and every entry pointing at it is dropped at once, so the
flow's next packet is hashed over the proxies that are left.

Return path: a UDP socket bound to (underlay, 6081). A datagram is accepted
only from a configured proxy address (``unknown_proxy``), must decode
(`egressd.geneve.decode`; its reasons are counted verbatim), carry this
fleet's VNI (``unknown_vni``), be addressed to a registered sandbox
(``unknown_sandbox``) and carry that sandbox's job id (``job_mismatch``). The
inner packet is written to `egr0`; the node's kernel routes it to the
sandbox's veth (/32 route; ip_forward=1 and rp_filter=0 are ensured at start).

Offload (`config.offload`; `egr0` opened with ``IFF_VNET_HDR`` and
``TUN_F_CSUM | TUN_F_TSO4``, see `egressd.net.tun`): every TUN read and write
starts with a 10-byte virtio-net header, and the kernel hands up TCP
super-packets of up to 64 KiB (a sandbox's TSO burst, redirected by tier 1)
and packets whose L4 checksum is partial. Each goes out as one GENEVE
datagram; a packet that needs its metadata (GSO or NEEDS_CSUM) carries the
offload option after the job option (`egressd.geneve.offload_vnet_header`
on the receiving side). A datagram that large does not fit the underlay
MTU, so the sender is a raw socket *without* ``IP_HDRINCL``
(``SOCK_RAW``/``IPPROTO_UDP``): the agent still writes the UDP header (the
per-flow source port), the kernel writes the IPv4 header and fragments a
datagram larger than the MTU (DF only on those that fit); the proxy's kernel
reassembles it. That socket would also get a copy of every UDP datagram the
node receives: a drop-all socket filter keeps its receive queue empty. On
the return path a datagram with the offload option is written with the
virtio-net header built from it (the node's kernel segments it towards the
sandbox's veth); without offload it is dropped (``offload_disabled``).
Super-packets are counted in `egressd_tun_superpackets_total{direction}`.

Nothing raises out of the reader callbacks: every failure is a counted drop.
Counters are plain ints read by `AgentCollector` at scrape time, so the hot
path never takes a metrics lock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from egressd.agent.config import AgentConfig, ProxyEndpoint
from egressd.agent.hashing import Rendezvous, flow_hash, source_port_for_hash
from egressd.agent.tier1 import Count, Reason, Tier1Error
from egressd.errors import EgressdError
from egressd.geneve import (
    DECODE_REASONS,
    OFFLOAD_OPTION_LEN,
    OFFLOAD_REASON,
    GeneveError,
    JobOption,
    decode,
    header_for,
    offload_vnet_header,
    pack_offload_option,
)
from egressd.geneve.codec import (
    HEADER_LEN,
    PREFIX_LEN,
    VNET_GSO_NONE,
    VNET_GSO_TCPV4,
    VNET_NEEDS_CSUM,
)
from egressd.net.tun import NO_VNET_HDR, VNET_HDR, VNET_HDR_LEN

if TYPE_CHECKING:
    from egressd.agent.sandboxes import Sandbox

log = structlog.get_logger("egressd.agent.datapath")

BATCH = 256
MAX_PACKET = 65535
OUTER_LEN = 20 + 8  # IPv4 + UDP
HEAD_ROOM = OUTER_LEN + PREFIX_LEN  # 64: outer headers + GENEVE + job option
SOCKET_BUFFER = 4 << 20
# Offload layout of the send buffer: [UDP 8 | GENEVE + job option 36 | offload option 12 | inner].
UDP_LEN = 8
OFFLOAD_HEAD = UDP_LEN + PREFIX_LEN + OFFLOAD_OPTION_LEN  # 56: where the inner packet starts
_OFFLOAD_OPTLEN = (PREFIX_LEN + OFFLOAD_OPTION_LEN - HEADER_LEN) // 4  # Opt Len of both options
_SO_ATTACH_FILTER = 26
_IP_DF = 0x4000
_TTL = 64

# Every drop reason the data path can count (pre-registered at zero).
DROP_REASONS: tuple[str, ...] = (
    "tun_malformed",
    "tun_not_ipv4",
    "unknown_source",
    "no_healthy_proxy",
    "too_big",
    "send_failed",
    "unknown_proxy",
    "unknown_vni",
    "unknown_sandbox",
    "job_mismatch",
    "tun_write_failed",
    "unsupported_gso",
    OFFLOAD_REASON,
    "offload_disabled",
    *DECODE_REASONS,
)

_OUTER = struct.Struct("!BBHHHBBH4s4sHHHH")
_UDP = struct.Struct("!HHHH")


def _drop_all_filter(sock: socket.socket) -> None:
    """Attach a classic BPF program that accepts nothing (`ret #0`) to `sock`."""
    import ctypes  # only the offload path needs it

    insn = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K, 0
    prog = struct.pack("HL", 1, ctypes.addressof(insn))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)


def outer_header(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The 28-byte outer IPv4 + UDP header template (lengths and checksums 0).

    The kernel fills the IPv4 total length, id and checksum (IP_HDRINCL); the
    UDP length is written per packet; the UDP checksum stays 0.
    """
    return _OUTER.pack(
        0x45, 0, 0, 0, _IP_DF, _TTL, socket.IPPROTO_UDP, 0, src, dst, sport, dport, 0, 0
    )


class KernelCounters(NamedTuple):
    """What the kernel data path (egressd.agent.kernel_datapath) counted: per proxy index
    (tx packets, tx bytes, rx packets, rx bytes), and drops by reason."""

    per_proxy: Mapping[int, tuple[int, int, int, int]]
    dropped: Mapping[str, int]


NO_KERNEL_COUNTERS = KernelCounters({}, {})


@dataclass(frozen=True, slots=True)
class Route:
    """What the data path knows of one sandbox."""

    sandbox_id: str
    job_id: bytes  # 16 bytes
    prefix: bytes  # GENEVE header + job option, 36 bytes


class Datapath:
    """TUN reader, GENEVE sender and receiver. Runs entirely on the event loop."""

    def __init__(
        self,
        config: AgentConfig,
        tun_fd: int,
        *,
        tx_socket: socket.socket | None = None,
        rx_socket: socket.socket | None = None,
    ) -> None:
        self.config = config
        self._tun_fd = tun_fd
        self._vni = config.vni
        self._underlay = config.underlay.packed
        self._geneve_port = config.geneve_port
        # Every proxy ever known keeps its index (and counters) for the agent's
        # life; `_active` is the current list (static, or static + discovered).
        self.proxy_names: tuple[str, ...] = tuple(p.name for p in config.proxies)
        self._proxy_index = {name: i for i, name in enumerate(self.proxy_names)}
        self._proxy_addr = [str(p.underlay) for p in config.proxies]
        self._proxy_by_ip = {str(p.underlay): i for i, p in enumerate(config.proxies)}
        self._active: set[str] = set(self.proxy_names)
        self._healthy: set[str] = set()
        self._rendezvous = Rendezvous(())
        # src address (4 bytes) -> Route; dst address -> Route for the return path.
        self._routes: dict[bytes, Route] = {}
        # flow key -> (proxy index, (proxy addr, 0), outer header)
        self._flows: dict[bytes, tuple[int, tuple[str, int], bytes]] = {}
        self._flows_old: dict[bytes, tuple[int, tuple[str, int], bytes]] = {}
        n = len(self.proxy_names)
        self.tx_packets = [0] * n
        self.tx_bytes = [0] * n
        self.rx_packets = [0] * n
        self.rx_bytes = [0] * n
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._offload = config.offload
        self.super_to_tun = 0
        self.super_from_tun = 0
        self._vnet_in = bytearray(VNET_HDR_LEN)
        self._out = bytearray(HEAD_ROOM + MAX_PACKET)
        self._out_view = memoryview(self._out)
        self._in = bytearray(MAX_PACKET)
        self._in_view = memoryview(self._in)
        self._tx = tx_socket
        self._rx = rx_socket
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rotate_handle: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------

    def open_sockets(self) -> None:
        """The raw send socket and the bound GENEVE receive socket (in this netns)."""
        if self._tx is None:
            if self._offload:
                tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
                try:
                    _drop_all_filter(tx)
                    tx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    tx.bind((str(self.config.underlay), 0))
                except OSError:
                    tx.close()
                    raise
            else:
                tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            tx.setblocking(False)
            self._tx = tx
        if self._rx is None:
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                rx.bind((str(self.config.underlay), self._geneve_port))
            except OSError:
                rx.close()
                raise
            rx.setblocking(False)
            self._rx = rx

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.open_sockets()
        assert self._rx is not None
        self._loop = loop
        loop.add_reader(self._tun_fd, self.drain_tun_offload if self._offload else self.drain_tun)
        loop.add_reader(self._rx.fileno(), self.drain_geneve)
        self._rotate_handle = loop.call_later(self.config.flow_idle_s, self._rotate)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.remove_reader(self._tun_fd)
            if self._rx is not None:
                loop.remove_reader(self._rx.fileno())
        if self._rotate_handle is not None:
            self._rotate_handle.cancel()
            self._rotate_handle = None
        for sock in (self._tx, self._rx):
            if sock is not None:
                sock.close()
        self._tx = self._rx = None

    # -- control (sandboxes, proxy health) ---------------------------------------

    def sandbox_added(self, sandbox: Sandbox) -> None:
        job = JobOption(sandbox.job_id.bytes, sandbox.digest)
        self._routes[sandbox.ip.packed] = Route(
            sandbox.sandbox_id, job.job_id, header_for(self._vni, job)
        )

    def sandbox_removed(self, sandbox: Sandbox) -> None:
        route = self._routes.get(sandbox.ip.packed)
        if route is not None and route.sandbox_id == sandbox.sandbox_id:
            del self._routes[sandbox.ip.packed]

    @property
    def sandbox_count(self) -> int:
        return len(self._routes)

    def proxy_health(self, name: str, up: bool) -> None:
        """Health monitor callback: the set of proxies new flows may use changed."""
        if name not in self._active:
            return
        if up:
            self._healthy.add(name)
        else:
            self._healthy.discard(name)
            self._forget_flows(self._proxy_index[name])
        self._rendezvous = Rendezvous(self._healthy)

    def _forget_flows(self, index: int) -> None:
        for flows in (self._flows, self._flows_old):
            stale = [key for key, entry in flows.items() if entry[0] == index]
            for key in stale:
                del flows[key]

    @property
    def active_proxies(self) -> tuple[str, ...]:
        """The proxies of the current list, in index order."""
        return tuple(name for name in self.proxy_names if name in self._active)

    def set_proxies(self, proxies: Sequence[ProxyEndpoint]) -> None:
        """Replace the proxy list (proxy discovery).

        A new proxy gets the next index and takes no flow until the health
        monitor reports it up. A proxy that left, or whose address changed,
        is no longer healthy and its flows are forgotten (new packets of
        those flows pick another proxy, as after a proxy failure); return
        packets from an address no current proxy has are `unknown_proxy`.
        """
        active: set[str] = set()
        for proxy in proxies:
            addr = str(proxy.underlay)
            index = self._proxy_index.get(proxy.name)
            if index is None:
                index = len(self.proxy_names)
                self.proxy_names = (*self.proxy_names, proxy.name)
                self._proxy_index[proxy.name] = index
                self._proxy_addr.append(addr)
                for counters in (self.tx_packets, self.tx_bytes, self.rx_packets, self.rx_bytes):
                    counters.append(0)
            elif self._proxy_addr[index] != addr or proxy.name not in self._active:
                self._healthy.discard(proxy.name)
                self._forget_flows(index)
                self._proxy_addr[index] = addr
            active.add(proxy.name)
        for name in self._active - active:
            self._healthy.discard(name)
            self._forget_flows(self._proxy_index[name])
        self._active = active
        self._proxy_by_ip = {
            self._proxy_addr[self._proxy_index[name]]: self._proxy_index[name] for name in active
        }
        self._rendezvous = Rendezvous(self._healthy)

    @property
    def healthy(self) -> tuple[str, ...]:
        return self._rendezvous.names

    def kernel_counters(self) -> KernelCounters:
        """The kernel data path's counters (none here: see KernelDatapath)."""
        return NO_KERNEL_COUNTERS

    @property
    def flow_count(self) -> int:
        return len(self._flows) + len(self._flows_old)

    def _rotate(self) -> None:
        self._flows_old = self._flows
        self._flows = {}
        if self._loop is not None:
            self._rotate_handle = self._loop.call_later(self.config.flow_idle_s, self._rotate)

    # -- outbound: TUN -> GENEVE -----------------------------------------------------

    def _new_flow(self, key: bytes) -> tuple[int, tuple[str, int], bytes] | None:
        fhash = flow_hash(key)
        name = self._rendezvous.pick(fhash)
        if name is None:
            return None
        index = self._proxy_index[name]
        addr = self._proxy_addr[index]
        if self._offload:  # the kernel writes the IPv4 header: only UDP is ours
            return index, (addr, 0), _UDP.pack(source_port_for_hash(fhash), self._geneve_port, 0, 0)
        header = outer_header(
            self._underlay,
            ipaddress.IPv4Address(addr).packed,
            source_port_for_hash(fhash),
            self._geneve_port,
        )
        return index, (addr, 0), header

    def drain_tun(self) -> None:
        # Locals: this is the per-packet path.
        out = self._out
        view = self._out_view
        target = [view[HEAD_ROOM:]]
        readv = os.readv
        fd = self._tun_fd
        routes = self._routes
        flows = self._flows
        old = self._flows_old
        dropped = self.dropped
        tx_packets = self.tx_packets
        tx_bytes = self.tx_bytes
        tx = self._tx
        if tx is None:
            return
        sendto = tx.sendto
        for _ in range(BATCH):
            try:
                n = readv(fd, target)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("tun_read_failed", error=str(exc))
                return
            if out[64] >> 4 != 4:  # IPv6 from the kernel (router solicitations ...)
                dropped["tun_not_ipv4"] += 1
                continue
            if n < 20:
                dropped["tun_malformed"] += 1
                continue
            route = routes.get(bytes(out[76:80]))
            if route is None:
                dropped["unknown_source"] += 1
                continue
            ihl = (out[64] & 15) << 2
            proto = out[73]
            if (proto == 6 or proto == 17) and n >= ihl + 4:
                key = bytes(out[76:84] + out[73:74] + out[64 + ihl : 68 + ihl])
            else:
                key = bytes(out[76:84] + out[73:74]) + b"\0\0\0\0"
            entry = flows.get(key)
            if entry is None:
                entry = old.pop(key, None)
                if entry is None:
                    entry = self._new_flow(key)
                    if entry is None:
                        dropped["no_healthy_proxy"] += 1
                        continue
                flows[key] = entry
            index, addr, header = entry
            out[0:28] = header
            udp_len = n + 44  # UDP header + GENEVE prefix + inner
            out[24] = udp_len >> 8
            out[25] = udp_len & 0xFF
            out[28:64] = route.prefix
            try:
                sendto(view[: n + 64], addr)
            except BlockingIOError:
                dropped["send_failed"] += 1
                continue
            except OSError as exc:
                dropped["too_big" if exc.errno == 90 else "send_failed"] += 1  # 90: EMSGSIZE
                continue
            tx_packets[index] += 1
            tx_bytes[index] += n

    def drain_tun_offload(self) -> None:
        """`drain_tun` for a TUN with a virtio-net header (see the module docstring)."""
        out = self._out
        view = self._out_view
        vnet = self._vnet_in
        target: list[bytearray | memoryview] = [vnet, view[OFFLOAD_HEAD:]]
        unpack_vnet = VNET_HDR.unpack
        readv = os.readv
        fd = self._tun_fd
        routes = self._routes
        flows = self._flows
        old = self._flows_old
        dropped = self.dropped
        tx_packets = self.tx_packets
        tx_bytes = self.tx_bytes
        tx = self._tx
        if tx is None:
            return
        sendto = tx.sendto
        supers = 0
        i = OFFLOAD_HEAD  # the inner packet's offset in `out`
        for _ in range(BATCH):
            try:
                n = readv(fd, target) - VNET_HDR_LEN
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("tun_read_failed", error=str(exc))
                break
            if n < 20:
                dropped["tun_malformed"] += 1
                continue
            if out[i] >> 4 != 4:
                dropped["tun_not_ipv4"] += 1
                continue
            route = routes.get(bytes(out[i + 12 : i + 16]))
            if route is None:
                dropped["unknown_source"] += 1
                continue
            ihl = (out[i] & 15) << 2
            proto = out[i + 9]
            if (proto == 6 or proto == 17) and n >= ihl + 4:
                key = bytes(out[i + 12 : i + 20] + out[i + 9 : i + 10] + out[i + ihl : i + ihl + 4])
            else:
                key = bytes(out[i + 12 : i + 20] + out[i + 9 : i + 10]) + b"\0\0\0\0"
            entry = flows.get(key)
            if entry is None:
                entry = old.pop(key, None)
                if entry is None:
                    entry = self._new_flow(key)
                    if entry is None:
                        dropped["no_healthy_proxy"] += 1
                        continue
                flows[key] = entry
            index, addr, header = entry
            flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = unpack_vnet(vnet)
            flags &= VNET_NEEDS_CSUM  # DATA_VALID is for us, not for the proxy's kernel
            if gso_type == VNET_GSO_NONE and not flags:
                start = OFFLOAD_OPTION_LEN
                out[start : start + 8] = header
                out[start + 8 : i] = route.prefix
            else:
                if gso_type != VNET_GSO_NONE:
                    if gso_type != VNET_GSO_TCPV4:
                        dropped["unsupported_gso"] += 1
                        continue
                    supers += 1
                start = 0
                out[0:8] = header
                out[8:44] = route.prefix
                out[8] = _OFFLOAD_OPTLEN
                pack_offload_option(out, 44, flags, gso_type, gso_size, csum_start, csum_offset)
            udp_len = i + n - start
            out[start + 4] = udp_len >> 8
            out[start + 5] = udp_len & 0xFF
            try:
                sendto(view[start : i + n], addr)
            except BlockingIOError:
                dropped["send_failed"] += 1
                continue
            except OSError as exc:
                dropped["too_big" if exc.errno == 90 else "send_failed"] += 1  # 90: EMSGSIZE
                continue
            tx_packets[index] += 1
            tx_bytes[index] += n
        self.super_from_tun += supers

    # -- return: GENEVE -> TUN ----------------------------------------------------------

    def drain_geneve(self) -> None:
        rx = self._rx
        if rx is None:
            return
        recv = rx.recvfrom_into
        buf = self._in
        view = self._in_view
        by_ip = self._proxy_by_ip
        routes = self._routes
        dropped = self.dropped
        rx_packets = self.rx_packets
        rx_bytes = self.rx_bytes
        write = os.write
        writev = os.writev
        offload = self._offload
        fd = self._tun_fd
        vni = self._vni
        for _ in range(BATCH):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                log.debug("geneve_recv_error", error=str(exc))
                continue
            index = by_ip.get(addr[0])
            if index is None:
                dropped["unknown_proxy"] += 1
                continue
            try:
                pkt = decode(view[:n])
            except GeneveError as exc:
                dropped[exc.reason] = dropped.get(exc.reason, 0) + 1
                continue
            if pkt.vni != vni:
                dropped["unknown_vni"] += 1
                continue
            inner = pkt.inner
            route = routes.get(bytes(inner[16:20]))
            if route is None:
                dropped["unknown_sandbox"] += 1
                continue
            if pkt.job.job_id != route.job_id:
                dropped["job_mismatch"] += 1
                continue
            vnet = None
            if pkt.options:
                try:
                    vnet = offload_vnet_header(pkt.options, inner)
                except GeneveError:
                    dropped[OFFLOAD_REASON] += 1
                    continue
                if vnet is not None and not offload:
                    dropped["offload_disabled"] += 1
                    continue
            try:
                if offload:
                    writev(fd, [NO_VNET_HDR if vnet is None else vnet, inner])
                    if vnet is not None and vnet[1] != VNET_GSO_NONE:
                        self.super_to_tun += 1
                else:
                    write(fd, inner)
            except OSError:
                dropped["tun_write_failed"] += 1
                continue
            rx_packets[index] += 1
            rx_bytes[index] += len(inner)


class AgentCollector(Collector):
    """Every agent metric, read from the components at scrape time."""

    def __init__(
        self,
        datapath: Datapath,
        *,
        proxy_up: Callable[[], Mapping[str, bool]],
        tier1_totals: Callable[[], Mapping[Reason, Count]] | None,
        sandboxes: Callable[[], int],
        tier1_by_sandbox: Callable[[], Mapping[Sandbox, Mapping[Reason, Count]]] | None = None,
    ) -> None:
        self._dp = datapath
        self._proxy_up = proxy_up
        self._tier1_totals = tier1_totals
        self._sandboxes = sandboxes
        self._tier1_by_sandbox = tier1_by_sandbox

    def describe(self) -> Sequence[object]:
        return []  # dynamic: do not collect at registration time

    def collect(self) -> Iterator[Metric]:
        dp = self._dp
        packets = CounterMetricFamily(
            "egressd_tunnel_packets",
            "GENEVE packets to and from proxies",
            labels=["proxy", "direction"],
        )
        octets = CounterMetricFamily(
            "egressd_tunnel_bytes",
            "Inner bytes tunnelled to and from proxies",
            labels=["proxy", "direction"],
        )
        try:
            kernel = dp.kernel_counters()
        except (EgressdError, OSError) as exc:  # a scrape must not fail on a map read
            log.warning("kernel_counters_failed", error=str(exc))
            kernel = NO_KERNEL_COUNTERS
        for i, name in enumerate(dp.proxy_names):
            k_tx_p, k_tx_b, k_rx_p, k_rx_b = kernel.per_proxy.get(i, (0, 0, 0, 0))
            packets.add_metric([name, "tx"], dp.tx_packets[i] + k_tx_p)
            packets.add_metric([name, "rx"], dp.rx_packets[i] + k_rx_p)
            octets.add_metric([name, "tx"], dp.tx_bytes[i] + k_tx_b)
            octets.add_metric([name, "rx"], dp.rx_bytes[i] + k_rx_b)
        yield packets
        yield octets
        dropped = CounterMetricFamily(
            "egressd_tunnel_dropped", "Packets the agent's data path dropped", labels=["reason"]
        )
        drops = dict(dp.dropped)
        for reason, value in kernel.dropped.items():
            drops[reason] = drops.get(reason, 0) + value
        for reason, value in sorted(drops.items()):
            dropped.add_metric([reason], value)
        yield dropped
        supers = CounterMetricFamily(
            "egressd_tun_superpackets",
            "GSO super-packets (TUN offload) written to or read from the TUN",
            labels=["direction"],
        )
        supers.add_metric(["to_tun"], dp.super_to_tun)
        supers.add_metric(["from_tun"], dp.super_from_tun)
        yield supers
        up = GaugeMetricFamily("egressd_proxy_up", "1 when the proxy is healthy", labels=["proxy"])
        states = self._proxy_up()
        for name in dp.active_proxies:
            up.add_metric([name], 1.0 if states.get(name) else 0.0)
        yield up
        yield GaugeMetricFamily(
            "egressd_sandboxes", "Sandboxes registered on this node", value=self._sandboxes()
        )
        yield GaugeMetricFamily(
            "egressd_agent_flows", "Flows in the agent's flow cache", value=dp.flow_count
        )
        if self._tier1_totals is not None:
            t1_packets = CounterMetricFamily(
                "egressd_tier1_packets",
                "Frames tier 1 handled, by verdict and reason",
                labels=["verdict", "reason"],
            )
            t1_bytes = CounterMetricFamily(
                "egressd_tier1_bytes",
                "Bytes tier 1 handled, by verdict and reason",
                labels=["verdict", "reason"],
            )
            try:
                totals = self._tier1_totals()
            except (Tier1Error, OSError) as exc:  # a scrape must not fail on a map read
                log.warning("tier1_counters_failed", error=str(exc))
                totals = {}
            for reason in Reason:
                count = totals.get(reason, Count(0, 0))
                t1_packets.add_metric([reason.verdict.value, reason.value], count.packets)
                t1_bytes.add_metric([reason.verdict.value, reason.value], count.bytes)
            yield t1_packets
            yield t1_bytes
        if self._tier1_by_sandbox is not None:
            yield _tier1_sandbox_family(self._tier1_by_sandbox)


def _tier1_sandbox_family(
    read: Callable[[], Mapping[Sandbox, Mapping[Reason, Count]]],
) -> CounterMetricFamily:
    # Per sandbox, only the reasons that counted (bounded by sandboxes x reasons):
    # a load test reads its attacker's drops here, e.g. reason="syn_rate_limit".
    family = CounterMetricFamily(
        "egressd_tier1_sandbox_packets",
        "Frames tier 1 handled per registered sandbox, by verdict and reason",
        labels=["sandbox_id", "job_id", "verdict", "reason"],
    )
    try:
        per_sandbox = read()
    except (Tier1Error, OSError) as exc:  # a scrape must not fail on a map read
        log.warning("tier1_counters_failed", error=str(exc))
        per_sandbox = {}
    for sandbox, counts in per_sandbox.items():
        for reason, count in sorted(counts.items(), key=lambda item: item[0].code):
            labels = [sandbox.sandbox_id, str(sandbox.job_id), reason.verdict.value, reason.value]
            family.add_metric(labels, count.packets)
    return family
