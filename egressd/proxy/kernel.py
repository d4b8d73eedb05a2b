"""The proxy's kernel data path (proxy config ``"datapath": "kernel"``): `bpf/proxy.c`
loaded, attached and kept in step with the proxy's verified policies and node registry.

* `ProxyKernel` is the I/O edge (`egressd.ebpf.build`, `egressd.ebpf.tc` and
  `egressd.ebpf.loaded.Loaded`, as the node's tier 1 and data path): build, mount a bpffs of its own
  on ``state_dir/bpffs``, ``bpftool prog loadall`` (both programs, maps pinned), check
  every map's shape against `egressd.proxy.kernel_maps`, write px_config, attach
  ``px_ingress`` to the underlay's clsact ingress and ``px_egress`` to the TUN's clsact
  egress (rtnetlink, in the calling thread's network namespace). `close` detaches,
  unpins and unmounts: nothing is left behind.
* `KernelDatapath` is the control loop around it: the tunnel's slow path calls
  `accepted` for every datagram it accepted (the job's entries are programmed and the
  flow recorded, so the flow's next packet takes the fast path and its return traffic
  is encapsulated in the kernel); the policy store's listeners call it on a replaced or
  revoked policy; and every `SYNC_INTERVAL_S` it re-derives what the maps should hold
  (`kernel_maps.desired_jobs`, `desired_nodes`) from the registry and from
  `PolicyStore.cached` (which also schedules the revalidations the userspace path
  scheduled per packet) and writes the difference. It also moves the kernel's
  counters into the proxy's metrics and is the `FlowLookup` tier 2 uses: one px_flows
  lookup per accepted connection or DNS query. A slow-path map write that fails is
  counted (``egressd_kernel_map_write_failures_total{reason}``) and logged at most once
  per (job, reason) per `FAILURE_LOG_INTERVAL_S` (`LogThrottle`), with how many were
  suppressed: a failing map cannot flood the log at the packet rate.

Only the current digest of a job is in px_jobs: a datagram with another digest goes the
slow path, where `egressd.proxy.digests` decides it exactly as in the userspace path.
Not thread-safe: one event loop owns it (the map writes are single syscalls).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from importlib import resources
from pathlib import Path
from typing import Final, Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter
from pyroute2 import Ethtool, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.loaded import Loaded
from egressd.errors import EgressdError
from egressd.policy.jws import VerifiedPolicy
from egressd.proxy import kernel_maps as km
from egressd.proxy.context import FlowInfo
from egressd.proxy.registry import NodeEntry

IPv4Address = ipaddress.IPv4Address

# Package data: in a checkout egressd/proxy/bpf/ links to bpf/, a wheel carries copies;
# clang finds geneve.h beside proxy.c.
DEFAULT_SOURCE: Final = Path(str(resources.files("egressd.proxy").joinpath("bpf", "proxy.c")))
INGRESS_PROG: Final = "px_ingress"
EGRESS_PROG: Final = "px_egress"
FILTER_NAME: Final = "egressd-proxy"
#: skb->mark of a decapsulated packet; nftables TPROXYs on it (`NftSpec.decap_mark`).
DECAP_MARK: Final = 0x2
SYNC_INTERVAL_S: Final = 1.0
FAILURE_LOG_INTERVAL_S: Final = 10.0
#: The TUN's largest GSO super-packet: px_egress adds 64 bytes and an IPv4 packet ends at
#: 65535 (the kernel's default, 65536, would make the largest ones unencapsulable).
TUN_GSO_MAX_SIZE: Final = 65535 - 64

log = structlog.get_logger("egressd.proxy.kernel")


class KernelError(EgressdError):
    """The kernel data path failed: tool_missing, build_failed, mount_failed, load_failed,
    abi_mismatch, attach_failed, detach_failed, map_failed, not_loaded, no_such_link."""


class ProxyKernel(Loaded[KernelError]):
    """`bpf/proxy.c` on one proxy host (see the module docstring)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        underlay_ifname: str,
        tun_ifname: str,
        underlay: IPv4Address,
        port: int,
        vni: int,
        mark: int = DECAP_MARK,
        source: Path = DEFAULT_SOURCE,
        cache_dir: Path | None = None,
        keep_tx_checksum: bool = False,
    ) -> None:
        super().__init__(
            state_dir=state_dir,
            pin_name="bpffs",
            source=source,
            deps=(source.with_name("geneve.h"), source.with_name("px_flows.h")),
            cache_dir=cache_dir,
            error=KernelError,
        )
        self.underlay_ifname = underlay_ifname
        self.tun_ifname = tun_ifname
        self.underlay = underlay
        self.port = port
        self.vni = vni
        self.mark = mark
        #: Every node decapsulates in the kernel (config ``nodes_decap_in_kernel``): partial
        #: inner checksums are fine there, so the underlay's offload (and TSO) stays as it is.
        self.keep_tx_checksum = keep_tx_checksum
        self._attached: list[tuple[str, int]] = []  # (ifname, clsact parent)
        self._saved_csum: tuple[str, ...] = ()  # checksum features turned off at load
        self._saved_gso: int | None = None  # the TUN's gso_max_size before load
        # Tier 2's px_flows reader: its buffers are this object's, used from one event loop.
        self._flow_reader: km.FlowReader | None = None

    # -- lifecycle ----------------------------------------------------------

    def load(self) -> None:
        """Build if needed, mount the bpffs, load and pin both programs, write px_config,
        attach. Pins left by an earlier proxy that died are replaced."""
        if self.loaded:
            return
        with self._loading((INGRESS_PROG, EGRESS_PROG), km.MAPS, single=False):
            underlay_index = self._ifindex(self.underlay_ifname)
            self._map_update(
                "px_config",
                km.U32.pack(0),
                km.pack_config(
                    underlay=self.underlay,
                    port=self.port,
                    vni=self.vni,
                    mark=self.mark,
                    ifindex=underlay_index,
                ),
            )
            if not self.keep_tx_checksum:
                self._saved_csum = _set_tx_checksum(self.underlay_ifname, False)
            self._saved_gso = _set_gso_max_size(self.tun_ifname, TUN_GSO_MAX_SIZE)
            self._attach(self.underlay_ifname, tc.INGRESS, INGRESS_PROG)
            self._attach(self.tun_ifname, tc.EGRESS, EGRESS_PROG)

    def _unwind(self) -> list[EgressdError]:
        """`close`: detach, give the devices their offload settings back."""
        errors: list[EgressdError] = []
        for ifname, parent in reversed(self._attached):
            try:
                self._detach(ifname, parent)
            except KernelError as exc:
                errors.append(exc)
        self._attached.clear()
        if self._saved_gso is not None:
            try:
                _set_gso_max_size(self.tun_ifname, self._saved_gso)
                self._saved_gso = None
            except KernelError as exc:
                errors.append(exc)
        if self._saved_csum:
            try:
                _set_tx_checksum(self.underlay_ifname, True, only=self._saved_csum)
                self._saved_csum = ()
            except KernelError as exc:
                errors.append(exc)
        return errors

    # -- maps -----------------------------------------------------------------

    def write(self, name: str, key: bytes, value: bytes) -> None:
        self._map_update(name, key, value)

    def delete(self, name: str, key: bytes) -> None:
        self._map_delete(name, key)

    def read(self, name: str, key: bytes) -> bytes | None:
        return self._map_lookup(name, key, km.MAP_SIZES[name].value_size)

    def entries(self, name: str) -> dict[bytes, bytes]:
        """Every entry of a (non-per-CPU) map."""
        spec = km.MAP_SIZES[name]
        try:
            keys = list(bpf.map_keys(self._fd(name), spec.key_size))
            out = {}
            for key in keys:
                raw = bpf.map_lookup(self._fd(name), key, spec.value_size)
                if raw is not None:
                    out[key] = raw
            return out
        except OSError as exc:
            raise KernelError("map_failed", f"entries of {name}: {exc.strerror}") from exc

    def flow(self, src: int, sport: int, dst: int, dport: int, proto: int) -> km.KernelFlow | None:
        """The px_flows entry of a sandbox -> internet 5-tuple (addresses as ints)."""
        reader = self._flows()
        raw = self._read_flow(reader, src, sport, dst, dport, proto)
        return None if raw is None else reader.flow(raw)

    def flow_info(
        self,
        src: int,
        sport: int,
        dst: int,
        dport: int,
        proto: int,
        node_name: Callable[[IPv4Address], str | None],
    ) -> FlowInfo | None:
        """`flow` as tier 2 wants it (`km.FlowReader.info`): None also when `node_name`
        does not know the flow's node. Raises `KernelError` as `flow` does."""
        reader = self._flows()
        raw = self._read_flow(reader, src, sport, dst, dport, proto)
        return None if raw is None else reader.info(raw, node_name)

    def _flows(self) -> km.FlowReader:
        """The px_flows reader of the current fd (made again when a reload changed it)."""
        fd = self._fd("px_flows")
        reader = self._flow_reader
        if reader is None or reader.fd != fd:
            reader = self._flow_reader = km.FlowReader(fd)
        return reader

    @staticmethod
    def _read_flow(
        reader: km.FlowReader, src: int, sport: int, dst: int, dport: int, proto: int
    ) -> bytes | None:
        try:
            return reader.read(src, sport, dst, dport, proto)
        except OSError as exc:  # as `Loaded._map_lookup` reports it
            raise KernelError("map_failed", f"lookup px_flows: {exc.strerror}") from exc

    def stats(self) -> dict[km.Stat, int]:
        return self._counters("px_stats", km.Stat)

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _ifindex(ifname: str) -> int:
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=ifname)
        except (NetlinkError, OSError) as exc:
            raise KernelError("no_such_link", f"{ifname}: {exc}") from exc
        if not found:
            raise KernelError("no_such_link", ifname)
        return int(found[0])

    def _attach(self, ifname: str, parent: int, prog: str) -> None:
        self._ebpf(tc.attach, ifname, self._prog_fd(prog), name=FILTER_NAME, parent=parent)
        self._attached.append((ifname, parent))

    def _detach(self, ifname: str, parent: int) -> None:
        self._ebpf(tc.detach, ifname, parent=parent)


_TX_CSUM_FEATURES: Final = ("tx-checksum-ip-generic", "tx-checksum-ipv4")


def _set_tx_checksum(ifname: str, enable: bool, only: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Turn the underlay's transmit checksum offload off (or back on); the features changed.

    Why: the proxy's TCP stack leaves every checksum partial (CHECKSUM_PARTIAL), to be
    finished by the device or by `skb_checksum_help` just before it; px_egress sees the
    packet before that, encapsulates it and redirects it to the underlay. A device that
    offloads checksums (a veth, as in the local fleet) passes it on unfinished, and a node
    that reads the inner packet from a UDP socket (today's userspace agent) gets a wrong
    TCP checksum. With offload off the kernel finishes the inner checksum (csum_start
    still points at it) on the way out. A NIC with UDP-tunnel checksum offload would not
    need this; it costs a software checksum per packet, and TSO goes off with it (every
    super-packet is segmented in software). Skipped when every node decapsulates in the
    kernel (`ProxyKernel.keep_tx_checksum`).
    """
    try:
        with contextlib.closing(Ethtool()) as tool:
            features = tool.get_features(ifname)
            names = only or tuple(
                n
                for n in _TX_CSUM_FEATURES
                if n in features.features and features.features[n].enable
            )
            for name in names:
                features.features[name].enable = enable
            if names:
                tool.set_features(ifname, features)
            return names
    except (OSError, NetlinkError, KeyError) as exc:
        raise KernelError("attach_failed", f"{ifname}: tx checksum offload: {exc}") from exc


def _set_gso_max_size(ifname: str, size: int) -> int | None:
    """Set the device's gso_max_size; its previous value (None: the device is gone)."""
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return None
            (link,) = ipr.get_links(found[0])
            before = int(link.get_attr("IFLA_GSO_MAX_SIZE"))
            ipr.link("set", index=found[0], gso_max_size=size)
            return before
    except (NetlinkError, OSError, TypeError) as exc:
        raise KernelError("attach_failed", f"{ifname}: gso_max_size {size}: {exc}") from exc


def ifname_of(address: IPv4Address) -> str:
    """The interface holding `address` in this network namespace (the underlay)."""
    try:
        with IPRoute() as ipr:
            for entry in ipr.get_addr(family=2):
                if entry.get_attr("IFA_ADDRESS") == str(address):
                    links = ipr.get_links(entry["index"])
                    return str(links[0].get_attr("IFLA_IFNAME"))
    except (NetlinkError, OSError) as exc:
        raise KernelError("no_such_link", f"the interface of {address}: {exc}") from exc
    raise KernelError("no_such_link", f"no interface holds {address}")


# ---------------------------------------------------------------------------
# The control loop.


_K = TypeVar("_K", bound=Hashable)


class LogThrottle(Generic[_K]):
    """At most one log line per key per `interval_s`; what it holds back is counted.

    `admit(key, now)`: None (hold it back, counted) or how many were held back since the
    key's last admitted line (log it with that). `flush(now)`: {key: count held back} of
    the keys whose interval has passed (one summary line each); keys with nothing held
    back and a passed interval are forgotten, so the table stays as small as the set of
    keys failing within one interval.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._keys: dict[_K, tuple[float, int]] = {}  # key: (logged at, held back)

    def admit(self, key: _K, now: float) -> int | None:
        state = self._keys.get(key)
        if state is not None and now - state[0] < self.interval_s:
            self._keys[key] = (state[0], state[1] + 1)
            return None
        self._keys[key] = (now, 0)
        return 0 if state is None else state[1]

    def flush(self, now: float) -> dict[_K, int]:
        out = {}
        for key, (at, held) in list(self._keys.items()):
            if now - at < self.interval_s:
                continue
            if held:
                out[key] = held
                self._keys[key] = (now, 0)
            else:
                del self._keys[key]
        return out


def node_facts(nodes: Iterable[NodeEntry]) -> list[km.NodeFacts]:
    return [km.NodeFacts(n.name, n.underlay, n.sandbox_cidr) for n in nodes]


def job_facts(job_id: uuid.UUID, verified: VerifiedPolicy) -> km.JobFacts:
    policy = verified.policy
    exp = float(policy.exp) if policy.exp is not None else None
    return km.JobFacts(job_id, verified.digest, frozenset(policy.nodes), exp)


class KernelDatapath:
    """Keeps `ProxyKernel`'s maps in step (see the module docstring).

    `nodes()` gives the registry's current nodes, `cached(job_id)` the proxy's verified
    policy (`PolicyStore.cached`), `count(received, drops, tun_drops)` adds the kernel's
    counters to the proxy's metrics (`GeneveTunnel.add_kernel_counts`).
    """

    def __init__(
        self,
        kernel: ProxyKernel,
        *,
        nodes: Callable[[], Iterable[NodeEntry]],
        cached: Callable[[uuid.UUID], VerifiedPolicy | None],
        count: Callable[[int, dict[str, int], dict[str, int]], None] | None = None,
        wall: Callable[[], float] = time.time,
        interval_s: float = SYNC_INTERVAL_S,
        metrics: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        failure_log_interval_s: float = FAILURE_LOG_INTERVAL_S,
    ) -> None:
        self.kernel = kernel
        self._nodes = nodes
        self._cached = cached
        self._count = count
        self._wall = wall
        self._interval_s = interval_s
        self._boot_offset = km.boot_offset(
            time.clock_gettime_ns(time.CLOCK_REALTIME), time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        )
        self._jobs: set[uuid.UUID] = set()
        # What this object wrote (it is the maps' only writer besides px_flows' kernel side).
        self._written: dict[str, dict[bytes, bytes]] = {
            "px_nodes": {},
            "px_sandboxes": {},
            "px_jobs": {},
            "px_bound": {},
        }
        self._names: dict[IPv4Address, str] = {}
        self._seen_stats: dict[km.Stat, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._paths: dict[km.Stat, Counter] = {}
        self._clock = clock
        self._failure_log: LogThrottle[tuple[uuid.UUID, str]] = LogThrottle(failure_log_interval_s)
        self._failures: Counter | None = None
        if metrics is not None:
            self._failures = Counter(
                "egressd_kernel_map_write_failures_total",
                "Slow-path kernel map writes that failed (the packet still went on through the "
                "TUN, the flow's next packets take the slow path again), by reason",
                ["reason"],
                registry=metrics,
            )
            paths = Counter(
                "egressd_kernel_packets_total",
                "Packets the kernel data path handled, by path: fast (decapsulated), slow "
                "(passed up to the Python endpoint), return (encapsulated), return_pass (left "
                "to the Python return path)",
                ["path"],
                registry=metrics,
            )
            self._paths = {
                km.Stat.fast: paths.labels("fast"),
                km.Stat.slow: paths.labels("slow"),
                km.Stat.ret: paths.labels("return"),
                km.Stat.return_pass: paths.labels("return_pass"),
            }

    # -- the slow path and the policy store --------------------------------------

    def accepted(
        self,
        job_id: uuid.UUID,
        digest: bytes,
        node: IPv4Address,
        flow: tuple[int, int, int, int, int],
    ) -> None:
        """The Python endpoint accepted a datagram: record its flow, program its job.

        Called per slow-path datagram, so a failure is counted and its log throttled
        (`LogThrottle`), not raised: the datagram goes on through the TUN either way."""
        try:
            self.kernel.write(
                "px_flows", km.pack_flow_key(*flow), km.pack_flow(job_id, digest, node)
            )
            if job_id not in self._jobs:
                self._jobs.add(job_id)
                self.sync()
        except KernelError as exc:
            self._write_failed(job_id, exc)

    def _write_failed(self, job_id: uuid.UUID, exc: KernelError) -> None:
        if self._failures is not None:
            self._failures.labels(exc.reason).inc()
        suppressed = self._failure_log.admit((job_id, exc.reason), self._clock())
        if suppressed is not None:
            log.warning(
                "kernel_program_failed",
                job_id=str(job_id),
                reason=exc.reason,
                detail=exc.detail,
                suppressed=suppressed,
            )

    def flush_failure_log(self) -> None:
        """One summary line per (job, reason) whose failures were held back last interval."""
        for (job_id, reason), count in self._failure_log.flush(self._clock()).items():
            log.warning(
                "kernel_program_failed", job_id=str(job_id), reason=reason, suppressed=count
            )

    def policy_changed(
        self, job_id: uuid.UUID, _previous: VerifiedPolicy | None, _current: VerifiedPolicy | None
    ) -> None:
        """A `PolicyStore` listener: a replaced or revoked policy is reprogrammed at once."""
        if job_id in self._jobs:
            self.sync()

    # -- FlowLookup (tier 2) ----------------------------------------------------

    def lookup(
        self,
        src: int | str | IPv4Address,
        sport: int,
        dst: int | str | IPv4Address,
        dport: int,
        proto: int,
    ) -> FlowInfo | None:
        """The flow the tc program (or the slow path) recorded: one px_flows lookup."""
        try:
            # None also when the node left the registry: its flows no longer count.
            return self.kernel.flow_info(
                km.ip_int(src), sport, km.ip_int(dst), dport, proto, self._names.get
            )
        except KernelError as exc:
            log.warning("flow_lookup_failed", reason=exc.reason, detail=exc.detail)
            return None

    # -- the sync -----------------------------------------------------------------

    def sync(self) -> None:
        """Write the difference between what the maps hold and what they should."""
        nodes = node_facts(self._nodes())
        self._names = {n.underlay: n.name for n in nodes}
        by_underlay, by_cidr = km.desired_nodes(nodes)
        facts = []
        for job_id in list(self._jobs):
            verified = self._cached(job_id)
            if verified is None:
                self._jobs.discard(job_id)
            else:
                facts.append(job_facts(job_id, verified))
        jobs, bound = km.desired_jobs(
            facts, nodes, wall_now=self._wall(), boot_offset_ns=self._boot_offset
        )
        # Nodes and bindings before the job entries that make them matter; removals after.
        self._apply("px_nodes", by_underlay)
        self._apply("px_sandboxes", by_cidr)
        self._apply("px_bound", bound, deletes=False)
        self._apply("px_jobs", jobs)
        self._apply("px_bound", bound)

    def _apply(self, name: str, wanted: dict[bytes, bytes], *, deletes: bool = True) -> None:
        written = self._written[name]
        change = km.diff(written, wanted)
        for key, value in change.put.items():
            self.kernel.write(name, key, value)
            written[key] = value
        if deletes:
            for key in change.delete:
                self.kernel.delete(name, key)
                written.pop(key, None)

    def export_counts(self) -> None:
        """Add what the kernel counted since the last call to the proxy's metrics."""
        now = self.kernel.stats()
        delta = {s: n - self._seen_stats.get(s, 0) for s, n in now.items()}
        self._seen_stats = now
        for stat, child in self._paths.items():
            if delta[stat]:
                child.inc(delta[stat])
        if self._count is None:
            return
        drops = {s.name: d for s, d in delta.items() if s < km.DROP_COUNT and d}
        received = sum(drops.values()) + delta[km.Stat.fast]
        failed = delta[km.Stat.return_failed]
        tun_drops = {"encap_failed": failed} if failed else {}
        if received or tun_drops:
            self._count(received, drops, tun_drops)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.flush_failure_log()
            try:
                self.sync()
                self.export_counts()
            except KernelError as exc:
                log.error("kernel_sync_failed", reason=exc.reason, detail=exc.detail)

    def start(self) -> asyncio.Task[None]:
        self.sync()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="proxy-kernel-sync"
            )
        return self._task

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(KernelError):
            self.export_counts()
