"""The node's kernel data path (agent config ``"datapath": "kernel"``): bpf/node.c.

`NodeKernel` builds, loads and pins bpf/node.c's two programs and their maps,
attaches ``node_underlay_ingress`` to the tc ingress of the node's underlay device
(the link holding the underlay address, in the calling thread's network namespace),
and programs the maps. ``node_encap`` is not attached anywhere: tier 1 tail-calls it
(`Tier1.set_forward` with `encap_fd`) for every frame it allows.

How, as tier 1 (`egressd.agent.tier1`) does it, with the same `egressd.ebpf.tc` and
`egressd.ebpf.loaded.Loaded` (fds, pins, cleanup): clang through
`egressd.ebpf.build.build_object` (rebuilt when node.c or geneve.h is newer);
``bpftool prog loadall`` into a bpffs of its own on ``STATE_DIR/bpffs-node`` (each
mount is its own instance: two agents never share maps); map shapes checked against
`egressd.agent.node_maps.MAPS`; the filter is a clsact ``bpf direct-action`` filter
of fixed priority and handle, created with "replace".

`close` detaches, unpins and unmounts: nothing is left (the programs go when their
last reference does; the tail-call slot in tier 1 is cleared by the data path first).

Not thread-safe: one `NodeKernel` per agent, used from one thread at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egressd.agent.node_maps import (
    COUNT,
    MAGLEV_SIZE,
    MAPS,
    MAX_PROXIES,
    REASONS,
    STATS,
    U32,
    MapSpec,
    NodeError,
    NodeReason,
    ProxySlot,
    pack_config,
    pack_maglev,
    pack_proxy,
    pack_sandbox,
    pack_sandbox_ip,
    sum_percpu,
    unpack_flow,
    unpack_maglev,
    unpack_proxy,
)
from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.loaded import Loaded
from egressd.errors import EgressdError

IPv4Address = ipaddress.IPv4Address

_BPF_DIR = resources.files("egressd.agent").joinpath("bpf")
DEFAULT_SOURCE: Final = Path(str(_BPF_DIR.joinpath("node.c")))
DEFAULT_HEADERS: Final = (Path(str(_BPF_DIR.joinpath("geneve.h"))),)
ENCAP_PROG: Final = "node_encap"
UNDERLAY_PROG: Final = "node_underlay_ingress"
FILTER_NAME: Final = "egressd-node"


class NodeKernel(Loaded[NodeError]):
    """bpf/node.c of one node: load, attach to the underlay, program."""

    def __init__(
        self,
        *,
        underlay: IPv4Address,
        vni: int,
        state_dir: Path,
        source: Path = DEFAULT_SOURCE,
        headers: Iterable[Path] = DEFAULT_HEADERS,
        cache_dir: Path | None = None,
    ) -> None:
        self.underlay = underlay
        self.vni = vni
        super().__init__(
            state_dir=state_dir,
            pin_name="bpffs-node",
            source=source,
            deps=headers,
            cache_dir=cache_dir,
            error=NodeError,
        )
        self._underlay_ifindex = 0
        self._underlay_name = ""
        self._tx_csum_was: bool | None = None
        self._active_table = 0
        self._proxy_addrs: dict[IPv4Address, int] = {}

    # -- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        """Build if needed, mount the bpffs, load and pin; empty proxy tables.

        Pins an earlier agent left behind are replaced.
        """
        if self.loaded:
            return
        with self._loading((ENCAP_PROG, UNDERLAY_PROG), MAPS, single=False):
            empty = pack_maglev((None,) * MAGLEV_SIZE, {})
            for table in (0, 1):
                self._map_update("nd_maglev", U32.pack(table), empty)
            self._write_config()

    def _unwind(self) -> list[EgressdError]:
        """`close`: detach from the underlay; the proxy addresses go with the maps."""
        self._proxy_addrs.clear()
        try:
            self.detach_underlay()
        except NodeError as exc:
            return [exc]
        return []

    @property
    def encap_fd(self) -> int:
        """The fd of node_encap, for tier 1's tail-call slot."""
        return self._prog_fd(ENCAP_PROG)

    @property
    def underlay_ifindex(self) -> int:
        return self._underlay_ifindex

    # -- tc on the underlay -------------------------------------------------------------

    def attach_underlay(self) -> int:
        """Attach node_underlay_ingress to the link holding the underlay address; its ifindex.

        Also the device encapsulated packets are redirected to.
        """
        prog_fd = self._prog_fd(UNDERLAY_PROG)
        try:
            with IPRoute() as ipr:
                found = [
                    int(msg["index"])
                    for msg in ipr.get_addr(family=2)
                    if msg.get_attr("IFA_ADDRESS") == str(self.underlay)
                ]
        except NetlinkError as exc:
            raise NodeError("attach_failed", f"underlay: {os.strerror(exc.code)}") from exc
        except OSError as exc:
            raise NodeError("attach_failed", f"underlay: {exc}") from exc
        if not found:
            raise NodeError("no_underlay", f"no link holds {self.underlay}")
        ifindex = self._ebpf(tc.attach, found[0], prog_fd, name=FILTER_NAME, label="underlay")
        self._underlay_ifindex = ifindex
        self._underlay_name = _ifname(ifindex)
        if self._tx_csum_was is None:
            self._tx_csum_was = tx_checksum(self._underlay_name)
        set_tx_checksum(self._underlay_name, False)
        self._write_config()
        return ifindex

    def detach_underlay(self) -> None:
        """Remove our filter (and clsact once it holds nothing), restore the device's TX
        checksum offload. Idempotent."""
        ifindex, self._underlay_ifindex = self._underlay_ifindex, 0
        if not ifindex:
            return
        was, self._tx_csum_was = self._tx_csum_was, None
        if was:
            with contextlib.suppress(OSError):
                set_tx_checksum(self._underlay_name, True)
        self._ebpf(tc.detach, ifindex, label="underlay")

    # -- sandboxes -----------------------------------------------------------------------

    def set_sandbox(
        self,
        ifindex: int,
        ip: IPv4Address,
        *,
        prefix: bytes,
        mac: bytes,
        gw_mac: bytes,
        job_id: bytes,
    ) -> None:
        """Encapsulate what tier 1 allows on veth `ifindex` with `prefix`; deliver GENEVE
        for `ip` carrying `job_id` to that veth's peer (MACs `gw_mac` -> `mac`)."""
        if not isinstance(ifindex, int) or ifindex <= 0:
            raise NodeError("bad_sandbox", f"ifindex must be positive, got {ifindex!r}")
        self._map_update("nd_sandbox_ips", ip.packed, pack_sandbox_ip(ifindex, mac, gw_mac, job_id))
        self._map_update("nd_sandboxes", U32.pack(ifindex), pack_sandbox(prefix, ip))

    def remove_sandbox(self, ifindex: int, ip: IPv4Address) -> None:
        """Forget the sandbox (its frames drop as no_sandbox, GENEVE for it as
        unknown_sandbox). Idempotent."""
        self._map_delete("nd_sandboxes", U32.pack(ifindex))
        self._map_delete("nd_sandbox_ips", ip.packed)

    # -- proxies ---------------------------------------------------------------------------

    def set_proxies(self, slots: Mapping[int, ProxySlot], table: bytes) -> None:
        """Program the proxies: every slot's state, the addresses GENEVE is accepted from,
        and the Maglev `table` (see `pack_maglev`) into the inactive buffer, then flip.

        Order matters for the packets in flight: new slots and addresses first, the table
        flip next, stale addresses last.
        """
        for slot in slots:
            if not 0 <= slot < MAX_PROXIES:
                raise NodeError("too_many_proxies", f"slot {slot} outside 0..{MAX_PROXIES - 1}")
        wanted = {s.addr: i for i, s in slots.items() if s.addr is not None}
        for slot, state in slots.items():
            self._map_update("nd_proxies", U32.pack(slot), pack_proxy(state))
        for addr, slot in wanted.items():
            if self._proxy_addrs.get(addr) != slot:
                self._map_update("nd_proxy_addrs", addr.packed, U32.pack(slot))
        inactive = self._active_table ^ 1
        self._map_update("nd_maglev", U32.pack(inactive), table)
        self._active_table = inactive
        self._write_config()
        for addr in set(self._proxy_addrs) - set(wanted):
            self._map_delete("nd_proxy_addrs", addr.packed)
        self._proxy_addrs = wanted

    def proxy_slot(self, slot: int) -> ProxySlot:
        raw = self._lookup("nd_proxies", U32.pack(slot))
        if raw is None:
            raise NodeError("map_failed", f"no proxy slot {slot}")
        return unpack_proxy(raw)

    def active_table(self) -> tuple[int, ...]:
        raw = self._lookup("nd_maglev", U32.pack(self._active_table))
        if raw is None:
            raise NodeError("map_failed", "no Maglev table")
        return unpack_maglev(raw)

    def flows(self) -> dict[bytes, tuple[int, int]]:
        """Pinned flows: nd_flows key -> (slot, gen)."""
        spec = self._spec("nd_flows")
        out = {}
        for key in self._map_keys("nd_flows", spec.key_size):
            raw = self._lookup("nd_flows", key)
            if raw is not None:
                out[key] = unpack_flow(raw)
        return out

    def forget_flows(self, slot: int) -> int:
        """Delete the flows pinned to `slot` (the program would re-pick them anyway)."""
        stale = [key for key, (s, _) in self.flows().items() if s == slot]
        for key in stale:
            self._map_delete("nd_flows", key)
        return len(stale)

    # -- counters --------------------------------------------------------------------------

    def drops(self) -> dict[NodeReason, tuple[int, int]]:
        """(packets, bytes) dropped by reason, summed over CPUs."""
        out = {}
        for code, reason in enumerate(REASONS):
            raw = self._lookup("nd_drops", U32.pack(code), percpu=True)
            packets, octets = (0, 0) if raw is None else sum_percpu(raw, COUNT, bpf.possible_cpus())
            out[reason] = (packets, octets)
        return out

    def stats(self, slots: Iterable[int]) -> dict[int, tuple[int, int, int, int]]:
        """Per slot (tx packets, tx bytes, rx packets, rx bytes), summed over CPUs."""
        out = {}
        for slot in slots:
            if not 0 <= slot < MAX_PROXIES:
                continue
            raw = self._lookup("nd_stats", U32.pack(slot), percpu=True)
            if raw is not None:
                tx_p, tx_b, rx_p, rx_b = sum_percpu(raw, STATS, bpf.possible_cpus())
                out[slot] = (tx_p, tx_b, rx_p, rx_b)
        return out

    # -- maps ------------------------------------------------------------------------------

    @staticmethod
    def _spec(name: str) -> MapSpec:
        return next(spec for spec in MAPS if spec.name == name)

    def _write_config(self) -> None:
        self._map_update(
            "nd_config",
            U32.pack(0),
            pack_config(self.underlay, self._underlay_ifindex, self.vni, self._active_table),
        )

    def _lookup(self, name: str, key: bytes, *, percpu: bool = False) -> bytes | None:
        spec = self._spec(name)
        size = bpf.percpu_value_size(spec.value_size) if percpu else spec.value_size
        return self._map_lookup(name, key, size)


# -- the underlay's TX checksum offload (SIOCETHTOOL) ---------------------------------------
#
# A sandbox's TCP hands the veth CHECKSUM_PARTIAL packets (the L4 checksum is left to the
# device). Encapsulated in tc they stay partial, and a device that offloads checksums (a
# veth does) sends them with the inner checksum unfinished: a receiver that reads the
# datagram from a socket (today's userspace endpoint, a capture) sees a bad checksum. With
# TX checksumming off on the underlay the kernel finishes every checksum, and segments GSO
# super-packets, before the frame leaves: GENEVE on the wire is complete, as from a NIC
# without tunnel offloads.

_SIOCETHTOOL = 0x8946
_ETHTOOL_GTXCSUM = 0x16
_ETHTOOL_STXCSUM = 0x17


def _ethtool(ifname: str, cmd: int, data: int = 0) -> int:
    value = ctypes.create_string_buffer(struct.pack("=II", cmd, data), 8)
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)) + bytes(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, _SIOCETHTOOL, ifreq)
    return int(struct.unpack("=II", value.raw)[1])


def tx_checksum(ifname: str) -> bool:
    try:
        return bool(_ethtool(ifname, _ETHTOOL_GTXCSUM))
    except OSError as exc:
        raise NodeError("attach_failed", f"{ifname}: tx checksum: {exc.strerror}") from exc


def set_tx_checksum(ifname: str, on: bool) -> None:
    try:
        _ethtool(ifname, _ETHTOOL_STXCSUM, int(on))
    except OSError as exc:
        raise NodeError("attach_failed", f"{ifname}: tx checksum: {exc.strerror}") from exc


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError as exc:
        raise NodeError("attach_failed", f"ifindex {ifindex}: {exc.strerror}") from exc
