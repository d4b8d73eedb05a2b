"""Helpers for the tier-1 and TUN integration tests: throwaway namespaces, setns.

Everything created here lives in network namespaces named ``egd-t<random>``;
nothing touches the host's own interfaces. `Namespaces.cleanup` removes them
(and with them every veth and TUN inside) and is always called from fixture
finalizers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x4000_0000
NETNS_DIR = Path("/run/netns")
PREFIX = "egd-t"

_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with this thread in netns `name`; always switch back.

    Sockets, TUNs and netlink sockets opened in the block stay in `name`.
    """
    assert name.startswith(PREFIX), name
    home_ino = _netns_inode()
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
    assert _netns_inode() == home_ino


class Namespaces:
    """Creates ``egd-t<hex><tag>`` namespaces; `cleanup` deletes every one it made."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.names: list[str] = []

    def create(self, tag: str) -> str:
        name = f"{PREFIX}{self.run_id}{tag}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        for key in ("all", "default"):
            sysctl(name, f"net.ipv6.conf.{key}.disable_ipv6", "1")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def cleanup(self) -> None:
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)
        self.names.clear()


def sysctl(ns: str, key: str, value: str) -> None:
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}")


def link(ns: str, ifname: str) -> dict[str, Any]:
    data = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", ifname))
    assert isinstance(data, list)
    assert len(data) == 1
    out: dict[str, Any] = data[0]
    return out


def ifindex(ns: str, ifname: str) -> int:
    return int(link(ns, ifname)["ifindex"])


def mac(ns: str, ifname: str) -> str:
    return str(link(ns, ifname)["address"])


def ingress_filters(ns: str, ifname: str) -> list[str]:
    """The ``handle`` lines of ``tc filter show dev IFNAME ingress`` (one per filter)."""
    out = sh("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", ifname, "ingress")
    return [line for line in out.splitlines() if " handle " in line]


def packet_socket(ns: str, ifname: str, proto: int = 0) -> socket.socket:
    """An AF_PACKET socket bound to `ifname` in `ns` (blocking with a 2 s timeout).

    With `proto` 0 it only sends; give an ethertype to receive those frames too.
    """
    with in_netns(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        sock.bind((ifname, proto))
        sock.settimeout(2.0)
    except OSError:
        sock.close()
        raise
    return sock
