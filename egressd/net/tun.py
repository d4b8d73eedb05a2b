"""TUN devices (IFF_TUN | IFF_NO_PI): raw IPv4 packets in and out of the kernel.

`open_tun` creates the device in the calling thread's network namespace (or
attaches one more queue to an existing multi-queue device), brings it up and
sets its MTU, all with ioctls on sockets opened by the calling thread: nothing
here forks, and nothing reaches into another namespace. The fd is
non-blocking by default, ready for ``loop.add_reader(tun.fd, ...)``.

The device lives as long as one of its queues is open (it is not persistent):
closing the last `Tun` removes it.
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

    __slots__ = ("_fd", "ifindex", "name")

    def __init__(self, fd: int, name: str, ifindex: int) -> None:
        self._fd = fd
        self.name = name
        self.ifindex = ifindex

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
    name: str, *, mtu: int | None = None, multi_queue: bool = False, blocking: bool = False
) -> Tun:
    """Create (or attach a queue to) TUN `name` in this thread's netns, set it up.

    With `multi_queue`, each call on the same name adds a queue (the kernel
    spreads flows over queues); every call must pass it, as the kernel refuses
    to mix. `mtu`, when given, is set on the device.
    """
    raw_name = _ifname(name)
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
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
        os.set_blocking(fd, blocking)
        ifindex = _configure(actual, mtu)
    except BaseException:
        os.close(fd)
        raise
    return Tun(fd, actual, ifindex)


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


__all__ = ["IFF_MULTI_QUEUE", "IFF_NO_PI", "IFF_TUN", "Tun", "TunError", "open_tun"]
