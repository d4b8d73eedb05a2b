"""The proxy kernel data path's map layouts and what userspace wants in them: pure data.

`bpf/proxy.c` is the other half of every layout here; `tests/unit/proxy/test_kernel_maps.py`
checks the stat enum and the struct sizes against that file. All addresses and ports are in
network byte order, as the program reads them from the packet.

| map | type | key | value |
|---|---|---|---|
| px_config | array[1] | u32 0 | underlay, port, vni, mark, underlay ifindex |
| px_nodes | hash | node underlay | sandbox CIDR base, mask |
| px_jobs | hash | job id, digest | until_ns (CLOCK_BOOTTIME: the policy's exp) |
| px_bound | hash | job id, node underlay | 1 |
| px_flows | LRU hash | src, dst, sport, dport, proto | job id, digest, node underlay |
| px_sandboxes | LPM trie | prefix, sandbox CIDR | node underlay |
| px_stats | per-CPU array | `Stat` | packets |

`desired_jobs` and `desired_nodes` turn the proxy's verified policies and node registry into
the entries these maps should hold; `egressd.proxy.kernel` writes the difference.

`FlowReader` is tier 2's px_flows lookup (one per accepted connection or DNS query, for
`egressd.proxy.kernel.KernelDatapath` and each worker's `egressd.proxy.workers.PinnedFlows`):
one syscall through buffers allocated once, and the objects a value decodes to kept for the
next lookup that finds the same value (every flow of a job on a node holds the same one).
"""

from __future__ import annotations

import ipaddress
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from egressd.ebpf import syscall as bpf
from egressd.ebpf.tc import MapSpec as MapSpec  # re-exported: the maps' shapes
from egressd.proxy.context import FlowInfo

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network


class Stat(IntEnum):
    """`enum px_stat` in bpf/proxy.c: drop reasons first, then what passed."""

    unknown_node = 0
    truncated = 1
    bad_version = 2
    options_past_end = 3
    bad_option_length = 4
    unknown_critical_option = 5
    missing_job_option = 6
    duplicate_job_option = 7
    unsupported_protocol = 8
    inner_not_ipv4 = 9
    inner_truncated = 10
    inner_bad_checksum = 11
    bad_vni = 12
    source_outside_node_cidr = 13
    proto_not_allowed = 14
    fragmented = 15
    malformed_l4 = 16
    job_not_bound_to_node = 17
    outer_bad_length = 18
    outer_bad_checksum = 19
    decap_failed = 20
    fast = 21  # decapsulated, on to TPROXY
    slow = 22  # passed up, still encapsulated, to the Python endpoint
    ret = 23  # return traffic encapsulated and redirected to the underlay
    return_pass = 24  # return traffic left on the TUN for the Python return path
    return_failed = 25  # encapsulation failed: dropped


DROP_COUNT: Final = 21
STAT_COUNT: Final = len(Stat)
#: The kernel's drop reasons (the names of `egressd_geneve_rx_dropped_total{reason}`).
KERNEL_DROP_REASONS: Final = tuple(s.name for s in Stat if s < DROP_COUNT)
#: Reasons only the kernel gives: the outer header, which ip_rcv checks on the slow path.
KERNEL_ONLY_REASONS: Final = ("outer_bad_length", "outer_bad_checksum", "decap_failed")

U32: Final = struct.Struct("=I")
U64: Final = struct.Struct("=Q")
_CONFIG: Final = struct.Struct("=4sHHIII")  # underlay, port (be), pad, vni, mark, ifindex
_NODE: Final = struct.Struct("=4s4s")  # cidr base, mask (be)
_JOB_KEY: Final = struct.Struct("=16s8s")
_JOB: Final = struct.Struct("=Q")
_BOUND_KEY: Final = struct.Struct("=16s4s")
_FLOW_KEY: Final = struct.Struct("=4s4sHHB3x")  # ports as raw big-endian u16 (see pack_flow_key)
# The same bytes from ints: every field big-endian, so addresses and ports go in as they are.
_FLOW_KEY_INTS: Final = struct.Struct(">IIHHB3x")
_FLOW: Final = struct.Struct("=16s8s4s4x")
_SANDBOX_KEY: Final = struct.Struct("=I4s")
_NODE_ADDR: Final = struct.Struct("=4s")
BOUND_VALUE: Final = U32.pack(1)


BPF_MAP_TYPE_LRU_HASH: Final = 9
BPF_MAP_TYPE_PERCPU_ARRAY: Final = 6

MAPS: Final = (
    MapSpec("px_config", bpf.BPF_MAP_TYPE_ARRAY, U32.size, _CONFIG.size),
    MapSpec("px_nodes", bpf.BPF_MAP_TYPE_HASH, _NODE_ADDR.size, _NODE.size),
    MapSpec("px_jobs", bpf.BPF_MAP_TYPE_HASH, _JOB_KEY.size, _JOB.size),
    MapSpec("px_bound", bpf.BPF_MAP_TYPE_HASH, _BOUND_KEY.size, U32.size),
    MapSpec("px_flows", BPF_MAP_TYPE_LRU_HASH, _FLOW_KEY.size, _FLOW.size),
    MapSpec("px_sandboxes", bpf.BPF_MAP_TYPE_LPM_TRIE, _SANDBOX_KEY.size, _NODE_ADDR.size),
    MapSpec("px_stats", BPF_MAP_TYPE_PERCPU_ARRAY, U32.size, U64.size),
)
MAP_SIZES: Final = {spec.name: spec for spec in MAPS}


@dataclass(frozen=True, slots=True)
class KernelFlow:
    """A px_flows value: the job option the flow's first packet carried, and its node."""

    job_id: uuid.UUID
    digest: bytes
    node: IPv4Address


def pack_config(*, underlay: IPv4Address, port: int, vni: int, mark: int, ifindex: int) -> bytes:
    return _CONFIG.pack(underlay.packed, _be16(port), 0, vni, mark, ifindex)


def _be16(port: int) -> int:
    """A port as the u16 whose in-memory bytes are big-endian (what the program compares)."""
    return int.from_bytes(port.to_bytes(2, "big"), "little" if _NATIVE_LITTLE else "big")


_NATIVE_LITTLE: Final = struct.pack("=H", 1) == b"\x01\x00"


def pack_node_key(underlay: IPv4Address) -> bytes:
    return underlay.packed


def pack_node(cidr: IPv4Network) -> bytes:
    return _NODE.pack(cidr.network_address.packed, cidr.netmask.packed)


def pack_job_key(job_id: uuid.UUID, digest: bytes) -> bytes:
    if len(digest) != 8:
        raise ValueError(f"digest is {len(digest)} bytes, not 8")
    return _JOB_KEY.pack(job_id.bytes, digest)


def pack_job(until_ns: int) -> bytes:
    return _JOB.pack(until_ns)


def pack_bound_key(job_id: uuid.UUID, node: IPv4Address) -> bytes:
    return _BOUND_KEY.pack(job_id.bytes, node.packed)


def unpack_bound_key(raw: bytes) -> tuple[uuid.UUID, IPv4Address]:
    job, node = _BOUND_KEY.unpack(raw)
    return uuid.UUID(bytes=job), IPv4Address(node)


def unpack_job_key(raw: bytes) -> tuple[uuid.UUID, bytes]:
    job, digest = _JOB_KEY.unpack(raw)
    return uuid.UUID(bytes=job), digest


def pack_flow_key(src: int, sport: int, dst: int, dport: int, proto: int) -> bytes:
    """The px_flows key of a sandbox -> internet 5-tuple (addresses as ints, host ports)."""
    return _FLOW_KEY.pack(
        src.to_bytes(4, "big"), dst.to_bytes(4, "big"), _be16(sport), _be16(dport), proto
    )


def ip_int(value: int | str | IPv4Address) -> int:
    """An IPv4 address as the 32-bit int the flow tables key on: an int as it is, an
    `IPv4Address` by its own int (not parsed again from its text), anything else parsed
    (`ipaddress.AddressValueError` when it is no address)."""
    if type(value) is int:
        return value
    if type(value) is IPv4Address:
        return int(value)
    return int(IPv4Address(value))


def pack_flow(job_id: uuid.UUID, digest: bytes, node: IPv4Address) -> bytes:
    return _FLOW.pack(job_id.bytes, digest, node.packed)


def unpack_flow(raw: bytes) -> KernelFlow:
    job, digest, node = _FLOW.unpack(raw)
    return KernelFlow(uuid.UUID(bytes=job), digest, IPv4Address(node))


#: Distinct px_flows values whose decoding `FlowReader` keeps: one per (job, digest, node)
#: with live flows. Past it the cache starts over (bounded memory; the next lookups decode).
FLOW_VALUES_KEPT: Final = 4096


class _Known:
    """A px_flows value decoded, and the `FlowInfo` it gave last, with its node's name."""

    __slots__ = ("flow", "info", "name")

    def __init__(self, flow: KernelFlow) -> None:
        self.flow = flow
        self.name: str | None = None
        self.info: FlowInfo | None = None


class FlowReader:
    """px_flows lookups by 5-tuple through one `bpf.ElemReader` on `fd` (the caller's, kept
    open while the reader is used).

    `read` is the syscall (`OSError` as `bpf.map_lookup` raises it, None for no entry);
    `flow` and `info` decode what it returned, each distinct value once: the `KernelFlow`
    (and the last `FlowInfo`, whose node name is asked for on every call, as the registry
    may have renamed or dropped the node) are kept in a dict by the value's bytes, at most
    `max_values` of them. The objects handed out are shared between lookups; they are
    frozen. Not thread-safe (`bpf.ElemReader`): one event loop owns a reader.
    """

    __slots__ = ("_elem", "_key", "_known", "_max", "fd")

    def __init__(self, fd: int, *, max_values: int = FLOW_VALUES_KEPT) -> None:
        if max_values <= 0:
            raise ValueError("max_values must be positive")
        spec = MAP_SIZES["px_flows"]
        self.fd = fd
        self._elem = bpf.ElemReader(fd, spec.key_size, spec.value_size)
        self._key = self._elem.key
        self._known: dict[bytes, _Known] = {}
        self._max = max_values

    def __len__(self) -> int:
        """How many decoded values are kept."""
        return len(self._known)

    def read(self, src: int, sport: int, dst: int, dport: int, proto: int) -> bytes | None:
        """The raw px_flows value of a sandbox -> internet 5-tuple (addresses as ints, host
        ports: `pack_flow_key`'s arguments), or None when the map has none."""
        _FLOW_KEY_INTS.pack_into(self._key, 0, src, dst, sport, dport, proto)
        return self._elem.lookup()

    def flow(self, raw: bytes) -> KernelFlow:
        """`unpack_flow(raw)`, the same object for the same value while it is kept."""
        return self._known_value(raw).flow

    def info(self, raw: bytes, node_name: Callable[[IPv4Address], str | None]) -> FlowInfo | None:
        """What tier 2 wants of a value: its job and digest with its node's name, or None
        when `node_name` knows the node no more (its flows no longer count)."""
        known = self._known_value(raw)
        name = node_name(known.flow.node)
        if name is None:
            return None
        info = known.info
        if info is None or name != known.name:
            flow = known.flow
            info = known.info = FlowInfo(flow.job_id, flow.digest, name)
            known.name = name
        return info

    def release(self) -> None:
        """The fd is being closed: later reads fail with EBADF (`bpf.ElemReader.release`)."""
        self.fd = -1
        self._elem.release()

    def _known_value(self, raw: bytes) -> _Known:
        known = self._known.get(raw)
        if known is None:
            known = _Known(unpack_flow(raw))
            if len(self._known) >= self._max:
                self._known.clear()  # bounded; rare (FLOW_VALUES_KEPT): one decode per value again
            self._known[raw] = known
        return known


def pack_sandbox_key(cidr: IPv4Network) -> bytes:
    return _SANDBOX_KEY.pack(cidr.prefixlen, cidr.network_address.packed)


def pack_node_addr(node: IPv4Address) -> bytes:
    return node.packed


# --- what the maps should hold -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the kernel needs of a registered node."""

    name: str
    underlay: IPv4Address
    sandbox_cidr: IPv4Network


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What the kernel needs of a job's verified policy: its digest, nodes and exp."""

    job_id: uuid.UUID
    digest: bytes
    nodes: frozenset[str]
    exp: float | None  # wall clock seconds


def desired_nodes(nodes: Iterable[NodeFacts]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """(px_nodes, px_sandboxes) entries for the registry's nodes."""
    by_underlay: dict[bytes, bytes] = {}
    by_cidr: dict[bytes, bytes] = {}
    for node in nodes:
        by_underlay[pack_node_key(node.underlay)] = pack_node(node.sandbox_cidr)
        by_cidr[pack_sandbox_key(node.sandbox_cidr)] = pack_node_addr(node.underlay)
    return by_underlay, by_cidr


def desired_jobs(
    jobs: Iterable[JobFacts], nodes: Iterable[NodeFacts], *, wall_now: float, boot_offset_ns: int
) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """(px_jobs, px_bound) entries: each job's current digest until its exp, and a binding
    for each node its policy names that the registry knows.

    A job without exp, or whose exp has passed, gets nothing (its datagrams go the slow
    path, which refetches; the policy store never uses such a policy either). `exp`
    becomes CLOCK_BOOTTIME nanoseconds as ``exp * 1e9 + boot_offset_ns``, the offset taken
    once (`boot_offset`), so an unchanged policy gives an unchanged entry.
    """
    underlay_by_name: Mapping[str, IPv4Address] = {n.name: n.underlay for n in nodes}
    entries: dict[bytes, bytes] = {}
    bound: dict[bytes, bytes] = {}
    for job in jobs:
        if job.exp is None or job.exp <= wall_now:
            continue
        entries[pack_job_key(job.job_id, job.digest)] = pack_job(
            int(job.exp * 1e9) + boot_offset_ns
        )
        for name in job.nodes:
            underlay = underlay_by_name.get(name)
            if underlay is not None:
                bound[pack_bound_key(job.job_id, underlay)] = BOUND_VALUE
    return entries, bound


def boot_offset(wall_ns: int, boot_ns: int) -> int:
    """CLOCK_BOOTTIME minus the wall clock, in ns, from two readings taken together."""
    return boot_ns - wall_ns


@dataclass(frozen=True, slots=True)
class Diff:
    put: dict[bytes, bytes]
    delete: frozenset[bytes]


def diff(current: Mapping[bytes, bytes], wanted: Mapping[bytes, bytes]) -> Diff:
    """What to write and delete so that a map holding `current` holds `wanted`."""
    put = {k: v for k, v in wanted.items() if current.get(k) != v}
    return Diff(put, frozenset(current.keys() - wanted.keys()))
