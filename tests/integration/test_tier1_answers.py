"""Tier 1 answers refused SYNs with a RST, and reports denials in t1_events (real program).

Same topology as test_tier1.py (tests/support/tier1_bed.py's `make_topology`): a sandbox namespace
behind veth h1/s1, the tc program on h1. A kernel socket in the sandbox
namespace connects to denied destinations and must see ECONNREFUSED at once;
frames injected on an AF_PACKET socket check what is (and is never) answered;
the ring buffer is read with `Tier1.open_events`, as the agent does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from egressd.agent.ringbuf import RingBuffer
from egressd.agent.tier1 import Bucket, Reason, Tier1Event, unpack_event
from egressd.agent.tier1_maps import EVENT_BUCKET
from egressd.layout import CONTROL_ADDR, METADATA
from tests.support.tier1 import in_netns, packet_socket, sh
from tests.support.tier1_bed import (
    API,
    OTHER_MAC,
    SBX_IP,
    SBX_MAC,
    SETTLE_S,
    Bed,
    expect_verdict,
    make_topology,
)

pytestmark = pytest.mark.root

REFUSE_WITHIN_S = 0.1
QUIET_S = 0.3
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with ExitStack() as stack:
        yield make_topology(stack, tmp_path_factory.mktemp("tier1-answers"))


@pytest.fixture(scope="module")
def ring(bed: Bed) -> Iterator[RingBuffer]:
    ring = bed.tier1.open_events()
    try:
        yield ring
    finally:
        ring.close()


@pytest.fixture(autouse=True)
def _fresh(bed: Bed, ring: RingBuffer) -> None:
    bed.program()  # refills every bucket, resets `suppressed`
    bed.drain_tun()
    ring.drain()


# -- helpers ------------------------------------------------------------------------------


def _tx_csum(ns: str, ifname: str, on: bool | None = None) -> bool:
    """Read (and with `on`, first set) the device's TX checksum offload (legacy ethtool ioctl)."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for cmd, value in ((ETHTOOL_STXCSUM, on), (ETHTOOL_GTXCSUM, None)):
            if cmd == ETHTOOL_STXCSUM and value is None:
                continue
            data = ctypes.create_string_buffer(struct.pack("=II", cmd, int(bool(value))))
            ifreq = struct.pack("16sQ16x", ifname.encode(), ctypes.addressof(data))
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        return bool(struct.unpack_from("=II", data.raw)[1])


def _snmp_tcp(ns: str) -> dict[str, int]:
    lines = [
        ln.split()
        for ln in sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").splitlines()
        if ln.startswith("Tcp:")
    ]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def _connect(bed: Bed, dst: IPv4Address, port: int, timeout: float = 3.0) -> tuple[int, float]:
    """connect() from the sandbox namespace: (errno or 0, seconds it took)."""
    with in_netns(bed.sandbox):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        start = time.monotonic()
        try:
            sock.connect((str(dst), port))
            code = 0
        except TimeoutError:
            code = errno.ETIMEDOUT
        except OSError as exc:
            code = exc.errno or -1
        return code, time.monotonic() - start


def _answers(bed: Bed, frame: Packet, reason: Reason) -> list[Packet]:
    """Send `frame` (one counted verdict `reason`); the TCP frames the sandbox then receives."""
    capture = packet_socket(bed.sandbox, "s1", proto=0x0800)
    try:
        expect_verdict(bed, frame, reason)
        got: list[Packet] = []
        deadline = time.monotonic() + QUIET_S
        capture.settimeout(0.02)
        while time.monotonic() < deadline:
            try:
                data, addr = capture.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            pkt = Ether(data)
            if TCP in pkt:
                got.append(pkt)
        return got
    finally:
        capture.close()


def _syn(bed: Bed, dst: IPv4Address, dport: int, **over: object) -> Packet:
    ip: dict[str, object] = {"src": str(SBX_IP), "dst": str(dst)}
    tcp: dict[str, object] = {"sport": 41000, "dport": dport, "flags": "S", "seq": 0x7FFFFFF0}
    eth: dict[str, object] = {"src": SBX_MAC, "dst": bed.h1_mac}
    for key, value in over.items():
        target = eth if key.startswith("eth_") else ip if key.startswith("ip_") else tcp
        target[key.split("_", 1)[1] if key.startswith(("eth_", "ip_")) else key] = value
    return Ether(**eth) / IP(**ip) / TCP(**tcp)  # type: ignore[arg-type]


def _events(ring: RingBuffer, want: int, timeout: float = SETTLE_S) -> list[Tier1Event]:
    out: list[Tier1Event] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out.extend(unpack_event(raw) for raw in ring.drain())
        time.sleep(0.01)
    return out


# -- RST ----------------------------------------------------------------------------------

REFUSED = {
    "port_not_allowed": (API, 22, Reason.PORT_NOT_ALLOWED),
    "denied_range_metadata": (METADATA, 80, Reason.DENIED_RANGE),
    "fleet_range_control": (CONTROL_ADDR, 443, Reason.FLEET_RANGE),
}


@pytest.mark.parametrize("offload", ["tx_csum_on", "tx_csum_off"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_kernel_connect_to_a_denied_destination_is_refused_at_once(
    bed: Bed, name: str, offload: str
) -> None:
    """With TX checksum offload off, the SYN leaves the sandbox with a full checksum and
    the RST arrives as CHECKSUM_NONE: the sandbox's kernel verifies the RST's checksums."""
    dst, port, reason = REFUSED[name]
    was = _tx_csum(bed.sandbox, "s1")
    try:
        assert _tx_csum(bed.sandbox, "s1", offload == "tx_csum_on") == (offload == "tx_csum_on")
        before, snmp = bed.tier1.counters(), _snmp_tcp(bed.sandbox)
        code, took = _connect(bed, dst, port)
        assert code == errno.ECONNREFUSED, (errno.errorcode.get(code, code), took)
        assert took < REFUSE_WITHIN_S
        after = bed.tier1.counters()
        # Counted as the drop it is, once: the refused socket never retransmits.
        assert after[(bed.h1, reason)].packets - before.get((bed.h1, reason), (0, 0))[0] == 1
        assert _snmp_tcp(bed.sandbox)["InCsumErrors"] == snmp["InCsumErrors"]
    finally:
        _tx_csum(bed.sandbox, "s1", was)
    assert bed.tun_packets(0.05) == []


def test_rst_is_exactly_what_a_closed_port_sends(bed: Bed) -> None:
    syn = _syn(
        bed,
        API,
        22,
        options=[("MSS", 1396), ("SAckOK", b""), ("WScale", 7), ("Timestamp", (1, 0))],
        ip_ttl=61,
        ip_id=777,
    )
    got = _answers(bed, syn, Reason.PORT_NOT_ALLOWED)
    assert len(got) == 1
    rst = got[0]
    assert len(bytes(rst)) == 14 + 20 + 20  # options gone
    assert (rst[Ether].src, rst[Ether].dst) == (bed.h1_mac, SBX_MAC)
    assert (rst[IP].src, rst[IP].dst, rst[IP].len, rst[IP].ihl) == (str(API), str(SBX_IP), 40, 5)
    assert (rst[IP].flags, rst[IP].frag) == (syn[IP].flags, 0)
    assert (rst[TCP].sport, rst[TCP].dport) == (22, 41000)
    assert (rst[TCP].seq, rst[TCP].ack) == (0, 0x7FFFFFF1)
    assert rst[TCP].flags == "RA"
    assert (rst[TCP].dataofs, rst[TCP].window, rst[TCP].urgptr) == (5, 0, 0)
    fresh = IP(bytes(rst[IP]))
    del fresh.chksum
    del fresh[TCP].chksum
    rebuilt = IP(bytes(fresh))
    assert (rst[IP].chksum, rst[TCP].chksum) == (rebuilt.chksum, rebuilt[TCP].chksum)


def test_rst_ack_wraps_the_sequence_space(bed: Bed) -> None:
    got = _answers(bed, _syn(bed, API, 22, seq=0xFFFFFFFF), Reason.PORT_NOT_ALLOWED)
    assert [(p[TCP].flags, p[TCP].ack) for p in got] == [("RA", 0)]


NOT_ANSWERED: dict[str, tuple[Callable[[Bed], Packet], Reason]] = {
    "spoofed_ip": (lambda b: _syn(b, API, 22, ip_src=str(SBX_IP + 1)), Reason.SPOOFED_IP),
    "spoofed_mac": (lambda b: _syn(b, API, 22, eth_src=OTHER_MAC), Reason.SPOOFED_MAC),
    "rst": (lambda b: _syn(b, API, 22, flags="R"), Reason.PORT_NOT_ALLOWED),
    "rst_ack": (lambda b: _syn(b, API, 22, flags="RA"), Reason.PORT_NOT_ALLOWED),
    "syn_rst": (lambda b: _syn(b, API, 22, flags="SR"), Reason.PORT_NOT_ALLOWED),
    "syn_ack": (lambda b: _syn(b, API, 22, flags="SA"), Reason.PORT_NOT_ALLOWED),
    "syn_fin": (lambda b: _syn(b, API, 22, flags="SF"), Reason.PORT_NOT_ALLOWED),
    "ack": (lambda b: _syn(b, API, 22, flags="A"), Reason.PORT_NOT_ALLOWED),
    "syn_with_payload": (lambda b: _syn(b, API, 22) / Raw(b"GET /"), Reason.PORT_NOT_ALLOWED),
    "multicast": (lambda b: _syn(b, IPv4Address("224.0.0.1"), 443), Reason.DENIED_RANGE),
    "broadcast": (lambda b: _syn(b, IPv4Address("255.255.255.255"), 443), Reason.DENIED_RANGE),
    "zero_net": (lambda b: _syn(b, IPv4Address("0.1.2.3"), 443), Reason.DENIED_RANGE),
    "ip_options": (
        lambda b: _syn(b, API, 22, ip_options=[IPOption_Router_Alert()]),
        Reason.IP_OPTIONS,
    ),
    "fragment": (lambda b: _syn(b, API, 22, ip_flags="MF"), Reason.FRAGMENT),
    "malformed_doff": (lambda b: _syn(b, API, 22, dataofs=4), Reason.MALFORMED),
}


@pytest.mark.parametrize("name", list(NOT_ANSWERED))
def test_never_answered(bed: Bed, name: str) -> None:
    build, reason = NOT_ANSWERED[name]
    assert _answers(bed, build(bed), reason) == []


def test_other_protocols_are_dropped_silently(bed: Bed) -> None:
    udp = Ether(src=SBX_MAC, dst=bed.h1_mac) / IP(src=str(SBX_IP), dst=str(API)) / UDP(dport=123)
    icmp = Ether(src=SBX_MAC, dst=bed.h1_mac) / IP(src=str(SBX_IP), dst=str(API)) / ICMP()
    capture = packet_socket(bed.sandbox, "s1", proto=0x0800)
    try:
        expect_verdict(bed, udp, Reason.UDP_NOT_DNS)
        expect_verdict(bed, icmp, Reason.PROTO_NOT_ALLOWED)
        capture.settimeout(QUIET_S)
        with pytest.raises(TimeoutError):
            while True:
                _, addr = capture.recvfrom(65536)
                assert addr[2] == socket.PACKET_OUTGOING
    finally:
        capture.close()


def test_a_rate_limited_syn_is_dropped_not_answered(bed: Bed) -> None:
    bed.program(syn=Bucket.per_second(1))  # a burst of 10, no token back within the test
    for i in range(10):
        expect_verdict(bed, _syn(bed, API, 443, sport=42000 + i), Reason.REDIRECTED)
    assert _answers(bed, _syn(bed, API, 443, sport=42100), Reason.SYN_RATE_LIMIT) == []
    bed.drain_tun()


# -- events -------------------------------------------------------------------------------


def test_each_denial_is_an_event_with_its_destination(bed: Bed, ring: RingBuffer) -> None:
    before_ns = time.monotonic_ns()
    expect_verdict(bed, _syn(bed, API, 22), Reason.PORT_NOT_ALLOWED)
    expect_verdict(bed, _syn(bed, METADATA, 80, flags="A"), Reason.DENIED_RANGE)
    expect_verdict(
        bed,
        Ether(src=SBX_MAC) / IP(src=str(SBX_IP), dst=str(API)) / UDP(dport=123),
        Reason.UDP_NOT_DNS,
    )
    expect_verdict(bed, _syn(bed, API, 22, ip_src=str(SBX_IP + 1)), Reason.SPOOFED_IP)
    events = _events(ring, 4)
    assert [
        (e.ifindex, e.reason, e.dst, e.port, e.proto_name, e.rst, e.suppressed) for e in events
    ] == [
        (bed.h1, Reason.PORT_NOT_ALLOWED, API, 22, "tcp", True, 0),
        (bed.h1, Reason.DENIED_RANGE, METADATA, 80, "tcp", False, 0),
        (bed.h1, Reason.UDP_NOT_DNS, API, 123, "udp", False, 0),
        (bed.h1, Reason.SPOOFED_IP, API, 0, "tcp", False, 0),
    ]
    assert all(before_ns <= e.ts_ns <= time.monotonic_ns() for e in events)
    # Allowed traffic and unregistered veths make no events.
    expect_verdict(bed, _syn(bed, API, 443), Reason.REDIRECTED)
    expect_verdict(
        bed,
        Ether(src=OTHER_MAC) / IP(src=str(SBX_IP + 1), dst=str(API)) / TCP(dport=22),
        Reason.NO_POLICY,
        ifindex=bed.h2,
        sock=bed.s2,
    )
    assert _events(ring, 1, timeout=0.2) == []
    bed.drain_tun()


def test_a_flood_yields_a_bounded_number_of_events_that_account_for_every_denial(
    bed: Bed, ring: RingBuffer
) -> None:
    n = 600
    frames = [bytes(_syn(bed, API, 22, sport=20000 + i)) for i in range(n)]
    before = bed.tier1.counters()
    start = time.monotonic()
    for raw in frames:
        bed.s1.send(raw)
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + SETTLE_S
    while (
        bed.tier1.counters()[(bed.h1, Reason.PORT_NOT_ALLOWED)].packets
        - before.get((bed.h1, Reason.PORT_NOT_ALLOWED), (0, 0))[0]
    ) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    flood_events = _events(ring, EVENT_BUCKET.burst, timeout=0.3)
    bound = EVENT_BUCKET.burst + EVENT_BUCKET.rate_per_s * (elapsed + 0.4) + 1
    assert EVENT_BUCKET.burst <= len(flood_events) <= bound, (len(flood_events), elapsed)
    # The rest waits in `suppressed` for the next event, once a token is back.
    time.sleep(1.5 / EVENT_BUCKET.rate_per_s)
    expect_verdict(bed, _syn(bed, API, 23), Reason.PORT_NOT_ALLOWED)
    events = flood_events + _events(ring, 1)
    assert events[-1].port == 23
    assert events[-1].suppressed > 0
    assert sum(1 + e.suppressed for e in events) == n + 1
    assert all(e.reason is Reason.PORT_NOT_ALLOWED and e.rst for e in events)


def test_reprogramming_refills_the_event_bucket(bed: Bed, ring: RingBuffer) -> None:
    frames = [bytes(_syn(bed, API, 22, sport=30000 + i)) for i in range(EVENT_BUCKET.burst + 5)]
    for raw in frames:
        bed.s1.send(raw)
    assert len(_events(ring, EVENT_BUCKET.burst, timeout=0.5)) >= EVENT_BUCKET.burst
    time.sleep(0.05)
    bed.program()
    expect_verdict(bed, _syn(bed, API, 22, sport=31000), Reason.PORT_NOT_ALLOWED)
    got = _events(ring, 1)
    # The new entry starts full with nothing suppressed (the old entry's count went with it).
    assert [(e.port, e.suppressed) for e in got] == [(22, 0)]


def test_events_ring_is_a_real_ring_buffer(ring: RingBuffer) -> None:
    assert ring.size == 256 * 1024
    assert ring.pending == 0
    with pytest.raises(ValueError):
        RingBuffer(ring.fd, 1000)
