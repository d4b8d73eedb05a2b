"""Tier 1 on a test bed: the real tc program on a sandbox veth pair (h1/s1, and h2/s2 with
another MAC) in throwaway namespaces, the node's TUN, and AF_PACKET sockets on the sandbox
side to send frames from (`make_topology`); `expect_verdict` checks one frame's counter."""

from __future__ import annotations

import select
import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from scapy.layers.l2 import Dot1AD, Dot1Q
from scapy.packet import Packet

from egressd.agent.tier1 import (
    Bucket,
    Count,
    PortSpec,
    Reason,
    Tier1,
    denied_ranges,
)
from egressd.layout import (
    NODE_TUN,
    RESOLVER,
    SANDBOX_MTU,
    UNDERLAY_MTU,
    default_layout,
)
from egressd.net.tun import Tun, open_tun
from tests.support.tier1 import (
    Namespaces,
    in_netns,
    mac,
    packet_socket,
    sh,
    sysctl,
)

LAYOUT = default_layout()
NODE = LAYOUT.nodes[0]
GATEWAY = NODE.gateway
SBX_IP = NODE.gateway + 1
SBX_MAC = "02:00:00:00:01:02"
OTHER_MAC = "02:00:00:00:01:99"
API = LAYOUT.site("api.allowed.test").address
PORTS: list[PortSpec] = [443, 80, (8000, 8010)]
# The policy defaults (egressd.policy.model.Limits): far above what these tests send.
DNS_BUCKET = Bucket.per_second(50)
SYN_BUCKET = Bucket.per_second(200)
SETTLE_S = 2.0
VLAN_TAG_LEN = 4


@dataclass
class Bed:
    node: str
    sandbox: str
    tier1: Tier1
    tun: Tun
    h1: int
    h2: int
    h1_mac: str
    s1: socket.socket
    s2: socket.socket
    pending: list[bytes] = field(default_factory=list)

    def program(
        self,
        exemptions: tuple[IPv4Network, ...] = (),
        *,
        dns: Bucket = DNS_BUCKET,
        syn: Bucket = SYN_BUCKET,
    ) -> None:
        self.tier1.set_sandbox(self.h1, SBX_IP, SBX_MAC, PORTS, exemptions, dns=dns, syn=syn)

    def drain_tun(self) -> list[bytes]:
        out = []
        buf = bytearray(65536)
        while (n := self.tun.read_into(buf)) > 0:
            out.append(bytes(buf[:n]))
        return out

    def tun_packets(self, timeout: float) -> list[bytes]:
        select.select([self.tun.fd], [], [], timeout)
        return self.drain_tun()

    def send(self, frame: Packet | bytes, sock: socket.socket | None = None) -> bytes:
        raw = bytes(frame)
        (sock or self.s1).send(raw)
        return raw


def make_topology(stack: ExitStack, tmp: Path) -> Bed:
    spaces = Namespaces()
    stack.callback(spaces.cleanup)
    node, sandbox = spaces.create("n"), spaces.create("s")
    for host, peer, peer_mac in (("h1", "s1", SBX_MAC), ("h2", "s2", OTHER_MAC)):
        sh(
            "ip",
            "-n",
            node,
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            sandbox,
        )
        sh(
            "ip",
            "-n",
            sandbox,
            "link",
            "set",
            peer,
            "address",
            peer_mac,
            "mtu",
            str(SANDBOX_MTU),
            "up",
        )
        sh("ip", "-n", node, "link", "set", host, "mtu", str(SANDBOX_MTU), "up")
    sh("ip", "-n", sandbox, "addr", "add", f"{SBX_IP}/{NODE.sandbox_cidr.prefixlen}", "dev", "s1")
    sh("ip", "-n", node, "addr", "add", f"{GATEWAY}/{NODE.sandbox_cidr.prefixlen}", "dev", "h1")
    # What the agent's node looks like: the sandbox routes via the gateway, the
    # node forwards what the agent writes to the TUN back to the sandbox veth.
    sh("ip", "-n", sandbox, "route", "add", "default", "via", str(GATEWAY), "dev", "s1")
    sysctl(node, "net.ipv4.ip_forward", "1")

    with in_netns(node):
        tun = open_tun(NODE_TUN, mtu=UNDERLAY_MTU)
    stack.callback(tun.close)
    tier1 = Tier1(
        tun_ifindex=tun.ifindex,
        resolver=RESOLVER,
        denied=denied_ranges(LAYOUT.fleet_ranges),
        state_dir=tmp / "node",
    )

    def close_tier1() -> None:
        with in_netns(node):
            tier1.close()

    stack.callback(close_tier1)
    tier1.load()
    with in_netns(node):
        h1, h2 = tier1.attach("h1"), tier1.attach("h2")
    s1 = packet_socket(sandbox, "s1")
    stack.callback(s1.close)
    s2 = packet_socket(sandbox, "s2")
    stack.callback(s2.close)
    return Bed(node, sandbox, tier1, tun, h1, h2, mac(node, "h1"), s1, s2)


def counter_delta(
    before: dict[tuple[int, Reason], Count], after: dict[tuple[int, Reason], Count], ifindex: int
) -> dict[Reason, Count]:
    out = {}
    for (idx, reason), now in after.items():
        if idx != ifindex:
            continue
        old = before.get((idx, reason), Count(0, 0))
        if now != old:
            out[reason] = Count(now.packets - old.packets, now.bytes - old.bytes)
    return out


def expect_verdict(
    bed: Bed,
    frame: Packet | bytes,
    reason: Reason,
    *,
    ifindex: int | None = None,
    sock: socket.socket | None = None,
) -> bytes:
    """Send one frame; exactly one counter moves, by one packet of the frame's length."""
    idx = bed.h1 if ifindex is None else ifindex
    before = bed.tier1.counters()
    raw = bed.send(frame, sock)
    # The receive path moves one VLAN tag into skb metadata before tc runs.
    tagged = isinstance(frame, Packet) and (Dot1Q in frame or Dot1AD in frame)
    wire_len = len(raw) - VLAN_TAG_LEN if tagged else len(raw)
    deadline = time.monotonic() + SETTLE_S
    while True:
        delta = counter_delta(before, bed.tier1.counters(), idx)
        if delta or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    assert delta == {reason: Count(1, wire_len)}
    return raw
