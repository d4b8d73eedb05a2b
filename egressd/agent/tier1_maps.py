"""Tier 1's maps as plain data: the reason table shared with bpf/tier1.c, the
map layouts, and packing/unpacking of keys and values. Pure: no kernel, no I/O
(the loader and the map I/O are in `egressd.agent.tier1`).

Map layouts (native byte order unless marked be32, which is network order):

* ``t1_config`` array[1]: u32 0 -> {u32 tun_ifindex, be32 resolver}
* ``t1_sandboxes`` hash: u32 ifindex -> {be32 ip, u8 mac[6], u16 0, u32 0,
  bucket dns, bucket syn, bucket events, u64 suppressed, u8 tcp_ports[8192]}; a
  bucket is {u64 cost_ns, u64 depth_ns, u64 tat_ns} (see `Bucket`; the agent
  writes tat_ns 0 and suppressed 0, only the program moves them)
* ``t1_denied`` LPM trie: {u32 prefixlen, be32 addr} -> {u32 reason, u32 flags}
  (flags bit 0: overridable by an exemption)
* ``t1_exempt`` LPM trie: {u32 32 + prefixlen, u32 ifindex, be32 addr} -> u32 1
* ``t1_counters`` per-CPU hash: {u32 ifindex, u32 reason} -> {u64 packets, u64 bytes}
* ``t1_events`` ring buffer of {u64 ts_ns, u32 ifindex, u32 reason, be32 daddr,
  be16 dport, u8 proto, u8 flags, u32 suppressed, u32 0} (`Tier1Event`)
* ``t1_forward`` prog array[1]: u32 0 -> the fd of bpf/node.c's node_encap
  (the kernel data path's tail call; empty for the userspace data path)

TCP port p is allowed when bit ``p & 7`` of byte ``p >> 3`` of ``ports`` is set.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from egressd.ebpf import syscall as bpf
from egressd.ebpf.tc import MapSpec as MapSpec  # re-exported: the maps' shapes
from egressd.errors import EgressdError
from egressd.policy.addresses import ALWAYS_DENIED, OVERRIDABLE_REASONS

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network


class Tier1Error(EgressdError):
    """Tier 1 could not be built, loaded, attached or programmed.

    Reasons: bad_config, build_failed, tool_missing, mount_failed,
    load_failed, abi_mismatch, not_loaded, no_such_link, attach_failed, detach_failed,
    map_failed, bad_sandbox, bad_port, bad_rate, bad_exemption, bad_denied_range.
    """


# ---------------------------------------------------------------------------
# Reasons: the one table shared with bpf/tier1.c's `enum t1_reason`.


class Verdict(enum.StrEnum):
    REDIRECT = "redirect"
    PASS = "pass"
    DROP = "drop"


class Reason(enum.StrEnum):
    """Why tier 1 did what it did to a frame; the value is the counter label.

    The order is the C enum's: `code` is the position (a unit test parses the
    enum in bpf/tier1.c and compares).
    """

    REDIRECTED = "redirected"
    ARP = "arp"
    NOT_CONFIGURED = "not_configured"
    NO_POLICY = "no_policy"
    MALFORMED = "malformed"
    SPOOFED = "spoofed"
    IPV6 = "ipv6"
    NOT_IPV4 = "not_ipv4"
    SPOOFED_MAC = "spoofed_mac"
    SPOOFED_IP = "spoofed_ip"
    FRAGMENT = "fragment"
    UDP_NOT_DNS = "udp_not_dns"
    DENIED_RANGE = "denied_range"
    FLEET_RANGE = "fleet_range"
    PORT_NOT_ALLOWED = "port_not_allowed"
    PROTO_NOT_ALLOWED = "proto_not_allowed"
    IP_OPTIONS = "ip_options"
    DNS_RATE_LIMIT = "dns_rate_limit"
    SYN_RATE_LIMIT = "syn_rate_limit"

    @property
    def code(self) -> int:
        return _CODES[self]

    @property
    def verdict(self) -> Verdict:
        if self is Reason.REDIRECTED:
            return Verdict.REDIRECT
        if self is Reason.ARP:
            return Verdict.PASS
        return Verdict.DROP

    @classmethod
    def from_code(cls, code: int) -> Reason:
        try:
            return _BY_CODE[code]
        except IndexError:
            raise Tier1Error("abi_mismatch", f"unknown reason code {code}") from None


_BY_CODE: Final = tuple(Reason)
_CODES: Final = {reason: code for code, reason in enumerate(_BY_CODE)}
# A denied range's counter reason: only these two are meaningful in t1_denied.
DENIED_REASONS: Final = frozenset({Reason.DENIED_RANGE, Reason.FLEET_RANGE})

# ---------------------------------------------------------------------------
# Map layouts (mirrors of the structs in bpf/tier1.c).

BPF_MAP_TYPE_PROG_ARRAY: Final = 3
PORT_BITMAP_BYTES: Final = 65536 // 8
DENIED_OVERRIDABLE: Final = 1
CONFIG_KEY: Final = struct.pack("=I", 0)

U32 = struct.Struct("=I")
_CONFIG = struct.Struct("=I4s")
_SANDBOX_HEAD = struct.Struct("=4s6s2x4x")
_BUCKET = struct.Struct("=QQQ")
_DENIED_KEY = struct.Struct("=I4s")
_DENIED_VALUE = struct.Struct("=II")
_EXEMPT_KEY = struct.Struct("=II4s")
EXEMPT_VALUE = U32.pack(1)
_COUNTER_KEY = struct.Struct("=II")
COUNTER_VALUE = struct.Struct("=QQ")
_SUPPRESSED = struct.Struct("=Q")
SANDBOX_VALUE_SIZE: Final = (
    _SANDBOX_HEAD.size + 3 * _BUCKET.size + _SUPPRESSED.size + PORT_BITMAP_BYTES
)
_EVENT = struct.Struct("=QII4s2sBBII")
EVENT_SIZE: Final = _EVENT.size
#: t1_event.flags bit: tier 1 answered the denied SYN with a RST.
EVENT_RST: Final = 1
_PORTS_OFFSET: Final = SANDBOX_VALUE_SIZE - PORT_BITMAP_BYTES
NS_PER_S: Final = 1_000_000_000
#: A bucket holds one second's worth of packets, and never fewer than this: a
#: resolver sends A and AAAA at once and retries, a client pool opens a few
#: connections together, and a rate of 1/s must not turn that into drops.
MIN_BURST: Final = 10
#: Highest rate a bucket takes (1 packet per microsecond); policy bounds are lower.
MAX_RATE_PER_S: Final = 1_000_000


MAPS: Final = (
    MapSpec("t1_config", bpf.BPF_MAP_TYPE_ARRAY, U32.size, _CONFIG.size),
    MapSpec("t1_sandboxes", bpf.BPF_MAP_TYPE_HASH, U32.size, SANDBOX_VALUE_SIZE),
    MapSpec("t1_denied", bpf.BPF_MAP_TYPE_LPM_TRIE, _DENIED_KEY.size, _DENIED_VALUE.size),
    MapSpec("t1_exempt", bpf.BPF_MAP_TYPE_LPM_TRIE, _EXEMPT_KEY.size, len(EXEMPT_VALUE)),
    MapSpec("t1_counters", bpf.BPF_MAP_TYPE_PERCPU_HASH, _COUNTER_KEY.size, COUNTER_VALUE.size),
    # A ring buffer has no keys or values; its size is max_entries.
    MapSpec("t1_events", bpf.BPF_MAP_TYPE_RINGBUF, 0, 0),
    # Slot 0: the kernel data path's program fd (egressd.agent.node); empty: the TUN.
    MapSpec("t1_forward", BPF_MAP_TYPE_PROG_ARRAY, U32.size, U32.size),
)


class _HasBounds(Protocol):
    @property
    def lo(self) -> int: ...

    @property
    def hi(self) -> int: ...


# A port, an inclusive (lo, hi) pair, or anything with .lo/.hi (policy PortRange).
PortSpec = int | tuple[int, int] | _HasBounds


class Count(NamedTuple):
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class DeniedRange:
    """A destination range tier 1 drops; `overridable` ones yield to a sandbox exemption."""

    network: IPv4Network
    reason: Reason = Reason.DENIED_RANGE
    overridable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.network, IPv4Network):
            raise Tier1Error("bad_denied_range", f"not an IPv4 network: {self.network!r}")
        if self.reason not in DENIED_REASONS:
            raise Tier1Error("bad_denied_range", f"{self.network}: reason {self.reason!r}")
        if self.overridable and self.reason is Reason.FLEET_RANGE:
            raise Tier1Error("bad_denied_range", f"{self.network}: fleet ranges are never exempt")


@dataclass(frozen=True, slots=True)
class Bucket:
    """A tier-1 token bucket in credit time: a packet costs `cost_ns`, and the
    bucket holds `depth_ns` (``burst * cost_ns``); see `struct t1_bucket`."""

    cost_ns: int
    depth_ns: int

    def __post_init__(self) -> None:
        for name in ("cost_ns", "depth_ns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Tier1Error("bad_rate", f"{name} must be a positive integer, got {value!r}")
        if self.cost_ns < NS_PER_S // MAX_RATE_PER_S or self.cost_ns > NS_PER_S:
            raise Tier1Error("bad_rate", f"cost_ns {self.cost_ns} outside 1 us..1 s")
        if self.depth_ns < self.cost_ns or self.depth_ns >= 1 << 62:
            raise Tier1Error("bad_rate", f"depth_ns {self.depth_ns} below one packet or too big")

    @classmethod
    def per_second(cls, rate: int, *, min_burst: int = MIN_BURST) -> Bucket:
        """`rate` packets a second, a burst of one second's worth (at least `min_burst`).

        The cost is rounded up, so tier 1 never lets through more than `rate`.
        """
        if not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= MAX_RATE_PER_S:
            raise Tier1Error("bad_rate", f"rate must be 1..{MAX_RATE_PER_S} per second: {rate!r}")
        if not isinstance(min_burst, int) or isinstance(min_burst, bool) or min_burst < 1:
            raise Tier1Error("bad_rate", f"min_burst must be a positive integer: {min_burst!r}")
        cost = -(-NS_PER_S // rate)
        return cls(cost, max(rate, min_burst) * cost)

    @property
    def burst(self) -> int:
        return self.depth_ns // self.cost_ns

    @property
    def rate_per_s(self) -> float:
        return NS_PER_S / self.cost_ns


#: Each sandbox's tier-1 denial events: 5 a second after a burst of 20; the rest are
#: counted in the next event's `suppressed`. At most 4096 sandboxes x 5/s reach the log.
EVENT_RATE_PER_S: Final = 5
EVENT_BURST: Final = 20
EVENT_BUCKET: Final = Bucket.per_second(EVENT_RATE_PER_S, min_burst=EVENT_BURST)
_PROTO_NAMES: Final = {1: "icmp", 6: "tcp", 17: "udp"}


@dataclass(frozen=True, slots=True)
class Tier1Event:
    """One denial tier 1 reported in t1_events (see `struct t1_event`).

    `dst` is None and `port` 0 where the frame never got that far (not IPv4,
    spoofed MAC ...); `rst` says tier 1 answered the SYN with a RST;
    `suppressed` counts the sandbox's denials that were not reported since its
    previous event (rate limit or a full ring).
    """

    ts_ns: int
    ifindex: int
    reason: Reason
    dst: IPv4Address | None
    port: int
    proto: int
    rst: bool
    suppressed: int

    @property
    def proto_name(self) -> str | None:
        """tcp, udp, icmp, the number of another IP protocol, None before the IP header."""
        if self.dst is None:
            return None
        return _PROTO_NAMES.get(self.proto, str(self.proto))


def unpack_event(raw: bytes) -> Tier1Event:
    """A t1_events record; a record of another size or reason is an ABI mismatch."""
    if len(raw) != _EVENT.size:
        raise Tier1Error("abi_mismatch", f"t1_event of {len(raw)} bytes, expected {_EVENT.size}")
    ts_ns, ifindex, code, daddr, dport, proto, flags, suppressed, _ = _EVENT.unpack(raw)
    dst = IPv4Address(daddr) if daddr != b"\0\0\0\0" else None
    return Tier1Event(
        ts_ns,
        ifindex,
        Reason.from_code(code),
        dst,
        int.from_bytes(dport, "big"),
        proto,
        bool(flags & EVENT_RST),
        suppressed,
    )


def pack_event(event: Tier1Event) -> bytes:
    """The record the kernel would write for `event` (tests and fakes)."""
    daddr = event.dst.packed if event.dst is not None else bytes(4)
    dport = event.port.to_bytes(2, "big")
    flags = EVENT_RST if event.rst else 0
    return _EVENT.pack(
        event.ts_ns,
        event.ifindex,
        event.reason.code,
        daddr,
        dport,
        event.proto,
        flags,
        event.suppressed,
        0,
    )


@dataclass(frozen=True, slots=True)
class SandboxEntry:
    """What t1_sandboxes holds for one veth (read back by `Tier1.sandbox`)."""

    ip: IPv4Address
    mac: bytes
    tcp_ports: tuple[tuple[int, int], ...]
    dns: Bucket
    syn: Bucket


def denied_ranges(fleet_ranges: Iterable[IPv4Network]) -> tuple[DeniedRange, ...]:
    """The IPv4 always-denied ranges (egressd.policy.addresses) plus the fleet's own.

    A range is overridable when its reason is in `OVERRIDABLE_REASONS`; fleet
    ranges never are. Pass the result to `Tier1`.
    """
    out = [
        DeniedRange(net, Reason.DENIED_RANGE, reason in OVERRIDABLE_REASONS)
        for net, reason in ALWAYS_DENIED
        if isinstance(net, IPv4Network)
    ]
    out.extend(DeniedRange(net, Reason.FLEET_RANGE, False) for net in fleet_ranges)
    return normalize_denied(out)


def normalize_denied(ranges: Iterable[DeniedRange]) -> tuple[DeniedRange, ...]:
    """One entry per network, safe under longest-prefix match.

    The same network listed twice keeps the stricter entry (not overridable,
    fleet over denied). A range nested inside a range that cannot be
    overridden cannot be overridden either: an exemption must never reopen
    part of a fleet range through a longer, overridable prefix.
    """
    by_net: dict[IPv4Network, DeniedRange] = {}
    for entry in ranges:
        old = by_net.get(entry.network)
        if old is None or _strictness(entry) > _strictness(old):
            by_net[entry.network] = entry
    strict = [e.network for e in by_net.values() if not e.overridable]
    out = []
    for net, entry in sorted(by_net.items(), key=lambda item: (item[0].prefixlen, item[0])):
        nested = any(net != s and net.subnet_of(s) for s in strict)
        out.append(DeniedRange(net, entry.reason, False) if entry.overridable and nested else entry)
    return tuple(out)


def _strictness(entry: DeniedRange) -> tuple[bool, bool]:
    return (not entry.overridable, entry.reason is Reason.FLEET_RANGE)


# ---------------------------------------------------------------------------
# Pure encoding.


def mac_bytes(mac: str | bytes) -> bytes:
    """Six bytes from "aa:bb:cc:dd:ee:ff" (or "-" separated) or from bytes."""
    if isinstance(mac, bytes):
        raw = mac
    else:
        try:
            raw = bytes(int(part, 16) for part in mac.replace("-", ":").split(":"))
        except ValueError:
            raise Tier1Error("bad_sandbox", f"bad MAC address {mac!r}") from None
    if len(raw) != 6:
        raise Tier1Error("bad_sandbox", f"bad MAC address {mac!r}")
    return raw


def port_bounds(spec: PortSpec) -> tuple[int, int]:
    """(lo, hi) of a port, a (lo, hi) pair or an object with .lo/.hi; 0 <= lo <= hi <= 65535."""
    try:
        if isinstance(spec, int):
            lo = hi = spec
        elif isinstance(spec, tuple):
            lo, hi = spec
        else:
            lo, hi = spec.lo, spec.hi
    except (AttributeError, TypeError, ValueError):
        raise Tier1Error("bad_port", f"not a port or port range: {spec!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not (
        0 <= lo <= hi <= 65535
    ):
        raise Tier1Error("bad_port", f"need 0 <= lo <= hi <= 65535, got {spec!r}")
    return lo, hi


def port_bitmap(ports: Iterable[PortSpec]) -> bytes:
    """The 65536-bit map of allowed TCP destination ports."""
    bits = 0
    for spec in ports:
        lo, hi = port_bounds(spec)
        bits |= ((1 << (hi - lo + 1)) - 1) << lo
    return bits.to_bytes(PORT_BITMAP_BYTES, "little")


def bitmap_ranges(bitmap: bytes) -> tuple[tuple[int, int], ...]:
    """The inclusive port ranges set in a bitmap (inverse of `port_bitmap`)."""
    bits = int.from_bytes(bitmap, "little")
    out = []
    while bits:
        lo = (bits & -bits).bit_length() - 1
        run = bits >> lo
        ones = (~run & (run + 1)).bit_length() - 1  # trailing ones of `run`
        out.append((lo, lo + ones - 1))
        bits &= ~(((1 << ones) - 1) << lo)
    return tuple(out)


def pack_config(tun_ifindex: int, resolver: IPv4Address) -> bytes:
    return _CONFIG.pack(tun_ifindex, resolver.packed)


def pack_sandbox(
    ip: IPv4Address,
    mac: str | bytes,
    tcp_ports: Iterable[PortSpec],
    *,
    dns: Bucket,
    syn: Bucket,
    events: Bucket = EVENT_BUCKET,
) -> bytes:
    """The t1_sandboxes value; every bucket starts full (tat_ns 0), nothing suppressed."""
    if not isinstance(ip, IPv4Address):
        raise Tier1Error("bad_sandbox", f"not an IPv4 address: {ip!r}")
    if not all(isinstance(b, Bucket) for b in (dns, syn, events)):
        raise Tier1Error("bad_rate", f"buckets must be Bucket, got {dns!r}, {syn!r}, {events!r}")
    return (
        _SANDBOX_HEAD.pack(ip.packed, mac_bytes(mac))
        + _BUCKET.pack(dns.cost_ns, dns.depth_ns, 0)
        + _BUCKET.pack(syn.cost_ns, syn.depth_ns, 0)
        + _BUCKET.pack(events.cost_ns, events.depth_ns, 0)
        + _SUPPRESSED.pack(0)
        + port_bitmap(tcp_ports)
    )


def unpack_sandbox(raw: bytes) -> SandboxEntry:
    ip, mac = _SANDBOX_HEAD.unpack_from(raw)
    dns_cost, dns_depth, _ = _BUCKET.unpack_from(raw, _SANDBOX_HEAD.size)
    syn_cost, syn_depth, _ = _BUCKET.unpack_from(raw, _SANDBOX_HEAD.size + _BUCKET.size)
    return SandboxEntry(
        IPv4Address(ip),
        mac,
        bitmap_ranges(raw[_PORTS_OFFSET:]),
        Bucket(dns_cost, dns_depth),
        Bucket(syn_cost, syn_depth),
    )


def pack_denied_key(network: IPv4Network) -> bytes:
    return _DENIED_KEY.pack(network.prefixlen, network.network_address.packed)


def pack_denied_value(entry: DeniedRange) -> bytes:
    return _DENIED_VALUE.pack(entry.reason.code, DENIED_OVERRIDABLE if entry.overridable else 0)


def unpack_denied(key: bytes, value: bytes) -> DeniedRange:
    prefixlen, addr = _DENIED_KEY.unpack(key)
    code, flags = _DENIED_VALUE.unpack(value)
    network = IPv4Network((IPv4Address(addr), prefixlen))
    return DeniedRange(network, Reason.from_code(code), bool(flags & DENIED_OVERRIDABLE))


def pack_exempt_key(ifindex: int, network: IPv4Network) -> bytes:
    return _EXEMPT_KEY.pack(32 + network.prefixlen, ifindex, network.network_address.packed)


def unpack_exempt_key(raw: bytes) -> tuple[int, IPv4Network]:
    prefixlen, ifindex, addr = _EXEMPT_KEY.unpack(raw)
    return ifindex, IPv4Network((IPv4Address(addr), prefixlen - 32))


def pack_counter_key(ifindex: int, reason: Reason) -> bytes:
    return _COUNTER_KEY.pack(ifindex, reason.code)


def unpack_counter_key(raw: bytes) -> tuple[int, Reason]:
    ifindex, code = _COUNTER_KEY.unpack(raw)
    return ifindex, Reason.from_code(code)
