"""Sandbox logic without a kernel: ids and names, addresses, ports, exemptions,
policy checks at register, and the data path's per-packet decisions with fake
sockets (a socketpair stands in for the TUN)."""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import struct
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from egressd.agent.api import ApiError, ApiServer
from egressd.agent.client import AgentClient, AgentClientError
from egressd.agent.config import parse_config
from egressd.agent.datapath import (
    DROP_REASONS,
    HEAD_ROOM,
    AgentCollector,
    Datapath,
    outer_header,
)
from egressd.agent.hashing import Rendezvous, flow_hash, flow_key, outer_source_port
from egressd.agent.sandboxes import (
    BAD_REQUEST,
    POLICY_REJECTED,
    UNAVAILABLE,
    AgentError,
    IpPool,
    Sandbox,
    SandboxManager,
    SandboxNames,
    check_sandbox_id,
    exemptions,
    names_for,
    short_id,
    tcp_ports,
    verify_for_node,
)
from egressd.geneve import JobOption, decode, encode
from egressd.policy.jws import VerifiedPolicy, sign_payload
from egressd.policy.keys import TrustedKeys, generate_signing_key
from egressd.policy.model import PortRange, parse_policy
from tests.support.agent import DIGEST, JOB, SANDBOX_IP, FakeRx, FakeTx, sandbox

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network
FLEET = (
    IPv4Network("198.18.0.0/24"),
    IPv4Network("100.96.0.0/16"),
    IPv4Network("100.100.100.53/32"),
)


def payload(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "v": 1,
        "job_id": JOB,
        "account": "acme",
        "nodes": ["node1"],
        "iat": now - 10,
        "nbf": now - 10,
        "exp": now + 600,
        "egress": [{"host": "api.allowed.test", "ports": [443, 80]}],
    }
    base.update(over)
    return base


# --- ids and names -------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "sbx-1", "A.b_c-9", "x" * 64])
def test_good_ids(good: str) -> None:
    assert check_sandbox_id(good) == good


@pytest.mark.parametrize("bad", ["", "-a", ".a", "a/b", "a b", "x" * 65, None, 7, "é"])
def test_bad_ids(bad: object) -> None:
    with pytest.raises(AgentError) as info:
        check_sandbox_id(bad)
    assert (info.value.reason, info.value.kind) == ("bad_sandbox_id", BAD_REQUEST)


def test_names_fit_the_kernel() -> None:
    names = names_for("x" * 64, "egd-sbx-")
    assert names.netns == "egd-sbx-" + short_id("x" * 64)
    assert len(names.host_veth) <= 15 and names.host_veth.startswith("sb")
    assert names.peer_veth == "eth0"
    assert short_id("a") == short_id("a") != short_id("b")
    assert len(short_id("a")) == 8 and int(short_id("a"), 16) >= 0


# --- addresses ---------------------------------------------------------------------


def test_pool_skips_gateway_network_and_broadcast() -> None:
    pool = IpPool(IPv4Network("100.96.1.0/29"))
    assert pool.gateway == IPv4Address("100.96.1.1")
    got = [pool.allocate() for _ in range(pool.capacity)]
    assert got == [IPv4Address(f"100.96.1.{i}") for i in range(2, 7)]
    with pytest.raises(AgentError) as info:
        pool.allocate()
    assert (info.value.reason, info.value.kind) == ("no_free_address", UNAVAILABLE)


def test_pool_reuses_lowest_released() -> None:
    pool = IpPool(IPv4Network("100.96.1.0/24"))
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.release(b)
    assert pool.allocate() == b
    pool.release(a)
    assert pool.allocate() == a
    assert c in pool and len(pool) == 3
    with pytest.raises(AgentError):
        pool.reserve(c)
    with pytest.raises(AgentError):
        pool.reserve(IPv4Address("100.96.1.1"))


# --- ports and exemptions -------------------------------------------------------------


def test_port_union_merges() -> None:
    policy = parse_policy(
        payload(
            egress=[
                {"host": "a.test", "ports": [443, 80]},
                {"host": "b.test", "ports": ["8000-8080", 8081, 444]},
                {"cidr": "203.0.113.64/28", "ports": [5432, "8070-9000"]},
                {"host": "c.test"},  # 443 by default
            ]
        )
    )
    assert tcp_ports(policy) == (
        PortRange(80, 80),
        PortRange(443, 444),
        PortRange(5432, 5432),
        PortRange(8000, 9000),
    )


def test_port_union_of_nothing() -> None:
    assert tcp_ports(parse_policy(payload(egress=[]))) == ()


def test_exemptions() -> None:
    policy = parse_policy(
        payload(
            egress=[
                {"cidr": "10.1.2.0/24", "ports": [5432]},  # inside 10/8: exempt
                {"cidr": "169.254.169.254/32", "ports": [80]},  # metadata, named exactly: exempt
                {"cidr": "0.0.0.0/0", "ports": [443]},  # too broad: never
                {"cidr": "203.0.113.64/28", "ports": [5432]},  # not denied: nothing to exempt
                {"cidr": "127.0.0.0/8", "ports": [80]},  # loopback: never overridable
                {"cidr": "100.96.1.0/24", "ports": [80]},  # a fleet range: never
                {"cidr": "8.0.0.0/6", "ports": [80]},  # contains 10/8 but is not inside it
                {"cidr": "2001:db8::/32", "ports": [80]},  # IPv6: tier 1 is IPv4 only
                {"host": "internal.test", "ports": [80]},
            ]
        )
    )
    assert exemptions(policy, FLEET) == (
        IPv4Network("10.1.2.0/24"),
        IPv4Network("169.254.169.254/32"),
    )


# --- policy checks at register ------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> Any:
    return generate_signing_key()


def test_verify_bound_policy(key: Any) -> None:
    token = sign_payload(payload(), key)
    verified = verify_for_node(token, TrustedKeys.of(key.public), "node1")
    assert str(verified.policy.job_id) == JOB
    assert len(verified.digest) == 8


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: sign_payload(payload(nodes=["node2"]), k), "job_not_bound_to_node"),
        (lambda k: sign_payload(payload(iat=1, nbf=1, exp=100), k), "expired"),
        (
            lambda k: sign_payload(
                payload(nbf=int(time.time()) + 3600, exp=int(time.time()) + 7200), k
            ),
            "not_yet_valid",
        ),
        (lambda k: _tamper(sign_payload(payload(), k)), "bad_signature"),
        (lambda k: sign_payload(payload(), generate_signing_key()), "unknown_kid"),
        (lambda k: "not-a-jws", "malformed"),
        (lambda k: "", "malformed"),
        (lambda k: 42, "malformed"),
    ],
    ids=[
        "not_bound",
        "expired",
        "not_yet_valid",
        "tampered",
        "unknown_kid",
        "garbage",
        "empty",
        "not_a_string",
    ],
)
def test_rejections_have_distinct_reasons(key: Any, make: Any, reason: str) -> None:
    with pytest.raises(AgentError) as info:
        verify_for_node(make(key), TrustedKeys.of(key.public), "node1")
    assert (info.value.reason, info.value.kind) == (reason, POLICY_REJECTED)


def _tamper(token: str) -> str:
    head, body, sig = token.split(".")
    raw = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw["egress"].append({"cidr": "0.0.0.0/0", "ports": ["1-65535"]})
    forged = (
        base64.urlsafe_b64encode(json.dumps(raw, separators=(",", ":"), sort_keys=True).encode())
        .rstrip(b"=")
        .decode()
    )
    return f"{head}.{forged}.{sig}"


# --- the data path with fake sockets ------------------------------------------------------

CONFIG = parse_config(
    {
        "name": "node1",
        "underlay": "198.18.0.11",
        "sandbox_cidr": "100.96.1.0/24",
        "proxies": [
            {"name": "proxy1", "underlay": "198.18.0.21"},
            {"name": "proxy2", "underlay": "198.18.0.22"},
        ],
    }
)


def ipv4_tcp(src: str, dst: str, sport: int, dport: int, payload_: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 65535, 0, 0) + payload_
    total = 20 + len(tcp)
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        1,
        0x4000,
        64,
        6,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    csum = 0
    for (word,) in struct.iter_unpack("!H", head):
        csum += word
    while csum >> 16:
        csum = (csum & 0xFFFF) + (csum >> 16)
    return head[:10] + struct.pack("!H", ~csum & 0xFFFF) + head[12:] + tcp


@pytest.fixture
def dp() -> Any:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    tx, rx = FakeTx(), FakeRx()
    path = Datapath(CONFIG, ours.fileno(), tx_socket=tx, rx_socket=rx)  # type: ignore[arg-type]
    path.sandbox_added(sandbox())
    path.proxy_health("proxy1", True)
    path.proxy_health("proxy2", True)
    try:
        yield path, theirs, tx, rx
    finally:
        ours.close()
        theirs.close()


def test_outer_header_template() -> None:
    hdr = outer_header(bytes([198, 18, 0, 11]), bytes([198, 18, 0, 21]), 50000, 6081)
    assert len(hdr) == 28 and hdr[0] == 0x45 and hdr[9] == 17
    assert hdr[6:8] == b"\x40\x00"  # DF
    assert struct.unpack("!HHHH", hdr[20:28]) == (50000, 6081, 0, 0)


def test_encapsulation(dp: Any) -> None:
    path, tun, tx, _ = dp
    packets = [
        ipv4_tcp(str(SANDBOX_IP), "203.0.113.10", 40000 + i, 443, b"x" * i) for i in range(40)
    ]
    for pkt in packets:
        tun.send(pkt)
    path.drain_tun()
    assert len(tx.sent) == 40
    rz = Rendezvous(["proxy1", "proxy2"])
    seen = set()
    for pkt, (data, addr) in zip(packets, tx.sent, strict=True):
        key = flow_key(SANDBOX_IP, "203.0.113.10", 6, struct.unpack("!H", pkt[20:22])[0], 443)
        proxy = rz.pick(flow_hash(key))
        assert proxy is not None
        assert addr == (str(CONFIG.proxy(proxy).underlay), 0)
        seen.add(proxy)
        assert data[12:16] == CONFIG.underlay.packed
        assert data[16:20] == CONFIG.proxy(proxy).underlay.packed
        sport, dport, length, csum = struct.unpack("!HHHH", data[20:28])
        assert (sport, dport, length, csum) == (outer_source_port(key), 6081, len(data) - 20, 0)
        geneve = decode(data[28:])
        assert geneve.vni == 1
        assert geneve.job.job_id == uuid.UUID(JOB).bytes and geneve.job.digest == DIGEST
        assert bytes(geneve.inner) == pkt
    assert seen == {"proxy1", "proxy2"}
    assert sum(path.tx_packets) == 40
    assert path.flow_count == 40


def test_flow_sticks_and_moves_only_when_its_proxy_dies(dp: Any) -> None:
    path, tun, tx, _ = dp
    pkts = [ipv4_tcp(str(SANDBOX_IP), "203.0.113.10", 40000 + i, 443) for i in range(20)]
    for pkt in pkts:
        tun.send(pkt)
    path.drain_tun()
    first = [addr for _, addr in tx.sent]
    tx.sent.clear()
    path.proxy_health("proxy1", False)
    for pkt in pkts:
        tun.send(pkt)
    path.drain_tun()
    assert all(addr == ("198.18.0.22", 0) for _, addr in tx.sent)
    # Proxy 1 comes back: flows now cached on proxy 2 stay there.
    tx.sent.clear()
    path.proxy_health("proxy1", True)
    for pkt in pkts:
        tun.send(pkt)
    path.drain_tun()
    assert all(addr == ("198.18.0.22", 0) for _, addr in tx.sent)
    assert ("198.18.0.21", 0) in first


def test_drops_are_counted(dp: Any) -> None:
    path, tun, tx, _ = dp
    tun.send(ipv4_tcp("100.96.1.99", "203.0.113.10", 40000, 443))  # unknown sandbox
    tun.send(b"\x60" + bytes(39))  # IPv6
    tun.send(b"\x45\x00")  # runt
    path.drain_tun()
    assert path.dropped["unknown_source"] == 1
    assert path.dropped["tun_not_ipv4"] == 1
    assert path.dropped["tun_malformed"] == 1
    path.proxy_health("proxy1", False)
    path.proxy_health("proxy2", False)
    tun.send(ipv4_tcp(str(SANDBOX_IP), "203.0.113.10", 40001, 443))
    path.drain_tun()
    assert path.dropped["no_healthy_proxy"] == 1
    assert tx.sent == []
    assert set(DROP_REASONS) <= set(path.dropped)


def test_return_path(dp: Any) -> None:
    path, tun, _, rx = dp
    job = JobOption(uuid.UUID(JOB).bytes, DIGEST)
    synack = ipv4_tcp("203.0.113.10", str(SANDBOX_IP), 443, 40000)
    rx.queue.append((encode(1, job, synack), ("198.18.0.22", 6081)))
    rx.queue.append((encode(1, job, synack), ("198.18.0.99", 6081)))  # not a proxy
    rx.queue.append((encode(2, job, synack), ("198.18.0.21", 6081)))  # other VNI
    rx.queue.append((b"\x00" * 4, ("198.18.0.21", 6081)))  # truncated
    other = ipv4_tcp("203.0.113.10", "100.96.1.77", 443, 40000)
    rx.queue.append((encode(1, job, other), ("198.18.0.21", 6081)))  # no such sandbox
    wrong_job = JobOption(uuid.uuid4().bytes, DIGEST)
    rx.queue.append((encode(1, wrong_job, synack), ("198.18.0.21", 6081)))
    path.drain_geneve()
    tun.setblocking(False)
    assert tun.recv(65535) == synack
    with pytest.raises(BlockingIOError):
        tun.recv(65535)
    assert path.rx_packets == [0, 1]
    for reason in ("unknown_proxy", "unknown_vni", "truncated", "unknown_sandbox", "job_mismatch"):
        assert path.dropped[reason] == 1, reason


def test_removed_sandbox_is_unknown(dp: Any) -> None:
    path, tun, tx, _ = dp
    path.sandbox_removed(sandbox())
    tun.send(ipv4_tcp(str(SANDBOX_IP), "203.0.113.10", 40000, 443))
    path.drain_tun()
    assert path.dropped["unknown_source"] == 1 and tx.sent == []
    assert path.sandbox_count == 0


def test_head_room() -> None:
    assert HEAD_ROOM == 64  # outer IPv4 + UDP + GENEVE + job option


# --- the manager and the API, with the kernel work stubbed out -----------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def sandbox_added(self, sb: Sandbox) -> None:
        self.events.append(("added", sb.sandbox_id))

    def sandbox_removed(self, sb: Sandbox) -> None:
        self.events.append(("removed", sb.sandbox_id))


class FakeTier1:
    def __init__(self) -> None:
        self.removed: list[int] = []

    def remove_sandbox(self, ifindex: int) -> None:
        self.removed.append(ifindex)

    def counters(self) -> dict[Any, Any]:
        return {}


class StubManager(SandboxManager):
    """The real bookkeeping; `_setup`/`_teardown` make no kernel objects."""

    fail_next: bool = False
    torn_down: list[str]

    def _setup(
        self, sandbox_id: str, names: SandboxNames, verified: VerifiedPolicy, ip: IPv4Address
    ) -> Sandbox:
        if self.fail_next:
            self.fail_next = False
            raise AgentError("link_failed", "stubbed kernel refusal")
        return Sandbox(
            sandbox_id=sandbox_id,
            job_id=verified.policy.job_id,
            digest=verified.digest,
            kid=verified.kid,
            exp=int(verified.policy.exp or 0),
            ip=ip,
            gateway=self.config.gateway,
            prefixlen=24,
            netns=names.netns,
            host_veth=names.host_veth,
            peer_veth=names.peer_veth,
            ifindex=int(ip) & 0xFF,
            mac="02:00:00:00:00:01",
            tcp_ports=tcp_ports(verified.policy),
            exemptions=exemptions(verified.policy, self.config.fleet_ranges),
        )

    def _teardown(self, sandbox: Sandbox) -> None:
        self.torn_down.append(sandbox.sandbox_id)


@pytest.fixture
def manager(key: Any, tmp_path: Path) -> Any:
    executor = ThreadPoolExecutor(max_workers=1)
    clock = [time.time()]
    mgr = StubManager(
        parse_config({**_CONFIG_OBJ, "state_dir": str(tmp_path / "state")}),
        FakeTier1(),  # type: ignore[arg-type]
        Recorder(),
        executor,
        clock=lambda: clock[0],
        keys_loader=lambda _dir: TrustedKeys.of(key.public),
    )
    mgr.torn_down = []
    mgr.clock_cell = clock  # type: ignore[attr-defined]
    try:
        yield mgr
    finally:
        executor.shutdown(wait=True)


_CONFIG_OBJ: dict[str, Any] = {
    "name": "node1",
    "underlay": "198.18.0.11",
    "sandbox_cidr": "100.96.1.0/24",
    "proxies": [{"name": "proxy1", "underlay": "198.18.0.21"}],
}


async def test_manager_bookkeeping(manager: Any, key: Any) -> None:
    a = await manager.register("a", sign_payload(payload(), key))
    b = await manager.register("b", sign_payload(payload(), key))
    assert (str(a.ip), str(b.ip)) == ("100.96.1.2", "100.96.1.3")
    with pytest.raises(AgentError) as dup:
        await manager.register("a", sign_payload(payload(), key))
    assert dup.value.reason == "duplicate_sandbox"
    manager.fail_next = True
    with pytest.raises(AgentError):
        await manager.register("c", sign_payload(payload(), key))
    assert manager.get("c") is None
    await manager.unregister("a")
    c = await manager.register("c", sign_payload(payload(), key))
    assert str(c.ip) == "100.96.1.2"  # a's address, free again; the failed attempt leaked none
    assert manager.listener.events == [
        ("added", "a"),
        ("added", "b"),
        ("removed", "a"),
        ("added", "c"),
    ]
    assert manager.torn_down == ["a"]
    with pytest.raises(AgentError) as unknown:
        await manager.unregister("a")
    assert unknown.value.kind == "not_found"
    await manager.unregister_all()
    assert len(manager) == 0 and len(manager.pool) == 0


async def test_expired_policy_is_withdrawn(manager: Any, key: Any) -> None:
    now = manager.clock_cell[0]
    sb = await manager.register("a", sign_payload(payload(exp=int(now) + 60), key))
    assert await manager.expire() == []
    manager.clock_cell[0] = now + 60 + 31  # past exp and the leeway
    assert await manager.expire() == ["a"]
    assert manager.tier1.removed == [sb.ifindex]
    assert manager.state("a") == "expired"
    assert ("removed", "a") in manager.listener.events
    assert await manager.expire() == []  # once
    await manager.unregister("a")
    assert manager.state("a") == "active" and manager.get("a") is None


async def test_api_and_client(manager: Any, key: Any, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = ApiServer(manager, path)
    await server.start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        async with AgentClient(path) as client:
            info = await client.register("sbx-1", sign_payload(payload(), key))
            assert (str(info.ip), str(info.gateway), info.mtu, info.job_id) == (
                "100.96.1.2",
                "100.96.1.1",
                1436,
                JOB,
            )
            assert str(info.resolver) == "100.100.100.53" and info.prefixlen == 24
            assert [s.sandbox_id for s in await client.list()] == ["sbx-1"]
            assert (await client.get("sbx-1")).raw["state"] == "active"
            for jws, reason in [
                (sign_payload(payload(nodes=["node9"]), key), "job_not_bound_to_node"),
                (sign_payload(payload(iat=1, nbf=1, exp=2), key), "expired"),
                (_tamper(sign_payload(payload(), key)), "bad_signature"),
            ]:
                with pytest.raises(AgentClientError) as rej:
                    await client.register("sbx-2", jws)
                assert (rej.value.status, rej.value.kind, rej.value.reason) == (
                    400,
                    "policy_rejected",
                    reason,
                )
            with pytest.raises(AgentClientError) as dup:
                await client.register("sbx-1", sign_payload(payload(), key))
            assert (dup.value.status, dup.value.reason) == (409, "duplicate_sandbox")
            with pytest.raises(AgentClientError) as bad:
                await client.register("../x", sign_payload(payload(), key))
            assert (bad.value.status, bad.value.reason) == (400, "bad_sandbox_id")
            await client.unregister("sbx-1")
            with pytest.raises(AgentClientError) as gone:
                await client.unregister("sbx-1")
            assert (gone.value.status, gone.value.reason) == (404, "unknown_sandbox")
            assert await client.list() == []
    finally:
        await server.close()
    assert not path.exists()
    async with AgentClient(path) as client:
        with pytest.raises(OSError) as unreachable:
            await client.list()
        assert isinstance(unreachable.value, AgentClientError)
        assert unreachable.value.reason == "agent_unreachable"


async def test_api_rejects_bad_bodies(manager: Any, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = ApiServer(manager, path)
    await server.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s:
            for body, reason in [
                (b"{", "bad_json"),
                (b"[]", "bad_json"),
                (b'{"sandbox_id": "a"}', "missing_field"),
                (b'{"sandbox_id": "a", "jws": "x", "extra": 1}', "unknown_field"),
            ]:
                async with s.post("http://agent/v1/sandboxes", data=body) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["reason"] == reason
    finally:
        await server.close()


async def test_api_refuses_a_live_socket(manager: Any, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    first = ApiServer(manager, path)
    await first.start()
    try:
        with pytest.raises(ApiError) as info:
            await ApiServer(manager, path).start()
        assert info.value.reason == "socket_in_use"
    finally:
        await first.close()
    # A stale socket file (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    second = ApiServer(manager, path)
    await second.start()
    await second.close()


def test_collector_exports_every_agent_metric(dp: Any) -> None:
    from egressd.agent.tier1 import Count, Reason

    path, tun, _, _ = dp
    tun.send(ipv4_tcp(str(SANDBOX_IP), "203.0.113.10", 40000, 443))
    path.drain_tun()
    registry = CollectorRegistry()
    registry.register(
        AgentCollector(
            path,
            proxy_up=lambda: {"proxy1": True, "proxy2": False},
            tier1_totals=lambda: {
                Reason.REDIRECTED: Count(5, 500),
                Reason.SPOOFED_IP: Count(2, 120),
            },
            sandboxes=lambda: 1,
        )
    )
    text = generate_latest(registry).decode()
    sent_to = next(p for p in ("proxy1", "proxy2") if path.tx_packets[path.proxy_names.index(p)])
    assert f'egressd_tunnel_packets_total{{direction="tx",proxy="{sent_to}"}} 1.0' in text
    assert 'egressd_proxy_up{proxy="proxy1"} 1.0' in text
    assert 'egressd_proxy_up{proxy="proxy2"} 0.0' in text
    assert "egressd_sandboxes 1.0" in text
    assert 'egressd_tier1_packets_total{reason="redirected",verdict="redirect"} 5.0' in text
    assert 'egressd_tier1_bytes_total{reason="spoofed_ip",verdict="drop"} 120.0' in text
    assert 'egressd_tier1_packets_total{reason="arp",verdict="pass"} 0.0' in text
    assert 'egressd_tunnel_dropped_total{reason="no_healthy_proxy"} 0.0' in text
