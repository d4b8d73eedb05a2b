"""Tier 1: the tc ingress eBPF program on each sandbox veth, and its maps.

`bpf/tier1.c` decides per frame (see its header comment and DESIGN.md, "The
packet path", step 3); this module builds it, loads it, attaches it and keeps
its maps in step with the node's sandboxes.

How, and why:

* Build: `build_object` runs clang into a cache directory when the object is
  missing or older than the source (CI starts from a clean clone).
* Load: once per agent, ``bpftool prog load OBJ PIN pinmaps DIR``. bpftool
  (libbpf) does the ELF, BTF and relocation work; the program and its maps are
  pinned in a bpffs that this module mounts on ``STATE_DIR/bpffs``. Each mount
  of bpffs is its own instance, so two agents on one host (two node
  namespaces, two state dirs) never share maps, and nothing depends on
  /sys/fs/bpf being mounted.
* Maps: read and written through the bpf(2) syscall (`egressd.agent.bpf_syscall`,
  ctypes) on fds from ``BPF_OBJ_GET``: no process per update. At load the maps'
  key and value sizes are checked against the layouts below, so a C/Python
  drift fails loudly instead of corrupting entries.
* Attach: a clsact qdisc and one ``bpf direct-action`` filter (fixed priority
  and handle, created with "replace") on the veth's ingress, over rtnetlink
  (pyroute2) from the calling thread's network namespace. Attaching twice
  leaves one filter; a filter that outlives its agent keeps the old program
  until the next attach replaces it.

bpf(2) and bpffs do not care about network namespaces; only `Tier1.attach` and
`Tier1.detach` do, and they act in the namespace of the calling thread, which is
the node's when the agent runs under ``nsenter --net=/run/netns/NODE``.

Map layouts (native byte order unless marked be32, which is network order):

* ``t1_config`` array[1]: u32 0 -> {u32 tun_ifindex, be32 resolver}
* ``t1_sandboxes`` hash: u32 ifindex -> {be32 ip, u8 mac[6], u16 0, u8 tcp_ports[8192]}
* ``t1_denied`` LPM trie: {u32 prefixlen, be32 addr} -> {u32 reason, u32 flags}
  (flags bit 0: overridable by an exemption)
* ``t1_exempt`` LPM trie: {u32 32 + prefixlen, u32 ifindex, be32 addr} -> u32 1
* ``t1_counters`` per-CPU hash: {u32 ifindex, u32 reason} -> {u64 packets, u64 bytes}

TCP port p is allowed when bit ``p & 7`` of byte ``p >> 3`` of ``ports`` is set.
Counters count skbs: a TSO/GSO super-packet from the sandbox's stack counts
once (the kernel segments it, with checksums, on its way into the TUN), and its
bytes are the frame's length on the veth, Ethernet header included.

Not thread-safe: one `Tier1` per agent, used from one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import ipaddress
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple, Protocol, Self

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egressd.agent import bpf_syscall as bpf
from egressd.errors import EgressdError
from egressd.policy.addresses import ALWAYS_DENIED, OVERRIDABLE_REASONS

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DEFAULT_SOURCE: Final = Path(__file__).resolve().parents[2] / "bpf" / "tier1.c"
PROG_NAME: Final = "tier1_ingress"
FILTER_NAME: Final = "egressd-tier1"
# The filter's identity on the clsact ingress hook: "replace" on it is idempotent.
FILTER_PRIO: Final = 1
FILTER_HANDLE: Final = 1
_TC_H_CLSACT_INGRESS = 0xFFFF_FFF2
_ETH_P_ALL = 0x0003
_MNT_DETACH = 2
_TOOL_TIMEOUT_S = 120.0


class Tier1Error(EgressdError):
    """Tier 1 could not be built, loaded, attached or programmed.

    Reasons: bad_config, build_failed, tool_missing, mount_failed,
    load_failed, abi_mismatch, not_loaded, no_such_link, attach_failed, detach_failed,
    map_failed, bad_sandbox, bad_port, bad_exemption, bad_denied_range.
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

PORT_BITMAP_BYTES: Final = 65536 // 8
DENIED_OVERRIDABLE: Final = 1
CONFIG_KEY: Final = struct.pack("=I", 0)

_U32 = struct.Struct("=I")
_CONFIG = struct.Struct("=I4s")
_SANDBOX_HEAD = struct.Struct("=4s6s2x")
_DENIED_KEY = struct.Struct("=I4s")
_DENIED_VALUE = struct.Struct("=II")
_EXEMPT_KEY = struct.Struct("=II4s")
_EXEMPT_VALUE = _U32.pack(1)
_COUNTER_KEY = struct.Struct("=II")
_COUNTER_VALUE = struct.Struct("=QQ")
SANDBOX_VALUE_SIZE: Final = _SANDBOX_HEAD.size + PORT_BITMAP_BYTES


@dataclass(frozen=True, slots=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int


MAPS: Final = (
    MapSpec("t1_config", bpf.BPF_MAP_TYPE_ARRAY, _U32.size, _CONFIG.size),
    MapSpec("t1_sandboxes", bpf.BPF_MAP_TYPE_HASH, _U32.size, SANDBOX_VALUE_SIZE),
    MapSpec("t1_denied", bpf.BPF_MAP_TYPE_LPM_TRIE, _DENIED_KEY.size, _DENIED_VALUE.size),
    MapSpec("t1_exempt", bpf.BPF_MAP_TYPE_LPM_TRIE, _EXEMPT_KEY.size, len(_EXEMPT_VALUE)),
    MapSpec("t1_counters", bpf.BPF_MAP_TYPE_PERCPU_HASH, _COUNTER_KEY.size, _COUNTER_VALUE.size),
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
class SandboxEntry:
    """What t1_sandboxes holds for one veth (read back by `Tier1.sandbox`)."""

    ip: IPv4Address
    mac: bytes
    tcp_ports: tuple[tuple[int, int], ...]


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


def pack_sandbox(ip: IPv4Address, mac: str | bytes, tcp_ports: Iterable[PortSpec]) -> bytes:
    if not isinstance(ip, IPv4Address):
        raise Tier1Error("bad_sandbox", f"not an IPv4 address: {ip!r}")
    return _SANDBOX_HEAD.pack(ip.packed, mac_bytes(mac)) + port_bitmap(tcp_ports)


def unpack_sandbox(raw: bytes) -> SandboxEntry:
    ip, mac = _SANDBOX_HEAD.unpack_from(raw)
    return SandboxEntry(IPv4Address(ip), mac, bitmap_ranges(raw[_SANDBOX_HEAD.size :]))


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


def sum_percpu_counters(raw: bytes, cpus: int) -> Count:
    """Sum one per-CPU {packets, bytes} value over `cpus` slots of 8-byte-aligned values."""
    stride = (_COUNTER_VALUE.size + 7) // 8 * 8
    packets = byte_count = 0
    for cpu in range(cpus):
        p, b = _COUNTER_VALUE.unpack_from(raw, cpu * stride)
        packets += p
        byte_count += b
    return Count(packets, byte_count)


# ---------------------------------------------------------------------------
# Build.


def _multiarch_include() -> list[str]:
    machine = {"arm64": "aarch64"}.get(platform.machine(), platform.machine())
    path = Path(f"/usr/include/{machine}-linux-gnu")
    return ["-idirafter", str(path)] if path.is_dir() else []


def build_object(src: Path, out_dir: Path, *, clang: str = "clang") -> Path:
    """`out_dir/<stem>.o` compiled from `src` unless it is already newer than `src`."""
    out = out_dir / f"{src.stem}.o"
    try:
        src_mtime = src.stat().st_mtime_ns
    except OSError as exc:
        raise Tier1Error("build_failed", f"{src}: {exc.strerror}") from exc
    with contextlib.suppress(FileNotFoundError):
        if out.stat().st_mtime_ns >= src_mtime:
            return out
    compiler = shutil.which(clang)
    if compiler is None:
        raise Tier1Error("tool_missing", f"{clang} not found (apt-get install clang)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{src.stem}.", suffix=".o", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        raise Tier1Error("build_failed", f"{out_dir}: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    cmd = [
        compiler, "-O2", "-g", "-target", "bpf", "-Wall",
        *_multiarch_include(), "-c", str(src), "-o", str(tmp),
    ]  # fmt: skip
    try:
        result = _run(cmd, "build_failed")
        if result.returncode != 0:
            raise Tier1Error("build_failed", f"clang {src}: {result.stderr.strip()[-4000:]}")
        os.replace(tmp, out)
    except OSError as exc:
        raise Tier1Error("build_failed", f"{out}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _run(cmd: list[str], reason: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise Tier1Error("tool_missing", f"{cmd[0]}: {exc.strerror}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Tier1Error(reason, f"{cmd[0]}: {exc}") from exc


# ---------------------------------------------------------------------------
# bpffs.

_libc = ctypes.CDLL(None, use_errno=True)


def _mounts() -> dict[str, str]:
    """{mount point: filesystem type} of this mount namespace; the top mount wins."""
    out = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            before, _, after = line.partition(" - ")
            point = before.split(" ")[4].replace("\\040", " ").replace("\\011", "\t")
            out[point] = after.split(" ", 1)[0]
    return out


def _mount_bpffs(path: Path) -> None:
    fstype = _mounts().get(str(path))
    if fstype == "bpf":
        return
    if fstype is not None:
        raise Tier1Error("mount_failed", f"{path} is already a {fstype} mount")
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise Tier1Error("mount_failed", f"bpffs on {path}: {os.strerror(err)}")


def _umount(path: Path) -> None:
    if _mounts().get(str(path)) != "bpf":
        return
    if _libc.umount2(os.fsencode(path), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(os.fsencode(path), _MNT_DETACH) == 0:
        return
    raise Tier1Error("mount_failed", f"umount {path}: {os.strerror(err)}")


# ---------------------------------------------------------------------------
# The I/O edge.


class Tier1:
    """Tier 1 of one node: load once, attach per sandbox veth, program per sandbox.

    `denied`: the ranges to drop (see `denied_ranges`). `state_dir` is the
    node's own directory (bpffs mounted on ``state_dir/bpffs``, the compiled
    object in `cache_dir`, ``state_dir/cache`` by default).
    """

    def __init__(
        self,
        *,
        tun_ifindex: int,
        resolver: IPv4Address,
        denied: Iterable[DeniedRange],
        state_dir: Path,
        source: Path = DEFAULT_SOURCE,
        cache_dir: Path | None = None,
    ) -> None:
        if not isinstance(tun_ifindex, int) or tun_ifindex <= 0:
            raise Tier1Error("bad_config", f"TUN ifindex must be positive, got {tun_ifindex!r}")
        if not isinstance(resolver, IPv4Address):
            raise Tier1Error("bad_config", f"resolver must be an IPv4 address: {resolver!r}")
        self.tun_ifindex = tun_ifindex
        self.resolver = resolver
        self.denied = normalize_denied(denied)
        self.state_dir = Path(os.path.realpath(state_dir))
        self.pin_dir = self.state_dir / "bpffs"
        self.source = source
        self.cache_dir = cache_dir if cache_dir is not None else self.state_dir / "cache"
        self._prog_fd: int | None = None
        self._maps: dict[str, int] = {}
        self._attached: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------

    def load(self) -> None:
        """Build if needed, mount the bpffs, load and pin, fill config and denied ranges.

        Pins left by an earlier agent that died are replaced.
        """
        if self._prog_fd is not None:
            return
        obj = build_object(self.source, self.cache_dir)
        bpftool = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
        if bpftool is None:
            raise Tier1Error("tool_missing", "bpftool not found (apt-get install bpftool)")
        try:
            self.pin_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Tier1Error("mount_failed", f"{self.pin_dir}: {exc.strerror}") from exc
        _mount_bpffs(self.pin_dir)
        try:
            self._unpin()
            cmd = [bpftool, "prog", "load", str(obj), str(self._prog_pin),
                   "type", "classifier", "pinmaps", str(self._map_dir)]  # fmt: skip
            result = _run(cmd, "load_failed")
            if result.returncode != 0:
                detail = (result.stderr or result.stdout).strip()[-4000:]
                raise Tier1Error("load_failed", f"bpftool prog load {obj}: {detail}")
            self._open_pins()
            self._map_update("t1_config", CONFIG_KEY, pack_config(self.tun_ifindex, self.resolver))
            for entry in self.denied:
                self._map_update(
                    "t1_denied", pack_denied_key(entry.network), pack_denied_value(entry)
                )
        except BaseException:
            self._close_fds()
            with contextlib.suppress(Tier1Error):
                self._unpin()
                _umount(self.pin_dir)
            raise

    def close(self) -> None:
        """Detach from every veth this object attached to, unpin, unmount. Idempotent."""
        errors = []
        for ifname in list(self._attached):
            try:
                self.detach(ifname)
            except Tier1Error as exc:
                errors.append(exc)
                self._attached.pop(ifname, None)
        self._close_fds()
        try:
            self._unpin()
            _umount(self.pin_dir)
            with contextlib.suppress(FileNotFoundError):
                self.pin_dir.rmdir()
        except OSError as exc:
            errors.append(Tier1Error("mount_failed", f"{self.pin_dir}: {exc.strerror}"))
        except Tier1Error as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def prog_id(self) -> int:
        return bpf.prog_info(self._require_prog()).prog_id

    # -- tc -------------------------------------------------------------------

    def attach(self, ifname: str) -> int:
        """Ensure clsact and our ingress filter on `ifname`; returns its ifindex."""
        prog_fd = self._require_prog()
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=ifname)
                if not found:
                    raise Tier1Error("no_such_link", ifname)
                ifindex = int(found[0])
                try:
                    ipr.tc("add", "clsact", ifindex)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                ipr.tc(
                    "replace-filter", "bpf", ifindex, FILTER_HANDLE,
                    fd=prog_fd, name=FILTER_NAME, parent=_TC_H_CLSACT_INGRESS,
                    prio=FILTER_PRIO, protocol=_ETH_P_ALL, direct_action=True,
                )  # fmt: skip
        except NetlinkError as exc:
            raise Tier1Error("attach_failed", f"{ifname}: {os.strerror(exc.code)}") from exc
        except OSError as exc:
            raise Tier1Error("attach_failed", f"{ifname}: {exc}") from exc
        self._attached[ifname] = ifindex
        return ifindex

    def detach(self, ifname: str) -> None:
        """Remove our filter from `ifname` (and clsact once it holds nothing). Idempotent."""
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=ifname)
                if found:
                    self._detach_index(ipr, int(found[0]))
        except NetlinkError as exc:
            raise Tier1Error("detach_failed", f"{ifname}: {os.strerror(exc.code)}") from exc
        except OSError as exc:
            raise Tier1Error("detach_failed", f"{ifname}: {exc}") from exc
        self._attached.pop(ifname, None)

    @staticmethod
    def _detach_index(ipr: IPRoute, ifindex: int) -> None:
        gone = (errno.ENOENT, errno.ENODEV, errno.EINVAL)
        try:
            ipr.tc(
                "del-filter", "bpf", ifindex, FILTER_HANDLE,
                parent=_TC_H_CLSACT_INGRESS, prio=FILTER_PRIO, protocol=_ETH_P_ALL,
            )  # fmt: skip
        except NetlinkError as exc:
            if exc.code not in gone:
                raise
        try:
            left = [
                f
                for parent in (_TC_H_CLSACT_INGRESS, _TC_H_CLSACT_INGRESS + 1)
                for f in ipr.get_filters(ifindex, parent=parent)
            ]
            if not left:
                ipr.tc("del", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code not in gone:
                raise

    @property
    def attached(self) -> Mapping[str, int]:
        return dict(self._attached)

    # -- sandboxes ------------------------------------------------------------

    def set_sandbox(
        self,
        ifindex: int,
        ip: IPv4Address,
        mac: str | bytes,
        tcp_ports: Iterable[PortSpec],
        exemptions: Iterable[IPv4Network] = (),
    ) -> None:
        """Create or replace the sandbox behind veth `ifindex`.

        `exemptions` are the job's cidr rules that lie inside an overridable
        always-denied range (egressd.policy.addresses.overrides); any other
        network is refused with ``bad_exemption``. New exemptions go in
        before the entry, stale ones come out after it, so no packet sees a
        state that neither the old nor the new policy allows.
        """
        if not isinstance(ifindex, int) or ifindex <= 0:
            raise Tier1Error("bad_sandbox", f"ifindex must be positive, got {ifindex!r}")
        value = pack_sandbox(ip, mac, tcp_ports)
        wanted = {pack_exempt_key(ifindex, self._check_exemption(net)) for net in exemptions}
        stale = set(self._exempt_keys(ifindex)) - wanted
        for key in wanted:
            self._map_update("t1_exempt", key, _EXEMPT_VALUE)
        self._map_update("t1_sandboxes", _U32.pack(ifindex), value)
        for key in stale:
            self._map_delete("t1_exempt", key)

    def remove_sandbox(self, ifindex: int) -> None:
        """Forget the sandbox: its veth's frames drop as no_policy from now on. Idempotent."""
        self._map_delete("t1_sandboxes", _U32.pack(ifindex))
        for key in self._exempt_keys(ifindex):
            self._map_delete("t1_exempt", key)

    def sandbox(self, ifindex: int) -> SandboxEntry | None:
        raw = self._map_lookup("t1_sandboxes", _U32.pack(ifindex), SANDBOX_VALUE_SIZE)
        return None if raw is None else unpack_sandbox(raw)

    def sandboxes(self) -> dict[int, SandboxEntry]:
        out = {}
        for key in self._keys("t1_sandboxes"):
            raw = self._map_lookup("t1_sandboxes", key, SANDBOX_VALUE_SIZE)
            if raw is not None:
                out[_U32.unpack(key)[0]] = unpack_sandbox(raw)
        return out

    def exemptions(self, ifindex: int) -> set[IPv4Network]:
        return {unpack_exempt_key(key)[1] for key in self._exempt_keys(ifindex)}

    def _check_exemption(self, net: IPv4Network) -> IPv4Network:
        if not isinstance(net, IPv4Network):
            raise Tier1Error("bad_exemption", f"not an IPv4 network: {net!r}")
        around = [e for e in self.denied if net.subnet_of(e.network)]
        innermost = max(around, key=lambda e: e.network.prefixlen, default=None)
        if innermost is None or not innermost.overridable:
            raise Tier1Error("bad_exemption", f"{net} is not inside an overridable denied range")
        return net

    def _exempt_keys(self, ifindex: int) -> list[bytes]:
        return [k for k in self._keys("t1_exempt") if unpack_exempt_key(k)[0] == ifindex]

    # -- counters -------------------------------------------------------------

    def counters(self) -> dict[tuple[int, Reason], Count]:
        """{(ifindex, reason): (packets, bytes)} summed over CPUs."""
        size = bpf.percpu_value_size(_COUNTER_VALUE.size)
        cpus = bpf.possible_cpus()
        out = {}
        for key in self._keys("t1_counters"):
            raw = self._map_lookup("t1_counters", key, size)
            if raw is not None:
                out[unpack_counter_key(key)] = sum_percpu_counters(raw, cpus)
        return out

    def clear_counters(self, ifindex: int) -> dict[Reason, Count]:
        """Delete the veth's counters (when it is gone) and return their last values."""
        last = {r: c for (i, r), c in self.counters().items() if i == ifindex}
        for reason in last:
            self._map_delete("t1_counters", pack_counter_key(ifindex, reason))
        return last

    # -- maps -----------------------------------------------------------------

    @property
    def _prog_pin(self) -> Path:
        return self.pin_dir / "prog"

    @property
    def _map_dir(self) -> Path:
        return self.pin_dir / "maps"

    def _require_prog(self) -> int:
        if self._prog_fd is None:
            raise Tier1Error("not_loaded", "call load() first")
        return self._prog_fd

    def _fd(self, name: str) -> int:
        self._require_prog()
        return self._maps[name]

    def _open_pins(self) -> None:
        try:
            self._prog_fd = bpf.obj_get(self._prog_pin)
            info = bpf.prog_info(self._prog_fd)
            for spec in MAPS:
                fd = self._maps[spec.name] = bpf.obj_get(self._map_dir / spec.name)
                found = bpf.map_info(fd)
                shape = (found.map_type, found.key_size, found.value_size)
                if shape != (spec.map_type, spec.key_size, spec.value_size):
                    raise Tier1Error(
                        "abi_mismatch",
                        f"{spec.name}: kernel (type, key, value) {shape}, expected "
                        f"{(spec.map_type, spec.key_size, spec.value_size)}",
                    )
        except OSError as exc:
            raise Tier1Error("load_failed", f"{self.pin_dir}: {exc.strerror}") from exc
        if (info.prog_type, info.name) != (bpf.BPF_PROG_TYPE_SCHED_CLS, PROG_NAME):
            raise Tier1Error("abi_mismatch", f"pinned program is {info}")

    def _close_fds(self) -> None:
        for fd in [self._prog_fd, *self._maps.values()]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._prog_fd = None
        self._maps.clear()

    def _unpin(self) -> None:
        try:
            self._prog_pin.unlink(missing_ok=True)
            if self._map_dir.is_dir():
                for pin in self._map_dir.iterdir():
                    pin.unlink()
                self._map_dir.rmdir()
        except OSError as exc:
            raise Tier1Error("mount_failed", f"unpin {self.pin_dir}: {exc.strerror}") from exc

    def _map_update(self, name: str, key: bytes, value: bytes) -> None:
        try:
            bpf.map_update(self._fd(name), key, value)
        except OSError as exc:
            raise Tier1Error("map_failed", f"update {name}: {exc.strerror}") from exc

    def _map_delete(self, name: str, key: bytes) -> None:
        try:
            bpf.map_delete(self._fd(name), key)
        except OSError as exc:
            raise Tier1Error("map_failed", f"delete {name}: {exc.strerror}") from exc

    def _map_lookup(self, name: str, key: bytes, size: int) -> bytes | None:
        try:
            return bpf.map_lookup(self._fd(name), key, size)
        except OSError as exc:
            raise Tier1Error("map_failed", f"lookup {name}: {exc.strerror}") from exc

    def _keys(self, name: str) -> Iterator[bytes]:
        size = next(spec.key_size for spec in MAPS if spec.name == name)
        try:
            return iter(list(bpf.map_keys(self._fd(name), size)))
        except OSError as exc:
            raise Tier1Error("map_failed", f"keys of {name}: {exc.strerror}") from exc
