"""The node's kernel data path on a real kernel: tier 1 -> bpf/node.c -> GENEVE -> proxies.

Topology (all in ``egd-t*`` namespaces made here, removed even on failure):

    sandbox ns: s1 (100.96.1.2) --veth-- h1 (gateway)  : node ns, tier 1 + node_encap
                                         u0 198.18.0.11 : node ns, node_underlay_ingress
    underlay ns: bridge br0 -- node u0, proxy a u0 (198.18.0.21), proxy b u0 (198.18.0.22)

The proxies are plain UDP sockets on port 6081, as today's userspace GENEVE endpoint
is: every datagram is decoded with the codec and accepted by
`egressd.proxy.endpoint.validate`. The agent side is the real `KernelDatapath` over
`Tier1` and `NodeKernel` (its health callbacks drive the Maglev table).
"""

from __future__ import annotations

import dataclasses
import errno
import select
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from egressd.agent.config import parse_config
from egressd.agent.kernel_datapath import KernelDatapath
from egressd.agent.node import NodeKernel, tx_checksum
from egressd.agent.node_maps import (
    MAGLEV_SIZE,
    NodeReason,
    flow_hash,
    maglev_table,
    source_port,
)
from egressd.agent.tier1 import Bucket, Tier1, denied_ranges
from egressd.ebpf import syscall as bpf_syscall
from egressd.geneve import JobOption, decode, encode
from egressd.layout import NODE_TUN, RESOLVER, SANDBOX_MTU, UNDERLAY_MTU, default_layout
from egressd.net.tun import Tun, open_tun
from egressd.proxy.endpoint import Accepted, validate
from tests.support import agent as agent_support
from tests.support.proxy import JOB, NODES, OTHER_JOB, POLICIES, POLICY
from tests.support.tier1 import Namespaces, in_netns, ingress_filters, mac, packet_socket, sh

pytestmark = pytest.mark.root("ip", "tc", "bpftool", "clang", "/dev/net/tun")

LAYOUT = default_layout()
NODE_IP = IPv4Address("198.18.0.11")
PROXY_IPS = {"proxy1": IPv4Address("198.18.0.21"), "proxy2": IPv4Address("198.18.0.22")}
GATEWAY = IPv4Address("100.96.1.1")
SBX_IP = IPv4Address("100.96.1.2")
SBX_MAC = "02:00:00:00:01:02"
API = LAYOUT.site("api.allowed.test").address
SETTLE_S = 2.0
JOB_OPTION = JobOption(JOB.bytes, POLICY.digest)


@dataclass
class Bed:
    node: str
    sandbox: str
    proxy_ns: dict[str, str]
    tier1: Tier1
    kernel: NodeKernel
    datapath: KernelDatapath
    tun: Tun
    h1: int
    h1_mac: str
    node_mac: str
    s1: socket.socket
    proxies: dict[str, socket.socket]
    raw: socket.socket  # AF_PACKET on proxy1's underlay

    def drain(self, timeout: float = 0.3) -> list[tuple[str, bytes, tuple[str, int]]]:
        """Every datagram the proxies get until `timeout` passes without one."""
        out: list[tuple[str, bytes, tuple[str, int]]] = []
        socks = {sock: name for name, sock in self.proxies.items()}
        while True:
            ready, _, _ = select.select(list(socks), [], [], timeout)
            if not ready:
                return out
            for sock in ready:
                data, addr = sock.recvfrom(65535)
                out.append((socks[sock], data, addr))


def _ns_sh(ns: str, *argv: str) -> None:
    sh("ip", "-n", ns, *argv)


def _make_bed(stack: ExitStack, tmp: Path) -> Bed:
    spaces = Namespaces()
    stack.callback(spaces.cleanup)
    under, node, sandbox = spaces.create("u"), spaces.create("n"), spaces.create("s")
    proxy_ns = {"proxy1": spaces.create("a"), "proxy2": spaces.create("b")}
    _ns_sh(under, "link", "add", "br0", "type", "bridge")
    _ns_sh(under, "link", "set", "br0", "up")
    # With br_netfilter loaded the bridge validates IPv4 headers itself: the node must see
    # what a proxy sent, bad checksums included.
    if Path("/proc/sys/net/bridge").is_dir():
        sh("ip", "netns", "exec", under, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")
    members = {"n": (node, NODE_IP)} | {
        tag: (proxy_ns[name], PROXY_IPS[name]) for tag, name in (("a", "proxy1"), ("b", "proxy2"))
    }
    for tag, (ns, ip) in members.items():
        _ns_sh(under, "link", "add", f"v{tag}", "type", "veth", "peer", "name", "u0", "netns", ns)
        _ns_sh(under, "link", "set", f"v{tag}", "master", "br0", "up")
        _ns_sh(ns, "addr", "add", f"{ip}/24", "dev", "u0")
        _ns_sh(ns, "link", "set", "u0", "up")
    _ns_sh(node, "link", "add", "h1", "type", "veth", "peer", "name", "s1", "netns", sandbox)
    _ns_sh(sandbox, "link", "set", "s1", "address", SBX_MAC, "mtu", str(SANDBOX_MTU), "up")
    _ns_sh(node, "link", "set", "h1", "mtu", str(SANDBOX_MTU), "up")
    _ns_sh(sandbox, "addr", "add", f"{SBX_IP}/24", "dev", "s1")
    _ns_sh(node, "addr", "add", f"{GATEWAY}/24", "dev", "h1")
    _ns_sh(sandbox, "route", "add", "default", "via", str(GATEWAY), "dev", "s1")

    with in_netns(node):
        tun = open_tun(NODE_TUN, mtu=UNDERLAY_MTU)
    stack.callback(tun.close)
    state = tmp / "node"
    tier1 = Tier1(
        tun_ifindex=tun.ifindex,
        resolver=RESOLVER,
        denied=denied_ranges(LAYOUT.fleet_ranges),
        state_dir=state,
    )

    def close_tier1() -> None:
        with in_netns(node):
            tier1.close()

    stack.callback(close_tier1)
    tier1.load()
    with in_netns(node):
        h1 = tier1.attach("h1")
    tier1.set_sandbox(
        h1,
        SBX_IP,
        SBX_MAC,
        [443, 80, (8000, 8010)],
        dns=Bucket.per_second(50),
        syn=Bucket.per_second(1000),
    )
    kernel = NodeKernel(underlay=NODE_IP, vni=1, state_dir=state)

    def close_kernel() -> None:
        with in_netns(node):
            kernel.close()

    stack.callback(close_kernel)
    kernel.load()
    with in_netns(node):
        kernel.attach_underlay()
    config = parse_config(
        {
            "name": "node1",
            "underlay": str(NODE_IP),
            "sandbox_cidr": "100.96.1.0/24",
            "proxies": [{"name": n, "underlay": str(ip)} for n, ip in PROXY_IPS.items()],
            "datapath": "kernel",
            "state_dir": str(state),
        }
    )
    datapath = KernelDatapath(config, tun.fd, node=kernel, tier1=tier1)
    record = dataclasses.replace(
        agent_support.sandbox(ip=SBX_IP, job=str(JOB)),
        ifindex=h1,
        host_veth="h1",
        mac=SBX_MAC,
        digest=POLICY.digest,
    )
    with in_netns(node):
        datapath.sandbox_added(record)
    tier1.set_forward(kernel.encap_fd)
    stack.callback(tier1.clear_forward)
    proxies = {}
    for name, ip in PROXY_IPS.items():
        with in_netns(proxy_ns[name]):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stack.callback(sock.close)
        sock.bind((str(ip), 6081))
        proxies[name] = sock
    s1 = packet_socket(sandbox, "s1")
    stack.callback(s1.close)
    raw = packet_socket(proxy_ns["proxy1"], "u0")
    stack.callback(raw.close)
    return Bed(
        node,
        sandbox,
        proxy_ns,
        tier1,
        kernel,
        datapath,
        tun,
        h1,
        mac(node, "h1"),
        mac(node, "u0"),
        s1,
        proxies,
        raw,
    )


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with ExitStack() as stack:
        yield _make_bed(stack, tmp_path_factory.mktemp("nodekernel"))


def _health(bed: Bed, **up: bool) -> None:
    for name, state in up.items():
        bed.datapath.proxy_health(name, state)


def _predicted(healthy: set[str], sport: int) -> str | None:
    fhash = flow_hash(SBX_IP, API, 6, sport, 443)
    return maglev_table(healthy)[fhash % MAGLEV_SIZE]


def _syn(bed: Bed, sport: int) -> bytes:
    return bytes(
        Ether(src=SBX_MAC, dst=bed.h1_mac)
        / IP(src=str(SBX_IP), dst=str(API))
        / TCP(sport=sport, dport=443, flags="S", seq=1)
    )


def _send_syns(bed: Bed, sports: range) -> dict[int, str]:
    """Send one SYN per source port; which proxy got each (checked against the codec and
    the proxy's validation on the way)."""
    for sport in sports:
        bed.s1.send(_syn(bed, sport))
    got: dict[int, str] = {}
    for proxy, data, (src, outer_sport) in bed.drain():
        assert src == str(NODE_IP)
        result = validate(data, src, nodes=NODES, vni=1, policy_lookup=POLICIES.get)
        assert isinstance(result, Accepted), result
        assert result.job == JOB_OPTION
        inner = IP(bytes(result.inner))
        assert outer_sport == source_port(flow_hash(SBX_IP, API, 6, inner[TCP].sport, 443))
        assert inner[TCP].sport not in got
        got[inner[TCP].sport] = proxy
    assert set(got) == set(sports), f"missing {set(sports) - set(got)}: {bed.kernel.drops()}"
    return got


def _assert_checksums(pkt: IP) -> None:
    fresh = IP(bytes(pkt))
    del fresh[IP].chksum
    del fresh[TCP].chksum
    rebuilt = IP(bytes(fresh))
    assert (pkt[IP].chksum, pkt[TCP].chksum) == (rebuilt[IP].chksum, rebuilt[TCP].chksum)


def _drops(bed: Bed) -> dict[NodeReason, int]:
    return {reason: packets for reason, (packets, _) in bed.kernel.drops().items()}


# -- outbound: encapsulation and proxy choice -------------------------------------------------


def test_no_healthy_proxy_drops_and_counts(bed: Bed) -> None:
    _health(bed, proxy1=False, proxy2=False)
    before = _drops(bed)
    bed.s1.send(_syn(bed, 30000))
    assert bed.drain() == []
    after = _drops(bed)
    assert after[NodeReason.NO_HEALTHY_PROXY] == before[NodeReason.NO_HEALTHY_PROXY] + 1


def test_joining_and_leaving_proxies_move_only_new_and_dead_flows(bed: Bed) -> None:
    _health(bed, proxy1=True, proxy2=False)
    first = range(31000, 31040)
    assert set(_send_syns(bed, first).values()) == {"proxy1"}

    # proxy2 joins: the pinned flows stay, new ones follow the two-proxy table exactly.
    _health(bed, proxy2=True)
    assert set(_send_syns(bed, first).values()) == {"proxy1"}
    second = range(32000, 32060)
    placed = _send_syns(bed, second)
    assert placed == {sport: _predicted({"proxy1", "proxy2"}, sport) for sport in second}
    assert set(placed.values()) == {"proxy1", "proxy2"}

    # proxy2 leaves: only its flows move (to proxy1); proxy1's flows were never touched.
    _health(bed, proxy2=False)
    again = _send_syns(bed, second)
    assert set(again.values()) == {"proxy1"}
    # proxy2 is back: the flows that moved stay on proxy1 (pinned), new flows use it again.
    _health(bed, proxy2=True)
    assert set(_send_syns(bed, second).values()) == {"proxy1"}
    third = range(33000, 33060)
    assert _send_syns(bed, third) == {
        sport: _predicted({"proxy1", "proxy2"}, sport) for sport in third
    }
    slots = {slot for slot, _ in bed.kernel.flows().values()}
    assert slots == {0, 1}


def test_kernel_tcp_handshake_and_data_through_a_userspace_endpoint(bed: Bed) -> None:
    """The sandbox's own TCP stack: its SYN reaches a proxy as GENEVE that today's
    endpoint accepts; the proxy's GENEVE answer is decapsulated into the sandbox."""
    _health(bed, proxy1=True, proxy2=True)
    bed.drain(0.05)
    with in_netns(bed.sandbox):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with client:
        client.setblocking(False)
        assert client.connect_ex((str(API), 443)) in (errno.EINPROGRESS, errno.EAGAIN)
        ((proxy, data, (src, _)),) = bed.drain()
        result = validate(data, src, nodes=NODES, vni=1, policy_lookup=POLICIES.get)
        assert isinstance(result, Accepted), result
        syn = IP(bytes(result.inner))
        assert syn[TCP].flags == "S"
        _assert_checksums(syn)
        assert proxy == _predicted({"proxy1", "proxy2"}, syn[TCP].sport)
        sock = bed.proxies[proxy]

        def answer(flags: str, seq: int, payload: bytes = b"") -> None:
            reply = IP(src=str(API), dst=str(SBX_IP)) / TCP(
                sport=443,
                dport=syn[TCP].sport,
                flags=flags,
                seq=seq,
                ack=syn[TCP].seq + 1,
                window=65535,
                options=[("MSS", SANDBOX_MTU - 40)] if "S" in flags else [],
            )
            sock.sendto(encode(1, JOB_OPTION, bytes(reply / Raw(payload))), (str(NODE_IP), 6081))

        before = bed.kernel.stats([0, 1])
        answer("SA", 1000)
        _, writable, _ = select.select([], [client], [], SETTLE_S)
        assert writable, f"no SYN-ACK reached the sandbox: {bed.kernel.drops()}"
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        ack = [IP(bytes(decode(d).inner)) for p, d, _ in bed.drain() if p == proxy]
        assert any(pkt[TCP].flags == "A" and pkt[TCP].ack == 1001 for pkt in ack)
        answer("PA", 1001, b"hello from the proxy")
        ready, _, _ = select.select([client], [], [], SETTLE_S)
        assert ready
        assert client.recv(100) == b"hello from the proxy"
        slot = 0 if proxy == "proxy1" else 1
        after = bed.kernel.stats([0, 1])
        assert after[slot][2] - before[slot][2] == 2  # rx packets: SYN-ACK and data
        assert after[slot][0] - before[slot][0] >= 1  # tx: the ACK at least
        # An upload: the sandbox's stack leaves checksums and segmentation to the device
        # (CHECKSUM_PARTIAL, TSO); what reaches the proxy is MTU-sized and complete.
        client.setblocking(True)
        client.sendall(bytes(range(256)) * 40)
        segments = [IP(bytes(decode(d).inner)) for p, d, _ in bed.drain() if p == proxy]
        assert sum(len(pkt[TCP].payload) for pkt in segments) >= 10 * 1024
        for pkt in segments:
            _assert_checksums(pkt)
            assert pkt.len <= SANDBOX_MTU
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")


# -- return: malformed GENEVE on the underlay ----------------------------------------------


def _geneve_frame(bed: Bed, payload: bytes, **ip: Any) -> Ether:
    fields = {"src": str(PROXY_IPS["proxy1"]), "dst": str(NODE_IP)} | ip
    return (
        Ether(dst=bed.node_mac, src=mac(bed.proxy_ns["proxy1"], "u0"))
        / IP(**fields)
        / UDP(sport=50000, dport=6081)
        / Raw(payload)
    )


def _inner(dst: IPv4Address = SBX_IP, **ip: Any) -> bytes:
    return bytes(IP(src=str(API), dst=str(dst), **ip) / TCP(sport=443, dport=31000, flags="A"))


def _good(**over: Any) -> bytes:
    return encode(over.get("vni", 1), over.get("job", JOB_OPTION), over.get("inner", _inner()))


def _patched(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset] = value
    return bytes(out)


def _malformed(bed: Bed) -> dict[NodeReason, Ether]:
    other = JobOption(OTHER_JOB.bytes, POLICY.digest)
    bad_inner_sum = bytearray(_inner())
    bad_inner_sum[10] ^= 0xFF
    long_inner = bytearray(_inner())
    long_inner[3] += 4  # total length past the datagram
    return {
        NodeReason.UNKNOWN_PROXY: _geneve_frame(bed, _good(), src="198.18.0.99"),
        NodeReason.OUTER_BAD_CHECKSUM: _geneve_frame(bed, _good(), chksum=0x1234),
        NodeReason.OUTER_IP_OPTIONS: _geneve_frame(bed, _good(), options=[IPOption_Router_Alert()]),
        NodeReason.OUTER_FRAGMENT: _geneve_frame(bed, _good(), flags="MF"),
        NodeReason.TRUNCATED: _geneve_frame(bed, _good()[:20]),
        NodeReason.BAD_VERSION: _geneve_frame(bed, _patched(_good(), 0, 0x47)),
        NodeReason.BAD_OPTIONS: _geneve_frame(bed, _patched(_good(), 10, 0x02)),
        NodeReason.UNSUPPORTED_PROTOCOL: _geneve_frame(bed, _patched(_good(), 2, 0x86)),
        NodeReason.UNKNOWN_VNI: _geneve_frame(bed, _good(vni=2)),
        NodeReason.INNER_BAD_CHECKSUM: _geneve_frame(bed, _good(inner=bytes(bad_inner_sum))),
        NodeReason.INNER_TRUNCATED: _geneve_frame(bed, _good(inner=bytes(long_inner))),
        NodeReason.INNER_NOT_IPV4: _geneve_frame(bed, _good(inner=b"\x60" + _inner()[1:])),
        NodeReason.UNKNOWN_SANDBOX: _geneve_frame(
            bed, _good(inner=_inner(IPv4Address("100.96.1.99")))
        ),
        NodeReason.JOB_MISMATCH: _geneve_frame(bed, _good(job=other)),
    }


def test_malformed_geneve_is_dropped_and_counted_by_reason(bed: Bed) -> None:
    for reason, frame in _malformed(bed).items():
        before = _drops(bed)
        bed.raw.send(bytes(frame))
        deadline = time.monotonic() + SETTLE_S
        while (after := _drops(bed)) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        delta = {r: after[r] - before[r] for r in after if after[r] != before[r]}
        assert delta == {reason: 1}, (reason, delta)


def test_other_traffic_on_the_underlay_passes_untouched(bed: Bed) -> None:
    with in_netns(bed.node):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with listener:
        listener.bind((str(NODE_IP), 9999))
        listener.settimeout(SETTLE_S)
        before = _drops(bed)
        bed.proxies["proxy1"].sendto(b"not geneve", (str(NODE_IP), 9999))
        assert listener.recvfrom(100) == (b"not geneve", (str(PROXY_IPS["proxy1"]), 6081))
        assert _drops(bed) == before


def test_maps_read_back(bed: Bed) -> None:
    assert bed.kernel.proxy_slot(0).addr == PROXY_IPS["proxy1"]
    table = bed.kernel.active_table()
    assert len(table) == MAGLEV_SIZE
    assert set(table) <= {0, 1}


# -- lifecycle ------------------------------------------------------------------------------


def _exists(kind: str, obj_id: int) -> bool:
    return bool(sh("bpftool", kind, "show", "id", str(obj_id), check=False).strip())


def test_close_leaves_no_programs_pins_or_maps(tmp_path: Path) -> None:
    spaces = Namespaces()
    try:
        node = spaces.create("n")
        _ns_sh(node, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
        _ns_sh(node, "addr", "add", f"{NODE_IP}/24", "dev", "u0")
        _ns_sh(node, "link", "set", "u0", "up")
        kernel = NodeKernel(underlay=NODE_IP, vni=1, state_dir=tmp_path)
        kernel.load()
        try:
            with in_netns(node):
                assert tx_checksum("u0")
                kernel.attach_underlay()
                kernel.attach_underlay()  # idempotent
                assert not tx_checksum("u0")
            assert len(ingress_filters(node, "u0")) == 1
            prog_ids = kernel.prog_ids()
            map_ids = [bpf_syscall.map_info(fd).map_id for fd in kernel._maps.values()]
        finally:
            with in_netns(node):
                kernel.close()
                kernel.close()
        assert ingress_filters(node, "u0") == []
        with in_netns(node):
            assert tx_checksum("u0")  # the device's setting is back
        assert not (tmp_path / "bpffs-node").exists()
        assert str(tmp_path / "bpffs-node") not in Path("/proc/self/mountinfo").read_text()
        # The kernel frees programs and maps once their last reference goes (deferred).
        objects = [("prog", i) for i in prog_ids.values()] + [("map", i) for i in map_ids]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_exists(*obj) for obj in objects):
            time.sleep(0.1)
        assert [obj for obj in objects if _exists(*obj)] == []
    finally:
        spaces.cleanup()
