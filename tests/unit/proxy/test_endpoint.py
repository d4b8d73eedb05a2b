"""Validation of received GENEVE datagrams, and the tunnel's I/O loop around it.

`validate` is tested as the pure function it is (scapy builds the inner
packets: it is the oracle, never the data path). The tunnel is tested on
loopback UDP sockets with a SOCK_SEQPACKET socketpair standing in for the
TUN (one read or write per packet, like a TUN), so no root is needed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from egressd.geneve.codec import DECODE_REASONS, GeneveError, JobOption, decode, encode
from egressd.proxy.endpoint import (
    DROPPED,
    ENDPOINT_REASONS,
    MAX_JOB_IDS,
    Accepted,
    Dropped,
    NeedPolicy,
    validate,
)
from egressd.proxy.flows import FlowTable
from egressd.proxy.registry import NodeEntry, NodeView
from egressd.proxy.tunnel import RX_DROP_REASONS, TUN_DROP_REASONS, GeneveTunnel, TunnelLimits
from tests.support.proxy import (
    JOB,
    NODE1,
    NODE2,
    NODES,
    OTHER_JOB,
    POLICIES,
    POLICY,
    SANDBOX,
    SITE,
    FakeNodes,
    FakePolicies,
    FakeTun,
    until,
)


def syn(src: str = SANDBOX, dst: str = SITE, sport: int = 40000, dport: int = 443) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S", seq=1000))


def datagram(
    inner: bytes, *, job: uuid.UUID = JOB, digest: bytes | None = None, vni: int = 1
) -> bytes:
    option = JobOption(job.bytes, POLICIES.get(job, POLICY).digest if digest is None else digest)
    return encode(vni, option, inner)


def check(
    data: bytes, sender: str = "198.18.0.11", **kwargs: Any
) -> Accepted | Dropped | NeedPolicy:
    args: dict[str, Any] = {"nodes": NODES, "vni": 1, "policy_lookup": POLICIES.get}
    args.update(kwargs)
    return validate(data, sender, **args)


# --- validate --------------------------------------------------------------------------


def test_a_syn_from_a_bound_node_is_accepted_with_its_flow() -> None:
    inner = syn()
    result = check(datagram(inner))
    assert isinstance(result, Accepted)
    assert bytes(result.inner) == inner
    assert result.node is NODE1
    assert result.job_id == JOB
    assert result.job.job_id == JOB.bytes
    assert result.policy is POLICY
    assert (result.src, result.sport, result.dst, result.dport, result.proto) == (
        int(ipaddress.IPv4Address(SANDBOX)),
        40000,
        int(ipaddress.IPv4Address(SITE)),
        443,
        6,
    )
    assert not result.digest_mismatch


def test_udp_is_accepted() -> None:
    inner = bytes(
        IP(src=SANDBOX, dst="100.100.100.53") / UDP(sport=5353, dport=53) / Raw(b"q" * 12)
    )
    result = check(datagram(inner))
    assert isinstance(result, Accepted)
    assert (result.proto, result.dport) == (17, 53)


def test_an_unknown_sender_is_dropped_before_its_bytes_are_parsed() -> None:
    assert check(b"\xff", sender="198.18.0.99") == Dropped("unknown_node")
    assert check(datagram(syn()), sender="198.18.0.99") == Dropped("unknown_node")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x00\x00\x08", "truncated"),
        (bytes([0x47]) + datagram(syn())[1:], "bad_version"),
        (encode(1, JobOption(JOB.bytes, POLICY.digest), b"\x60" + b"\x00" * 39), "inner_not_ipv4"),
        (datagram(syn())[:-5], "inner_truncated"),
    ],
)
def test_decode_reasons_are_passed_on_verbatim(data: bytes, reason: str) -> None:
    with pytest.raises(GeneveError) as info:
        decode(data)
    assert info.value.reason == reason
    assert check(data) == Dropped(reason)


def test_bad_vni() -> None:
    assert check(datagram(syn(), vni=2)) == Dropped("bad_vni")
    assert isinstance(check(datagram(syn(), vni=2), vni=2), Accepted)


@pytest.mark.parametrize("src", ["100.96.2.5", "100.96.0.5", "10.0.0.1", "203.0.113.10"])
def test_inner_source_outside_the_node_cidr(src: str) -> None:
    assert check(datagram(syn(src=src))) == Dropped("source_outside_node_cidr")


def test_the_cidr_is_the_sending_nodes() -> None:
    # node2's sandbox address is fine from node2 (and its job is bound to node2).
    inner = syn(src="100.96.2.5")
    assert isinstance(check(datagram(inner, job=OTHER_JOB), sender="198.18.0.12"), Accepted)
    assert check(datagram(inner, job=OTHER_JOB), sender="198.18.0.11") == Dropped(
        "source_outside_node_cidr"
    )


@pytest.mark.parametrize(
    "inner",
    [
        bytes(IP(src=SANDBOX, dst=SITE) / ICMP()),
        bytes(IP(src=SANDBOX, dst=SITE, proto=47) / Raw(b"\x00" * 8)),  # GRE
        bytes(IP(src=SANDBOX, dst=SITE, proto=132) / Raw(b"\x00" * 16)),  # SCTP
    ],
)
def test_protocols_other_than_tcp_and_udp(inner: bytes) -> None:
    assert check(datagram(inner)) == Dropped("proto_not_allowed")


@pytest.mark.parametrize(
    "inner",
    [
        bytes(IP(src=SANDBOX, dst=SITE, flags="MF") / TCP(sport=1, dport=443)),
        bytes(IP(src=SANDBOX, dst=SITE, frag=100, proto=6) / Raw(b"\x00" * 20)),
    ],
)
def test_fragments(inner: bytes) -> None:
    assert check(datagram(inner)) == Dropped("fragmented")


@pytest.mark.parametrize(
    "inner",
    [
        bytes(IP(src=SANDBOX, dst=SITE, proto=6) / Raw(b"\x00" * 10)),  # short TCP header
        bytes(IP(src=SANDBOX, dst=SITE) / TCP(sport=1, dport=443, dataofs=4)),
        bytes(IP(src=SANDBOX, dst=SITE) / TCP(sport=1, dport=443, dataofs=15)),  # past the end
        bytes(IP(src=SANDBOX, dst=SITE, proto=17) / Raw(b"\x00" * 7)),  # short UDP header
        bytes(IP(src=SANDBOX, dst=SITE) / UDP(sport=1, dport=53, len=7)),
        bytes(IP(src=SANDBOX, dst=SITE) / UDP(sport=1, dport=53, len=200) / Raw(b"x" * 8)),
        bytes(IP(src=SANDBOX, dst=SITE) / TCP(sport=0, dport=443)),
        bytes(IP(src=SANDBOX, dst=SITE) / UDP(sport=5353, dport=0)),
    ],
)
def test_malformed_l4(inner: bytes) -> None:
    assert check(datagram(inner)) == Dropped("malformed_l4")


def test_no_cached_policy_asks_for_one() -> None:
    assert check(datagram(syn()), policy_lookup=lambda _job: None) == NeedPolicy(JOB)


def test_a_job_not_bound_to_the_node() -> None:
    # OTHER_JOB's policy names node2 only; node1 may not speak for it.
    assert check(datagram(syn(), job=OTHER_JOB)) == Dropped("job_not_bound_to_node")


def test_the_binding_is_checked_after_the_cheaper_checks() -> None:
    bad = datagram(syn(src="100.96.2.9"), job=OTHER_JOB)
    assert check(bad) == Dropped("source_outside_node_cidr")


def test_a_digest_mismatch_is_accepted_and_flagged() -> None:
    result = check(datagram(syn(), digest=b"\x00" * 8))
    assert isinstance(result, Accepted)
    assert result.digest_mismatch
    assert result.policy is POLICY  # the proxy's own verified policy, not the option's


def test_the_job_id_memo_is_used_and_bounded() -> None:
    memo: dict[bytes, uuid.UUID] = {}
    first = check(datagram(syn()), job_ids=memo)
    assert isinstance(first, Accepted)
    assert memo == {JOB.bytes: JOB}
    second = check(datagram(syn()), job_ids=memo)
    assert isinstance(second, Accepted)
    assert second.job_id is memo[JOB.bytes]
    memo.update({uuid.uuid4().bytes: uuid.uuid4() for _ in range(MAX_JOB_IDS)})
    fresh = uuid.uuid4()
    assert check(datagram(syn(), job=fresh), job_ids=memo) == NeedPolicy(fresh)
    assert len(memo) <= MAX_JOB_IDS
    assert memo[fresh.bytes] == fresh


def test_drops_are_preallocated_for_every_reason() -> None:
    assert set(DROPPED) == set(ENDPOINT_REASONS)
    assert set(DECODE_REASONS) <= set(ENDPOINT_REASONS)
    assert check(b"", sender="1.1.1.1") is DROPPED["unknown_node"]
    assert set(ENDPOINT_REASONS) <= set(RX_DROP_REASONS)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_from_a_node_never_raise(data: bytes) -> None:
    result = check(data)
    assert isinstance(result, Accepted | Dropped | NeedPolicy)
    if isinstance(result, Dropped):
        assert result.reason in ENDPOINT_REASONS


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=20, max_size=80), st.integers(0, 2**24 - 1))
def test_arbitrary_inner_packets_never_raise(inner: bytes, vni: int) -> None:
    data = encode(vni, JobOption(JOB.bytes, POLICY.digest), inner)
    result = check(data, vni=vni)
    assert isinstance(result, Accepted | Dropped | NeedPolicy)


# --- the tunnel's I/O loop -------------------------------------------------------------


class Rig:
    """A tunnel on 127.0.0.1 with nodes at 127.0.0.2 (node1) and 127.0.0.3 (node2)."""

    def __init__(self, policies: FakePolicies, limits: TunnelLimits = TunnelLimits()) -> None:
        self.node1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.node1.bind(("127.0.0.2", 0))
        self.node1.settimeout(2.0)
        port = self.node1.getsockname()[1]
        self.stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.stranger.bind(("127.0.0.9", 0))
        view = NodeView(
            [
                NodeEntry("node1", ipaddress.IPv4Address("127.0.0.2"), NODE1.sandbox_cidr),
                NodeEntry("node2", ipaddress.IPv4Address("127.0.0.3"), NODE2.sandbox_cidr),
            ]
        )
        self.tun = FakeTun()
        self.metrics = CollectorRegistry()
        self.flows = FlowTable(idle_s=60, max_flows=100)
        self.policies = policies
        self.tunnel = GeneveTunnel(
            listen=("127.0.0.1", 0),
            peer_port=port,
            vni=1,
            tun=self.tun,  # type: ignore[arg-type]
            nodes=FakeNodes(view),  # type: ignore[arg-type]
            policies=policies,  # type: ignore[arg-type]
            flows=self.flows,
            metrics=self.metrics,
            limits=limits,
        )

    def start(self) -> None:
        self.tunnel.start()
        bound = self.tunnel.bound
        assert bound is not None
        self.addr = bound

    async def close(self) -> None:
        await self.tunnel.close()
        self.tun.close()
        self.node1.close()
        self.stranger.close()

    def send(self, data: bytes, sock: socket.socket | None = None) -> None:
        (sock or self.node1).sendto(data, self.addr)

    async def from_tun(self) -> bytes:
        return await asyncio.to_thread(self.tun.theirs.recv, 65536)

    async def at_node(self) -> bytes:
        return await asyncio.to_thread(self.node1.recv, 65536)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def rig() -> Any:
    r = Rig(FakePolicies(POLICIES))
    r.start()
    yield r
    await r.close()


async def test_forward_and_return_through_the_tunnel(rig: Rig) -> None:
    inner = syn()
    rig.send(datagram(inner))
    assert await rig.from_tun() == inner
    await until(lambda: rig.sample("egressd_geneve_rx_packets_total") == 1)
    assert rig.sample("egressd_tun_rx_packets_total") == 1
    flow = rig.flows.lookup(SANDBOX, 40000, SITE, 443, 6)
    assert flow is not None
    assert (flow.job_id, flow.digest, flow.node) == (JOB, POLICY.digest, "node1")

    reply = bytes(IP(src=SITE, dst=SANDBOX) / TCP(sport=443, dport=40000, flags="SA", ack=1001))
    rig.tun.theirs.send(reply)
    back = decode(await rig.at_node())
    assert bytes(back.inner) == reply
    assert back.vni == 1
    assert back.job.job_id == JOB.bytes
    assert back.job.digest == POLICY.digest
    await until(lambda: rig.sample("egressd_geneve_tx_packets_total") == 1)


async def test_return_packets_without_a_flow_or_node_are_dropped_and_counted(rig: Rig) -> None:
    for reason in TUN_DROP_REASONS:
        assert rig.sample("egressd_tun_tx_dropped_total", reason=reason) == 0
    rig.tun.theirs.send(bytes(IP(src=SITE, dst=SANDBOX) / TCP(sport=443, dport=1, flags="R")))
    rig.tun.theirs.send(bytes(IP(src=SITE, dst="100.97.0.1") / TCP(sport=443, dport=1)))
    rig.tun.theirs.send(b"\x60" + b"\x00" * 47)  # IPv6
    rig.tun.theirs.send(b"\x45\x00")
    rig.tun.theirs.send(bytes(IP(src=SITE, dst=SANDBOX) / ICMP(type=0)))  # an echo reply
    await until(lambda: rig.sample("egressd_tun_tx_dropped_total", reason="no_flow") == 1)
    await until(lambda: rig.sample("egressd_tun_tx_dropped_total", reason="proto_not_allowed") == 1)
    assert rig.sample("egressd_tun_tx_dropped_total", reason="no_node") == 1
    assert rig.sample("egressd_tun_tx_dropped_total", reason="not_ipv4") == 1
    assert rig.sample("egressd_tun_tx_dropped_total", reason="malformed") == 1
    assert rig.sample("egressd_geneve_tx_packets_total") == 0


async def test_icmp_errors_go_back_under_the_flow_they_quote(rig: Rig) -> None:
    inner = bytes(IP(src=SANDBOX, dst=SITE) / UDP(sport=5000, dport=9999) / Raw(b"x"))
    rig.send(datagram(inner))
    await rig.from_tun()
    icmp = bytes(IP(src=SITE, dst=SANDBOX) / ICMP(type=3, code=3) / inner[:28])
    rig.tun.theirs.send(icmp)
    back = decode(await rig.at_node())
    assert bytes(back.inner) == icmp
    assert back.job.job_id == JOB.bytes


async def test_forged_datagrams_are_dropped_by_reason_and_the_loop_goes_on(rig: Rig) -> None:
    for reason in RX_DROP_REASONS:
        assert rig.sample("egressd_geneve_rx_dropped_total", reason=reason) == 0
    rig.send(datagram(syn()), sock=rig.stranger)
    rig.send(b"\x00\x01")
    rig.send(datagram(syn(), vni=9))
    rig.send(datagram(syn(src="100.96.2.7")))
    rig.send(datagram(syn(), job=OTHER_JOB))
    good = syn(sport=40001)
    rig.send(datagram(good))
    assert await rig.from_tun() == good
    await until(lambda: rig.sample("egressd_geneve_rx_packets_total") == 6)
    for reason in (
        "unknown_node",
        "truncated",
        "bad_vni",
        "source_outside_node_cidr",
        "job_not_bound_to_node",
    ):
        assert rig.sample("egressd_geneve_rx_dropped_total", reason=reason) == 1, reason
    assert len(rig.flows) == 1


async def test_digest_mismatch_is_counted_and_asks_for_a_refresh(rig: Rig) -> None:
    rig.send(datagram(syn(), digest=b"\x09" * 8))
    await rig.from_tun()
    await until(lambda: rig.sample("egressd_geneve_digest_mismatch_total") == 1)
    assert rig.policies.refreshes == [JOB]


async def test_a_replaced_digest_is_accepted_in_its_grace_period_then_dropped(rig: Rig) -> None:
    old = b"\x07" * 8
    rig.policies.digest_states[old] = "grace"
    first = syn(sport=41000)
    rig.send(datagram(first, digest=old))
    assert await rig.from_tun() == first
    await until(lambda: rig.sample("egressd_geneve_digest_grace_total") == 1)
    assert rig.sample("egressd_geneve_digest_mismatch_total") == 0
    assert rig.policies.refreshes == []
    rig.policies.digest_states[old] = "stale"
    rig.send(datagram(syn(sport=41001), digest=old))
    await until(lambda: rig.sample("egressd_geneve_rx_dropped_total", reason="stale_digest") == 1)
    assert rig.flows.lookup(SANDBOX, 41001, SITE, 443, 6) is None
    current = syn(sport=41002)
    rig.send(datagram(current))
    assert await rig.from_tun() == current
    assert rig.sample("egressd_geneve_digest_grace_total") == 1


async def test_datagrams_wait_for_a_policy_then_go_through() -> None:
    policies = FakePolicies({})
    rig = Rig(policies)
    rig.start()
    try:
        policies.serve[JOB] = POLICY
        first, second = syn(sport=1), syn(sport=2)
        rig.send(datagram(first))
        rig.send(datagram(second))
        await until(lambda: rig.sample("egressd_geneve_rx_packets_total") == 2)
        assert policies.gets == [JOB]  # one fetch for the job, not one per datagram
        policies.release()
        assert {await rig.from_tun(), await rig.from_tun()} == {first, second}
    finally:
        await rig.close()


async def test_an_unavailable_policy_drops_the_held_datagrams_with_its_reason() -> None:
    policies = FakePolicies({})
    rig = Rig(policies, TunnelLimits(pending_per_job=2))
    rig.start()
    try:
        policies.serve[JOB] = "policy_unverifiable"
        for sport in range(1, 6):
            rig.send(datagram(syn(sport=sport)))
        await until(lambda: rig.sample("egressd_geneve_rx_packets_total") == 5)
        assert rig.sample("egressd_geneve_rx_dropped_total", reason="policy_queue_full") == 3
        policies.release()
        await until(
            lambda: rig.sample("egressd_geneve_rx_dropped_total", reason="policy_unverifiable") == 2
        )
        # A job in the store's negative cache is dropped at once, without a fetch.
        policies.negatives[OTHER_JOB] = "policy_missing"
        rig.send(datagram(syn(), job=OTHER_JOB))
        await until(
            lambda: rig.sample("egressd_geneve_rx_dropped_total", reason="policy_missing") == 1
        )
        assert policies.gets == [JOB]
    finally:
        await rig.close()


async def test_a_full_flow_table_drops_new_flows(rig: Rig) -> None:
    rig.flows.max_flows = 1
    rig.send(datagram(syn(sport=1)))
    await rig.from_tun()
    rig.send(datagram(syn(sport=2)))
    await until(
        lambda: rig.sample("egressd_geneve_rx_dropped_total", reason="flow_table_full") == 1
    )


async def test_close_is_idempotent_and_stops_reading(rig: Rig) -> None:
    await rig.tunnel.close()
    await rig.tunnel.close()
    assert rig.tunnel.bound is None
