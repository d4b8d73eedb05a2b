"""TUN devices (IFF_TUN | IFF_NO_PI): raw IPv4 packets in and out of the kernel.

`open_tun` creates the device in the calling thread's network namespace (or
attaches one more queue to an existing multi-queue device), brings it up and
sets its MTU, all with ioctls on sockets opened by the calling thread: nothing
here forks, and nothing reaches into another namespace. The fd is
non-blocking by default, ready for ``loop.add_reader(tun.fd, ...)``.

The device lives as long as one of its queues is open (it is not persistent):
closing the last `Tun` removes it.

Offloads (`open_tun(..., vnet_hdr=True, offload=TUN_F_CSUM | TUN_F_TSO4)`), as
wireguard-go and tailscale use them: with ``IFF_VNET_HDR`` every read and
write starts with a 10-byte ``struct virtio_net_hdr`` (flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset; little-endian, the host's order
on every platform we run on), and ``TUNSETOFFLOAD`` lets the kernel hand up
TCP super-packets of up to 64 KiB (``gso_type`` TCPV4, ``gso_size`` the MSS)
and packets whose L4 checksum is still partial (``VIRTIO_NET_HDR_F_NEEDS_CSUM``,
the checksum to be folded in at ``csum_start + csum_offset``). A write with
such a header is segmented (or handed whole to the local stack) by the
kernel. Without `vnet_hdr` nothing changes: one plain IPv4 packet per call.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Final, Self, TypeAlias

from egressd.errors import EgressdError

TUN_DEVICE: Final = "/dev/net/tun"
IFNAMSIZ: Final = 16

# <linux/if_tun.h>
TUNSETIFF: Final = 0x400454CA
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFF_MULTI_QUEUE: Final = 0x0100
IFF_VNET_HDR: Final = 0x4000
TUNSETOFFLOAD: Final = 0x400454D0
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
# <linux/virtio_net.h>
VNET_HDR_LEN: Final = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2
VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VNET_HDR: Final = struct.Struct(
    "<BBHHHH"
)  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NO_VNET_HDR: Final = bytes(VNET_HDR_LEN)  # a plain packet: no GSO, checksums complete
# <linux/sockios.h>, <net/if.h>
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
SIOCSIFMTU: Final = 0x8922
SIOCGIFINDEX: Final = 0x8933
IFF_UP: Final = 0x1

# collections.abc.Buffer is 3.12+; these are the buffers the agent uses.
WritableBuffer: TypeAlias = bytearray | memoryview
ReadableBuffer: TypeAlias = bytes | bytearray | memoryview

_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")


class TunError(EgressdError):
    """A TUN device could not be opened, configured, read or written.

    Reasons: bad_name, open_failed, configure_failed, read_failed,
    write_failed, closed.
    """


class Tun:
    """One queue of a TUN device. Use `open_tun` to get one."""

    __slots__ = ("_fd", "ifindex", "name", "offload", "vnet_hdr")

    def __init__(
        self, fd: int, name: str, ifindex: int, *, vnet_hdr: bool = False, offload: int = 0
    ) -> None:
        self._fd = fd
        self.name = name
        self.ifindex = ifindex
        # With vnet_hdr every packet read or written starts with VNET_HDR_LEN bytes.
        self.vnet_hdr = vnet_hdr
        self.offload = offload

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise TunError("closed", self.name)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self.fd

    def read_into(self, buf: WritableBuffer) -> int:
        """Read one packet into `buf`; its length, or 0 when none is waiting (non-blocking).

        A packet longer than `buf` is truncated (size `buf` to the MTU).
        """
        try:
            return os.readv(self.fd, [buf])
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise TunError("read_failed", f"{self.name}: {exc.strerror}") from exc

    def write(self, packet: ReadableBuffer) -> int:
        """Hand one IP packet to the kernel; returns the bytes written."""
        try:
            return os.write(self.fd, packet)
        except OSError as exc:
            raise TunError("write_failed", f"{self.name}: {exc.strerror}") from exc

    def set_blocking(self, blocking: bool) -> None:
        os.set_blocking(self.fd, blocking)

    def close(self) -> None:
        """Close this queue (the device goes with its last queue). Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tun(name={self.name!r}, ifindex={self.ifindex}, fd={self._fd})"


def _ifname(name: str) -> bytes:
    raw = name.encode("ascii", "replace")
    if not raw or len(raw) >= IFNAMSIZ or any(c in raw for c in b"/ :?\0") or raw in (b".", b".."):
        raise TunError("bad_name", f"not a valid interface name: {name!r}")
    return raw


def open_tun(
    name: str,
    *,
    mtu: int | None = None,
    multi_queue: bool = False,
    blocking: bool = False,
    vnet_hdr: bool = False,
    offload: int = 0,
) -> Tun:
    """Create (or attach a queue to) TUN `name` in this thread's netns, set it up.

    With `multi_queue`, each call on the same name adds a queue (the kernel
    spreads flows over queues); every call must pass it, as the kernel refuses
    to mix. `mtu`, when given, is set on the device. `vnet_hdr` opens it with
    ``IFF_VNET_HDR``; `offload` (``TUN_F_*`` bits, needs `vnet_hdr`) is then
    given to ``TUNSETOFFLOAD``.
    """
    raw_name = _ifname(name)
    if offload and not vnet_hdr:
        raise TunError("configure_failed", f"{name}: offloads need vnet_hdr")
    if offload & ~(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6):
        raise TunError("configure_failed", f"{name}: unsupported offload bits 0x{offload:x}")
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
    flags |= IFF_VNET_HDR if vnet_hdr else 0
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError("open_failed", f"{TUN_DEVICE}: {exc.strerror}") from exc
    try:
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(raw_name, flags))
        except OSError as exc:
            raise TunError("open_failed", f"TUNSETIFF {name}: {exc.strerror}") from exc
        actual = _IFREQ_FLAGS.unpack(ifr)[0].rstrip(b"\0").decode("ascii")
        if vnet_hdr:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
            except OSError as exc:
                raise TunError("configure_failed", f"TUNSETOFFLOAD {name}: {exc.strerror}") from exc
        os.set_blocking(fd, blocking)
        ifindex = _configure(actual, mtu)
    except BaseException:
        os.close(fd)
        raise
    return Tun(fd, actual, ifindex, vnet_hdr=vnet_hdr, offload=offload)


def _configure(name: str, mtu: int | None) -> int:
    """Set MTU and IFF_UP on `name`; return its ifindex (ioctls in this thread's netns)."""
    raw = name.encode("ascii")
    if mtu is not None and not (isinstance(mtu, int) and 0 < mtu < 2**31):
        raise TunError("configure_failed", f"{name}: bad MTU {mtu!r}")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            if mtu is not None:
                fcntl.ioctl(sock, SIOCSIFMTU, _IFREQ_INT.pack(raw, mtu))
            ifr = fcntl.ioctl(sock, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0))
            flags = _IFREQ_FLAGS.unpack(ifr)[1]
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw, flags | IFF_UP))
            ifr = fcntl.ioctl(sock, SIOCGIFINDEX, _IFREQ_INT.pack(raw, 0))
            return int(_IFREQ_INT.unpack(ifr)[1])
    except OSError as exc:
        raise TunError("configure_failed", f"{name}: {exc.strerror}") from exc


def vnet_header(
    flags: int = 0,
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """A 10-byte ``struct virtio_net_hdr`` (little-endian)."""
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TUN",
    "IFF_VNET_HDR",
    "NO_VNET_HDR",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "Tun",
    "TunError",
    "open_tun",
    "vnet_header",
]
