"""`egressd proxy serve` as a real process: GENEVE in, TPROXY, SYN-ACK back, drops by reason.

A fleet of its own under a fresh prefix (`egd-t<hex>-`, built with
`egressd_harness.topology.network`): `ctl` (the real control plane, a subprocess),
`proxy1` (the real proxy, a subprocess under `nsenter --net=...`), `inet`
(an HTTP server on 203.0.113.10:80) and `node1`, which plays the node: a UDP
socket on 198.18.0.11:6081 that sends GENEVE built with scapy +
`egressd.geneve.encode` and reads the proxy's replies. A second address on
node1's underlay interface, 198.18.0.99, is the "non-node" sender.

The last test runs a minimal node agent in node1 (a TUN with the sandbox
address, GENEVE both ways) so that a plain `socket.connect` from a sandbox
address gets an HTTP answer from the inet server through the proxy.

Everything is removed in finalizers: processes first, then the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from egressd.geneve.codec import GeneveError, JobOption, decode, encode
from egressd.layout import CONTROL_ADDR, INET_NS, Layout, default_layout
from egressd.metrics_text import SeriesKey, parse, series
from egressd.net import netns as kn
from egressd.policy.jws import policy_digest
from egressd.policy.keys import generate_signing_key, write_key_dir
from egressd_harness.topology import network
from tests.support.netns import fresh_prefix
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS)

REPO = Path(__file__).resolve().parents[2]
BASE = default_layout()
LAYOUT = Layout(nodes=BASE.nodes[:1], proxies=BASE.proxies[:1], sites=BASE.sites)
NODE = LAYOUT.nodes[0]
PROXY = LAYOUT.proxies[0]
FORGER = "198.18.0.99"
SANDBOX = "100.96.1.5"
SITE = "203.0.113.10"  # api.allowed.test in the layout
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
JOB_NODE2 = uuid.UUID("5e0a6b1c-2222-4a9a-9f55-1f0c5ac1d3e2")
JOB_UNKNOWN = uuid.UUID("9f9f9f9f-3333-4a9a-9f55-1f0c5ac1d3e2")
GENEVE_PORT = 6081
ADMIN_PORT = 9090
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
REPLY_TIMEOUT_S = 5.0


# --- a small HTTP client that runs in a namespace (no child process) ------------------


def http(
    ns: str,
    method: str,
    url_host: str,
    port: int,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else b""
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {url_host}:{port}",
        "Connection: close",
        f"Content-Length: {len(data)}",
        "Content-Type: application/json",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    with contextlib.closing(kn.netns_socket(ns)) as sock:
        sock.settimeout(timeout)
        sock.connect((url_host, port))
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    header_blob, _, payload = raw.partition(b"\r\n\r\n")
    lines = header_blob.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    if fields.get("transfer-encoding") == "chunked":
        payload = dechunk(payload)
    return status, payload


def dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2 :]
    return b"".join(out)


# --- the fleet ---------------------------------------------------------------------------


@dataclass
class Fleet:
    prefix: str
    root: Path
    admin_token: str = ""
    control: subprocess.Popen[bytes] | None = None
    inet_http: subprocess.Popen[bytes] | None = None

    def ns(self, layout_name: str) -> str:
        return network.netns_name(layout_name, self.prefix)

    @property
    def ctl(self) -> str:
        return self.ns("egd-ctl")

    @property
    def proxy_ns(self) -> str:
        return self.ns(PROXY.netns)

    @property
    def node_ns(self) -> str:
        return self.ns(NODE.netns)

    @property
    def inet(self) -> str:
        return self.ns(INET_NS)

    @property
    def keys_dir(self) -> Path:
        return self.root / "proxy-keys"

    def put(self, path: str, body: object) -> dict[str, Any]:
        status, payload = http(
            self.ctl,
            "PUT",
            str(CONTROL_ADDR),
            8080,
            path,
            body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        assert status == 200, payload
        return json.loads(payload)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("proxy-dataplane")
    f = Fleet(prefix=fresh_prefix(), root=root)
    try:
        network.build(LAYOUT, f.prefix)
        kn.ensure_addr(f.node_ns, network.UNDERLAY_IF, f"{FORGER}/24")

        key = generate_signing_key()
        write_key_dir(root / "ctl-keys", key)
        f.keys_dir.mkdir()
        jwk = root / "ctl-keys" / f"{key.kid}.jwk"
        (f.keys_dir / jwk.name).write_bytes(jwk.read_bytes())  # public key only
        port_file = root / "ctl-port"
        f.control = kn.popen_in_netns(
            f.ctl,
            [
                sys.executable,
                "-m",
                "egressd",
                "control",
                "serve",
                "--listen",
                f"{CONTROL_ADDR}:8080",
                "--state-dir",
                str(root / "ctl-state"),
                "--key",
                str(root / "ctl-keys" / "signing.key"),
                "--admin-token-file",
                str(root / "admin-token"),
                "--port-file",
                str(port_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(root / "control.log").open("wb"),
            cwd=str(REPO),
        )
        wait_for(port_file.exists, START_TIMEOUT_S, "the control plane")
        f.admin_token = (root / "admin-token").read_text().strip()
        f.put(
            f"/v1/nodes/{NODE.name}",
            {"underlay": str(NODE.underlay), "sandbox_cidr": str(NODE.sandbox_cidr)},
        )
        egress = [
            {"cidr": f"{SITE}/32", "ports": [80]},
            {"host": "api.allowed.test", "ports": [80, 443]},
        ]
        f.put(
            f"/v1/jobs/{JOB}/policy",
            {"v": 1, "account": "acme", "nodes": ["node1"], "egress": egress},
        )
        # A policy names registered nodes only: node2 is registered, never started.
        node2 = BASE.nodes[1]
        f.put(
            f"/v1/nodes/{node2.name}",
            {"underlay": str(node2.underlay), "sandbox_cidr": str(node2.sandbox_cidr)},
        )
        f.put(
            f"/v1/jobs/{JOB_NODE2}/policy",
            {"v": 1, "account": "acme", "nodes": ["node2"], "egress": egress},
        )

        www = root / "www"
        www.mkdir()
        (www / "hello.txt").write_text("hello through the tunnel\n")
        f.inet_http = kn.popen_in_netns(
            f.inet,
            [sys.executable, "-m", "http.server", "--bind", SITE, "--directory", str(www), "80"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(root / "inet-http.log").open("wb"),
        )
        yield f
    finally:
        stop_process(f.control)
        stop_process(f.inet_http)
        network.destroy(LAYOUT, f.prefix)
        for name in kn.list_netns(f.prefix):
            kn.delete_netns(name)


# --- the proxy process ---------------------------------------------------------------------


def proxy_argv(config: Path) -> list[str]:
    """`egressd proxy serve` once the CLI registers it, the module's own entry point until then."""
    from egressd.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "proxy" in getattr(sub, "choices", {}):
        return [sys.executable, "-m", "egressd", "proxy", "serve", "--config", str(config)]
    return [sys.executable, "-m", "egressd", "proxy", "serve", "--config", str(config)]


class ProxyProcess:
    def __init__(self, fleet: Fleet, **overrides: object) -> None:
        self.fleet = fleet
        config = {
            "name": PROXY.name,
            "underlay": str(PROXY.underlay),
            "egress": str(PROXY.egress),
            "control_url": f"http://{CONTROL_ADDR}:8080",
            "keys_dir": str(fleet.keys_dir),
            "node_refresh_s": 0.5,
            **overrides,
        }
        self.config_path = fleet.root / f"proxy-{secrets.token_hex(4)}.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = self.config_path.with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.proc = kn.popen_in_netns(
            fleet.proxy_ns,
            proxy_argv(self.config_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=str(REPO),
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def admin(self, path: str) -> tuple[int, bytes]:
        return http(self.fleet.node_ns, "GET", str(PROXY.underlay), ADMIN_PORT, path)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"proxy exited {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.admin("/readyz")
            except OSError as exc:
                last = str(exc)
            else:
                if status == 200:
                    return
                last = body.decode(errors="replace")
            time.sleep(0.1)
        pytest.fail(f"proxy not ready ({last}):\n{self.log()}")

    def metrics(self) -> dict[SeriesKey, float]:
        status, body = self.admin("/metrics")
        assert status == 200
        return series(parse(body.decode()))

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        stop_process(self.proc)
        self._log.close()


def dropped(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], reason: str) -> float:
    return metrics.get(("egressd_geneve_rx_dropped_total", (("reason", reason),)), 0.0)


@pytest.fixture
def proxy(fleet: Fleet) -> Iterator[ProxyProcess]:
    p = ProxyProcess(fleet)
    try:
        p.wait_ready()
        yield p
    finally:
        p.kill()
        # Whatever happened, leave the proxy namespace as the test found it.
        kn.run_in_netns(fleet.proxy_ns, ["nft", "delete", "table", "inet", "egressd"], check=False)


# --- the node simulator ----------------------------------------------------------------------


class NodeSim:
    """node1's GENEVE socket, and a socket on a non-node address."""

    def __init__(self, fleet: Fleet, digest: bytes) -> None:
        self.sock = kn.netns_socket(fleet.node_ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((str(NODE.underlay), GENEVE_PORT))
        self.forger = kn.netns_socket(fleet.node_ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.forger.bind((FORGER, GENEVE_PORT))
        self.digest = digest
        self.proxy = (str(PROXY.underlay), GENEVE_PORT)

    def close(self) -> None:
        self.sock.close()
        self.forger.close()

    def option(self, job: uuid.UUID = JOB) -> JobOption:
        return JobOption(job.bytes, self.digest)

    def send(self, data: bytes, *, forged: bool = False) -> None:
        (self.forger if forged else self.sock).sendto(data, self.proxy)

    def send_syn(
        self, sport: int, *, job: uuid.UUID = JOB, src: str = SANDBOX, vni: int = 1
    ) -> None:
        self.send(encode(vni, self.option(job), syn(sport, src=src)))

    def expect_syn_ack(self, sport: int, timeout: float = REPLY_TIMEOUT_S) -> IP:
        """The proxy's SYN-ACK for our SYN from `sport`, inside GENEVE for our job."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                break
            assert sender == self.proxy
            try:
                pkt = decode(data)
            except GeneveError as exc:
                raise AssertionError(f"proxy sent an invalid datagram: {exc}") from exc
            inner = IP(bytes(pkt.inner))
            if TCP in inner and inner[TCP].dport == sport:
                assert pkt.vni == 1
                assert pkt.job.job_id == JOB.bytes
                return inner
        raise AssertionError(f"no SYN-ACK for source port {sport}")


def syn(sport: int, *, src: str = SANDBOX, dst: str = SITE, dport: int = 80) -> bytes:
    return bytes(
        IP(src=src, dst=dst, ttl=64)
        / TCP(sport=sport, dport=dport, flags="S", seq=1000, window=64240)
    )


@pytest.fixture
def node(fleet: Fleet) -> Iterator[NodeSim]:
    _, body = http(fleet.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{JOB}/policy")
    sim = NodeSim(fleet, policy_digest(json.loads(body)["jws"]))
    try:
        yield sim
    finally:
        sim.close()


# --- tests -------------------------------------------------------------------------------------


def assert_syn_ack(reply: IP, sport: int) -> None:
    tcp = reply[TCP]
    assert (reply.src, reply.dst) == (SITE, SANDBOX)
    assert (tcp.sport, tcp.dport) == (80, sport)
    assert tcp.flags == "SA"
    assert tcp.ack == 1001


def test_an_allowed_syn_gets_a_syn_ack_through_geneve(proxy: ProxyProcess, node: NodeSim) -> None:
    node.send_syn(41000)
    assert_syn_ack(node.expect_syn_ack(41000), 41000)
    metrics = proxy.metrics()
    assert metrics[("egressd_geneve_rx_packets_total", ())] >= 1
    assert metrics[("egressd_geneve_tx_packets_total", ())] >= 1
    assert metrics[("egressd_policy_fetch_total", (("result", "ok"),))] == 1
    # The nftables table is what DESIGN.md describes.
    listing = kn.run_in_netns(
        proxy.fleet.proxy_ns, ["nft", "-j", "list", "table", "inet", "egressd"]
    )
    rules = [i["rule"] for i in json.loads(listing.stdout)["nftables"] if "rule" in i]
    assert [r["chain"] for r in rules] == ["prerouting"] * 3 + ["input"]
    assert [next(e["tproxy"]["port"] for e in r["expr"] if "tproxy" in e) for r in rules[:3]] == [
        15053,
        15053,
        15001,
    ]


def test_forged_datagrams_are_dropped_and_counted_by_reason(
    proxy: ProxyProcess, node: NodeSim
) -> None:
    node.send_syn(42000)  # warm up: the policy is fetched and cached
    node.expect_syn_ack(42000)
    before = proxy.metrics()

    node.send(encode(1, node.option(), syn(42001)), forged=True)  # not a node address
    node.send_syn(42002, job=JOB_NODE2)  # the job's policy names node2 only
    node.send_syn(42003, src="100.96.2.5")  # outside node1's sandbox CIDR
    node.send(b"\x00\x01\x02")  # truncated
    node.send(bytes([0x47]) + encode(1, node.option(), syn(42004))[1:])  # version 1
    node.send_syn(42005, vni=2)  # another overlay
    node.send_syn(42006, job=JOB_UNKNOWN)  # no policy at the control plane
    node.send(
        encode(1, node.option(), bytes(IP(src=SANDBOX, dst=SITE, proto=6) / Raw(b"\x00" * 8)))
    )
    node.send_syn(42010)  # and a legitimate SYN right after
    assert_syn_ack(node.expect_syn_ack(42010), 42010)

    expected = {
        "unknown_node": 1,
        "job_not_bound_to_node": 1,
        "source_outside_node_cidr": 1,
        "truncated": 1,
        "bad_version": 1,
        "bad_vni": 1,
        "policy_missing": 1,
        "malformed_l4": 1,
    }

    def counted() -> bool:
        after = proxy.metrics()
        return all(dropped(after, r) - dropped(before, r) == n for r, n in expected.items())

    wait_for(counted, REPLY_TIMEOUT_S, "every drop to be counted")
    after = proxy.metrics()
    for reason in ("options_past_end", "inner_bad_checksum", "flow_table_full"):
        assert ("egressd_geneve_rx_dropped_total", (("reason", reason),)) in after  # pre-registered
        assert dropped(after, reason) == dropped(before, reason)
    # None of the forged SYNs produced a reply.
    node.sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError):
        while True:
            inner = IP(bytes(decode(node.sock.recv(65536)).inner))
            assert inner[TCP].dport in (42000, 42010), inner.summary()


def test_sigterm_leaves_nothing_behind(fleet: Fleet, node: NodeSim) -> None:
    proxy = ProxyProcess(fleet)
    try:
        proxy.wait_ready()
        node.send_syn(43000)
        node.expect_syn_ack(43000)
        assert proxy.terminate() == 0, proxy.log()
    finally:
        proxy.kill()
    ns = fleet.proxy_ns
    assert (
        kn.run_in_netns(ns, ["nft", "list", "table", "inet", "egressd"], check=False).returncode
        != 0
    )
    assert kn.run_in_netns(ns, ["ip", "link", "show", "gnv0"], check=False).returncode != 0
    assert "fwmark" not in kn.run_in_netns(ns, ["ip", "rule"]).stdout
    assert kn.run_in_netns(ns, ["ip", "route", "show", "table", "100"]).stdout.strip() == ""
    assert "100.96.0.0/16" not in kn.run_in_netns(ns, ["ip", "route"]).stdout
    events = [
        json.loads(line)["event"] for line in proxy.log().splitlines() if line.startswith("{")
    ]
    assert "proxy_started" in events and events[-1] == "stopped"
    assert "nft_remove_incomplete" not in events and "stop_step_failed" not in events


# --- a sandbox connection end to end, through a minimal node agent -----------------------------

MINI_AGENT = textwrap.dedent(
    """
    import os, selectors, socket, sys, uuid
    from egressd.geneve.codec import JobOption, decode, header_for
    from egressd.net.tun import open_tun
    tun_name, sandbox, node_ip, proxy_ip, job, digest_hex, ready = sys.argv[1:8]
    tun = open_tun(tun_name, mtu=1436)
    os.system(f"ip addr add {sandbox}/32 dev {tun_name} && ip route add 203.0.113.0/24 dev {tun_name} src {sandbox}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((node_ip, 6081))
    sock.setblocking(False)
    header = header_for(1, JobOption(uuid.UUID(job).bytes, bytes.fromhex(digest_hex)))
    open(ready, "w").close()
    sel = selectors.DefaultSelector()
    sel.register(tun.fd, selectors.EVENT_READ, "tun")
    sel.register(sock, selectors.EVENT_READ, "udp")
    buf = bytearray(65536)
    while True:
        for key, _ in sel.select():
            if key.data == "tun":
                n = tun.read_into(buf)
                if n:
                    sock.sendto(header + bytes(buf[:n]), (proxy_ip, 6081))
            else:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                tun.write(decode(data).inner)
    """
)


def test_a_sandbox_connection_gets_its_http_answer_through_the_proxy(
    fleet: Fleet, proxy: ProxyProcess, node: NodeSim
) -> None:
    node.close()  # the agent takes 198.18.0.11:6081
    ready = fleet.root / "agent-ready"
    agent = kn.popen_in_netns(
        fleet.node_ns,
        [
            sys.executable,
            "-c",
            MINI_AGENT,
            "sbx0",
            SANDBOX,
            str(NODE.underlay),
            str(PROXY.underlay),
            str(JOB),
            node.digest.hex(),
            str(ready),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(fleet.root / "agent.log").open("wb"),
        cwd=str(REPO),
    )
    try:
        wait_for(ready.exists, START_TIMEOUT_S, "the mini agent")
        wait_for(lambda: http(fleet.inet, "GET", SITE, 80, "/hello.txt")[0] == 200, 10, "inet http")
        with contextlib.closing(kn.netns_socket(fleet.node_ns)) as sock:
            sock.settimeout(10)
            sock.bind((SANDBOX, 0))
            sock.connect((SITE, 80))
            sock.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: api.allowed.test\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
        assert answer.endswith(b"hello through the tunnel\n")

        def connections() -> list[dict[str, Any]]:
            events = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
            return [e for e in events if e.get("event") == "connection"]

        wait_for(
            lambda: bool(connections()), 5, "the connection's audit event"
        )  # logged at its end
        event = connections()[-1]
        assert (event["verdict"], event["reason"]) == ("allow", "allowed_cidr")
        assert event["job_id"] == str(JOB)
        assert event["component"] == "proxy"
        assert event["node"] == "node1"
        metrics = proxy.metrics()
        assert metrics[("egressd_geneve_rx_packets_total", ())] >= 4
        assert metrics[("egressd_geneve_tx_packets_total", ())] >= 3
    finally:
        agent.kill()
        agent.wait(timeout=STOP_TIMEOUT_S)
