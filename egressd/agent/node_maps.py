"""The node's kernel data path as plain data: bpf/node.c's reasons and map layouts, the
flow hash it computes, and the Maglev table the agent writes. Pure: no kernel, no I/O
(the loader and the map I/O are in `egressd.agent.node`).

Map layouts (native byte order unless marked be, which is network order):

* ``nd_config`` array[1]: u32 0 -> {be32 underlay, u32 underlay ifindex, u32 vni,
  u32 active table (0 or 1)}
* ``nd_proxies`` array[256]: u32 slot -> {be32 addr, u32 flags (1: up), u32 gen, u32 0};
  the slot is the data path's proxy index, stable for the agent's life
* ``nd_proxy_addrs`` hash: be32 addr -> u32 slot (the proxies GENEVE is accepted from)
* ``nd_maglev`` array[2]: u32 table -> u32 slots[MAGLEV_SIZE] (0xffffffff: no proxy);
  the agent writes the table that is not active, then flips ``active``
* ``nd_flows`` LRU hash: {be32 saddr, be32 daddr, be16 sport, be16 dport, u8 proto,
  u8 0[3]} -> {u32 slot, u32 gen}
* ``nd_sandboxes`` hash: u32 host veth ifindex -> {u8 prefix[36], be32 ip, u32 0};
  the prefix is `egressd.geneve.header_for(vni, job option)`, byte for byte
* ``nd_sandbox_ips`` hash: be32 ip -> {u32 host veth ifindex, u8 mac[6] (the
  sandbox's), u8 gw_mac[6] (the host veth's), u8 job_id[16]}
* ``nd_stats`` per-CPU array[256]: u32 slot -> {u64 tx_packets, tx_bytes, rx_packets,
  rx_bytes} (inner bytes)
* ``nd_drops`` per-CPU array: u32 reason -> {u64 packets, u64 bytes}

Maglev (Eisenbud et al., NSDI 2016): each proxy's permutation of the table's
`MAGLEV_SIZE` entries is ``(offset + j * skip) % size`` with offset and skip from
BLAKE2b of its name; proxies take turns claiming their next free preferred entry
until the table is full. Every proxy gets ``size / n`` entries (+-1), and adding or
removing one moves few entries between the others (tested). The size is a prime
(every skip is coprime with it) at least 100x the proxies the fleet expects.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from egressd.ebpf.tc import MapSpec as MapSpec  # re-exported: the maps' shapes
from egressd.ebpf.tc import sum_percpu as sum_percpu  # re-exported: node.py sums with it
from egressd.errors import EgressdError

IPv4Address = ipaddress.IPv4Address

MAGLEV_SIZE: Final = 16381
MAX_PROXIES: Final = 256
NO_PROXY: Final = 0xFFFF_FFFF
PROXY_UP: Final = 1
#: A sandbox veth's gso_max_size with the kernel data path: tc adds 64 bytes to a TCP
#: super-packet as to any packet, and the result must fit IPv4's 16-bit total length.
SANDBOX_GSO_MAX_SIZE: Final = 0xFFFF - 64
SOURCE_PORT_MIN: Final = 49152
SOURCE_PORT_SPAN: Final = 16384
_M32: Final = 0xFFFF_FFFF

# enum bpf_map_type
BPF_MAP_TYPE_HASH: Final = 1
BPF_MAP_TYPE_ARRAY: Final = 2
BPF_MAP_TYPE_PERCPU_ARRAY: Final = 6
BPF_MAP_TYPE_LRU_HASH: Final = 9


class NodeError(EgressdError):
    """The kernel data path could not be built, loaded, attached or programmed.

    Reasons: build_failed, tool_missing, mount_failed, load_failed, abi_mismatch,
    not_loaded, no_underlay, attach_failed, detach_failed, map_failed, bad_sandbox,
    too_many_proxies.
    """


class NodeReason(enum.StrEnum):
    """Why bpf/node.c dropped a packet; the value is the counter label.

    The order is the C enum's (a unit test parses `enum nd_reason` in bpf/node.c).
    Labels shared with the userspace data path mean the same thing.
    """

    NOT_CONFIGURED = "not_configured"
    NO_SANDBOX = "no_sandbox"
    MALFORMED = "malformed"
    NO_HEALTHY_PROXY = "no_healthy_proxy"
    TOO_BIG = "too_big"
    ENCAP_FAILED = "encap_failed"
    UNKNOWN_PROXY = "unknown_proxy"
    UNKNOWN_VNI = "unknown_vni"
    UNKNOWN_SANDBOX = "unknown_sandbox"
    JOB_MISMATCH = "job_mismatch"
    DECAP_FAILED = "decap_failed"
    OUTER_MALFORMED = "outer_malformed"
    OUTER_IP_OPTIONS = "outer_ip_options"
    OUTER_BAD_CHECKSUM = "outer_bad_checksum"
    OUTER_FRAGMENT = "outer_fragment"
    UDP_MALFORMED = "udp_malformed"
    TRUNCATED = "truncated"
    BAD_VERSION = "bad_version"
    BAD_OPTIONS = "bad_options"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    INNER_NOT_IPV4 = "inner_not_ipv4"
    INNER_TRUNCATED = "inner_truncated"
    INNER_BAD_CHECKSUM = "inner_bad_checksum"


REASONS: Final = tuple(NodeReason)

_CONFIG = struct.Struct("=4sIII")
_PROXY = struct.Struct("=4sIII")
U32 = struct.Struct("=I")
_FLOW_KEY = struct.Struct("=4s4s2s2sB3x")
_FLOW = struct.Struct("=II")
_SANDBOX = struct.Struct("=36s4sI")
_SANDBOX_IP = struct.Struct("=I6s6s16s")
STATS = struct.Struct("=QQQQ")
COUNT = struct.Struct("=QQ")
PREFIX_LEN: Final = 36


MAPS: Final = (
    MapSpec("nd_config", BPF_MAP_TYPE_ARRAY, U32.size, _CONFIG.size, 1),
    MapSpec("nd_proxies", BPF_MAP_TYPE_ARRAY, U32.size, _PROXY.size, MAX_PROXIES),
    MapSpec("nd_proxy_addrs", BPF_MAP_TYPE_HASH, 4, U32.size, MAX_PROXIES),
    MapSpec("nd_maglev", BPF_MAP_TYPE_ARRAY, U32.size, 4 * MAGLEV_SIZE, 2),
    MapSpec("nd_flows", BPF_MAP_TYPE_LRU_HASH, _FLOW_KEY.size, _FLOW.size, 262144),
    MapSpec("nd_sandboxes", BPF_MAP_TYPE_HASH, U32.size, _SANDBOX.size, 4096),
    MapSpec("nd_sandbox_ips", BPF_MAP_TYPE_HASH, 4, _SANDBOX_IP.size, 4096),
    MapSpec("nd_stats", BPF_MAP_TYPE_PERCPU_ARRAY, U32.size, STATS.size, MAX_PROXIES),
    MapSpec("nd_drops", BPF_MAP_TYPE_PERCPU_ARRAY, U32.size, COUNT.size, len(REASONS)),
)


# ---------------------------------------------------------------------------
# The flow hash (bpf/geneve.h gnv_flow_hash), for tests and tools.


def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def flow_hash(src: IPv4Address, dst: IPv4Address, proto: int, sport: int, dport: int) -> int:
    """The 32-bit hash bpf/geneve.h computes for an inner flow (ports 0 without TCP/UDP)."""
    h = _mix(int(src) ^ 0x9E3779B9)
    h = _mix(h ^ int(dst))
    h = _mix(h ^ ((sport << 16) | dport))
    return _mix(h ^ proto)


def source_port(fhash: int) -> int:
    """The outer UDP source port of a flow hash: 49152..65535."""
    return SOURCE_PORT_MIN + fhash % SOURCE_PORT_SPAN


def maglev_index(fhash: int, size: int = MAGLEV_SIZE) -> int:
    return fhash % size


# ---------------------------------------------------------------------------
# Maglev.


def permutation(name: str, size: int = MAGLEV_SIZE) -> tuple[int, int]:
    """(offset, skip) of a proxy's preference list: entry j is (offset + j * skip) % size."""
    digest = hashlib.blake2b(
        name.encode("utf-8"), digest_size=16, person=b"egressd-maglev"
    ).digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def maglev_table(names: Iterable[str], size: int = MAGLEV_SIZE) -> tuple[str | None, ...]:
    """The Maglev lookup table over `names`: entry -> name (None everywhere without names).

    Deterministic in the set of names (their order does not matter), so every agent
    with the same healthy proxies builds the same table. `size` must be a prime.
    """
    ordered = sorted(set(names))
    if not ordered:
        return (None,) * size
    if size < len(ordered):
        raise ValueError(f"table of {size} entries for {len(ordered)} proxies")
    prefs = [permutation(name, size) for name in ordered]
    nxt = [0] * len(ordered)
    table: list[int] = [-1] * size
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(prefs):
            j = nxt[i]
            c = (offset + j * skip) % size
            while table[c] >= 0:
                j += 1
                c = (offset + j * skip) % size
            table[c] = i
            nxt[i] = j + 1
            filled += 1
            if filled == size:
                return tuple(ordered[k] for k in table)


def pack_maglev(table: Sequence[str | None], slots: Mapping[str, int]) -> bytes:
    """The nd_maglev value: each entry's proxy slot (NO_PROXY for None)."""
    if len(table) != MAGLEV_SIZE:
        raise NodeError("abi_mismatch", f"Maglev table of {len(table)}, expected {MAGLEV_SIZE}")
    return array("I", (NO_PROXY if name is None else slots[name] for name in table)).tobytes()


def unpack_maglev(raw: bytes) -> tuple[int, ...]:
    return tuple(array("I", raw))


# ---------------------------------------------------------------------------
# Map values.


def pack_config(underlay: IPv4Address, underlay_ifindex: int, vni: int, active: int) -> bytes:
    return _CONFIG.pack(underlay.packed, underlay_ifindex, vni, active & 1)


def unpack_config(raw: bytes) -> tuple[IPv4Address, int, int, int]:
    addr, ifindex, vni, active = _CONFIG.unpack(raw)
    return IPv4Address(addr), ifindex, vni, active


@dataclass(frozen=True, slots=True)
class ProxySlot:
    """What nd_proxies holds for one slot (addr None: unused)."""

    addr: IPv4Address | None
    up: bool
    gen: int


def pack_proxy(slot: ProxySlot) -> bytes:
    addr = slot.addr.packed if slot.addr is not None else bytes(4)
    return _PROXY.pack(addr, PROXY_UP if slot.up and slot.addr else 0, slot.gen & _M32, 0)


def unpack_proxy(raw: bytes) -> ProxySlot:
    addr, flags, gen, _ = _PROXY.unpack(raw)
    return ProxySlot(IPv4Address(addr) if addr != bytes(4) else None, bool(flags & PROXY_UP), gen)


def pack_sandbox(prefix: bytes, ip: IPv4Address) -> bytes:
    if len(prefix) != PREFIX_LEN:
        raise NodeError("bad_sandbox", f"GENEVE prefix of {len(prefix)} bytes")
    return _SANDBOX.pack(prefix, ip.packed, 0)


def unpack_sandbox(raw: bytes) -> tuple[bytes, IPv4Address]:
    prefix, ip, _ = _SANDBOX.unpack(raw)
    return prefix, IPv4Address(ip)


def pack_sandbox_ip(ifindex: int, mac: bytes, gw_mac: bytes, job_id: bytes) -> bytes:
    if len(mac) != 6 or len(gw_mac) != 6 or len(job_id) != 16:
        raise NodeError("bad_sandbox", "MACs are 6 bytes and a job id 16")
    return _SANDBOX_IP.pack(ifindex, mac, gw_mac, job_id)


def unpack_sandbox_ip(raw: bytes) -> tuple[int, bytes, bytes, bytes]:
    ifindex, mac, gw_mac, job_id = _SANDBOX_IP.unpack(raw)
    return ifindex, mac, gw_mac, job_id


def pack_flow_key(src: IPv4Address, dst: IPv4Address, proto: int, sport: int, dport: int) -> bytes:
    return _FLOW_KEY.pack(
        src.packed, dst.packed, sport.to_bytes(2, "big"), dport.to_bytes(2, "big"), proto
    )


def unpack_flow(raw: bytes) -> tuple[int, int]:
    slot, gen = _FLOW.unpack(raw)
    return slot, gen
