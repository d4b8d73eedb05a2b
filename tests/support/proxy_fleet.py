"""The proxy's data plane in namespaces of its own: a fresh prefix (`egd-t<hex>-`, built with
`egressd_harness.topology.network`) with `ctl` (the real control plane, a subprocess),
`proxy1` (the real proxy, `ProxyProcess`), `inet` (an HTTP server on 203.0.113.10:80) and
`node1`, which plays the node (`NodeSim`: GENEVE built with scapy + `egressd.geneve.encode`,
or `MINI_AGENT`: a TUN with the sandbox address). The `proxy_fleet`, `proxy` and `node`
fixtures are in tests/integration/conftest.py.
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

from egressd.geneve.codec import GeneveError, JobOption, decode, encode
from egressd.layout import CONTROL_ADDR, INET_NS, Layout, default_layout
from egressd.metrics_text import SeriesKey, parse, series
from egressd.net import netns as kn
from egressd.policy.keys import generate_signing_key, write_key_dir
from egressd_harness.topology import network
from tests.support import processes
from tests.support.control_process import control_argv
from tests.support.netns import fresh_prefix
from tests.support.waits import wait_for

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
    processes.stop_process(proc, STOP_TIMEOUT_S)


def trust_control_key(fleet: Fleet) -> None:
    """A signing key for the control plane (`ctl-keys/`), its public half in the proxy's
    `keys_dir`."""
    key = generate_signing_key()
    write_key_dir(fleet.root / "ctl-keys", key)
    fleet.keys_dir.mkdir()
    jwk = fleet.root / "ctl-keys" / f"{key.kid}.jwk"
    (fleet.keys_dir / jwk.name).write_bytes(jwk.read_bytes())  # public key only


def start_control(fleet: Fleet, *extra: str, log: str = "control.log") -> None:
    """`egressd control serve` in the ctl namespace on the fleet's state, key and admin token
    (kept across restarts); returns once it listens."""
    port_file = fleet.root / "ctl-port"
    port_file.unlink(missing_ok=True)
    fleet.control = kn.popen_in_netns(
        fleet.ctl,
        control_argv(
            f"{CONTROL_ADDR}:8080",
            *extra,
            state=fleet.root / "ctl-state",
            key=fleet.root / "ctl-keys" / "signing.key",
            token=fleet.root / "admin-token",
            port_file=port_file,
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(fleet.root / log).open("wb"),
        cwd=str(REPO),
    )
    wait_for(port_file.exists, START_TIMEOUT_S, "the control plane")
    fleet.admin_token = (fleet.root / "admin-token").read_text().strip()


@contextlib.contextmanager
def running_fleet(root: Path) -> Iterator[Fleet]:
    """A fresh prefix's namespaces (`LAYOUT`) and the control plane, node1 registered; the
    body adds the rest (policies, an "internet" in `inet_http`). Processes and namespaces
    go however the body ends."""
    f = Fleet(prefix=fresh_prefix(), root=root)
    try:
        network.build(LAYOUT, f.prefix)
        trust_control_key(f)
        start_control(f)
        f.put(
            f"/v1/nodes/{NODE.name}",
            {"underlay": str(NODE.underlay), "sandbox_cidr": str(NODE.sandbox_cidr)},
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


@contextlib.contextmanager
def running_proxy(fleet: Fleet, **overrides: object) -> Iterator[ProxyProcess]:
    """A ready proxy; killed at the end, and the proxy namespace left as it was found."""
    p = ProxyProcess(fleet, **overrides)
    try:
        p.wait_ready()
        yield p
    finally:
        p.kill()
        kn.run_in_netns(fleet.proxy_ns, ["nft", "delete", "table", "inet", "egressd"], check=False)


def dropped(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], reason: str) -> float:
    return metrics.get(("egressd_geneve_rx_dropped_total", (("reason", reason),)), 0.0)


# --- the node simulator ----------------------------------------------------------------------


class NodeSim:
    """node1's GENEVE socket, and a socket on a non-node address. The proxy's replies come
    from `reply_port`; None: from any port (the kernel data path picks an entropy source port
    from the inner flow's hash, RFC 8926 section 3.3)."""

    def __init__(
        self, fleet: Fleet, digest: bytes, *, reply_port: int | None = GENEVE_PORT
    ) -> None:
        self.sock = kn.netns_socket(fleet.node_ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((str(NODE.underlay), GENEVE_PORT))
        self.forger = kn.netns_socket(fleet.node_ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.forger.bind((FORGER, GENEVE_PORT))
        self.digest = digest
        self.proxy = (str(PROXY.underlay), GENEVE_PORT)
        self.reply_port = reply_port

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
            assert sender[0] == self.proxy[0]
            if self.reply_port is not None:
                assert sender[1] == self.reply_port
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


def assert_syn_ack(reply: IP, sport: int) -> None:
    tcp = reply[TCP]
    assert (reply.src, reply.dst) == (SITE, SANDBOX)
    assert (tcp.sport, tcp.dport) == (80, sport)
    assert tcp.flags == "SA"
    assert tcp.ack == 1001


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


# --- a job's policy and its sandbox on the fleet (live policies, denials per job) ---------------

SLOW_BPS = 4_000_000  # 500 kB/s: a large download lasts minutes


def policy(job: uuid.UUID, *egress: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": 1,
        "job_id": str(job),
        "account": "acme",
        "nodes": ["node1"],
        "egress": list(egress),
        "limits": {"bandwidth_bps": SLOW_BPS},
    }


SITE_80 = {"cidr": f"{SITE}/32", "ports": [80]}


def control(fleet: Fleet, method: str, path: str, body: object = None) -> tuple[int, Any]:
    status, payload = http(
        fleet.ctl,
        method,
        str(CONTROL_ADDR),
        8080,
        path,
        body,
        headers={"Authorization": f"Bearer {fleet.admin_token}"},
    )
    return status, (json.loads(payload) if payload else None)


class Agent:
    """The mini node agent for one job (node1's GENEVE port, the sandbox's TUN `tun`); its
    GENEVE option carries `digest` (the job's current one keeps the proxy's kernel fast path)."""

    def __init__(
        self, fleet: Fleet, job: uuid.UUID, *, digest: bytes = bytes(8), tun: str = "sbx0"
    ) -> None:
        ready = fleet.root / f"agent-ready-{job}"
        ready.unlink(missing_ok=True)  # a previous agent's, for the same job
        self.proc = kn.popen_in_netns(
            fleet.node_ns,
            [
                sys.executable,
                "-c",
                MINI_AGENT,
                tun,
                SANDBOX,
                str(NODE.underlay),
                str(PROXY.underlay),
                str(job),
                digest.hex(),
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(fleet.root / f"agent-{job}.log").open("wb"),
            cwd=str(REPO),
        )
        try:
            wait_for(ready.exists, START_TIMEOUT_S, "the mini agent")
        except AssertionError:
            self.stop()
            raise
        time.sleep(0.3)  # its TUN address and route

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def agent_for(
    fleet: Fleet, job: uuid.UUID, *, digest: bytes = bytes(8), tun: str = "sbx0"
) -> Iterator[Agent]:
    agent = Agent(fleet, job, digest=digest, tun=tun)
    try:
        yield agent
    finally:
        agent.stop()


def sandbox_get(fleet: Fleet, path: str, timeout: float = 10.0) -> bytes:
    """An HTTP/1.0 GET of `SITE`'s `path` from the sandbox address (through the mini agent and
    the proxy): the whole answer, head included."""
    with contextlib.closing(kn.netns_socket(fleet.node_ns)) as sock:
        sock.settimeout(timeout)
        sock.bind((SANDBOX, 0))
        sock.connect((SITE, 80))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: api.allowed.test\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def try_connect(fleet: Fleet) -> bool:
    """A short request from the sandbox address: True when it got an HTTP answer."""
    with contextlib.closing(kn.netns_socket(fleet.node_ns)) as sock:
        sock.settimeout(3)
        sock.bind((SANDBOX, 0))
        try:
            sock.connect((SITE, 80))
            sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {SITE}\r\n\r\n".encode())
            return sock.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False


def watch_up(proxy_: ProxyProcess) -> bool:
    return proxy_.metrics().get(("egressd_watch_up", ()), 0.0) == 1.0
