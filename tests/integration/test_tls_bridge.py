"""TLS interception's moving parts over loopback, in one process (no root needed).

A real TLS server (the test CA's certificate), a real TLS client (trusting the
interception CA only), and between them what the interceptor does for an
intercepted connection: read the ClientHello (`peek_client`), the upstream
handshake verified against the test CA (`TlsEnd.connect`), the client
handshake with a minted leaf (`TlsEnd.accept`), then `bridge` with the real
relay and `HttpGate`. The proxy process, TPROXY and the audit events are in
`test_tls_intercept` (root).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from egressd.control.interception_ca import ensure_interception_ca
from egressd.policy.matcher import Decision, Verdict
from egressd.proxy import http_rules, tls_intercept
from egressd.proxy.http_gate import HttpGate, RequestRecord
from egressd.proxy.intercept import peek_client
from egressd.proxy.relay import relay
from egressd_harness.topology import ca

pytestmark = pytest.mark.timeout(60)

HOST = "api.allowed.test"


@dataclass
class Pki:
    interception: tls_intercept.Interception
    interception_ca: Path
    test_ca: Path
    server_ctx: ssl.SSLContext
    other_server_ctx: ssl.SSLContext  # a certificate from a CA nobody trusts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    icpt = ensure_interception_ca(tmp / "icpt")
    test = ca.ensure_ca(tmp / "ca", names=[HOST])
    other = ca.ensure_ca(tmp / "other", names=[HOST])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(test.server_cert, test.server_cert.with_name("server.key"))
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    other_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other_ctx.load_cert_chain(other.server_cert, other.server_cert.with_name("server.key"))
    return Pki(
        tls_intercept.Interception.load(icpt.cert, icpt.key, upstream_ca_file=test.ca_cert),
        icpt.cert,
        test.ca_cert,
        server_ctx,
        other_ctx,
    )


async def _keepalive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: answers ``<method> <host> <path> <alpn>``."""
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            fields = {
                k.strip().lower(): v.strip()
                for k, _, v in (x.partition(":") for x in lines[1:] if x)
            }
            await reader.readexactly(int(fields.get("content-length", "0")))
            text = f"{method} {fields.get('host', '')} {path} {alpn}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    writer.close()


class Proxy:
    """A listening socket whose connections are intercepted toward `upstream`."""

    def __init__(self, interception: tls_intercept.Interception, upstream: tuple[str, int]) -> None:
        self.interception = interception
        self.upstream = upstream
        self.records: list[RequestRecord] = []
        self.refusals: list[str] = []
        self.done = asyncio.Event()

    def decide(
        self, method: str, request: http_rules.RequestTarget, upgrade: str | None
    ) -> Decision:
        if request.host != HOST:
            return Decision(Verdict.DENY, tls_intercept.HOST_SNI_MISMATCH, None)
        if method == "GET" and request.path_text.startswith("/data"):
            return Decision(Verdict.ALLOW, "allowed_request", None)
        return Decision(Verdict.DENY, "method_not_allowed", None)

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            peeked = await peek_client(client, timeout_s=2.0)
            upstream = socket.socket()
            upstream.setblocking(False)
            await loop.sock_connect(upstream, self.upstream)
            offer = tls_intercept.alpn_offer(peeked.alpn, tls_intercept.HTTP1_ONLY)
            try:
                server = await tls_intercept.TlsEnd.connect(
                    upstream, self.interception.upstream_context(offer), peeked.sni or ""
                )
            except ssl.SSLCertVerificationError:
                self.refusals.append(tls_intercept.UPSTREAM_TLS_UNVERIFIED)
                upstream.close()
                client.close()
                return
            ctx = self.interception.leaves.context(
                peeked.sni or "", tls_intercept.client_alpn(server.selected_alpn)
            )
            tls_client = await tls_intercept.TlsEnd.accept(client, ctx, peeked.data)
            gate = HttpGate(self.decide, self.records.append)

            async def run(c: socket.socket, u: socket.socket) -> None:
                await relay(c, u, gate=gate)

            await tls_intercept.bridge(tls_client, server, run)
        finally:
            self.done.set()


@dataclass
class Loop:
    loop: asyncio.AbstractEventLoop
    proxy_port: int
    proxy: Proxy


def _serve(pki: Pki, server_ctx: ssl.SSLContext, ready: list[Loop], stop: threading.Event) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_keepalive, "127.0.0.1", 0, ssl=server_ctx)
        proxy = Proxy(pki.interception, server.sockets[0].getsockname()[:2])
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()
        ready.append(Loop(loop, lsock.getsockname()[1], proxy))
        tasks = set()
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.2):
                    conn, _ = await loop.sock_accept(lsock)
            except TimeoutError:
                continue
            conn.setblocking(False)
            task = loop.create_task(proxy.handle(conn))
            tasks.add(task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lsock.close()
        server.close()

    asyncio.run(main())


@pytest.fixture
def world(pki: Pki, request: pytest.FixtureRequest) -> Iterator[Loop]:
    server_ctx = pki.other_server_ctx if getattr(request, "param", "") == "bad" else pki.server_ctx
    ready: list[Loop] = []
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(pki, server_ctx, ready, stop), daemon=True)
    thread.start()
    for _ in range(100):
        if ready:
            break
        threading.Event().wait(0.05)
    yield ready[0]
    stop.set()
    thread.join(10)


def _client(pki: Pki, port: int, alpn: list[str] | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(pki.interception_ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(sock, server_hostname=HOST)


def _response(sock: ssl.SSLSocket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed mid-head: {buf!r}"
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    size = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    while len(body) < size:
        body += sock.recv(65536)
    return int(lines[0].split(" ")[1]), body


def test_requests_decided_through_interception(pki: Pki, world: Loop) -> None:
    with _client(pki, world.proxy_port, ["h2", "http/1.1"]) as tls:
        # HTTP/1.1 only offered upstream: the client gets the server's choice.
        assert tls.selected_alpn_protocol() == "http/1.1"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        leaf = x509.load_der_x509_certificate(der)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [HOST]
        assert "CN=egressd interception CA" in leaf.issuer.rfc4514_string()
        tls.sendall(f"GET /data HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert _response(tls) == (200, f"GET {HOST} /data http/1.1".encode())
        tls.sendall(f"GET /data/2 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert _response(tls) == (200, f"GET {HOST} /data/2 http/1.1".encode())
        tls.sendall(f"POST /data HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode())
        status, body = _response(tls)
        assert status == 403
        assert json.loads(body)["error"] == "method_not_allowed"
        assert tls.recv(1024) == b""  # closed after the 403 (close_notify, FIN)
    asyncio.run_coroutine_threadsafe(
        asyncio.wait_for(world.proxy.done.wait(), 5), world.loop
    ).result(6)
    assert [(r.method, r.path, r.status) for r in world.proxy.records] == [
        ("GET", "/data", 200),
        ("GET", "/data/2", 200),
        ("POST", "/data", 403),
    ]


def test_client_without_alpn_gets_none(pki: Pki, world: Loop) -> None:
    with _client(pki, world.proxy_port) as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(f"GET /data HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert _response(tls) == (200, f"GET {HOST} /data None".encode())


@pytest.mark.parametrize("world", ["bad"], indirect=True)
def test_unverified_upstream_refused(pki: Pki, world: Loop) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)), _client(pki, world.proxy_port) as tls:
        tls.recv(1)
    asyncio.run_coroutine_threadsafe(
        asyncio.wait_for(world.proxy.done.wait(), 5), world.loop
    ).result(6)
    assert world.proxy.refusals == [tls_intercept.UPSTREAM_TLS_UNVERIFIED]
