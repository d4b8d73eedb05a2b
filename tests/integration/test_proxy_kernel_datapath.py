"""`egressd proxy serve` with ``"datapath": "kernel"``: bpf/proxy.c on the real underlay.

The fleet and the node simulator are test_proxy_dataplane's (a fresh prefix for this
module: its own namespaces, removed in finalizers); only the proxy's configuration
differs, and the node takes replies from any source port (tc picks an entropy port).
What is checked, through the real tc programs of a real proxy process:

* a job's first SYN goes the slow path (the policy is fetched, the maps programmed),
  its SYN-ACK comes back encapsulated by tc egress on the TUN and decodes with the
  codec and scapy; the next SYNs take the fast path (decapsulated by tc ingress,
  TPROXYed), counted in `egressd_kernel_packets_total{path}`;
* a sandbox connection through a minimal node agent (today's userspace GENEVE on the
  node side) gets its HTTP answer, and the interceptor's audit event names the job:
  the job came from the kernel's flow map;
* the datagrams of tests/support/proxy_drops.py (test_proxy_dataplane sends them too)
  are dropped and counted under the Python endpoint's reason names
  (`egressd_geneve_rx_dropped_total{reason}`), in the kernel but for the two whose job
  the maps do not hold, which go up to the Python endpoint;
* an ICMP error the proxy's kernel sends about a sandbox's packet (a real one, through
  the TUN's tc egress) goes back encapsulated under the quoted packet's flow; one that
  quotes no known flow, or another host's packet, is not (the Python return path drops
  it, `no_flow`);
* SIGTERM leaves no tc filter, clsact qdisc, pin or bpffs mount behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Raw

from egressd.geneve.codec import JobOption, decode, header_for
from egressd.layout import CONTROL_ADDR
from egressd.net import netns as kn
from egressd.policy.jws import policy_digest
from egressd_harness.topology.network import UNDERLAY_IF
from tests.support.proxy_drops import DROPS, send_drops, wait_for_drops
from tests.support.proxy_fleet import (
    JOB,
    PROXY,
    REPLY_TIMEOUT_S,
    SANDBOX,
    SITE,
    Fleet,
    NodeSim,
    ProxyProcess,
    agent_for,
    assert_syn_ack,
    http,
    sandbox_get,
)
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS, "clang", "bpftool")

BULK = bytes(range(256)) * 8192  # 2 MiB


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    return proxy_fleet


@pytest.fixture
def node(fleet: Fleet) -> Iterator[NodeSim]:
    _, body = http(fleet.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{JOB}/policy")
    sim = NodeSim(fleet, policy_digest(json.loads(body)["jws"]), reply_port=None)
    try:
        yield sim
    finally:
        sim.close()


def kernel_proxy(fleet: Fleet) -> ProxyProcess:
    return ProxyProcess(
        fleet, datapath="kernel", state_dir=str(fleet.root / f"kstate-{fleet.prefix}")
    )


@pytest.fixture
def kproxy(fleet: Fleet) -> Iterator[ProxyProcess]:
    p = kernel_proxy(fleet)
    try:
        p.wait_ready()
        yield p
    finally:
        p.kill()
        ns = fleet.proxy_ns
        kn.run_in_netns(ns, ["nft", "delete", "table", "inet", "egressd"], check=False)
        kn.run_in_netns(ns, ["tc", "qdisc", "del", "dev", UNDERLAY_IF, "clsact"], check=False)


def path_count(metrics: dict[Any, float], path: str) -> float:
    return metrics.get(("egressd_kernel_packets_total", (("path", path),)), 0.0)


def test_first_syn_takes_the_slow_path_then_the_fast_path(
    kproxy: ProxyProcess, node: NodeSim
) -> None:
    node.send_syn(51000)
    assert_syn_ack(node.expect_syn_ack(51000), 51000)
    node.send_syn(51001)
    assert_syn_ack(node.expect_syn_ack(51001), 51001)
    node.send_syn(51002)
    assert_syn_ack(node.expect_syn_ack(51002), 51002)

    def counted() -> bool:
        m = kproxy.metrics()
        return path_count(m, "fast") >= 2 and path_count(m, "return") >= 3

    wait_for(counted, REPLY_TIMEOUT_S, "the kernel's counters")
    metrics = kproxy.metrics()
    assert path_count(metrics, "slow") >= 1
    assert metrics[("egressd_policy_fetch_total", (("result", "ok"),))] == 1
    # The nftables table TPROXYs the TUN's packets and the decapsulated ones.
    listing = kn.run_in_netns(
        kproxy.fleet.proxy_ns, ["nft", "-j", "list", "table", "inet", "egressd"]
    )
    rules = [i["rule"] for i in json.loads(listing.stdout)["nftables"] if "rule" in i]
    assert [r["chain"] for r in rules] == ["prerouting"] * 6 + ["input"] * 2


def test_return_traffic_is_geneve_that_scapy_decodes(kproxy: ProxyProcess, node: NodeSim) -> None:
    node.send_syn(51100)
    node.expect_syn_ack(51100)  # slow path: the job is programmed
    node.send_syn(51101)
    node.sock.settimeout(REPLY_TIMEOUT_S)
    while True:
        data, sender = node.sock.recvfrom(65536)
        inner = IP(bytes(decode(data).inner))
        if inner[TCP].dport == 51101:
            break
    assert sender[0] == str(PROXY.underlay)
    outer = GENEVE(data)
    assert outer.vni == 1 and outer.proto == 0x0800
    (opt,) = outer.options
    assert (opt.classid, opt.type, opt.length) == (0xFF01, 0x81, 6)
    assert bytes(opt.data)[:16] == JOB.bytes and bytes(opt.data)[16:] == node.digest
    assert outer[IP].src == SITE and outer[IP][TCP].flags == "SA"
    # Byte for byte what the userspace path sends: the codec's prefix for the flow's job.
    assert data[:36] == header_for(1, JobOption(JOB.bytes, node.digest))
    assert 49152 <= sender[1] < 65536  # the flow's entropy port (RFC 8926 3.3)
    # The inner TCP checksum is complete (the proxy's stack left it partial; see kernel.py).
    fresh = inner.copy()
    del fresh[TCP].chksum
    assert IP(bytes(fresh))[TCP].chksum == inner[TCP].chksum


def test_crafted_datagrams_are_dropped_in_the_kernel_by_reason(
    kproxy: ProxyProcess, node: NodeSim
) -> None:
    node.send_syn(52000)  # warm up: the job goes into the maps
    node.expect_syn_ack(52000)
    wait_for(lambda: path_count(kproxy.metrics(), "slow") >= 1, 5, "the counters' export")
    before = kproxy.metrics()
    slow_before = path_count(before, "slow")

    expected = send_drops(node, 52001)
    node.send_syn(52100)  # and a legitimate SYN right after
    assert_syn_ack(node.expect_syn_ack(52100), 52100)

    wait_for_drops(kproxy.metrics, before, expected, REPLY_TIMEOUT_S)
    # Decided in the kernel, but for the datagrams whose job the maps do not hold: only those
    # went up to the Python endpoint.
    slow = slow_before + sum(drop.slow for drop in DROPS)
    wait_for(lambda: path_count(kproxy.metrics(), "slow") >= slow, 5, "the counters' export")
    assert path_count(kproxy.metrics(), "slow") == slow


SEND_RAW = (
    "import socket, sys; "
    "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW); "
    "s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 0))"
)


def icmp_frag_needed(quoted_sport: int, *, quoted_src: str = SANDBOX) -> bytes:
    """ICMP "fragmentation needed" to the sandbox quoting its SYN to SITE:80 (IPv4 header
    and the first 8 bytes, as RFC 792 quotes)."""
    quoted = bytes(
        IP(src=quoted_src, dst=SITE, ttl=63)
        / TCP(sport=quoted_sport, dport=80, flags="S", seq=1000, window=64240)
    )[:28]
    return bytes(IP(src=SITE, dst=SANDBOX) / ICMP(type=3, code=4, nexthopmtu=1300) / Raw(quoted))


def icmp_from_node(node: NodeSim, timeout: float) -> list[tuple[bytes, IP]]:
    """The GENEVE datagrams with an inner ICMP packet the node receives within `timeout`."""
    out = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        node.sock.settimeout(left)
        try:
            data, _ = node.sock.recvfrom(65536)
        except TimeoutError:
            break
        inner = IP(bytes(decode(data).inner))
        if ICMP in inner:
            out.append((data, inner))
    return out


def tun_drops(proxy: ProxyProcess, reason: str) -> float:
    return proxy.metrics().get(("egressd_tun_tx_dropped_total", (("reason", reason),)), 0.0)


def test_an_icmp_error_goes_back_under_the_flow_it_quotes_and_only_then(
    kproxy: ProxyProcess, node: NodeSim
) -> None:
    node.send_syn(53200)  # slow path: the job is programmed, the flow recorded
    node.expect_syn_ack(53200)
    node.send_syn(53201)  # fast path: the flow recorded by tc ingress
    node.expect_syn_ack(53201)

    def send(packet: bytes) -> None:
        argv = [sys.executable, "-c", SEND_RAW, packet.hex(), SANDBOX]
        kn.run_in_netns(kproxy.fleet.proxy_ns, argv)

    # Fail closed first: an error quoting a flow nobody recorded, and one quoting the
    # known flow's ports but another host's packet, are not returned to the node.
    no_flow_before = tun_drops(kproxy, "no_flow")
    send(icmp_frag_needed(53299))
    send(icmp_frag_needed(53201, quoted_src="100.96.1.77"))
    assert icmp_from_node(node, 1.5) == []
    wait_for(lambda: tun_drops(kproxy, "no_flow") >= no_flow_before + 2, 5, "the no_flow drops")
    assert tun_drops(kproxy, "no_flow") == no_flow_before + 2

    for sport in (53200, 53201):
        sent = icmp_frag_needed(sport)
        send(sent)
        ((data, inner),) = icmp_from_node(node, REPLY_TIMEOUT_S)
        # Under the quoted flow's job option, byte for byte the codec's prefix.
        assert data[:36] == header_for(1, JobOption(JOB.bytes, node.digest))
        assert (inner.src, inner.dst) == (SITE, SANDBOX)
        assert (inner[ICMP].type, inner[ICMP].code, inner[ICMP].nexthopmtu) == (3, 4, 1300)
        assert bytes(inner) == sent[: len(bytes(inner))] and len(bytes(inner)) == len(sent)
    assert tun_drops(kproxy, "no_flow") == no_flow_before + 2


def test_a_sandbox_connection_through_the_kernel_path_names_its_job(
    fleet: Fleet, kproxy: ProxyProcess, node: NodeSim
) -> None:
    node.close()  # the agent takes 198.18.0.11:6081
    (fleet.root / "www" / "bulk.bin").write_bytes(BULK)
    with agent_for(fleet, JOB, digest=node.digest, tun="sbx1"):
        wait_for(lambda: http(fleet.inet, "GET", SITE, 80, "/hello.txt")[0] == 200, 10, "inet http")
        for _ in range(2):  # the first connection programs the job, the second is all fast path
            answer = sandbox_get(fleet, "/hello.txt")
            assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
            assert answer.endswith(b"hello through the tunnel\n")

        # Bulk: GSO super-packets from the proxy's stack, encapsulated and checksummed.
        answer = sandbox_get(fleet, "/bulk.bin", timeout=20)
        assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
        assert answer.endswith(BULK), len(answer)

        def connections() -> list[dict[str, Any]]:
            events = [
                json.loads(line) for line in kproxy.log().splitlines() if line.startswith("{")
            ]
            return [e for e in events if e.get("event") == "connection"]

        wait_for(lambda: len(connections()) >= 3, 5, "the connections' audit events")
        for event in connections()[-3:]:
            assert (event["verdict"], event["reason"]) == ("allow", "allowed_cidr")
            assert event["job_id"] == str(JOB)
            assert event["node"] == "node1"

        def fast_both_ways() -> bool:  # the kernel's counters are exported every second
            m = kproxy.metrics()
            return path_count(m, "fast") >= 4 and path_count(m, "return") >= 4

        wait_for(fast_both_ways, 5, "the fast path's counters")


def tc_filters(ns: str, dev: str, kind: str) -> str:
    return kn.run_in_netns(ns, ["tc", "filter", "show", "dev", dev, kind], check=False).stdout


def test_sigterm_leaves_no_program_pin_or_map(fleet: Fleet, node: NodeSim) -> None:
    proxy = kernel_proxy(fleet)
    state = fleet.root / f"kstate-{fleet.prefix}"
    try:
        proxy.wait_ready()
        node.send_syn(53000)
        try:
            node.expect_syn_ack(53000)
        except AssertionError as exc:
            # Seen once in a CI rehearsal under load, not reproduced since: keep what the
            # proxy saw, to tell a slow slow path from a lost datagram.
            raise AssertionError(f"{exc}; proxy log tail:\n{proxy.log()[-4000:]}") from exc
        assert "px_ingress" in tc_filters(fleet.proxy_ns, UNDERLAY_IF, "ingress")
        assert "px_egress" in tc_filters(fleet.proxy_ns, "gnv0", "egress")
        (loaded,) = [e for e in _events(proxy) if e["event"] == "kernel_datapath_loaded"]
        ids = set(loaded["programs"].values())
        assert ids <= _prog_ids(), "bpftool sees the proxy's programs"
        assert proxy.terminate() == 0, proxy.log()
    finally:
        proxy.kill()
    ns = fleet.proxy_ns
    assert "clsact" not in kn.run_in_netns(ns, ["tc", "qdisc", "show", "dev", UNDERLAY_IF]).stdout
    assert not (state / "bpffs").exists() or not any((state / "bpffs").iterdir())
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        assert str(state) not in fh.read()
    wait_for(lambda: not (_prog_ids() & ids), 5, "the programs to be freed")
    events = [e["event"] for e in _events(proxy)]
    assert "stop_step_failed" not in events and events[-1] == "stopped"


def _events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


def _prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {p["id"] for p in json.loads(out) if p.get("name") in ("px_ingress", "px_egress")}
