"""The proxy's packet I/O: GENEVE in from nodes -> TUN, TUN -> GENEVE back to nodes.

Receive path (DESIGN.md, packet path step 5): one non-blocking UDP socket
bound to `(underlay, 6081)`, read with `loop.add_reader`; each wake-up reads
datagrams with `recvfrom_into` into one preallocated buffer until `EAGAIN`
(at most `batch` per wake-up, so the TUN side gets its turn). Each datagram
goes through `endpoint.validate`; an accepted one records its flow and its
inner packet is written to the TUN (`gnv0`), where nftables TPROXYs it to
tier 2. Counters are updated once per batch, not once per packet.

A datagram for a job without a cached policy is copied into a small
per-job queue (`pending_per_job` datagrams, `pending_jobs` jobs at once);
one task per job fetches the policy (`PolicyStore.get`, single-flight) and
validates the held datagrams again. Unavailable: every held datagram is
dropped with the `PolicyUnavailable` reason. Past the bounds: dropped as
`policy_queue_full` (a SYN is retransmitted anyway). A job in the policy
store's negative cache is dropped at once, without queueing.

Digests: an accepted datagram whose digest is not the cached policy's is
decided by `PolicyStore.digest_state` (`egressd.proxy.digests`): a replaced
policy's digest passes during `digest_grace_s` (counted in
`egressd_geneve_digest_grace_total`), then drops as `stale_digest`; an
unknown one passes, is counted in `egressd_geneve_digest_mismatch_total` and
asks for a refetch.

Return path: the kernel routes the sandbox supernet to `gnv0`; the TUN
reader reads each packet into the same buffer right after a 36-byte gap,
finds the node by the destination's sandbox CIDR and the flow by the
reversed 5-tuple (`FlowTable.reverse`), copies that flow's GENEVE header
(job id + digest as the node sent them, cached on the flow) into the gap and
sends header + packet to the node's underlay address, port 6081, in one
`sendto`. ICMP errors the kernel generates for a sandbox packet (port
unreachable, fragmentation needed, time exceeded) go back under the flow of
the packet they quote.

A packet without a flow is dropped (`no_flow`), TCP resets included. The
alternative, sending such packets with a zero job id, would make every agent
accept packets that no verified flow stands behind; a reset for a flow the
proxy never saw (or forgot after `flow_idle_s` of silence) is not worth that
hole: the sandbox's TCP stack times the connection out instead.

Offload (`offload=True`, the TUN opened with ``IFF_VNET_HDR`` and
``TUN_F_CSUM | TUN_F_TSO4``): every TUN read and write carries a 10-byte
virtio-net header. The return path reads TCP super-packets of up to 64 KiB
(the proxy's own TCP stack sends them, segmented later by the node's kernel)
and packets with a partial checksum, and sends each as one GENEVE datagram
with the offload option after the job option (the kernel IP-fragments the
outer datagram for the underlay; the node's kernel reassembles it). The
receive path writes what `validate` accepted with the header
`Accepted.vnet` built from that option (or an all-zero one). Super-packets
are counted in `egressd_tun_superpackets_total{direction}` (``to_tun``,
``from_tun``). Without offload a datagram with the option is dropped
(`offload_disabled`).

Drops are counted by reason: `egressd_geneve_rx_dropped_total{reason}` on the
receive path (every reason pre-registered) and
`egressd_tun_tx_dropped_total{reason}` for packets the kernel sent to
`gnv0` that could not be returned. Malformed input never raises past the
loop: `validate` returns a value for any bytes, and the return path checks
lengths before every unpack.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter

from egressd.geneve.codec import (
    HEADER_LEN,
    OFFLOAD_OPTION_LEN,
    PREFIX_LEN,
    VNET_GSO_NONE,
    VNET_GSO_TCPV4,
    VNET_NEEDS_CSUM,
    header_for,
    pack_offload_option,
)
from egressd.net.tun import NO_VNET_HDR, VNET_HDR, VNET_HDR_LEN, Tun
from egressd.proxy.context import FlowInfo, PolicyUnavailable
from egressd.proxy.digests import GRACE, STALE, UNKNOWN
from egressd.proxy.endpoint import ENDPOINT_REASONS, Accepted, Dropped, validate
from egressd.proxy.flows import Flow, FlowTable
from egressd.proxy.kernel import FAILURE_LOG_INTERVAL_S, LogThrottle
from egressd.proxy.kernel_maps import KERNEL_ONLY_REASONS
from egressd.proxy.policies import PolicyStore
from egressd.proxy.registry import NodeRegistry, NodeView

POLICY_REASONS = ("policy_missing", "policy_unverifiable", "policy_expired", "control_unreachable")
RX_DROP_REASONS: tuple[str, ...] = (
    *ENDPOINT_REASONS,
    *POLICY_REASONS,
    "policy_queue_full",
    "stale_digest",
    "flow_table_full",
    "tun_write_failed",
    # The kernel data path's own (egressd.proxy.kernel_maps): the outer header, which
    # ip_rcv checks before this socket sees anything, and a failed decapsulation.
    *KERNEL_ONLY_REASONS,
)
TUN_DROP_REASONS: tuple[str, ...] = (
    "not_ipv4",
    "malformed",
    "no_node",
    "proto_not_allowed",
    "no_flow",
    "unsupported_gso",
    "send_buffer_full",
    "send_failed",
    "read_failed",
    "encap_failed",
)

DEFAULT_BATCH = 256
RX_BUFFER_BYTES = 65536
OFFLOAD_PREFIX_LEN = PREFIX_LEN + OFFLOAD_OPTION_LEN  # 48
SOCKET_BUFFER_BYTES = 8 * 1024 * 1024
MAX_INFO_CACHE = 65536

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
ICMP_ERROR_TYPES = frozenset({3, 11, 12})  # unreachable, time exceeded, parameter problem

_IPV4 = struct.Struct("!B5xHxB2xII")  # ver_ihl, frag, proto, src, dst
_PORTS = struct.Struct("!HH")

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

log = structlog.get_logger("egressd.proxy.tunnel")

#: (job id, digest, node underlay, sandbox -> internet 5-tuple of ints) of an accepted datagram.
#: It must not raise: `KernelDatapath.accepted` counts and throttles its own map write
#: failures. The tunnel still guards the call (a bug there must not cost the datagram) and
#: logs what escapes through a `LogThrottle`, one line per exception type per interval.
AcceptHook = Callable[
    [uuid.UUID, bytes, ipaddress.IPv4Address, tuple[int, int, int, int, int]], None
]


@dataclass(frozen=True, slots=True)
class TunnelLimits:
    batch: int = DEFAULT_BATCH
    pending_per_job: int = 16
    pending_jobs: int = 1024


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rx_packets = Counter(
            "egressd_geneve_rx_packets_total", "GENEVE datagrams received", registry=registry
        )
        self.rx_bytes = Counter(
            "egressd_geneve_rx_bytes_total", "GENEVE datagram bytes received", registry=registry
        )
        rx_dropped = Counter(
            "egressd_geneve_rx_dropped_total",
            "GENEVE datagrams dropped, by reason",
            ["reason"],
            registry=registry,
        )
        self.rx_dropped = {reason: rx_dropped.labels(reason) for reason in RX_DROP_REASONS}
        self._rx_dropped = rx_dropped
        self.tun_written = Counter(
            "egressd_tun_rx_packets_total",
            "Inner packets written to the TUN (accepted GENEVE)",
            registry=registry,
        )
        self.tx_packets = Counter(
            "egressd_geneve_tx_packets_total",
            "GENEVE datagrams sent back to nodes",
            registry=registry,
        )
        self.tx_bytes = Counter(
            "egressd_geneve_tx_bytes_total", "GENEVE datagram bytes sent", registry=registry
        )
        tun_dropped = Counter(
            "egressd_tun_tx_dropped_total",
            "Packets the kernel sent to the TUN that were not returned to a node, by reason",
            ["reason"],
            registry=registry,
        )
        self.tun_dropped = {reason: tun_dropped.labels(reason) for reason in TUN_DROP_REASONS}
        superpackets = Counter(
            "egressd_tun_superpackets",
            "GSO super-packets (TUN offload) written to or read from the TUN",
            ["direction"],
            registry=registry,
        )
        self.super_to_tun = superpackets.labels("to_tun")
        self.super_from_tun = superpackets.labels("from_tun")
        self.digest_mismatch = Counter(
            "egressd_geneve_digest_mismatch_total",
            "Accepted datagrams with a policy digest the proxy does not know (it refetches)",
            registry=registry,
        )
        self.digest_grace = Counter(
            "egressd_geneve_digest_grace_total",
            "Accepted datagrams with the digest of a replaced policy, in its grace period",
            registry=registry,
        )

    def rx_drop(self, reason: str, count: int = 1) -> None:
        child = self.rx_dropped.get(reason)
        if child is None:  # a reason nobody pre-registered: still counted
            child = self.rx_dropped[reason] = self._rx_dropped.labels(reason)
        child.inc(count)


class GeneveTunnel:
    """GENEVE endpoint <-> TUN; see the module docstring."""

    def __init__(
        self,
        *,
        listen: tuple[str, int],
        vni: int,
        tun: Tun,
        nodes: NodeRegistry,
        policies: PolicyStore,
        flows: FlowTable,
        metrics: CollectorRegistry,
        limits: TunnelLimits = TunnelLimits(),
        clock: Callable[[], float] = time.monotonic,
        peer_port: int | None = None,
        offload: bool = False,
        on_accept: AcceptHook | None = None,
    ) -> None:
        """`peer_port`: the nodes' GENEVE port (default: the port we listen on, 6081).

        `on_accept`: the kernel data path's slow path (`KernelDatapath.accepted`), told
        of every datagram accepted here before its inner packet is written to the TUN.

        `offload`: `tun` was opened with a virtio-net header and offloads
        (see the module docstring); the nodes must be configured for it too.
        """
        if offload and not tun.vnet_hdr:
            raise ValueError("offload needs a TUN opened with vnet_hdr")
        self.listen = listen
        self._vni = vni
        self._tun = tun
        self._nodes = nodes
        self._policies = policies
        self._flows = flows
        self._limits = limits
        self._clock = clock
        self._m = _Metrics(metrics)
        self._peer_port = listen[1] if peer_port is None else peer_port
        self._offload = offload
        self._on_accept = on_accept
        self._hook_log: LogThrottle[str] = LogThrottle(FAILURE_LOG_INTERVAL_S)
        self._hook_held = 0  # failures `_hook_log` held back and no line has reported yet
        self._vnet_in = bytearray(VNET_HDR_LEN)
        self._sock: socket.socket | None = None
        self._tun_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rx_buf = bytearray(RX_BUFFER_BYTES)
        self._rx_view = memoryview(self._rx_buf)
        # Offload: [GENEVE header + job option | offload option | inner]; the
        # option is only sent when the packet needs it, so a plain packet is
        # sent from offset OFFLOAD_OPTION_LEN.
        head = OFFLOAD_PREFIX_LEN if offload else PREFIX_LEN
        self._tx_buf = bytearray(head + RX_BUFFER_BYTES)
        self._tx_view = memoryview(self._tx_buf)
        self._tx_inner = self._tx_view[head:]
        # (job id bytes, digest, node name) -> (FlowInfo, GENEVE header): one of each per job.
        self._infos: dict[tuple[bytes, bytes, str], tuple[FlowInfo, bytes]] = {}
        self._job_ids: dict[bytes, uuid.UUID] = {}
        self._pending: dict[uuid.UUID, list[tuple[bytes, str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._drops: dict[str, int] = {}

    @property
    def bound(self) -> tuple[str, int] | None:
        return self._sock.getsockname() if self._sock is not None else None

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Bind the GENEVE socket and register both readers on the running loop."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _grow_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF)
            _grow_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF)
            sock.bind(self.listen)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._tun_fd = self._tun.fd
        self._loop = loop
        loop.add_reader(sock.fileno(), self._on_geneve_readable)
        loop.add_reader(self._tun_fd, self._on_tun_readable)
        log.info("tunnel_started", listen=f"{self.listen[0]}:{self.listen[1]}", tun=self._tun.name)

    async def close(self) -> None:
        """Stop reading, close the socket, drop what is held for policies. Idempotent."""
        loop, self._loop = self._loop, None
        sock, self._sock = self._sock, None
        if loop is not None:
            if sock is not None:
                loop.remove_reader(sock.fileno())
            if self._tun_fd >= 0:
                loop.remove_reader(self._tun_fd)
        self._tun_fd = -1
        if sock is not None:
            sock.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pending.clear()

    # --- receive path --------------------------------------------------------------

    def _on_geneve_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recv = sock.recvfrom_into
        buf = self._rx_buf
        view = self._rx_view
        nodes = self._nodes.view
        vni = self._vni
        lookup = self._policies.cached
        job_ids = self._job_ids
        offload = self._offload
        drops = self._drops
        now = self._clock()
        received = 0
        nbytes = 0
        written = 0
        try:
            for _ in range(self._limits.batch):
                try:
                    n, addr = recv(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # e.g. ENOMEM; the next wake-up retries
                    log.warning("geneve_recv_failed", error=str(exc))
                    break
                received += 1
                nbytes += n
                result = validate(
                    view[:n],
                    addr[0],
                    nodes=nodes,
                    vni=vni,
                    policy_lookup=lookup,
                    job_ids=job_ids,
                    offload=offload,
                )
                if isinstance(result, Accepted):
                    written += self._forward(result, now)
                elif isinstance(result, Dropped):
                    reason = result.reason
                    drops[reason] = drops.get(reason, 0) + 1
                else:
                    self._hold(result.job_id, bytes(view[:n]), addr[0])
        finally:
            m = self._m
            if received:
                m.rx_packets.inc(received)
                m.rx_bytes.inc(nbytes)
            if written:
                m.tun_written.inc(written)
            if drops:
                self._flush_drops()
            if self._hook_held:
                self._flush_hook_log(now)

    def add_kernel_counts(
        self, received: int, drops: dict[str, int], tun_drops: dict[str, int]
    ) -> None:
        """Add what the kernel data path counted (datagrams it decided, drops by reason)."""
        if received:
            self._m.rx_packets.inc(received)
        for reason, count in drops.items():
            self._m.rx_drop(reason, count)
        for reason, count in tun_drops.items():
            self._m.tun_dropped[reason].inc(count)

    def _flush_drops(self) -> None:
        for reason, count in self._drops.items():
            self._m.rx_drop(reason, count)
        self._drops.clear()

    def _forward(self, acc: Accepted, now: float) -> int:
        """Record the flow and write the inner packet to the TUN; 1 if written."""
        job = acc.job
        key = (job.job_id, job.digest, acc.node.name)
        cached = self._infos.get(key)
        if cached is None:
            if len(self._infos) >= MAX_INFO_CACHE:
                self._infos.clear()
            cached = (FlowInfo(acc.job_id, job.digest, acc.node.name), header_for(self._vni, job))
            self._infos[key] = cached
        info, header = cached
        drops = self._drops
        if acc.digest_mismatch:
            state = self._policies.digest_state(acc.job_id, job.digest)
            if state == STALE:
                drops["stale_digest"] = drops.get("stale_digest", 0) + 1
                return 0
            if state == GRACE:
                self._m.digest_grace.inc()
            elif state == UNKNOWN:
                self._m.digest_mismatch.inc()
                self._policies.request_refresh(acc.job_id)
        if not self._flows.record(
            acc.src, acc.sport, acc.dst, acc.dport, acc.proto, info, now, header
        ):
            drops["flow_table_full"] = drops.get("flow_table_full", 0) + 1
            return 0
        if self._on_accept is not None:
            try:
                self._on_accept(
                    acc.job_id,
                    job.digest,
                    acc.node.underlay,
                    (acc.src, acc.sport, acc.dst, acc.dport, acc.proto),
                )
            except Exception as exc:  # noqa: BLE001 - a hook bug must not cost the datagram
                self._hook_failed(exc, now)
        try:
            if self._offload:
                vnet = acc.vnet
                os.writev(self._tun_fd, [NO_VNET_HDR if vnet is None else vnet, acc.inner])
                if vnet is not None and vnet[1] != VNET_GSO_NONE:
                    self._m.super_to_tun.inc()
            else:
                os.write(self._tun_fd, acc.inner)
        except OSError:
            drops["tun_write_failed"] = drops.get("tun_write_failed", 0) + 1
            return 0
        return 1

    def _hook_failed(self, exc: Exception, now: float) -> None:
        """A flood of datagrams may each fail the same way: one line per type per interval."""
        kind = type(exc).__name__
        suppressed = self._hook_log.admit(kind, now)
        if suppressed is None:
            self._hook_held += 1
            return
        self._hook_held -= suppressed
        log.error("accept_hook_failed", error=kind, detail=str(exc), suppressed=suppressed)

    def _flush_hook_log(self, now: float) -> None:
        """Summarise the failures held back once their interval passed (at a batch's end, so
        that a flood that stops still has its count logged by the next datagram's batch)."""
        for kind, count in self._hook_log.flush(now).items():
            self._hook_held -= count
            log.error("accept_hook_failed", error=kind, suppressed=count)

    def _hold(self, job_id: uuid.UUID, datagram: bytes, src_ip: str) -> None:
        drops = self._drops
        reason = self._policies.negative(job_id)
        if reason is not None:
            drops[reason] = drops.get(reason, 0) + 1
            return
        held = self._pending.get(job_id)
        if held is None:
            if len(self._pending) >= self._limits.pending_jobs or self._loop is None:
                drops["policy_queue_full"] = drops.get("policy_queue_full", 0) + 1
                return
            held = self._pending[job_id] = []
            task = self._loop.create_task(
                self._await_policy(job_id), name=f"proxy-tunnel-await-policy-{job_id}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(held) >= self._limits.pending_per_job:
            drops["policy_queue_full"] = drops.get("policy_queue_full", 0) + 1
            return
        held.append((datagram, src_ip))

    async def _await_policy(self, job_id: uuid.UUID) -> None:
        try:
            await self._policies.get(job_id)
            reason = None
        except PolicyUnavailable as exc:
            reason = exc.reason
        held = self._pending.pop(job_id, [])
        if not held or self._sock is None:
            return
        if reason is not None:
            self._m.rx_drop(reason, len(held))
            return
        nodes = self._nodes.view
        now = self._clock()
        written = 0
        drops = self._drops
        for datagram, src_ip in held:
            result = validate(
                datagram,
                src_ip,
                nodes=nodes,
                vni=self._vni,
                policy_lookup=self._policies.cached,
                job_ids=self._job_ids,
                offload=self._offload,
            )
            if isinstance(result, Accepted):
                written += self._forward(result, now)
            elif isinstance(result, Dropped):
                drops[result.reason] = drops.get(result.reason, 0) + 1
            else:  # verified a moment ago, unusable now (expired in between)
                drops["policy_expired"] = drops.get("policy_expired", 0) + 1
        if written:
            self._m.tun_written.inc(written)
        self._flush_drops()

    # --- return path ---------------------------------------------------------------

    def _on_tun_readable(self) -> None:
        if self._offload:
            self._on_tun_readable_offload()
            return
        sock = self._sock
        fd = self._tun_fd
        if sock is None or fd < 0:
            return
        inner = self._tx_inner
        view = self._tx_view
        send = sock.sendto
        nodes = self._nodes.view
        flows = self._flows
        port = self._peer_port
        drops = self._m.tun_dropped
        now = self._clock()
        sent = 0
        nbytes = 0
        dropped: dict[str, int] = {}
        try:
            for _ in range(self._limits.batch):
                try:
                    n = os.readv(fd, [inner])
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("tun_read_failed", error=str(exc))
                    dropped["read_failed"] = dropped.get("read_failed", 0) + 1
                    break
                if n == 0:
                    break
                reason, node_addr, header = self._route_back(inner, n, nodes, flows, now)
                if reason is not None:
                    dropped[reason] = dropped.get(reason, 0) + 1
                    continue
                view[:PREFIX_LEN] = header
                try:
                    send(view[: PREFIX_LEN + n], (node_addr, port))
                except BlockingIOError:
                    dropped["send_buffer_full"] = dropped.get("send_buffer_full", 0) + 1
                    continue
                except OSError:
                    dropped["send_failed"] = dropped.get("send_failed", 0) + 1
                    continue
                sent += 1
                nbytes += PREFIX_LEN + n
        finally:
            if sent:
                self._m.tx_packets.inc(sent)
                self._m.tx_bytes.inc(nbytes)
            for reason, count in dropped.items():
                drops[reason].inc(count)

    def _on_tun_readable_offload(self) -> None:
        """The return path with a virtio-net header in front of every packet read."""
        sock = self._sock
        fd = self._tun_fd
        if sock is None or fd < 0:
            return
        inner = self._tx_inner
        view = self._tx_view
        buf = self._tx_buf
        vnet = self._vnet_in
        target: list[bytearray | memoryview] = [vnet, inner]
        unpack_vnet = VNET_HDR.unpack
        send = sock.sendto
        nodes = self._nodes.view
        flows = self._flows
        port = self._peer_port
        drops = self._m.tun_dropped
        now = self._clock()
        sent = 0
        nbytes = 0
        supers = 0
        dropped: dict[str, int] = {}
        try:
            for _ in range(self._limits.batch):
                try:
                    n = os.readv(fd, target) - VNET_HDR_LEN
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("tun_read_failed", error=str(exc))
                    dropped["read_failed"] = dropped.get("read_failed", 0) + 1
                    break
                if n <= 0:
                    if n < 0:
                        dropped["malformed"] = dropped.get("malformed", 0) + 1
                        continue
                    break
                reason, node_addr, header = self._route_back(inner, n, nodes, flows, now)
                if reason is not None:
                    dropped[reason] = dropped.get(reason, 0) + 1
                    continue
                flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = unpack_vnet(vnet)
                flags &= VNET_NEEDS_CSUM  # DATA_VALID is for us, not for the node's kernel
                if gso_type == VNET_GSO_NONE and not flags:
                    start = OFFLOAD_OPTION_LEN
                    view[start:OFFLOAD_PREFIX_LEN] = header
                else:
                    if gso_type != VNET_GSO_NONE:
                        if gso_type != VNET_GSO_TCPV4:
                            dropped["unsupported_gso"] = dropped.get("unsupported_gso", 0) + 1
                            continue
                        supers += 1
                    start = 0
                    view[:PREFIX_LEN] = header
                    buf[0] = (
                        OFFLOAD_PREFIX_LEN - HEADER_LEN
                    ) // 4  # Opt Len: both options, in words
                    pack_offload_option(
                        buf, PREFIX_LEN, flags, gso_type, gso_size, csum_start, csum_offset
                    )
                try:
                    send(view[start : OFFLOAD_PREFIX_LEN + n], (node_addr, port))
                except BlockingIOError:
                    dropped["send_buffer_full"] = dropped.get("send_buffer_full", 0) + 1
                    continue
                except OSError:
                    dropped["send_failed"] = dropped.get("send_failed", 0) + 1
                    continue
                sent += 1
                nbytes += OFFLOAD_PREFIX_LEN - start + n
        finally:
            if sent:
                self._m.tx_packets.inc(sent)
                self._m.tx_bytes.inc(nbytes)
            if supers:
                self._m.super_from_tun.inc(supers)
            for reason, count in dropped.items():
                drops[reason].inc(count)

    @staticmethod
    def _route_back(
        pkt: memoryview, n: int, nodes: NodeView, flows: FlowTable, now: float
    ) -> tuple[str | None, str, bytes]:
        """(drop reason or None, node underlay address, GENEVE header) for one packet."""
        if n < 20:
            return "malformed", "", b""
        ver_ihl, _frag, proto, src, dst = _IPV4.unpack_from(pkt, 0)
        if ver_ihl >> 4 != 4:
            return "not_ipv4", "", b""
        ihl = (ver_ihl & 0x0F) << 2
        if ihl < 20 or n < ihl:
            return "malformed", "", b""
        node = nodes.node_for_sandbox(dst)
        if node is None:
            return "no_node", "", b""
        flow: Flow | None
        if proto == PROTO_TCP or proto == PROTO_UDP:
            if n < ihl + 4:
                return "malformed", "", b""
            sport, dport = _PORTS.unpack_from(pkt, ihl)
            flow = flows.reverse(src, sport, dst, dport, proto, now)
        elif proto == PROTO_ICMP and n >= ihl + 8 and pkt[ihl] in ICMP_ERROR_TYPES:
            flow = _quoted_flow(pkt, n, ihl + 8, dst, flows)
        else:
            return "proto_not_allowed", "", b""
        if flow is None:
            return "no_flow", "", b""
        header: bytes = flow.tag  # type: ignore[assignment]
        return None, node.underlay_str, header


def _quoted_flow(pkt: memoryview, n: int, q: int, dst: int, flows: FlowTable) -> Flow | None:
    """The flow of the sandbox packet that an ICMP error (to `dst`) quotes at offset `q`."""
    if n < q + 20:
        return None
    q_ver_ihl, _frag, q_proto, q_src, q_dst = _IPV4.unpack_from(pkt, q)
    q_ihl = (q_ver_ihl & 0x0F) << 2
    if q_ver_ihl >> 4 != 4 or q_ihl < 20 or q_src != dst or n < q + q_ihl + 4:
        return None
    if q_proto != PROTO_TCP and q_proto != PROTO_UDP:
        return None
    q_sport, q_dport = _PORTS.unpack_from(pkt, q + q_ihl)
    return flows.get(q_src, q_sport, q_dst, q_dport, q_proto)


def _grow_buffer(sock: socket.socket, force_opt: int, opt: int) -> None:
    """Ask for a large socket buffer (FORCE needs CAP_NET_ADMIN; fall back to the capped one)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, SOCKET_BUFFER_BYTES)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
