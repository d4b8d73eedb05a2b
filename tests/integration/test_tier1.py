"""Tier 1 on a real kernel: real frames from a sandbox namespace through the tc program.

Topology (all in ``egd-t*`` namespaces made here):

    sandbox ns: s1 (sandbox MAC/IP) ---- veth ---- h1 (gateway/24)  : node ns
                s2 (no policy)      ---- veth ---- h2               : node ns
                                                   egr0 (TUN)       : node ns

Frames are built with scapy (the oracle) and sent on AF_PACKET sockets opened
in the sandbox namespace; verdicts are read back from the counters map and
from the TUN.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import (
    ICMP,
    IP,
    TCP,
    UDP,
    IPOption_EOL,
    IPOption_LSRR,
    IPOption_NOP,
    IPOption_Router_Alert,
)
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from egressd.agent.tier1 import (
    Bucket,
    Count,
    Reason,
    Tier1,
    Tier1Error,
)
from egressd.ebpf import syscall as bpf_syscall
from egressd.layout import (
    CONTROL_ADDR,
    METADATA,
    RESOLVER,
    UNDERLAY_MTU,
)
from tests.support.tier1 import (
    in_netns,
    ingress_filters,
    packet_socket,
    sh,
)
from tests.support.tier1_bed import (
    API,
    DNS_BUCKET,
    GATEWAY,
    NODE,
    OTHER_MAC,
    SBX_IP,
    SBX_MAC,
    SETTLE_S,
    SYN_BUCKET,
    Bed,
    counter_delta,
    expect_verdict,
    make_topology,
)

pytestmark = pytest.mark.root("ip", "tc", "bpftool", "clang", "/dev/net/tun")

PRIVATE = IPv4Address("10.1.2.3")  # inside 10/8, overridable by a cidr rule
PRIVATE_NET = IPv4Network("10.1.2.0/24")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with ExitStack() as stack:
        yield make_topology(stack, tmp_path_factory.mktemp("tier1"))


@pytest.fixture(autouse=True)
def _fresh_policy(request: pytest.FixtureRequest) -> None:
    if "bed" in request.fixturenames:
        bed: Bed = request.getfixturevalue("bed")
        bed.program()
        bed.drain_tun()


def _tcp(dst: IPv4Address, dport: int, **ip: Any) -> Packet:
    return (
        Ether(src=SBX_MAC)
        / IP(src=str(SBX_IP), dst=str(dst), **ip)
        / TCP(sport=40000, dport=dport, flags="S", seq=1)
    )


def _udp(dst: IPv4Address, dport: int) -> Packet:
    return (
        Ether(src=SBX_MAC)
        / IP(src=str(SBX_IP), dst=str(dst))
        / UDP(sport=40001, dport=dport)
        / Raw(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    )


def _with_dst_mac(bed: Bed, frame: Packet) -> Packet:
    if Ether in frame:
        frame[Ether].dst = bed.h1_mac
    return frame


REDIRECTED: dict[str, Callable[[], Packet]] = {
    "tcp_443": lambda: _tcp(API, 443),
    "tcp_80": lambda: _tcp(API, 80),
    "tcp_range_low": lambda: _tcp(API, 8000),
    "tcp_range_high": lambda: _tcp(API, 8010),
    "udp_dns_resolver": lambda: _udp(RESOLVER, 53),
    "tcp_dns_resolver": lambda: _tcp(RESOLVER, 53),
    "tcp_with_options": lambda: (
        Ether(src=SBX_MAC)
        / IP(src=str(SBX_IP), dst=str(API))
        / TCP(
            sport=40000,
            dport=443,
            flags="S",
            options=[("MSS", 1396), ("SAckOK", b""), ("WScale", 7)],
        )
    ),
}

DROPPED: dict[str, tuple[Callable[[], Packet], Reason]] = {
    "port_22": (lambda: _tcp(API, 22), Reason.PORT_NOT_ALLOWED),
    "port_above_range": (lambda: _tcp(API, 8011), Reason.PORT_NOT_ALLOWED),
    "udp_53_elsewhere": (lambda: _udp(API, 53), Reason.UDP_NOT_DNS),
    "udp_resolver_other_port": (lambda: _udp(RESOLVER, 123), Reason.UDP_NOT_DNS),
    "tcp_resolver_other_port": (lambda: _tcp(RESOLVER, 443), Reason.FLEET_RANGE),
    "metadata": (lambda: _tcp(METADATA, 80), Reason.DENIED_RANGE),
    "private": (lambda: _tcp(PRIVATE, 443), Reason.DENIED_RANGE),
    "loopback": (lambda: _tcp(IPv4Address("127.0.0.1"), 443), Reason.DENIED_RANGE),
    "multicast": (lambda: _tcp(IPv4Address("224.0.0.1"), 443), Reason.DENIED_RANGE),
    "control_plane": (lambda: _tcp(CONTROL_ADDR, 443), Reason.FLEET_RANGE),
    "other_sandbox": (lambda: _tcp(NODE.gateway + 5, 443), Reason.FLEET_RANGE),
    "node_gateway": (lambda: _tcp(GATEWAY, 443), Reason.FLEET_RANGE),
    "spoofed_ip": (
        lambda: Ether(src=SBX_MAC) / IP(src=str(SBX_IP + 1), dst=str(API)) / TCP(dport=443),
        Reason.SPOOFED_IP,
    ),
    "spoofed_mac": (
        lambda: Ether(src=OTHER_MAC) / IP(src=str(SBX_IP), dst=str(API)) / TCP(dport=443),
        Reason.SPOOFED_MAC,
    ),
    "ipv6": (
        lambda: Ether(src=SBX_MAC) / IPv6(src="fd00::2", dst="2001:db8::1") / TCP(dport=443),
        Reason.IPV6,
    ),
    "not_ipv4": (lambda: Ether(src=SBX_MAC, type=0x88B5) / Raw(b"\x00" * 46), Reason.NOT_IPV4),
    "vlan": (
        lambda: (
            Ether(src=SBX_MAC) / Dot1Q(vlan=5) / IP(src=str(SBX_IP), dst=str(API)) / TCP(dport=443)
        ),
        Reason.NOT_IPV4,
    ),
    "qinq": (
        lambda: (
            Ether(src=SBX_MAC)
            / Dot1AD(vlan=5)
            / Dot1Q(vlan=6)
            / IP(src=str(SBX_IP), dst=str(API))
            / TCP(dport=443)
        ),
        Reason.NOT_IPV4,
    ),
    "vlan_arp": (
        lambda: (
            Ether(src=SBX_MAC, dst="ff:ff:ff:ff:ff:ff")
            / Dot1Q(vlan=5)
            / ARP(op=1, hwsrc=SBX_MAC, psrc=str(SBX_IP), pdst=str(GATEWAY))
        ),
        Reason.NOT_IPV4,
    ),
    "icmp": (
        lambda: Ether(src=SBX_MAC) / IP(src=str(SBX_IP), dst=str(API)) / ICMP(),
        Reason.PROTO_NOT_ALLOWED,
    ),
    "gre": (
        lambda: Ether(src=SBX_MAC) / IP(src=str(SBX_IP), dst=str(API), proto=47) / Raw(b"\x00" * 8),
        Reason.PROTO_NOT_ALLOWED,
    ),
    "fragment_first": (lambda: _tcp(API, 443, flags="MF"), Reason.FRAGMENT),
    "fragment_later": (
        lambda: (
            Ether(src=SBX_MAC)
            / IP(src=str(SBX_IP), dst=str(API), frag=100, proto=6)
            / Raw(b"x" * 16)
        ),
        Reason.FRAGMENT,
    ),
    "bad_ihl": (lambda: _tcp(API, 443, ihl=4), Reason.MALFORMED),
    "ip_options_router_alert": (
        lambda: _tcp(API, 443, options=[IPOption_Router_Alert()]),
        Reason.IP_OPTIONS,
    ),
    "ip_options_nop_eol": (
        lambda: _tcp(
            API, 443, options=[IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()]
        ),
        Reason.IP_OPTIONS,
    ),
    "ip_options_loose_source_route": (
        lambda: _tcp(API, 443, options=[IPOption_LSRR(routers=[str(GATEWAY + 7)])]),
        Reason.IP_OPTIONS,
    ),
    "ip_options_to_resolver": (
        lambda: (
            Ether(src=SBX_MAC)
            / IP(src=str(SBX_IP), dst=str(RESOLVER), options=[IPOption_Router_Alert()])
            / UDP(sport=40001, dport=53)
            / Raw(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        ),
        Reason.IP_OPTIONS,
    ),
    "ip_len_past_frame": (lambda: _tcp(API, 443, len=400), Reason.MALFORMED),
    "tcp_truncated": (
        lambda: (
            Ether(src=SBX_MAC)
            / IP(src=str(SBX_IP), dst=str(API), proto=6)
            / Raw(b"\x9c\x40\x01\xbb")
        ),
        Reason.MALFORMED,
    ),
    "arp_spoofed_sender_ip": (
        lambda: (
            Ether(src=SBX_MAC, dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=SBX_MAC, psrc=str(SBX_IP + 1), pdst=str(GATEWAY))
        ),
        Reason.SPOOFED,
    ),
    "arp_spoofed_sender_mac": (
        lambda: (
            Ether(src=SBX_MAC, dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=OTHER_MAC, psrc=str(SBX_IP), pdst=str(GATEWAY))
        ),
        Reason.SPOOFED,
    ),
}


@pytest.mark.parametrize("name", list(REDIRECTED))
def test_allowed_frame_arrives_on_tun_as_the_same_ipv4_packet(bed: Bed, name: str) -> None:
    raw = expect_verdict(bed, _with_dst_mac(bed, REDIRECTED[name]()), Reason.REDIRECTED)
    packets = bed.tun_packets(SETTLE_S)
    assert packets == [raw[14:]]
    assert IP(packets[0]).version == 4


@pytest.mark.parametrize("name", list(DROPPED))
def test_dropped_frame_is_counted_by_reason_and_not_forwarded(bed: Bed, name: str) -> None:
    build, reason = DROPPED[name]
    expect_verdict(bed, _with_dst_mac(bed, build()), reason)
    assert bed.tun_packets(0.05) == []


def test_arp_for_the_gateway_is_answered(bed: Bed) -> None:
    request = Ether(src=SBX_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=SBX_MAC, psrc=str(SBX_IP), pdst=str(GATEWAY)
    )
    arp_sock = packet_socket(bed.sandbox, "s1", proto=0x0806)
    try:
        expect_verdict(bed, request, Reason.ARP)
        deadline = time.monotonic() + SETTLE_S
        reply = None
        while time.monotonic() < deadline and reply is None:
            data, addr = arp_sock.recvfrom(2048)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            frame = Ether(data)
            if ARP in frame and frame[ARP].op == 2:
                reply = frame[ARP]
    finally:
        arp_sock.close()
    assert reply is not None
    assert reply.psrc == str(GATEWAY)
    assert reply.hwsrc == bed.h1_mac
    assert reply.pdst == str(SBX_IP)


def test_unregistered_veth_drops_no_policy(bed: Bed) -> None:
    frame = Ether(src=OTHER_MAC) / IP(src=str(SBX_IP + 1), dst=str(API)) / TCP(dport=443)
    expect_verdict(bed, frame, Reason.NO_POLICY, ifindex=bed.h2, sock=bed.s2)
    assert bed.tun_packets(0.05) == []


def test_remove_sandbox_then_no_policy(bed: Bed) -> None:
    frame = _with_dst_mac(bed, _tcp(API, 443))
    expect_verdict(bed, frame, Reason.REDIRECTED)
    bed.drain_tun()
    bed.tier1.remove_sandbox(bed.h1)
    bed.tier1.remove_sandbox(bed.h1)  # idempotent
    assert bed.tier1.sandbox(bed.h1) is None
    expect_verdict(bed, frame, Reason.NO_POLICY)
    assert bed.tun_packets(0.05) == []


def test_exemption_opens_only_its_cidr_and_is_withdrawn(bed: Bed) -> None:
    bed.program(exemptions=(PRIVATE_NET,))
    assert bed.tier1.exemptions(bed.h1) == {PRIVATE_NET}
    expect_verdict(bed, _with_dst_mac(bed, _tcp(PRIVATE, 443)), Reason.REDIRECTED)
    assert len(bed.tun_packets(SETTLE_S)) == 1
    expect_verdict(bed, _with_dst_mac(bed, _tcp(PRIVATE, 22)), Reason.PORT_NOT_ALLOWED)
    expect_verdict(bed, _with_dst_mac(bed, _tcp(IPv4Address("10.1.3.3"), 443)), Reason.DENIED_RANGE)
    # An unrelated veth does not inherit the exemption.
    frame = Ether(src=OTHER_MAC) / IP(src=str(SBX_IP + 1), dst=str(PRIVATE)) / TCP(dport=443)
    expect_verdict(bed, frame, Reason.NO_POLICY, ifindex=bed.h2, sock=bed.s2)

    bed.program()
    assert bed.tier1.exemptions(bed.h1) == set()
    expect_verdict(bed, _with_dst_mac(bed, _tcp(PRIVATE, 443)), Reason.DENIED_RANGE)


def test_whole_cgnat_exemption_never_reopens_fleet_or_resolver(bed: Bed) -> None:
    bed.program(exemptions=(IPv4Network("100.64.0.0/10"),))
    expect_verdict(bed, _with_dst_mac(bed, _tcp(IPv4Address("100.64.0.9"), 443)), Reason.REDIRECTED)
    expect_verdict(bed, _with_dst_mac(bed, _tcp(NODE.gateway + 5, 443)), Reason.FLEET_RANGE)
    expect_verdict(bed, _with_dst_mac(bed, _tcp(RESOLVER, 443)), Reason.FLEET_RANGE)


@pytest.mark.parametrize(
    "net", ["127.0.0.0/8", "198.18.0.0/24", "100.96.1.0/24", "203.0.113.0/24", "0.0.0.0/0"]
)
def test_exemption_outside_overridable_ranges_is_refused(bed: Bed, net: str) -> None:
    with pytest.raises(Tier1Error) as info:
        bed.program(exemptions=(IPv4Network(net),))
    assert info.value.reason == "bad_exemption"
    assert bed.tier1.exemptions(bed.h1) == set()


def test_sandbox_entry_reads_back(bed: Bed) -> None:
    entry = bed.tier1.sandbox(bed.h1)
    assert entry is not None
    assert (entry.ip, entry.mac.hex(":")) == (SBX_IP, SBX_MAC)
    assert entry.tcp_ports == ((80, 80), (443, 443), (8000, 8010))
    assert (entry.dns, entry.syn) == (DNS_BUCKET, SYN_BUCKET)
    assert set(bed.tier1.sandboxes()) == {bed.h1}


def test_attach_is_idempotent(bed: Bed) -> None:
    with in_netns(bed.node):
        assert bed.tier1.attach("h1") == bed.h1
        assert bed.tier1.attach("h1") == bed.h1
    assert len(ingress_filters(bed.node, "h1")) == 1
    expect_verdict(bed, _with_dst_mac(bed, _tcp(API, 443)), Reason.REDIRECTED)


def test_clear_counters_returns_last_values(bed: Bed) -> None:
    frame = Ether(src=OTHER_MAC) / IP(src=str(SBX_IP + 1), dst=str(API)) / TCP(dport=443)
    expect_verdict(bed, frame, Reason.NO_POLICY, ifindex=bed.h2, sock=bed.s2)
    last = bed.tier1.clear_counters(bed.h2)
    assert last[Reason.NO_POLICY].packets >= 1
    assert all(idx != bed.h2 for idx, _ in bed.tier1.counters())


# -- topologies of their own ------------------------------------------------------------


def test_kernel_tcp_round_trip_through_the_tun(tmp_path: Path) -> None:
    """A real TCP stack behind the veth: offloaded checksums and GSO come out right.

    The sandbox's kernel connects to the API; the test plays the agent and the
    server by writing the SYN-ACK into the TUN (the node forwards it to the
    veth), then reads the client's data segments from the TUN. The sandbox
    hands the veth CHECKSUM_PARTIAL and TSO super-packets; what the TUN yields
    must be MTU-sized segments with correct checksums.
    """
    payload = bytes(range(256)) * 64  # 16 KiB: several segments, TSO on the veth
    server_mss = 1200
    with ExitStack() as stack:
        bed = make_topology(stack, tmp_path)
        bed.program()
        with in_netns(bed.sandbox):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stack.callback(client.close)
        client.setblocking(False)
        assert client.connect_ex((str(API), 443)) in (errno.EINPROGRESS, errno.EAGAIN)

        syn = IP(_next_tcp(bed))
        assert syn[TCP].flags == "S"
        _assert_checksums(syn)
        sport, isn = syn[TCP].sport, syn[TCP].seq
        bed.tun.write(
            bytes(
                IP(src=str(API), dst=str(SBX_IP))
                / TCP(
                    sport=443,
                    dport=sport,
                    flags="SA",
                    seq=5000,
                    ack=isn + 1,
                    window=65535,
                    options=[("MSS", server_mss)],
                )
            )
        )
        ack = IP(_next_tcp(bed))
        assert ack[TCP].flags == "A"
        assert ack[TCP].ack == 5001

        client.setblocking(True)
        client.settimeout(SETTLE_S)
        client.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            seg = IP(_next_tcp(bed))
            _assert_checksums(seg)
            assert seg.len <= UNDERLAY_MTU
            assert len(seg[TCP].payload) <= server_mss
            if seg[TCP].seq - isn - 1 == len(got):
                got += bytes(seg[TCP].payload)
                # ACK it, or the client stops at its initial congestion window.
                bed.tun.write(
                    bytes(
                        IP(src=str(API), dst=str(SBX_IP))
                        / TCP(
                            sport=443,
                            dport=sport,
                            flags="A",
                            seq=5001,
                            ack=isn + 1 + len(got),
                            window=65535,
                        )
                    )
                )
        assert bytes(got) == payload
        # Abort (RST) so nothing retransmits into the TUN afterwards.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        counted = bed.tier1.counters()[(bed.h1, Reason.REDIRECTED)]
        assert counted.packets >= 3


def _next_tcp(bed: Bed) -> bytes:
    deadline = time.monotonic() + SETTLE_S
    while not bed.pending and time.monotonic() < deadline:
        for pkt in bed.tun_packets(deadline - time.monotonic()):
            if IP(pkt).proto == socket.IPPROTO_TCP:
                bed.pending.append(pkt)
    if bed.pending:
        return bed.pending.pop(0)
    raise AssertionError(f"no TCP segment arrived on the TUN: {bed.tier1.counters()}")


def _assert_checksums(pkt: Packet) -> None:
    fresh = IP(bytes(pkt))
    del fresh[IP].chksum
    del fresh[TCP].chksum
    rebuilt = IP(bytes(fresh))
    assert (pkt[IP].chksum, pkt[TCP].chksum) == (rebuilt[IP].chksum, rebuilt[TCP].chksum)


# -- lifecycle -------------------------------------------------


def test_lifecycle_attach_detach_close_leaves_nothing(tmp_path: Path) -> None:
    with ExitStack() as stack:
        bed = make_topology(stack, tmp_path)
        bed.program()
        pin_dir = bed.tier1.pin_dir
        prog_id = bed.tier1.prog_id
        assert (pin_dir / "prog").exists()

        with in_netns(bed.node):
            with pytest.raises(Tier1Error) as info:
                bed.tier1.attach("nosuchlink0")
            assert info.value.reason == "no_such_link"
            bed.tier1.detach("h2")
            bed.tier1.detach("h2")  # idempotent
        assert ingress_filters(bed.node, "h2") == []
        assert "clsact" not in sh(
            "ip", "netns", "exec", bed.node, "tc", "qdisc", "show", "dev", "h2"
        )
        assert len(ingress_filters(bed.node, "h1")) == 1

        # A second agent (another state dir) gets maps of its own.
        other = Tier1(
            tun_ifindex=bed.tun.ifindex, resolver=RESOLVER, denied=(), state_dir=tmp_path / "other"
        )
        with other:
            assert other.prog_id != prog_id
            other.set_sandbox(bed.h1, SBX_IP, SBX_MAC, [1], dns=DNS_BUCKET, syn=SYN_BUCKET)
            assert bed.tier1.sandbox(bed.h1) is not None
            assert bed.tier1.sandbox(bed.h1) != other.sandbox(bed.h1)
        assert not (tmp_path / "other" / "bpffs").exists()

        with in_netns(bed.node):
            bed.tier1.close()
            bed.tier1.close()  # idempotent
        assert ingress_filters(bed.node, "h1") == []
        assert not pin_dir.exists()
        assert str(pin_dir) not in Path("/proc/self/mountinfo").read_text()
        # The program is gone from the kernel once unpinned and detached.
        deadline = time.monotonic() + 5
        while _prog_exists(prog_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _prog_exists(prog_id)
        with pytest.raises(Tier1Error) as info:
            bed.tier1.set_sandbox(bed.h1, SBX_IP, SBX_MAC, [443], dns=DNS_BUCKET, syn=SYN_BUCKET)
        assert info.value.reason == "not_loaded"


def _prog_exists(prog_id: int) -> bool:
    out = sh("bpftool", "prog", "show", "id", str(prog_id), check=False)
    return bool(out.strip())


def test_load_replaces_stale_pins(tmp_path: Path) -> None:
    first = Tier1(tun_ifindex=1, resolver=RESOLVER, denied=(), state_dir=tmp_path)
    first.load()
    try:
        # An agent that died without close(): a new one loads over its pins.
        second = Tier1(tun_ifindex=1, resolver=RESOLVER, denied=(), state_dir=tmp_path)
        second.load()
        assert second.prog_id != first.prog_id
        second.close()
    finally:
        first.close()
    assert not (tmp_path / "bpffs").exists()


def test_possible_cpus_matches_sysconf() -> None:
    assert bpf_syscall.possible_cpus() >= (os.cpu_count() or 1)


# -- token buckets ----------------------------------------------------------------------
# Buckets are GCRA in the kernel (bpf/tier1.c, take_token): B = burst, R = rate. A flood
# from a full bucket gets B through at once and then one every 1/R s; set_sandbox (the
# autouse fixture) refills both buckets before each test.

DNS_QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
FLOOD_SLACK_S = 0.05  # send-to-tc delay and scheduling noise, per end of a flood


def _syn_frames(bed: Bed, n: int, dst: IPv4Address = API, dport: int = 443) -> list[bytes]:
    return [
        bytes(
            Ether(src=SBX_MAC, dst=bed.h1_mac)
            / IP(src=str(SBX_IP), dst=str(dst))
            / TCP(sport=20000 + i % 40000, dport=dport, flags="S", seq=i)
        )
        for i in range(n)
    ]


def _dns_frames(bed: Bed, n: int) -> list[bytes]:
    return [
        bytes(
            Ether(src=SBX_MAC, dst=bed.h1_mac)
            / IP(src=str(SBX_IP), dst=str(RESOLVER))
            / UDP(sport=20000 + i % 40000, dport=53)
            / Raw(DNS_QUERY)
        )
        for i in range(n)
    ]


def _send_all(sock: socket.socket, frames: list[bytes], over_s: float = 0.0) -> float:
    """Send `frames` evenly spread over `over_s` seconds (at once for 0); the seconds taken."""
    start = time.monotonic()
    for i, raw in enumerate(frames):
        wait = start + over_s * i / len(frames) - time.monotonic()
        if wait > 0.0005:
            time.sleep(wait)
        sock.send(raw)
    return time.monotonic() - start


def _counted(bed: Bed, before: dict[tuple[int, Reason], Count], total: int) -> dict[Reason, int]:
    """Packets per reason on h1 since `before`, once `total` frames have been counted."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        delta = {
            r: c.packets for r, c in counter_delta(before, bed.tier1.counters(), bed.h1).items()
        }
        if sum(delta.values()) >= total or time.monotonic() > deadline:
            bed.drain_tun()
            return delta
        time.sleep(0.01)


def _burst_plus_rate(bucket: Bucket, elapsed_s: float) -> tuple[float, float]:
    """Bounds on what a flood lasting `elapsed_s` gets through a full bucket."""
    rate = bucket.rate_per_s
    low = bucket.burst + rate * max(0.0, elapsed_s - FLOOD_SLACK_S) - 1
    high = bucket.burst + rate * (elapsed_s + FLOOD_SLACK_S) + 1
    return low, high


@pytest.mark.parametrize("kind", ["syn", "dns"])
def test_flood_gets_burst_plus_rate_and_the_rest_is_dropped(bed: Bed, kind: str) -> None:
    bucket = Bucket.per_second(100)
    if kind == "syn":
        bed.program(syn=bucket)
        frames, limited = _syn_frames(bed, 1500), Reason.SYN_RATE_LIMIT
    else:
        bed.program(dns=bucket)
        frames, limited = _dns_frames(bed, 1500), Reason.DNS_RATE_LIMIT
    before = bed.tier1.counters()
    elapsed = _send_all(bed.s1, frames, over_s=1.0)
    got = _counted(bed, before, len(frames))
    assert set(got) == {Reason.REDIRECTED, limited}
    assert got[Reason.REDIRECTED] + got[limited] == len(frames)
    low, high = _burst_plus_rate(bucket, elapsed)
    assert low <= got[Reason.REDIRECTED] <= high, (got, elapsed)


@pytest.mark.parametrize("kind", ["syn", "dns"])
def test_at_once_exactly_the_burst_passes(bed: Bed, kind: str) -> None:
    # 1/s with the minimum burst: no token comes back for a second, so the count is exact.
    slow = Bucket.per_second(1)
    assert slow.burst == 10
    if kind == "syn":
        bed.program(syn=slow)
        frames, limited = _syn_frames(bed, 40), Reason.SYN_RATE_LIMIT
    else:
        bed.program(dns=slow)
        frames, limited = _dns_frames(bed, 40), Reason.DNS_RATE_LIMIT
    before = bed.tier1.counters()
    assert _send_all(bed.s1, frames) < 0.5
    assert _counted(bed, before, 40) == {Reason.REDIRECTED: 10, limited: 30}
    # Writing the entry again (a new registration) refills the bucket.
    bed.program(syn=slow, dns=slow)
    before = bed.tier1.counters()
    _send_all(bed.s1, frames[:10])
    assert _counted(bed, before, 10) == {Reason.REDIRECTED: 10}


def test_denied_syns_spend_no_tokens_and_only_syns_spend(bed: Bed) -> None:
    slow = Bucket.per_second(1)
    bed.program(syn=slow, dns=slow)
    before = bed.tier1.counters()
    _send_all(bed.s1, _syn_frames(bed, 30, dport=22))
    _send_all(bed.s1, _syn_frames(bed, 30, dst=METADATA, dport=80))
    _send_all(bed.s1, _syn_frames(bed, 12))
    assert _counted(bed, before, 72) == {
        Reason.PORT_NOT_ALLOWED: 30,
        Reason.DENIED_RANGE: 30,
        Reason.REDIRECTED: 10,
        Reason.SYN_RATE_LIMIT: 2,
    }
    # The bucket is empty: the rest of established connections still flows, and so
    # does a SYN-ACK (the sandbox answering); a DNS query has a bucket of its own.
    for flags in ("A", "PA", "FA", "R", "SA"):
        frame = (
            Ether(src=SBX_MAC)
            / IP(src=str(SBX_IP), dst=str(API))
            / TCP(sport=40000, dport=443, flags=flags, seq=1, ack=1)
        )
        expect_verdict(bed, _with_dst_mac(bed, frame), Reason.REDIRECTED)
    expect_verdict(bed, _with_dst_mac(bed, _tcp(API, 443)), Reason.SYN_RATE_LIMIT)
    expect_verdict(bed, _with_dst_mac(bed, _udp(RESOLVER, 53)), Reason.REDIRECTED)


def test_dns_over_tcp_syns_take_dns_tokens_not_syn_tokens(bed: Bed) -> None:
    slow = Bucket.per_second(1)
    bed.program(syn=slow, dns=slow)
    before = bed.tier1.counters()
    _send_all(bed.s1, _syn_frames(bed, 8, dst=RESOLVER, dport=53))
    _send_all(bed.s1, _dns_frames(bed, 5))
    assert _counted(bed, before, 13) == {Reason.REDIRECTED: 10, Reason.DNS_RATE_LIMIT: 3}
    # The query's segments after the SYN are not queries.
    ack = (
        Ether(src=SBX_MAC)
        / IP(src=str(SBX_IP), dst=str(RESOLVER))
        / TCP(sport=40000, dport=53, flags="PA", seq=1, ack=1)
        / Raw(b"\x00\x0c" + DNS_QUERY)
    )
    expect_verdict(bed, _with_dst_mac(bed, ack), Reason.REDIRECTED)
    expect_verdict(bed, _with_dst_mac(bed, _tcp(RESOLVER, 53)), Reason.DNS_RATE_LIMIT)
    # The SYN bucket is still full.
    before = bed.tier1.counters()
    _send_all(bed.s1, _syn_frames(bed, 10))
    assert _counted(bed, before, 10) == {Reason.REDIRECTED: 10}


@pytest.mark.parametrize("kind", ["syn", "dns"])
def test_below_the_rate_everything_passes_even_after_a_burst(bed: Bed, kind: str) -> None:
    bucket = Bucket.per_second(10)  # one token per 100 ms, burst 10
    if kind == "syn":
        bed.program(syn=bucket)
        frames, limited = _syn_frames(bed, 19), Reason.SYN_RATE_LIMIT
    else:
        bed.program(dns=bucket)
        frames, limited = _dns_frames(bed, 19), Reason.DNS_RATE_LIMIT
    before = bed.tier1.counters()
    _send_all(bed.s1, frames[:11])
    assert _counted(bed, before, 11) == {Reason.REDIRECTED: 10, limited: 1}
    # The bucket is empty; at 80 % of the rate every packet finds a token.
    time.sleep(0.125)
    before = bed.tier1.counters()
    _send_all(bed.s1, frames[11:], over_s=8 * 0.125)
    assert _counted(bed, before, 8) == {Reason.REDIRECTED: 8}


def test_udp_gso_super_packet_pays_for_each_datagram(bed: Bed) -> None:
    """One skb of six queries (UDP_SEGMENT) takes six DNS tokens, not one."""
    udp_segment = 103  # <linux/udp.h>
    bed.program(dns=Bucket.per_second(1))  # 10 tokens
    with in_netns(bed.sandbox):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_UDP, udp_segment, len(DNS_QUERY))
        resolver = (str(RESOLVER), 53)
        for want in ({Reason.REDIRECTED: 1}, {Reason.DNS_RATE_LIMIT: 1}):
            before = bed.tier1.counters()
            sock.sendto(DNS_QUERY * 6, resolver)
            got = _counted(bed, before, 1)
            got.pop(Reason.ARP, None)  # the sandbox's kernel asks for the gateway first
            assert got == want, "one skb, counted once"
        sock.setsockopt(socket.IPPROTO_UDP, udp_segment, 0)
        before = bed.tier1.counters()
        for _ in range(5):
            sock.sendto(DNS_QUERY, resolver)
        got = _counted(bed, before, 5)
        got.pop(Reason.ARP, None)
        assert got == {Reason.REDIRECTED: 4, Reason.DNS_RATE_LIMIT: 1}
    finally:
        sock.close()


def test_buckets_are_exact_across_cpus(bed: Bed) -> None:
    """Two senders pinned to two CPUs share one bucket (a per-CPU one would let 2x through)."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    slow = Bucket.per_second(1)
    bed.program(syn=slow)
    frames = _syn_frames(bed, 400)
    socks = [packet_socket(bed.sandbox, "s1") for _ in cpus]
    start = threading.Barrier(len(cpus))

    def flood(cpu: int, sock: socket.socket) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        start.wait()
        _send_all(sock, frames)

    before = bed.tier1.counters()
    per_cpu_before = _percpu_packets(bed, Reason.SYN_RATE_LIMIT)
    threads = [
        threading.Thread(target=flood, args=(c, s)) for c, s in zip(cpus, socks, strict=True)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        for sock in socks:
            sock.close()
    total = 400 * len(cpus)
    assert _counted(bed, before, total) == {
        Reason.REDIRECTED: 10,
        Reason.SYN_RATE_LIMIT: total - 10,
    }
    moved = [
        cpu
        for cpu, n in enumerate(_percpu_packets(bed, Reason.SYN_RATE_LIMIT))
        if n > per_cpu_before[cpu]
    ]
    assert len(moved) == len(cpus), f"tc ran on CPUs {moved}, wanted {cpus}"


def _percpu_packets(bed: Bed, reason: Reason) -> list[int]:
    """h1's packet count for `reason` in each CPU's slot of the per-CPU counters map."""
    fd = bpf_syscall.obj_get(bed.tier1.pin_dir / "maps" / "t1_counters")
    try:
        cpus = bpf_syscall.possible_cpus()
        raw = bpf_syscall.map_lookup(
            fd, struct.pack("=II", bed.h1, reason.code), bpf_syscall.percpu_value_size(16)
        )
    finally:
        os.close(fd)
    if raw is None:
        return [0] * cpus
    return [struct.unpack_from("=Q", raw, cpu * 16)[0] for cpu in range(cpus)]
