"""`egressd agent serve` with ``"datapath": "kernel"`` as a real process.

Topology (every namespace ``egd-t<run id>...``, none connected to the host), as in
test_agent.py: a bridge in ``...u`` joins the node (198.18.0.11, the agent) and two
proxy namespaces (198.18.0.21, .22). Each proxy runs a /healthz server and today's
userspace GENEVE endpoint logic in miniature: every datagram is decoded with the codec
and checked with `egressd.proxy.endpoint.validate`, logged as a JSON line, and a TCP
SYN is answered with a SYN-ACK inside GENEVE. A connect() from a sandbox succeeds only
if the kernel encapsulated its SYN and decapsulated the answer into the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.client import AgentClient, SandboxInfo
from egressd.agent.node_maps import (
    MAGLEV_SIZE,
    SANDBOX_GSO_MAX_SIZE,
    flow_hash,
    maglev_table,
    source_port,
)
from egressd.metrics_text import metric_value, parse
from egressd.net import netns
from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import SigningKey, generate_signing_key, write_key_dir
from tests.support.agent_fleet import (
    DEST,
    JOB_ID,
    NODE_IP,
    PROXIES,
    REPO,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
)
from tests.support.netns import fresh_prefix
from tests.support.processes import is_mount, tear_down_node
from tests.support.root import AGENT_NEEDS
from tests.support.waits import wait_for, when

pytestmark = pytest.mark.root(*AGENT_NEEDS, "tc")

BPFFS_MOUNTS = ("bpffs", "bpffs-node")  # tier 1's and the node program's

PROXY_SIM = r"""
import json, socket, sys, threading, uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from ipaddress import IPv4Address, IPv4Network
from scapy.layers.inet import IP, TCP
from egressd.geneve import GeneveError, decode, encode
from egressd.proxy.endpoint import Accepted, validate
from egressd.proxy.registry import NodeEntry, NodeView

ip, node_ip, out = sys.argv[1], sys.argv[2], sys.argv[3]

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

threading.Thread(target=HTTPServer((ip, 9090), Health).serve_forever, daemon=True).start()
nodes = NodeView([NodeEntry("node1", IPv4Address(node_ip), IPv4Network("100.96.1.0/24"))])

class Policy:  # what validate reads of a verified policy: the nodes it names
    class policy:
        nodes = ("node1",)
    digest = b""

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((ip, 6081))
log = open(out, "a", buffering=1)
log.write(json.dumps({"ready": True}) + "\n")
while True:
    data, (src, outer_sport) = sock.recvfrom(65535)
    result = validate(data, src, nodes=nodes, vni=1, policy_lookup=lambda job: Policy)
    if not isinstance(result, Accepted):
        log.write(json.dumps({"error": getattr(result, "reason", str(result))}) + "\n")
        continue
    pkt = decode(data)
    inner = IP(bytes(pkt.inner))
    rec = {"src": src, "outer_sport": outer_sport, "job": pkt.job.job_id.hex(),
           "digest": pkt.job.digest.hex(), "inner_src": inner.src, "inner_dst": inner.dst}
    if TCP in inner:
        tcp = inner[TCP]
        rec.update(sport=tcp.sport, dport=tcp.dport, flags=str(tcp.flags))
        if str(tcp.flags) == "S":
            reply = IP(src=inner.dst, dst=inner.src, ttl=64) / TCP(
                sport=tcp.dport, dport=tcp.sport, flags="SA", seq=1000, ack=tcp.seq + 1,
                window=65535)
            sock.sendto(encode(pkt.vni, pkt.job, bytes(reply)), (node_ip, 6081))
    log.write(json.dumps(rec) + "\n")
"""


@dataclass
class World:
    root: Path
    key: SigningKey
    prefix: str
    api_socket: Path
    state_dir: Path
    agent: subprocess.Popen[bytes] | None = None
    sims: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"{self.prefix}n"

    def proxy_ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def records(self, proxy: str) -> list[dict[str, Any]]:
        path = self.root / f"{proxy}.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return [r for r in out if "ready" not in r]

    def policy(self) -> str:
        now = int(time.time())
        payload = {
            "v": 1,
            "job_id": JOB_ID,
            "account": "acme",
            "nodes": ["node1"],
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 3600,
            "egress": [{"host": "api.allowed.test", "ports": [443]}],
        }
        return sign_payload(payload, self.key)

    def register(self, sandbox_id: str, jws: str) -> SandboxInfo:
        async def go() -> SandboxInfo:
            async with AgentClient(self.api_socket, timeout_s=30) as agent:
                return await agent.register(sandbox_id, jws)

        return asyncio.run(go())

    def metrics(self) -> str:
        sock = netns.netns_socket(self.node, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(5)
            sock.connect((NODE_IP, 9090))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).partition(b"\r\n\r\n")[2].decode()

    def stderr(self) -> str:
        return (self.root / "agent.log").read_text(errors="replace")[-6000:]


def _setup(world: World) -> None:
    under = f"{world.prefix}u"
    for ns in (under, world.node, *(world.proxy_ns(p) for p in PROXIES)):
        netns.ensure_netns(ns)
        world.namespaces.append(ns)
        netns.set_link_up(ns, "lo")
    netns.ensure_bridge(under, "br0")
    netns.set_link_up(under, "br0")
    members = {"n": (world.node, NODE_IP)} | {
        f"p{name[-1]}": (world.proxy_ns(name), ip) for name, ip in PROXIES.items()
    }
    for tag, (ns, ip) in members.items():
        netns.ensure_veth(under, f"v{tag}", ns, "u0")
        netns.enslave(under, f"v{tag}", "br0")
        netns.set_link_up(under, f"v{tag}")
        netns.ensure_addr(ns, "u0", f"{ip}/24")
        netns.set_link_up(ns, "u0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, ip in PROXIES.items():
        world.sims[name] = netns.popen_in_netns(
            world.proxy_ns(name),
            [sys.executable, "-c", PROXY_SIM, ip, NODE_IP, str(world.root / f"{name}.jsonl")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(world.root / f"{name}.err").open("wb"),
            env=env,
            cwd=str(REPO),
        )
    for name in PROXIES:
        wait_for(lambda n=name: (world.root / f"{n}.jsonl").exists(), 30, f"{name} sim")
    keys_dir = world.root / "keys"
    write_key_dir(keys_dir, world.key)
    config = {
        "name": "node1",
        "underlay": NODE_IP,
        "sandbox_cidr": "100.96.1.0/24",
        "proxies": [{"name": n, "underlay": ip} for n, ip in PROXIES.items()],
        "keys_dir": str(keys_dir),
        "api_socket": str(world.api_socket),
        "state_dir": str(world.state_dir),
        "sandbox_netns_prefix": f"{world.prefix}s-",
        "datapath": "kernel",
    }
    config_path = world.root / "agent.json"
    config_path.write_text(json.dumps(config))
    world.agent = netns.popen_in_netns(
        world.node,
        [sys.executable, "-m", "egressd", "agent", "serve", "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(world.root / "agent.log").open("wb"),
        env=env,
        cwd=str(REPO),
    )

    def ready() -> bool:
        assert world.agent is not None
        if world.agent.poll() is not None:
            raise AssertionError(f"agent exited {world.agent.returncode}:\n{world.stderr()}")
        with contextlib.suppress(OSError):
            text = world.metrics()
            return metric_value(parse(text), "egressd_proxy_up", proxy="proxy2") == 1
        return False

    wait_for(ready, START_TIMEOUT_S, "agent up with both proxies healthy")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("agentkernel")
    world = World(
        root=root,
        key=generate_signing_key(),
        prefix=fresh_prefix("egd-t"),
        api_socket=root / "agent.sock",
        state_dir=root / "state",
    )
    try:
        _setup(world)
        yield world
    finally:
        tear_down_node(
            [world.agent, *world.sims.values()],
            timeout_s=STOP_TIMEOUT_S,
            namespaces=world.namespaces,
            leftovers=[f"{world.prefix}s-"],
            mounts=[world.state_dir / mount for mount in BPFFS_MOUNTS],
        )


def _connect(ns: str, timeout: float = 5.0, port: int = 0) -> tuple[int, bool]:
    sock = netns.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.settimeout(timeout)
        sock.bind(("0.0.0.0", port))
        port = sock.getsockname()[1]
        try:
            sock.connect((DEST, 443))
        except OSError:
            return port, False
        return port, True


def _ports_on_each_proxy(src: IPv4Address, per_proxy: int, first: int = 20000) -> list[int]:
    """Source ports whose flows to DEST:443 the node's Maglev table (the agent's own
    `flow_hash` and `maglev_table`) gives `per_proxy` to each proxy, interleaved: the
    both-proxies assertion cannot fail by chance (12 random ports: 1 in 2048)."""
    table = maglev_table(PROXIES)
    by_proxy: dict[str, list[int]] = {name: [] for name in PROXIES}
    port = first
    while any(len(ports) < per_proxy for ports in by_proxy.values()):
        proxy = table[flow_hash(src, IPv4Address(DEST), 6, port, 443) % MAGLEV_SIZE]
        if proxy is not None and len(by_proxy[proxy]) < per_proxy:
            by_proxy[proxy].append(port)
        port += 1
        assert port < 65536, f"the Maglev table leaves a proxy out: {by_proxy}"
    return [port for group in zip(*by_proxy.values(), strict=True) for port in group]


def test_connections_go_through_the_kernel_path_both_ways(world: World) -> None:
    jws = world.policy()
    info = world.register("sbx-k1", jws)
    eth0 = subprocess.run(
        ["ip", "-n", info.netns, "-d", "-j", "link", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(eth0.stdout)[0]["gso_max_size"] == SANDBOX_GSO_MAX_SIZE
    ports = _ports_on_each_proxy(IPv4Address(str(info.ip)), 6)
    for port in ports:
        _, ok = _connect(info.netns, port=port)
        assert ok, f"connect() from the sandbox failed (flow {port})\n{world.stderr()}"

    def syns() -> dict[int, tuple[str, dict[str, Any]]]:
        return {
            r["sport"]: (proxy, r)
            for proxy in PROXIES
            for r in world.records(proxy)
            if r.get("flags") == "S"
        }

    seen = wait_for(lambda: when(syns(), lambda s: all(p in s for p in ports)), 5, "SYNs")
    table = maglev_table(PROXIES)
    for port in ports:
        proxy, rec = seen[port]
        fhash = flow_hash(IPv4Address(str(info.ip)), IPv4Address(DEST), 6, port, 443)
        assert proxy == table[fhash % MAGLEV_SIZE]
        assert rec["outer_sport"] == source_port(fhash)
        assert rec["src"] == NODE_IP
        assert rec["job"] == JOB_ID.replace("-", "")
        assert rec["digest"] == policy_digest(jws).hex()
    assert {seen[p][0] for p in ports} == set(PROXIES)
    assert not [r for p in PROXIES for r in world.records(p) if "error" in r]
    text = world.metrics()
    tx = sum(
        metric_value(parse(text), "egressd_tunnel_packets_total", proxy=p, direction="tx") or 0
        for p in PROXIES
    )
    rx = sum(
        metric_value(parse(text), "egressd_tunnel_packets_total", proxy=p, direction="rx") or 0
        for p in PROXIES
    )
    assert tx >= 24 and rx >= 12
    assert metric_value(parse(text), "egressd_tunnel_dropped_total", reason="bad_options") == 0


def test_sigterm_leaves_no_programs_pins_or_filters(world: World) -> None:
    assert world.agent is not None
    world.agent.send_signal(signal.SIGTERM)
    assert world.agent.wait(timeout=STOP_TIMEOUT_S) == 0, world.stderr()
    assert '"event": "agent_stopped"' in world.stderr()
    filters = subprocess.run(
        ["ip", "netns", "exec", world.node, "tc", "filter", "show", "dev", "u0", "ingress"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert "egressd" not in filters
    for mount in BPFFS_MOUNTS:
        assert not is_mount(world.state_dir / mount)
        assert not (world.state_dir / mount).exists()
    assert netns.list_netns(f"{world.prefix}s-") == ()
