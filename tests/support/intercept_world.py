"""A world for the transparent interceptor: namespaces, a proxy and an "internet".

Three fresh network namespaces (names ``egd-t<random>{c,p,i}``), nothing else
touched:

    client ns                 proxy ns                         inet ns
    100.96.1.2/24 ---veth--- 100.96.1.1/24                     203.0.113.10 .11 .53
    100.96.1.3/24            203.0.113.21/24 ---veth---------- .66 .77 .100 /24
    default via .1           nftables TPROXY (iif veth to the client):
                               udp/tcp dport 53 -> 127.0.0.1:DNS_PORT
                               tcp              -> 127.0.0.1:TCP_PORT
                             fwmark 1 -> table 100: local 0.0.0.0/0 dev lo

The proxy (interceptor + DNS responder) runs in a subprocess inside the proxy
namespace (a network namespace is per thread, so not in pytest's process),
with a FlowLookup that maps 100.96.1.2 to the test job (100.96.1.3 has no
flow) and a PolicySource that verifies a token file signed in the test (so a
test can swap the policy). The "internet" (HTTP, a TLS-ish echo, a
server-speaks-first service, a bulk stream server and an authoritative DNS
server) is a second subprocess in the inet namespace. This file is also the
entry point of both subprocesses (``python intercept_world.py proxy|inet CFG``), so
it imports nothing from `tests` (not importable there).

Client sockets are created in the client namespace by a short-lived thread
that enters it (`ns_socket`), then used from the test as usual.
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
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import pytest

TCP_PORT = 15001
DNS_PORT = 15053
RESOLVER = "100.100.100.53"
CLIENT = "100.96.1.2"
CLIENT_NO_FLOW = "100.96.1.3"
CLIENT2 = "100.96.1.4"  # a second job's sandbox (when the world is made with one)
PROXY_SIDE = "100.96.1.1"
EGRESS = "203.0.113.21"
INET_ADDRS = (
    "203.0.113.10",
    "203.0.113.11",
    "203.0.113.53",
    "203.0.113.66",
    "203.0.113.77",
    "203.0.113.100",
)
API, DATA, UPSTREAM_DNS, EVIL, RAW, BULK = INET_ADDRS
JOB_ID = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"
JOB2_ID = "7d2f0a51-3e8b-4c1d-a6f2-90b1c4e5d7a8"
FLEET = ("198.18.0.0/24", "100.96.0.0/16", "100.100.100.53/32")
ZONE: dict[str, str] = {
    "api.allowed.test": API,
    "eu.data.allowed.test": DATA,
    "raw.test": RAW,
    "evil.test": EVIL,
    "rebind.allowed.test": "169.254.169.254",
}
CNAMES = {"cname.allowed.test": "api.allowed.test"}
SILENT = {"slow.data.allowed.test"}  # the upstream never answers these
# A name with 150 A records: too large for a UDP answer (the upstream sets TC; TCP has it all).
MANY = {"many.data.allowed.test": [f"203.0.113.{i}" for i in range(101, 251)]}
EGRESS_RULES: list[dict[str, Any]] = [
    {"host": "api.allowed.test", "ports": [443, 80]},
    {"host": "*.data.allowed.test", "ports": [443, 80]},
    {"host": "raw.test", "ports": [2525]},
    {"host": "rebind.allowed.test", "ports": [80]},
    {"host": "cname.allowed.test", "ports": [80]},
    {"cidr": "203.0.113.96/28", "ports": [9000, 9001, 2525]},
]
CLONE_NEWNET = 0x40000000
# Limits out of the way of the tests that are not about them.
ROOMY_LIMITS = {
    "max_connections": 65_536,
    "max_new_connections_per_s": 100_000,
    "ports_per_destination": 4096,
    "bandwidth_bps": 100_000_000_000,
    "dns_queries_per_s": 10_000,
}


# =====================================================================================
# subprocess side: the "internet"
# =====================================================================================


async def _inet_main(cfg: dict[str, Any]) -> None:
    import dns.message
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

    upstream_log = open(cfg["upstream_log"], "a", buffering=1)  # noqa: SIM115, ASYNC230 - at start-up

    def dns_answer(data: bytes, src: str, proto: str) -> Any:
        try:
            q = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - a test server
            return None
        qname = q.question[0].name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(q.question[0].rdtype)
        record = {"qname": qname, "qtype": qtype, "src": src, "proto": proto}
        upstream_log.write(json.dumps(record) + "\n")
        if qname in SILENT:
            return None
        r = dns.message.make_response(q)
        name = q.question[0].name
        if qname in MANY and qtype == "A":
            r.answer.append(dns.rrset.from_text_list(name, 60, "IN", "A", MANY[qname]))
        elif qtype == "TXT":
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", '"leak"'))
        elif qname in CNAMES:
            target = CNAMES[qname]
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", target + "."))
            r.answer.append(dns.rrset.from_text(target + ".", 60, "IN", "A", ZONE[target]))
        elif qname in ZONE and qtype == "A":
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", ZONE[qname]))
        elif qname not in ZONE and qname not in MANY:
            r.set_rcode(dns.rcode.NXDOMAIN)
        if proto == "tcp":
            return r.to_wire(max_size=65535)
        # Over UDP, like an authoritative server: what does not fit is left out, with TC.
        limit = max(512, q.payload) if q.edns >= 0 else 512
        return r.to_wire(max_size=limit, prefer_truncation=True)

    class DnsServer(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            reply = dns_answer(data, addr[0], "udp")
            if reply is not None:
                self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

    async def dns_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while head := await reader.readexactly(2):
                data = await reader.readexactly(int.from_bytes(head, "big"))
                reply = dns_answer(data, writer.get_extra_info("peername")[0], "tcp")
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        writer.close()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            host = next(
                (v.split(":", 1)[1].strip() for v in lines[1:] if v.lower().startswith("host:")), ""
            )
            size = int(path.rsplit("/", 1)[1]) if path.startswith("/bytes/") else 2
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nX-Host: {host}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + b"x" * size
            )
            await writer.drain()
        writer.close()

    async def keepalive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # HTTP/1.1 with keep-alive (port 8080): answers each request with
        # "<method> <host> <path> <body length>" until the client closes.
        with contextlib.suppress(Exception):
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                fields = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (x.partition(":") for x in lines[1:] if x)
                }
                body = await reader.readexactly(int(fields.get("content-length", "0")))
                text = f"{method} {fields.get('host', '')} {path} {len(body)}".encode()
                if path.startswith("/echo-headers"):
                    text = head  # the head as the server got it (credentials, issue 12)
                content = b"" if method == "HEAD" else text
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + content)
                await writer.drain()
        writer.close()

    async def read_hello(reader: asyncio.StreamReader) -> bytes:
        """Up to the end of the client's first TLS handshake message (records of
        type 22; anything else: what the first read gave)."""
        data = await reader.read(65536)
        if not data or data[0] != 22:
            return data
        handshake = bytearray()
        at = 0
        while True:
            size = None
            while size is None or len(data) < at + 5 + size:
                if len(data) >= at + 5:
                    size = int.from_bytes(data[at + 3 : at + 5], "big")
                    if len(data) >= at + 5 + size:
                        break
                more = await reader.read(65536)
                if not more:
                    return data
                data += more
            handshake += data[at + 5 : at + 5 + size]
            at += 5 + size
            if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
                return data
            if at < len(data) and data[at] != 22:
                return data

    async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The whole first handshake message, however the relay's segments fall:
        # closing with part of it unread resets the connection (which the proxy
        # passes on), so one `read` of a large hello raced the relay's writes.
        with contextlib.suppress(Exception):
            data = await asyncio.wait_for(read_hello(reader), 5)
            writer.write(b"TLS-OK %d" % len(data))
            await writer.drain()
        writer.close()

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.write(b"220 raw.test ready\r\n")
            await writer.drain()
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        writer.close()

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # "SEND n\n": send n bytes, close. "RECV\n": count until FIN, answer the count, close.
        # "PEER\n": answer the client's "ip port", then hold the connection until FIN.
        with contextlib.suppress(Exception):
            cmd = (await reader.readline()).split()
            if cmd[0] == b"PEER":
                ip, port = writer.get_extra_info("peername")[:2]
                writer.write(f"{ip} {port}\n".encode())
                await writer.drain()
                await reader.read()
            elif cmd[0] == b"SEND":
                left = int(cmd[1])
                chunk = b"y" * (1 << 20)
                while left > 0:
                    writer.write(chunk[: min(left, len(chunk))])
                    left -= len(chunk)
                    await writer.drain()
            elif cmd[0] == b"RECV":
                total = 0
                while data := await reader.read(1 << 20):
                    total += len(data)
                writer.write(b"%d\n" % total)
                await writer.drain()
        writer.close()

    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(DnsServer, local_addr=(UPSTREAM_DNS, 53))
    servers = [
        await asyncio.start_server(dns_tcp, UPSTREAM_DNS, 53),
        await asyncio.start_server(http, "0.0.0.0", 80),
        await asyncio.start_server(keepalive, "0.0.0.0", 8080),
        await asyncio.start_server(tls_echo, "0.0.0.0", 443),
        await asyncio.start_server(banner, "0.0.0.0", 2525),
        await asyncio.start_server(bulk, "0.0.0.0", 9000),
        await asyncio.start_server(bulk, "0.0.0.0", 9002),
    ]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


# =====================================================================================
# subprocess side: the proxy
# =====================================================================================


async def _proxy_main(cfg: dict[str, Any]) -> None:
    import ipaddress

    import structlog
    from prometheus_client import CollectorRegistry, generate_latest

    from egressd import logs
    from egressd.policy.jws import verify_policy
    from egressd.policy.keys import trusted_from_jwks
    from egressd.proxy.context import FlowInfo, PolicyUnavailable, ProxyContext, ProxyIdentity
    from egressd.proxy.dns import start_dns
    from egressd.proxy.intercept import start_interceptor
    from egressd.proxy.resolved import ResolvedNames
    from egressd.proxy.secrets import SecretStore

    audit_file = open(cfg["audit_log"], "a", buffering=1)  # noqa: SIM115, ASYNC230 - at start-up
    logs.configure(json=True, stream=audit_file)
    # client address -> (job, its policy token file)
    clients = {CLIENT: (uuid.UUID(cfg["job_id"]), cfg["token"])}
    clients.update({ip: (uuid.UUID(j), t) for ip, (j, t) in cfg.get("more_clients", {}).items()})
    tokens = dict(clients.values())
    trusted = trusted_from_jwks(json.loads(Path(cfg["jwks"]).read_text()))

    class Flows:
        def lookup(self, src: Any, sport: int, dst: Any, dport: int, proto: int) -> FlowInfo | None:
            client = clients.get(str(src))
            return None if client is None else FlowInfo(client[0], b"\0" * 8, "node1")

    class Policies:
        async def get(self, job_id: uuid.UUID) -> Any:
            try:
                token = Path(tokens[job_id]).read_text()
            except FileNotFoundError as exc:
                raise PolicyUnavailable("policy_missing") from exc
            try:
                return verify_policy(token, trusted)
            except Exception as exc:  # any failure is "unverifiable"
                raise PolicyUnavailable("policy_unverifiable", str(exc)) from exc

    registry = CollectorRegistry()
    ctx = ProxyContext(
        identity=ProxyIdentity(
            "proxy-t", ipaddress.IPv4Address(PROXY_SIDE), ipaddress.IPv4Address(EGRESS)
        ),
        flows=Flows(),
        policies=Policies(),
        fleet_ranges=tuple(ipaddress.IPv4Network(n) for n in FLEET),
        upstream_resolver=ipaddress.IPv4Address(UPSTREAM_DNS),
        registry=registry,
        audit=structlog.get_logger("audit"),
        secrets=SecretStore(Path(cfg["secrets_dir"]), recheck_s=0.0),
    )
    resolved = ResolvedNames()
    limits = None
    if cfg.get("limits"):
        from egressd.proxy.config import config_from_mapping
        from egressd.proxy.limiting import ProxyLimits

        proxy_config = config_from_mapping(
            {"name": "proxy-t", "underlay": PROXY_SIDE, "egress": EGRESS, **cfg["limits"]}
        )
        limits = ProxyLimits(proxy_config.limits, registry=registry)
    interception = None
    if cfg.get("interception"):
        from egressd.proxy.tls_intercept import Interception

        tls = cfg["interception"]
        interception = Interception.load(
            Path(tls["cert"]), Path(tls["key"]), upstream_ca_file=Path(tls["upstream_ca_file"])
        )
    interceptor = await start_interceptor(
        ctx,
        resolved,
        listen=("127.0.0.1", TCP_PORT),
        peek_timeout_s=cfg["peek_timeout_s"],
        limits=limits,
        interception=interception,
    )
    responder = await start_dns(
        ctx,
        resolved,
        listen=("127.0.0.1", DNS_PORT),
        upstream_timeout_s=1.0,
        limits=interceptor.limits,
        refusal_rcode=cfg.get("dns_refusal_rcode", "REFUSED"),
    )

    def dump_metrics() -> None:
        tmp = Path(cfg["metrics"] + ".tmp")
        tmp.write_bytes(generate_latest(registry))
        tmp.replace(cfg["metrics"])

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_metrics)
    print("READY", flush=True)
    await stop.wait()
    await interceptor.close()
    await responder.close()
    dump_metrics()


def _subprocess_entry(argv: list[str]) -> None:
    role, cfg_path = argv[1], argv[2]
    cfg = json.loads(Path(cfg_path).read_text())
    main = {"inet": _inet_main, "proxy": _proxy_main}[role]
    if cfg.get("uvloop"):
        import uvloop

        uvloop.run(main(cfg))
    else:
        asyncio.run(main(cfg))


# =====================================================================================
# test side: the world
# =====================================================================================


def _run(
    *cmd: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, input=stdin, timeout=30)


def _in_ns(ns: str, *cmd: str, check: bool = True, stdin: str | None = None) -> None:
    _run("ip", "netns", "exec", ns, *cmd, check=check, stdin=stdin)


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a fresh thread that has entered network namespace `ns`.

    Sockets made there stay in that namespace for life, whatever thread uses them.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def ns_socket(ns: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    return in_netns(ns, lambda: socket.socket(socket.AF_INET, kind))


# Tests find a connection's audit records by the client's ip:port, and a proxy or fleet often
# lives for a whole module: the kernel may give a later test the port an earlier test's
# connection had (CI saw 51 records where 50 were sent), and the two tests' records mix.
class SourcePorts:
    """Binds sockets to ephemeral ports not used before by this instance."""

    def __init__(self) -> None:
        self.used: set[tuple[str, int, int]] = set()

    def bind(self, make: Callable[[], socket.socket], src: str) -> socket.socket:
        """`make()` a socket and bind it to `src` on a port this instance has not given out."""
        held: list[socket.socket] = []
        try:
            for _ in range(64):
                sock = make()
                try:
                    sock.bind((src, 0))
                except BaseException:
                    sock.close()
                    raise
                key = (src, sock.getsockname()[1], int(sock.type))
                if key not in self.used:
                    self.used.add(key)
                    return sock
                held.append(sock)  # kept bound so that the next bind gets another port
            raise AssertionError(f"no unused source port on {src} in 64 binds")
        finally:
            for sock in held:
                sock.close()


@dataclass
class World:
    tmp: Path
    sfx: str
    client_ns: str
    proxy_ns: str
    inet_ns: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    signing_key: Any = None
    sources: SourcePorts = field(default_factory=SourcePorts)

    def client_socket(
        self, src: str, kind: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket in the client namespace bound to a source port this world never used."""
        return self.sources.bind(lambda: ns_socket(self.client_ns, kind), src)

    @property
    def audit_log(self) -> Path:
        return self.tmp / "audit.jsonl"

    @property
    def upstream_log(self) -> Path:
        return self.tmp / "upstream.jsonl"

    @property
    def metrics_path(self) -> Path:
        return self.tmp / "metrics.txt"

    @property
    def token_path(self) -> Path:
        return self.tmp / "policy.jws"

    @property
    def secrets_dir(self) -> Path:
        """The proxy's `secrets_dir` (empty at start)."""
        path = self.tmp / "secrets"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    # policy

    def token_for(self, job_id: str) -> Path:
        return self.token_path if job_id == JOB_ID else self.tmp / f"policy-{job_id}.jws"

    def set_policy(
        self,
        *,
        mode: str = "enforce",
        egress: list[dict[str, Any]] | None = None,
        limits: dict[str, int] | None = None,
        job_id: str = JOB_ID,
    ) -> None:
        from egressd.policy.jws import sign_payload

        now = int(time.time())
        payload: dict[str, Any] = {
            "v": 1,
            "job_id": job_id,
            "account": "acme",
            "nodes": ["node1"],
            "mode": mode,
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 3600,
            "egress": EGRESS_RULES if egress is None else egress,
        }
        payload["limits"] = ROOMY_LIMITS if limits is None else limits
        token_path = self.token_for(job_id)
        tmp = token_path.with_suffix(".tmp")
        tmp.write_text(sign_payload(payload, self.signing_key))
        tmp.replace(token_path)

    # client side

    def connect(
        self, dst: str, port: int, *, src: str = CLIENT, timeout: float = 5.0
    ) -> socket.socket:
        sock = self.client_socket(src)
        sock.settimeout(timeout)
        try:
            sock.connect((dst, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def expect_reset(self, dst: str, port: int, *args: Any, src: str = CLIENT) -> str:
        """Connect (and send `args[0]`, if given); the proxy must reset. Returns our ip:port.

        The reset may arrive while connect() still runs (a fast deny), so
        connect is inside the check too.
        """
        payload: bytes = args[0] if args else b""
        sock = self.client_socket(src)
        with sock:
            sock.settimeout(5.0)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                sock.connect((dst, port))
                if payload:
                    sock.sendall(payload)
                data = sock.recv(1024)
                # A FIN instead of a RST would show up as b"" here.
                raise AssertionError(f"expected a reset, got {data!r}")
            return source(sock)

    # what the proxy logged

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        out = []
        for line in self.audit_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if event is None or record.get("event") == event:
                    out.append(record)
        return out

    def wait_event(self, timeout: float = 8.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for record in self.events():
                if all(record.get(k) == v for k, v in match.items()):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit event matching {match}; have {self.events()[-5:]}")
            time.sleep(0.05)

    def upstream_queries(self) -> list[dict[str, Any]]:
        if not self.upstream_log.exists():
            return []
        return [json.loads(line) for line in self.upstream_log.read_text().splitlines() if line]

    def metrics(self) -> str:
        before = self.metrics_path.stat().st_mtime_ns if self.metrics_path.exists() else 0
        self.procs["proxy"].send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.metrics_path.exists() and self.metrics_path.stat().st_mtime_ns != before:
                return self.metrics_path.read_text()
            time.sleep(0.05)
        raise AssertionError("the proxy did not write its metrics")

    def proxy_stderr(self) -> str:
        path = self.tmp / "proxy.err"
        return path.read_text() if path.exists() else ""


def _build_netns(w: World, extra_egress: tuple[str, ...] = ()) -> None:
    s = w.sfx
    c0, p0, p1, i0 = f"t{s}c0", f"t{s}p0", f"t{s}p1", f"t{s}i0"
    for ns in (w.client_ns, w.proxy_ns, w.inet_ns):
        _run("ip", "netns", "add", ns)
        _in_ns(ns, "ip", "link", "set", "lo", "up")
    # Create veths inside the proxy namespace and move the far ends, so no
    # interface ever exists in the host's namespace.
    _in_ns(w.proxy_ns, "ip", "link", "add", p0, "type", "veth", "peer", "name", c0)
    _in_ns(w.proxy_ns, "ip", "link", "set", c0, "netns", w.client_ns)
    _in_ns(w.proxy_ns, "ip", "link", "add", p1, "type", "veth", "peer", "name", i0)
    _in_ns(w.proxy_ns, "ip", "link", "set", i0, "netns", w.inet_ns)

    _in_ns(w.client_ns, "ip", "addr", "add", f"{CLIENT}/24", "dev", c0)
    _in_ns(w.client_ns, "ip", "addr", "add", f"{CLIENT_NO_FLOW}/24", "dev", c0)
    _in_ns(w.client_ns, "ip", "addr", "add", f"{CLIENT2}/24", "dev", c0)
    _in_ns(w.client_ns, "ip", "link", "set", c0, "up")
    _in_ns(w.client_ns, "ip", "route", "add", "default", "via", PROXY_SIDE)

    _in_ns(w.proxy_ns, "ip", "addr", "add", f"{PROXY_SIDE}/24", "dev", p0)
    for egress in (EGRESS, *extra_egress):
        _in_ns(w.proxy_ns, "ip", "addr", "add", f"{egress}/24", "dev", p1)
    _in_ns(w.proxy_ns, "ip", "link", "set", p0, "up")
    _in_ns(w.proxy_ns, "ip", "link", "set", p1, "up")
    for key in ("all", "default", p0, p1):
        _in_ns(w.proxy_ns, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
    _in_ns(w.proxy_ns, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
    _in_ns(w.proxy_ns, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    table = f"egd_t_{s}"
    _in_ns(
        w.proxy_ns,
        "nft",
        "-f",
        "-",
        stdin=f"""
table inet {table} {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{p0}" meta l4proto {{ tcp, udp }} th dport 53 tproxy ip to 127.0.0.1:{DNS_PORT} meta mark set 1 accept
        iifname "{p0}" meta l4proto tcp tproxy ip to 127.0.0.1:{TCP_PORT} meta mark set 1 accept
    }}
}}
""",
    )

    for addr in INET_ADDRS:
        _in_ns(w.inet_ns, "ip", "addr", "add", f"{addr}/24", "dev", i0)
    _in_ns(w.inet_ns, "ip", "link", "set", i0, "up")
    _in_ns(w.inet_ns, "ip", "route", "add", "100.96.0.0/16", "via", EGRESS)


def _start(w: World, role: str, ns: str, cfg: dict[str, Any]) -> None:
    cfg_path = w.tmp / f"{role}.json"
    cfg_path.write_text(json.dumps(cfg))
    err = open(w.tmp / f"{role}.err", "w")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            sys.executable,
            str(Path(__file__).resolve()),
            role,
            str(cfg_path),
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    w.procs[role] = proc
    assert proc.stdout is not None
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(20)
    if not ready or ready[0].strip() != "READY":
        raise RuntimeError(f"{role} did not start: {(w.tmp / f'{role}.err').read_text()}")


def _stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> int | None:
    # Imported here: this file also runs as a script in the namespaces, without `tests`.
    from tests.support.processes import stop_process

    return stop_process(proc, timeout)


@contextlib.contextmanager
def make_world(
    tmp: Path,
    *,
    peek_timeout_s: float = 0.5,
    use_uvloop: bool = True,
    limits: dict[str, Any] | None = None,
    extra_egress: tuple[str, ...] = (),
    second_job: bool = False,
    dns_refusal_rcode: str = "REFUSED",
    interception: dict[str, str] | None = None,
) -> Iterator[World]:
    """A world; `interception`: the proxy's TLS interception files (`cert`, `key`,
    `upstream_ca_file`); `limits`: proxy configuration keys of the limits (`ProxyConfig`),
    `extra_egress`: more egress addresses on the proxy, `second_job`: CLIENT2
    belongs to JOB2_ID (its policy from `set_policy(job_id=JOB2_ID)`),
    `dns_refusal_rcode`: the DNS responder's (`ProxyConfig.dns_refusal_rcode`)."""
    from egressd.policy.keys import TrustedKeys, generate_signing_key, jwks

    sfx = secrets.token_hex(3)
    w = World(tmp, sfx, f"egd-t{sfx}c", f"egd-t{sfx}p", f"egd-t{sfx}i")
    try:
        _build_netns(w, extra_egress)
        w.signing_key = generate_signing_key()
        (tmp / "jwks.json").write_text(json.dumps(jwks(TrustedKeys.of(w.signing_key.public))))
        w.set_policy()
        more_clients = {}
        if second_job:
            w.set_policy(job_id=JOB2_ID)
            more_clients[CLIENT2] = (JOB2_ID, str(w.token_for(JOB2_ID)))
        _start(w, "inet", w.inet_ns, {"upstream_log": str(w.upstream_log), "uvloop": False})
        _start(
            w,
            "proxy",
            w.proxy_ns,
            {
                "audit_log": str(w.audit_log),
                "metrics": str(w.metrics_path),
                "job_id": JOB_ID,
                "jwks": str(tmp / "jwks.json"),
                "token": str(w.token_path),
                "peek_timeout_s": peek_timeout_s,
                "uvloop": use_uvloop,
                "limits": limits,
                "more_clients": more_clients,
                "dns_refusal_rcode": dns_refusal_rcode,
                "interception": interception,
                "secrets_dir": str(w.secrets_dir),
            },
        )
        yield w
    finally:
        for proc in w.procs.values():
            _stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in (w.client_ns, w.proxy_ns, w.inet_ns):
            _run("ip", "netns", "del", ns, check=False)


# =====================================================================================
# helpers for the tests
# =====================================================================================


def http_get(sock: socket.socket, host: str, path: str = "/bytes/1000") -> tuple[bytes, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    sock.sendall(request)
    return request, recv_all(sock)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def source(sock: socket.socket) -> str:
    ip, port = sock.getsockname()
    return f"{ip}:{port}"


def client_hello(name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def expect_reset(sock: socket.socket, payload: bytes = b"") -> None:
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        if payload:
            sock.sendall(payload)
        data = sock.recv(1024)
        # A FIN instead of a RST would show up as b"" here.
        raise AssertionError(f"expected a reset, got {data!r}")


# --- DNS from the client to the resolver (100.100.100.53) -------------------------------------


def ask_udp(
    world: World, wire: bytes, *, src: str = CLIENT, timeout: float = 4.0
) -> tuple[bytes, tuple[str, int], str]:
    """Send one datagram to the resolver; (reply, reply source, our ip:port)."""
    sock = world.client_socket(src, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.sendto(wire, (RESOLVER, 53))
        reply, addr = sock.recvfrom(65535)
        return reply, addr, source(sock)


def query(
    world: World, name: str, rdtype: str = "A", **kw: object
) -> tuple[dns.message.Message, str]:
    q = dns.message.make_query(name, rdtype)
    wire, addr, src = ask_udp(world, q.to_wire(), **kw)  # type: ignore[arg-type]
    assert addr == (RESOLVER, 53)  # the answer comes from where the query went
    response = dns.message.from_wire(wire)
    assert response.id == q.id and response.flags & dns.flags.QR
    return response, src


def addresses(response: dns.message.Message) -> list[str]:
    return [r.address for rrset in response.answer for r in rrset if hasattr(r, "address")]


# --- HTTP/1.1 to the keep-alive server, and the proxy's http_request events --------------------

KEEPALIVE_PORT = 8080  # answers each request with "<method> <host> <path> <body length>"
EU = "eu.data.allowed.test"  # DATA's name in ZONE


def request(method: str, host: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}{extra}\r\n".encode() + body


class Reader:
    """Reads HTTP/1.1 responses (Content-Length framed) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self, *, no_body: bool = False) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed mid-head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        size = 0 if no_body else int(fields.get("content-length", "0"))
        while len(self.buf) < size:
            assert self._fill(), "connection closed mid-body"
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, body

    def closed(self) -> bool:
        """The proxy closed the connection (a FIN, nothing more)."""
        self.sock.settimeout(5.0)
        return not self.buf and not self._fill()


def requests_of(world: World, src: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 8
    while True:
        found = [e for e in world.events("http_request") if e.get("source") == src]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


if __name__ == "__main__":
    _subprocess_entry(sys.argv)
