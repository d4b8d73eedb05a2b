"""`egressd.net.tun` on a real kernel, in a namespace of its own.

The namespace routes the node's sandbox CIDR to the TUN and owns the node's
underlay address on its loopback, so a packet written to the TUN is routed by
the kernel to a local socket, and the answer comes back out of the TUN.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw

from egressd.errors import EgressdError
from egressd.layout import NODE_TUN, SANDBOX_MTU, UNDERLAY_MTU, default_layout
from egressd.net.tun import Tun, TunError, open_tun
from tests.support.tier1 import Namespaces, in_netns, link, sh

pytestmark = pytest.mark.root("ip", "/dev/net/tun")

NODE = default_layout().nodes[0]
LOCAL = NODE.underlay  # owned by the namespace (on lo)
PEER = NODE.gateway + 1  # "a sandbox": routed into the TUN
TIMEOUT_S = 2.0


@pytest.fixture
def ns() -> Iterator[str]:
    spaces = Namespaces()
    try:
        name = spaces.create("u")
        sh("ip", "-n", name, "addr", "add", f"{LOCAL}/32", "dev", "lo")
        yield name
    finally:
        spaces.cleanup()


@pytest.fixture
def tun(ns: str) -> Iterator[Tun]:
    with in_netns(ns):
        dev = open_tun(NODE_TUN, mtu=UNDERLAY_MTU)
    try:
        sh("ip", "-n", ns, "route", "add", str(NODE.sandbox_cidr), "dev", NODE_TUN)
        yield dev
    finally:
        dev.close()


def _read(dev: Tun, timeout: float = TIMEOUT_S) -> bytes:
    buf = bytearray(UNDERLAY_MTU)
    ready, _, _ = select.select([dev.fd], [], [], timeout)
    assert ready, "nothing arrived on the TUN"
    n = dev.read_into(buf)
    assert n > 0
    return bytes(buf[:n])


def test_open_sets_up_the_device(ns: str, tun: Tun) -> None:
    info = link(ns, NODE_TUN)
    assert tun.name == NODE_TUN
    assert info["ifindex"] == tun.ifindex
    assert info["mtu"] == UNDERLAY_MTU
    assert "UP" in info["flags"]
    assert info["link_type"] == "none"  # L3: no Ethernet header, no packet info
    assert not os.get_blocking(tun.fd)
    assert tun.read_into(bytearray(64)) == 0  # nothing waiting: 0, no exception


def test_icmp_echo_to_a_local_address_comes_back(tun: Tun) -> None:
    echo = IP(src=str(PEER), dst=str(LOCAL), ttl=64) / ICMP(id=0x4567, seq=1) / Raw(b"egressd")
    assert tun.write(bytes(echo)) == len(echo)
    reply = IP(_read(tun))
    assert (reply.src, reply.dst) == (str(LOCAL), str(PEER))
    assert reply[ICMP].type == 0
    assert (reply[ICMP].id, reply[ICMP].seq) == (0x4567, 1)
    assert bytes(reply[Raw]) == b"egressd"


def test_udp_written_to_the_tun_reaches_a_socket_and_the_answer_returns(ns: str, tun: Tun) -> None:
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((str(LOCAL), 0))
        sock.settimeout(TIMEOUT_S)
        port = sock.getsockname()[1]
        tun.write(
            bytes(IP(src=str(PEER), dst=str(LOCAL)) / UDP(sport=40000, dport=port) / Raw(b"ping"))
        )
        data, addr = sock.recvfrom(100)
        assert (data, addr) == (b"ping", (str(PEER), 40000))
        sock.sendto(b"pong", addr)
    answer = IP(_read(tun))
    assert (answer.src, answer.dst, answer[UDP].dport) == (str(LOCAL), str(PEER), 40000)
    assert bytes(answer[UDP].payload) == b"pong"


async def test_asyncio_reader(tun: Tun) -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()
    buf = bytearray(UNDERLAY_MTU)

    def on_readable() -> None:
        while (n := tun.read_into(buf)) > 0:
            got.put_nowait(bytes(buf[:n]))

    loop.add_reader(tun.fd, on_readable)
    try:
        for seq in range(3):
            tun.write(bytes(IP(src=str(PEER), dst=str(LOCAL)) / ICMP(id=7, seq=seq)))
        seqs = sorted(
            [IP(await asyncio.wait_for(got.get(), TIMEOUT_S))[ICMP].seq for _ in range(3)]
        )
    finally:
        loop.remove_reader(tun.fd)
    assert seqs == [0, 1, 2]


def test_multi_queue_and_close(ns: str) -> None:
    with in_netns(ns):
        first = open_tun("mq0", multi_queue=True, mtu=SANDBOX_MTU)
        second = open_tun("mq0", multi_queue=True)
    try:
        assert first.ifindex == second.ifindex
        assert link(ns, "mq0")["mtu"] == SANDBOX_MTU
        first.close()
        first.close()  # idempotent
        assert first.closed
        with pytest.raises(TunError) as info:
            first.write(b"x")
        assert info.value.reason == "closed"
        link(ns, "mq0")  # still there: one queue left
    finally:
        first.close()
        second.close()
    assert "mq0" not in sh("ip", "-n", ns, "-o", "link", "show")


@pytest.mark.usefixtures("tun")
def test_errors_are_typed(ns: str) -> None:
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(TunError) as info:
            open_tun(bad)
        assert info.value.reason == "bad_name"
        assert isinstance(info.value, EgressdError)
    with in_netns(ns):
        # Not multi-queue: a second queue on the same device is refused (EBUSY).
        with pytest.raises(TunError) as info:
            open_tun(NODE_TUN)
        assert info.value.reason == "open_failed"
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(TunError) as info:
            open_tun("mtu0", mtu=10**6)
        assert info.value.reason == "configure_failed"
    assert "mtu0" not in sh("ip", "-n", ns, "-o", "link", "show")
