"""One node agent (`egressd agent serve`, a real process) in a throwaway node namespace, with
two proxysims on a bridge (tests/integration/test_agent.py's docstring draws it). The
`agent_fleet` fixture is in tests/integration/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.agent.client import AgentClient, SandboxInfo
from egressd.metrics_text import metric_value, parse
from egressd.net import netns
from egressd.policy.jws import sign_payload
from egressd.policy.keys import SigningKey, write_key_dir
from tests.support.processes import tear_down_node
from tests.support.waits import wait_for

REPO = Path(__file__).resolve().parents[2]
NODE_IP = "198.18.0.11"
PROXIES = {"proxy1": "198.18.0.21", "proxy2": "198.18.0.22"}
DEST = "203.0.113.10"
JOB_ID = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0

HEALTH_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/healthz"
        body = b'{"status": "ok"}' if ok else b"{}"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer((sys.argv[1], 9090), Handler).serve_forever()
"""

GENEVE_SIM = r"""
import json, socket, sys
from scapy.layers.inet import IP, TCP
from egressd.geneve import GeneveError, decode, encode

ip, agent, out = sys.argv[1], sys.argv[2], sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((ip, 6081))
log = open(out, "a", buffering=1)
log.write(json.dumps({"ready": True}) + "\n")
while True:
    data, (src, outer_sport) = sock.recvfrom(65535)
    try:
        pkt = decode(data)
    except GeneveError as exc:
        log.write(json.dumps({"error": exc.reason, "src": src}) + "\n")
        continue
    inner = IP(bytes(pkt.inner))
    rec = {"src": src, "outer_sport": outer_sport, "vni": pkt.vni, "job": pkt.job.job_id.hex(),
           "digest": pkt.job.digest.hex(), "inner_src": inner.src, "inner_dst": inner.dst,
           "proto": inner.proto}
    if inner.proto == 17 and inner.dport == 53:
        continue  # the throughput probe: count nothing, answer nothing
    if TCP in inner:
        tcp = inner[TCP]
        rec.update(sport=tcp.sport, dport=tcp.dport, flags=str(tcp.flags))
        if "S" in str(tcp.flags) and "A" not in str(tcp.flags):
            reply = IP(src=inner.dst, dst=inner.src, ttl=64) / TCP(
                sport=tcp.dport, dport=tcp.sport, flags="SA", seq=1000, ack=tcp.seq + 1,
                window=65535)
            sock.sendto(encode(pkt.vni, pkt.job, bytes(reply)), (agent, 6081))
    log.write(json.dumps(rec) + "\n")
"""


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """A plain HTTP/1.0 GET from inside `ns`; (0, error) when it fails."""
    try:
        sock = netns.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    except netns.NetError as exc:
        return 0, str(exc)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            return 0, str(exc)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode("utf-8", "replace")


def metric(text: str, name: str, **labels: str) -> float | None:
    """The series of `name` with exactly `labels` on a /metrics page; None if absent."""
    return metric_value(parse(text), name, **labels)


def link_names(ns: str) -> set[str]:
    return {link.name for link in netns.netns_state(ns).links}


@dataclass
class Fleet:
    run_id: str
    root: Path
    key: SigningKey
    under: str
    node: str
    proxy_ns: dict[str, str]
    sandbox_prefix: str
    config_path: Path
    api_socket: Path
    state_dir: Path
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None
    health: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sims: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    # -- helpers for the tests --

    def records(self, proxy: str) -> list[dict[str, Any]]:
        path = self.root / f"{proxy}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return [r for r in out if "ready" not in r]

    def policy(self, **over: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "v": 1,
            "job_id": JOB_ID,
            "account": "acme",
            "nodes": ["node1"],
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 3600,
            "egress": [{"host": "api.allowed.test", "ports": [443, 80]}],
        }
        payload.update(over)
        return sign_payload(payload, self.key)

    def client(self) -> AgentClient:
        return AgentClient(self.api_socket, timeout_s=30)

    def register(self, sandbox_id: str, jws: str) -> SandboxInfo:
        async def go() -> SandboxInfo:
            async with self.client() as agent:
                return await agent.register(sandbox_id, jws)

        return asyncio.run(go())

    def unregister(self, sandbox_id: str) -> None:
        async def go() -> None:
            async with self.client() as agent:
                await agent.unregister(sandbox_id)

        asyncio.run(go())

    def list(self) -> list[SandboxInfo]:
        async def go() -> list[SandboxInfo]:
            async with self.client() as agent:
                return await agent.list()

        return asyncio.run(go())

    def metrics(self) -> str:
        status, body = http_get(self.node, NODE_IP, 9090, "/metrics")
        assert status == 200, body
        return body

    def agent_stderr(self) -> str:
        return self.agent_log.read_text(errors="replace")[-6000:] if self.agent_log else ""


def agent_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "egressd", "agent", "serve", "--config", str(config)]


def bring_up(fleet: Fleet) -> None:
    """The namespaces, both proxysims and the agent; returns once the agent is ready."""
    under = fleet.under
    for ns in (under, fleet.node, *fleet.proxy_ns.values()):
        netns.ensure_netns(ns)
        fleet.namespaces.append(ns)
        netns.set_link_up(ns, "lo")
    netns.ensure_bridge(under, "br0")
    netns.set_link_up(under, "br0")
    members = {"n": (fleet.node, NODE_IP)} | {
        f"p{name[-1]}": (fleet.proxy_ns[name], ip) for name, ip in PROXIES.items()
    }
    for tag, (ns, ip) in members.items():
        netns.ensure_veth(under, f"v{tag}", ns, "u0")
        netns.enslave(under, f"v{tag}", "br0")
        netns.set_link_up(under, f"v{tag}")
        netns.ensure_addr(ns, "u0", f"{ip}/24")
        netns.set_link_up(ns, "u0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, ip in PROXIES.items():
        ns = fleet.proxy_ns[name]
        fleet.health[name] = netns.popen_in_netns(
            ns,
            [sys.executable, "-c", HEALTH_SERVER, ip],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        fleet.sims[name] = netns.popen_in_netns(
            ns,
            [sys.executable, "-c", GENEVE_SIM, ip, NODE_IP, str(fleet.root / f"{name}.jsonl")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(fleet.root / f"{name}.err").open("wb"),
            env=env,
            cwd=str(REPO),
        )
    for name in PROXIES:
        wait_for(lambda n=name: (fleet.root / f"{n}.jsonl").exists(), 30, f"{name} sim")
        wait_for(
            lambda n=name: http_get(fleet.proxy_ns[n], PROXIES[n], 9090, "/healthz")[0] == 200,
            30,
            f"{name} health",
        )

    keys_dir = fleet.root / "keys"
    write_key_dir(keys_dir, fleet.key)
    config = {
        "name": "node1",
        "underlay": NODE_IP,
        "sandbox_cidr": "100.96.1.0/24",
        "proxies": [{"name": n, "underlay": ip} for n, ip in PROXIES.items()],
        "keys_dir": str(keys_dir),
        "api_socket": str(fleet.api_socket),
        "state_dir": str(fleet.state_dir),
        "sandbox_netns_prefix": fleet.sandbox_prefix,
    }
    fleet.config_path.write_text(json.dumps(config, indent=2))
    fleet.agent_log = fleet.root / "agent.log"
    fleet.agent = netns.popen_in_netns(
        fleet.node,
        agent_argv(fleet.config_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=fleet.agent_log.open("wb"),
        env=env,
        cwd=str(REPO),
    )

    def ready() -> bool:
        assert fleet.agent is not None
        if fleet.agent.poll() is not None:
            raise AssertionError(f"agent exited {fleet.agent.returncode}:\n{fleet.agent_stderr()}")
        return http_get(fleet.node, NODE_IP, 9090, "/readyz")[0] == 200

    wait_for(ready, START_TIMEOUT_S, "agent /readyz")


def tear_down(fleet: Fleet) -> None:
    """Stop every process, delete every namespace, unmount the agent's bpffs."""
    tear_down_node(
        [fleet.agent, *fleet.health.values(), *fleet.sims.values()],
        timeout_s=STOP_TIMEOUT_S,
        namespaces=fleet.namespaces,
        leftovers=[fleet.sandbox_prefix],
        mounts=[fleet.state_dir / "bpffs"],
    )
