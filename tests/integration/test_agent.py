"""`egressd agent serve` as a real process in a throwaway node namespace.

Topology (every namespace named ``egd-t<run id>...``, none connected to the host):

    egd-t<id>u: bridge br0 ──veth── egd-t<id>n   node, 198.18.0.11, runs the agent
                           ──veth── egd-t<id>p1  proxysim 1, 198.18.0.21
                           ──veth── egd-t<id>p2  proxysim 2, 198.18.0.22

Each proxysim is two small processes: a /healthz server on :9090 and a GENEVE
endpoint on UDP 6081 that decodes every datagram with `egressd.geneve.decode`,
appends what it saw (job option, inner 5-tuple and TCP flags, outer source
port) to a JSON-lines file, and answers a TCP SYN with a SYN-ACK inside
GENEVE (built with scapy). Sandboxes are plain network namespaces made by the
agent (prefix ``egd-t<id>s-``); the test connects from them with sockets
created inside them, no runsc needed.

The tests run in file order against one agent; the last one stops it with
SIGTERM and checks that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.client import AgentClient, AgentClientError, SandboxInfo
from egressd.agent.hashing import Rendezvous, flow_hash, flow_key, outer_source_port
from egressd.metrics_text import metric_value, parse
from egressd.net import netns
from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import SigningKey, generate_signing_key, write_key_dir
from tests.support.root import AGENT_NEEDS
from tests.support.waits import wait_for, when

pytestmark = pytest.mark.root(*AGENT_NEEDS)

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


def is_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split(" ")[4] == str(path) for line in fh)


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


def _agent_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "egressd", "agent", "serve", "--config", str(config)]


def _setup(fleet: Fleet) -> None:
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
        _agent_argv(fleet.config_path),
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


def _teardown(fleet: Fleet) -> None:
    procs = [fleet.agent, *fleet.health.values(), *fleet.sims.values()]
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for ns in netns.list_netns(fleet.sandbox_prefix):
        with contextlib.suppress(netns.NetError):
            netns.delete_netns(ns)
    for ns in reversed(fleet.namespaces):
        with contextlib.suppress(netns.NetError):
            netns.delete_netns(ns)
    bpffs = fleet.state_dir / "bpffs"
    if is_mount(bpffs):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(bpffs), 2)  # MNT_DETACH


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_id = secrets.token_hex(3)
    base = f"egd-t{run_id}"
    root = tmp_path_factory.mktemp("agent")
    fleet = Fleet(
        run_id=run_id,
        root=root,
        key=generate_signing_key(),
        under=f"{base}u",
        node=f"{base}n",
        proxy_ns={"proxy1": f"{base}p1", "proxy2": f"{base}p2"},
        sandbox_prefix=f"{base}s-",
        config_path=root / "agent.json",
        api_socket=root / "agent.sock",
        state_dir=root / "state",
    )
    try:
        _setup(fleet)
        yield fleet
    finally:
        _teardown(fleet)


# --- helpers that act from a sandbox -------------------------------------------------


def connect_from(ns: str, dest: str, port: int, timeout: float = 5.0) -> tuple[int, bool]:
    """Open a TCP connection from inside `ns`; (local port, connected?). Resets on close."""
    sock = netns.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.settimeout(timeout)
        sock.bind(("0.0.0.0", 0))
        local_port = sock.getsockname()[1]
        try:
            sock.connect((dest, port))
        except OSError:
            return local_port, False
        return local_port, True


def mark(fleet: Fleet) -> dict[str, int]:
    """How many records each proxysim has so far (to look only at later ones)."""
    return {proxy: len(fleet.records(proxy)) for proxy in PROXIES}


def syns(
    fleet: Fleet, since: dict[str, int] | None = None
) -> dict[int, tuple[str, dict[str, Any]]]:
    """Inner source port -> (proxy, record) for every SYN the proxysims saw after `since`."""
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    for proxy in PROXIES:
        start = since[proxy] if since else 0
        for rec in fleet.records(proxy)[start:]:
            if rec.get("flags") == "S":
                out[rec["sport"]] = (proxy, rec)
    return out


# --- the tests, in order ---------------------------------------------------------------


def test_agent_is_ready_and_exports_metrics(fleet: Fleet) -> None:
    text = wait_for(
        lambda: when(fleet.metrics(), lambda t: metric(t, "egressd_proxy_up", proxy="proxy2") == 1),
        10,
        "both proxies up",
    )
    assert metric(text, "egressd_proxy_up", proxy="proxy1") == 1
    assert metric(text, "egressd_sandboxes") == 0
    assert metric(text, "egressd_tier1_packets_total", verdict="drop", reason="spoofed_ip") == 0
    assert metric(text, "egressd_tunnel_packets_total", proxy="proxy1", direction="tx") == 0
    assert metric(text, "egressd_tunnel_dropped_total", reason="no_healthy_proxy") == 0
    assert "egr0" in link_names(fleet.node)
    assert os.stat(fleet.api_socket).st_mode & 0o777 == 0o600


def test_register_rejections_have_distinct_reasons(fleet: Fleet) -> None:
    cases = {
        "job_not_bound_to_node": fleet.policy(nodes=["node2"]),
        "expired": fleet.policy(iat=1_600_000_000, nbf=1_600_000_000, exp=1_600_000_600),
        "bad_signature": _tamper(fleet.policy()),
        "unknown_kid": sign_payload(
            json.loads(_payload_json(fleet.policy())), generate_signing_key()
        ),
    }
    for reason, jws in cases.items():
        with pytest.raises(AgentClientError) as info:
            fleet.register(f"rej-{reason}", jws)
        assert (info.value.kind, info.value.reason, info.value.status) == (
            "policy_rejected",
            reason,
            400,
        ), info.value
    with pytest.raises(AgentClientError) as bad:
        fleet.register("bad/id", fleet.policy())
    assert (bad.value.kind, bad.value.reason) == ("bad_request", "bad_sandbox_id")
    # Nothing was made for any of them.
    assert netns.list_netns(fleet.sandbox_prefix) == ()
    assert not any(n.startswith("sb") for n in link_names(fleet.node))
    assert fleet.list() == []


def _payload_json(jws: str) -> str:
    import base64

    body = jws.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def _tamper(jws: str) -> str:
    import base64

    head, _body, sig = jws.split(".")
    payload = json.loads(_payload_json(jws))
    payload["egress"].append({"cidr": "0.0.0.0/0", "ports": ["1-65535"]})
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def test_register_builds_the_sandbox(fleet: Fleet) -> None:
    jws = fleet.policy()
    info = fleet.register("sbx-one", jws)
    assert str(info.ip) == "100.96.1.2"
    assert str(info.gateway) == "100.96.1.1"
    assert info.netns.startswith(fleet.sandbox_prefix)
    assert info.mtu == 1436 and str(info.resolver) == "100.100.100.53"
    assert info.job_id == JOB_ID
    assert info.raw["digest"] == policy_digest(jws).hex()
    state = netns.netns_state(info.netns)
    eth0 = state.link("eth0")
    assert eth0 is not None and eth0.up and eth0.mtu == 1436
    assert [str(a) for a in eth0.addresses] == ["100.96.1.2/24"]
    assert any(str(r.dst) == "0.0.0.0/0" and str(r.gateway) == "100.96.1.1" for r in state.routes)
    host = netns.netns_state(fleet.node).link(info.raw["host_veth"])
    assert host is not None and host.up and host.mtu == 1436
    assert [str(a) for a in host.addresses] == ["100.96.1.1/32"]
    with pytest.raises(AgentClientError) as dup:
        fleet.register("sbx-one", jws)
    assert (dup.value.kind, dup.value.reason, dup.value.status) == (
        "conflict",
        "duplicate_sandbox",
        409,
    )
    assert [s.sandbox_id for s in fleet.list()] == ["sbx-one"]


def test_flows_are_tunnelled_with_job_option_and_stable_ports(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    since = mark(fleet)
    ports = []
    for _ in range(16):
        port, ok = connect_from(info.netns, DEST, 443)
        assert ok, f"connect() from the sandbox failed (flow {port})\n{fleet.agent_stderr()}"
        ports.append(port)
    seen = wait_for(
        lambda: when(syns(fleet, since), lambda s: all(p in s for p in ports)),
        5,
        "every SYN at a proxysim",
    )
    digest = info.raw["digest"]
    rz = Rendezvous(PROXIES)
    used = set()
    for port in ports:
        proxy, rec = seen[port]
        key = flow_key(info.ip, DEST, 6, port, 443)
        assert proxy == rz.pick(flow_hash(key)), "rendezvous choice"
        assert rec["job"] == uuid.UUID(JOB_ID).hex and rec["digest"] == digest
        assert rec["vni"] == 1 and rec["src"] == NODE_IP
        assert (rec["inner_src"], rec["inner_dst"], rec["dport"]) == (str(info.ip), DEST, 443)
        assert rec["outer_sport"] == outer_source_port(key)
        assert 49152 <= rec["outer_sport"] <= 65535
        used.add(proxy)
        # The rest of the flow (the ACK that completes the handshake) takes the same path.
        later = wait_for(
            lambda p=proxy, q=port: [
                r for r in fleet.records(p)[since[p] :] if r.get("sport") == q and r["flags"] != "S"
            ],
            5,
            f"the rest of flow {port}",
        )
        assert all(r["outer_sport"] == rec["outer_sport"] for r in later)
        other = next(p for p in PROXIES if p != proxy)
        assert not [r for r in fleet.records(other)[since[other] :] if r.get("sport") == port]
    assert used == set(PROXIES), "flows spread over both proxies"
    assert len({seen[p][1]["outer_sport"] for p in ports}) >= len(ports) - 1
    text = fleet.metrics()
    tx = sum(
        metric(text, "egressd_tunnel_packets_total", proxy=p, direction="tx") or 0 for p in PROXIES
    )
    rx = sum(
        metric(text, "egressd_tunnel_packets_total", proxy=p, direction="rx") or 0 for p in PROXIES
    )
    assert tx >= 32 and rx >= 16
    assert (
        metric(text, "egressd_tier1_packets_total", verdict="redirect", reason="redirected") or 0
    ) >= 32
    assert metric(text, "egressd_sandboxes") == 1


def test_tier1_drops_what_the_policy_cannot_allow(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    before = fleet.metrics()
    since = mark(fleet)
    _port, ok = connect_from(info.netns, DEST, 22, timeout=1.0)
    assert not ok
    _, ok = connect_from(info.netns, "169.254.169.254", 80, timeout=1.0)
    assert not ok
    after = fleet.metrics()
    for reason in ("port_not_allowed", "denied_range"):
        labels = {"verdict": "drop", "reason": reason}
        was = metric(before, "egressd_tier1_packets_total", **labels) or 0
        assert (metric(after, "egressd_tier1_packets_total", **labels) or 0) > was, reason
    assert syns(fleet, since) == {}


def test_dead_proxy_is_avoided_within_5s(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    health = fleet.health["proxy1"]
    health.send_signal(signal.SIGKILL)
    health.wait(timeout=10)
    killed = time.monotonic()
    wait_for(
        lambda: metric(fleet.metrics(), "egressd_proxy_up", proxy="proxy1") == 0,
        5.0,
        "egressd_proxy_up{proxy=proxy1} 0",
        interval=0.2,
    )
    assert time.monotonic() - killed <= 5.5
    assert metric(fleet.metrics(), "egressd_proxy_up", proxy="proxy2") == 1
    since = mark(fleet)
    ports = []
    for _ in range(12):
        port, ok = connect_from(info.netns, DEST, 443)
        assert ok
        ports.append(port)
    seen = wait_for(
        lambda: when(syns(fleet, since), lambda s: all(p in s for p in ports)),
        5,
        "SYNs after proxy1 went down",
    )
    assert {seen[p][0] for p in ports} == {"proxy2"}


def test_unregister_removes_everything(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    host_veth = info.raw["host_veth"]
    fleet.unregister("sbx-one")
    assert not netns.netns_exists(info.netns)
    assert host_veth not in link_names(fleet.node)
    dump = subprocess.run(
        [
            "bpftool",
            "-j",
            "map",
            "dump",
            "pinned",
            str(fleet.state_dir / "bpffs" / "maps" / "t1_sandboxes"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(dump.stdout) == []
    assert fleet.list() == []
    assert metric(fleet.metrics(), "egressd_sandboxes") == 0
    with pytest.raises(AgentClientError) as gone:
        fleet.unregister("sbx-one")
    assert (gone.value.kind, gone.value.reason, gone.value.status) == (
        "not_found",
        "unknown_sandbox",
        404,
    )
    # The address is free again.
    again = fleet.register("sbx-two", fleet.policy())
    assert str(again.ip) == "100.96.1.2"


def test_sigterm_leaves_nothing_behind(fleet: Fleet) -> None:
    fleet.register("sbx-three", fleet.policy())
    assert len(netns.list_netns(fleet.sandbox_prefix)) == 2
    agent = fleet.agent
    assert agent is not None
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=STOP_TIMEOUT_S) == 0, fleet.agent_stderr()
    assert netns.list_netns(fleet.sandbox_prefix) == ()
    links = link_names(fleet.node)
    assert "egr0" not in links
    assert not any(n.startswith("sb") for n in links), links
    assert not fleet.api_socket.exists()
    assert not is_mount(fleet.state_dir / "bpffs")
    assert not list((fleet.state_dir / "sandboxes").glob("*.json"))
    log = fleet.agent_stderr()
    assert '"event": "agent_stopped"' in log
