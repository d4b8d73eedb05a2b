"""Offload through the agent's data path, the proxy's endpoint and tunnel, with fakes.

A socketpair stands in for the TUN (the first 10 bytes of each message are
the virtio-net header, as on a TUN with IFF_VNET_HDR); no root needed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import uuid
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from egressd.agent.config import parse_config
from egressd.agent.datapath import DROP_REASONS, Datapath
from egressd.geneve import GeneveOption, JobOption, decode, encode, offload_option
from egressd.net.tun import NO_VNET_HDR, VNET_HDR_LEN, vnet_header
from egressd.proxy.endpoint import Accepted, Dropped, validate
from egressd.proxy.flows import FlowTable
from egressd.proxy.registry import NodeEntry, NodeView
from egressd.proxy.tunnel import TUN_DROP_REASONS, GeneveTunnel
from tests.support.agent import (
    DIGEST,
    JOB,
    SANDBOX_IP,
    FakeRx,
    FakeTx,
    sandbox,
)
from tests.support.proxy import JOB as PROXY_JOB
from tests.support.proxy import (
    NODE1,
    NODE2,
    NODES,
    POLICIES,
    POLICY,
    FakeNodes,
    FakePolicies,
    FakeTun,
    until,
)

MSS = 1396
GSO_HDR = vnet_header(1, 1, 52, MSS, 20, 16)
CSUM_HDR = vnet_header(1, 0, 0, 0, 20, 16)
AGENT_CONFIG = {
    "name": "node1",
    "underlay": "198.18.0.11",
    "sandbox_cidr": "100.96.1.0/24",
    "proxies": [
        {"name": "proxy1", "underlay": "198.18.0.21"},
        {"name": "proxy2", "underlay": "198.18.0.22"},
    ],
}


def tcp(src: str, dst: str, sport: int, dport: int, payload: int) -> bytes:
    return bytes(
        IP(src=src, dst=dst, flags="DF")
        / TCP(sport=sport, dport=dport, flags="PA", options=[("Timestamp", (1, 2))])
        / Raw(b"s" * payload)
    )


# --- the agent ----------------------------------------------------------------------------


def agent(offload: bool) -> tuple[Datapath, socket.socket, socket.socket, FakeTx, FakeRx]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    tx, rx = FakeTx(), FakeRx()
    config = parse_config({**AGENT_CONFIG, "offload": offload})
    path = Datapath(config, ours.fileno(), tx_socket=tx, rx_socket=rx)  # type: ignore[arg-type]
    path.sandbox_added(sandbox())
    path.proxy_health("proxy1", True)
    path.proxy_health("proxy2", True)
    return path, ours, theirs, tx, rx


@pytest.fixture
def dp() -> Any:
    path, ours, theirs, tx, rx = agent(True)
    try:
        yield path, theirs, tx, rx
    finally:
        ours.close()
        theirs.close()


def test_the_config_switch() -> None:
    assert parse_config(AGENT_CONFIG).offload is False
    assert parse_config({**AGENT_CONFIG, "offload": True}).offload is True
    with pytest.raises(Exception, match="offload"):
        parse_config({**AGENT_CONFIG, "offload": "yes"})


def test_agent_sends_super_packets_with_the_option_and_plain_ones_without(dp: Any) -> None:
    path, tun, tx, _ = dp
    big = tcp(str(SANDBOX_IP), "203.0.113.10", 40000, 80, 30 * MSS)
    small = tcp(str(SANDBOX_IP), "203.0.113.10", 40000, 80, 10)
    tun.send(GSO_HDR + big)
    tun.send(NO_VNET_HDR + small)
    tun.send(vnet_header(2) + small)  # DATA_VALID only: a plain packet
    tun.send(CSUM_HDR + small)
    path.drain_tun_offload()
    assert len(tx.sent) == 4
    for data, addr in tx.sent:
        assert addr in (("198.18.0.21", 0), ("198.18.0.22", 0))
        sport, dport, length, csum = struct.unpack("!HHHH", data[:8])
        assert (dport, length, csum) == (6081, len(data), 0) and sport >= 49152
    first = decode(tx.sent[0][0][8:])
    assert bytes(first.inner) == big
    assert first.job.job_id == uuid.UUID(JOB).bytes and first.job.digest == DIGEST
    assert first.options == (offload_option(1, 1, MSS, 20, 16),)
    for data, _ in tx.sent[1:3]:
        pkt = decode(data[8:])
        assert pkt.options == () and bytes(pkt.inner) == small
    assert decode(tx.sent[3][0][8:]).options == (offload_option(1, 0, 0, 20, 16),)
    assert path.super_from_tun == 1
    assert path.tx_bytes[0] + path.tx_bytes[1] == len(big) + 3 * len(small)


def test_agent_drops_what_it_cannot_send(dp: Any) -> None:
    path, tun, tx, _ = dp
    pkt = tcp(str(SANDBOX_IP), "203.0.113.10", 40000, 80, 10 * MSS)
    tun.send(vnet_header(1, 3, 52, MSS, 20, 16) + pkt)  # UFO: never offered
    tun.send(NO_VNET_HDR + tcp("100.96.1.99", "203.0.113.10", 40000, 80, 10))
    tun.send(NO_VNET_HDR + b"\x45\x00")
    tun.send(b"\x00" * 4)  # shorter than the header
    path.drain_tun_offload()
    assert tx.sent == []
    assert path.dropped["unsupported_gso"] == 1
    assert path.dropped["unknown_source"] == 1
    assert path.dropped["tun_malformed"] == 2


def test_agent_writes_super_packets_with_their_vnet_header(dp: Any) -> None:
    path, tun, _, rx = dp
    job = JobOption(uuid.UUID(JOB).bytes, DIGEST)
    big = tcp("203.0.113.10", str(SANDBOX_IP), 80, 40000, 30 * MSS)
    small = tcp("203.0.113.10", str(SANDBOX_IP), 80, 40000, 10)
    src = ("198.18.0.21", 6081)
    rx.queue.append((encode(1, job, big, options=[offload_option(1, 1, MSS, 20, 16)]), src))
    rx.queue.append((encode(1, job, small), src))
    rx.queue.append((encode(1, job, small, options=[offload_option(1, 0, 0, 20, 16)]), src))
    rx.queue.append((encode(1, job, big, options=[offload_option(1, 1, 8, 20, 16)]), src))
    rx.queue.append((encode(1, job, big, options=[offload_option(1, 1, MSS, 20, 6)]), src))
    path.drain_geneve()
    assert tun.recv(1 << 17) == GSO_HDR + big
    assert tun.recv(1 << 17) == NO_VNET_HDR + small
    assert tun.recv(1 << 17) == CSUM_HDR + small
    with pytest.raises(BlockingIOError):
        tun.recv(1 << 17)
    assert path.dropped["bad_offload_option"] == 2
    assert path.super_to_tun == 1
    assert {"bad_offload_option", "offload_disabled", "unsupported_gso"} <= set(DROP_REASONS)


def test_an_agent_without_offload_drops_super_packets() -> None:
    path, ours, theirs, _, rx = agent(False)
    try:
        job = JobOption(uuid.UUID(JOB).bytes, DIGEST)
        big = tcp("203.0.113.10", str(SANDBOX_IP), 80, 40000, 30 * MSS)
        opt = offload_option(1, 1, MSS, 20, 16)
        rx.queue.append((encode(1, job, big, options=[opt]), ("198.18.0.21", 6081)))
        # An unknown non-critical option is still ignored, as before.
        small = tcp("203.0.113.10", str(SANDBOX_IP), 80, 40000, 10)
        rx.queue.append(
            (encode(1, job, small, options=[GeneveOption(0x0102, 1, b"")]), ("198.18.0.21", 6081))
        )
        path.drain_geneve()
        assert theirs.recv(1 << 17) == small
        assert path.dropped["offload_disabled"] == 1
    finally:
        ours.close()
        theirs.close()


# --- the proxy: validate --------------------------------------------------------------


def proxy_datagram(inner: bytes, *options: GeneveOption) -> bytes:
    return encode(1, JobOption(PROXY_JOB.bytes, POLICY.digest), inner, options=list(options))


def check(data: bytes, offload: bool) -> Accepted | Dropped | object:
    return validate(
        data, "198.18.0.11", nodes=NODES, vni=1, policy_lookup=POLICIES.get, offload=offload
    )


def test_validate_with_offload() -> None:
    big = tcp("100.96.1.5", "203.0.113.10", 40000, 443, 30 * MSS)
    result = check(proxy_datagram(big, offload_option(1, 1, MSS, 20, 16)), True)
    assert isinstance(result, Accepted)
    assert result.vnet == GSO_HDR and bytes(result.inner) == big
    plain = check(proxy_datagram(tcp("100.96.1.5", "203.0.113.10", 40000, 443, 10)), True)
    assert isinstance(plain, Accepted) and plain.vnet is None
    assert check(proxy_datagram(big, offload_option(1, 1, MSS, 20, 16)), False) == Dropped(
        "offload_disabled"
    )
    assert check(proxy_datagram(big, offload_option(1, 1, 1, 20, 16)), True) == Dropped(
        "bad_offload_option"
    )
    # The other checks still come first: a forged source is refused whatever the option says.
    forged = tcp("100.96.2.5", "203.0.113.10", 40000, 443, 30 * MSS)
    assert check(proxy_datagram(forged, offload_option(1, 1, MSS, 20, 16)), True) == Dropped(
        "source_outside_node_cidr"
    )
    assert NODE1.name == "node1" and NODE2.name == "node2"


# --- the proxy: the tunnel ---------------------------------------------------------------


class VnetTun(FakeTun):
    vnet_hdr = True


class OffloadRig:
    def __init__(self) -> None:
        self.node1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.node1.bind(("127.0.0.2", 0))
        self.node1.settimeout(2.0)
        view = NodeView(
            [NodeEntry("node1", ipaddress.IPv4Address("127.0.0.2"), NODE1.sandbox_cidr)]
        )
        self.tun = VnetTun()
        self.metrics = CollectorRegistry()
        self.flows = FlowTable(idle_s=60, max_flows=100)
        self.tunnel = GeneveTunnel(
            listen=("127.0.0.1", 0),
            peer_port=self.node1.getsockname()[1],
            vni=1,
            tun=self.tun,  # type: ignore[arg-type]
            nodes=FakeNodes(view),  # type: ignore[arg-type]
            policies=FakePolicies(POLICIES),  # type: ignore[arg-type]
            flows=self.flows,
            metrics=self.metrics,
            offload=True,
        )

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


def test_offload_needs_a_vnet_tun() -> None:
    tun = FakeTun()
    tun.vnet_hdr = False  # type: ignore[attr-defined]
    try:
        with pytest.raises(ValueError, match="vnet_hdr"):
            GeneveTunnel(
                listen=("127.0.0.1", 0),
                vni=1,
                tun=tun,  # type: ignore[arg-type]
                nodes=FakeNodes(NODES),  # type: ignore[arg-type]
                policies=FakePolicies(POLICIES),  # type: ignore[arg-type]
                flows=FlowTable(idle_s=60, max_flows=10),
                metrics=CollectorRegistry(),
                offload=True,
            )
    finally:
        tun.close()


async def test_the_tunnel_carries_super_packets_both_ways() -> None:
    rig = OffloadRig()
    rig.tunnel.start()
    bound = rig.tunnel.bound
    assert bound is not None
    try:
        big = tcp("100.96.1.5", "203.0.113.10", 40000, 443, 8 * MSS)
        small = tcp("100.96.1.5", "203.0.113.10", 40000, 443, 10)
        rig.node1.sendto(proxy_datagram(big, offload_option(1, 1, MSS, 20, 16)), bound)
        rig.node1.sendto(proxy_datagram(small), bound)
        assert await asyncio.to_thread(rig.tun.theirs.recv, 1 << 17) == GSO_HDR + big
        assert await asyncio.to_thread(rig.tun.theirs.recv, 1 << 17) == NO_VNET_HDR + small
        await until(lambda: rig.sample("egressd_tun_superpackets_total", direction="to_tun") == 1)

        back_big = tcp("203.0.113.10", "100.96.1.5", 443, 40000, 8 * MSS)
        back_small = tcp("203.0.113.10", "100.96.1.5", 443, 40000, 10)
        rig.tun.theirs.send(GSO_HDR + back_big)
        rig.tun.theirs.send(vnet_header(2) + back_small)  # DATA_VALID: not forwarded
        rig.tun.theirs.send(CSUM_HDR + back_small)
        rig.tun.theirs.send(vnet_header(1, 4, 52, MSS, 20, 16) + back_big)  # TCPv6: refused
        first = decode(await asyncio.to_thread(rig.node1.recv, 1 << 17))
        assert bytes(first.inner) == back_big
        assert first.options == (offload_option(1, 1, MSS, 20, 16),)
        assert first.job.job_id == PROXY_JOB.bytes
        second = decode(await asyncio.to_thread(rig.node1.recv, 1 << 17))
        assert second.options == () and bytes(second.inner) == back_small
        third = decode(await asyncio.to_thread(rig.node1.recv, 1 << 17))
        assert third.options == (offload_option(1, 0, 0, 20, 16),)
        await until(
            lambda: rig.sample("egressd_tun_tx_dropped_total", reason="unsupported_gso") == 1
        )
        assert rig.sample("egressd_tun_superpackets_total", direction="from_tun") == 1
        assert rig.sample("egressd_geneve_tx_packets_total") == 3
        assert "unsupported_gso" in TUN_DROP_REASONS
        assert VNET_HDR_LEN == 10
    finally:
        await rig.tunnel.close()
        rig.tun.close()
        rig.node1.close()
