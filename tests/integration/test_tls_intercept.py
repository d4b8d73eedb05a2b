"""TLS interception through the real interceptor process (issue 12).

The world of `test_intercept` (TPROXY, the proxy in its own namespace, the
"internet"), with the proxy given an interception CA and the test CA as its
upstream trust store, and two real HTTPS servers (HTTP/1.1 keep-alive) in the
internet namespace on ``eu.data.allowed.test`` (203.0.113.11):

* :8443 presents a certificate of the test CA (verifies);
* :8444 presents a certificate of another CA (does not verify);
* :8445 speaks HTTP/2 (h2 by ALPN; the test CA's certificate).

The HTTP/1.1 servers answer ``<method> <host> <path> <alpn>``, the HTTP/2
one ``<method> <authority> <path> h2 <request body length>`` (``/bytes/N``: N
bytes). The client trusts only the
interception CA. This file is also the entry of the servers' subprocess
(``python test_tls_intercept.py servers CFG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if __name__ != "__main__":
    from egressd.control.interception_ca import ensure_interception_ca
    from egressd.metrics_text import metric_value, parse
    from egressd_harness.topology import ca
    from tests.support.intercept_world import DATA, World, make_world, requests_of, source
    from tests.support.processes import stop_process

pytestmark = [pytest.mark.root("ip", "nft", "nsenter"), pytest.mark.timeout(180)]

EU = "eu.data.allowed.test"
US = "us.data.allowed.test"
GOOD, BAD, H2 = 8443, 8444, 8445
RULES = [
    {
        "host": EU,
        "ports": [GOOD, BAD, H2],
        "tls": "intercept",
        "http": {
            "allow": [
                {"methods": ["GET", "HEAD"], "paths": ["/data", "/bytes/*"]},
                {"methods": ["PUT"], "paths": ["/upload"]},
            ]
        },
    }
]


def text_headers(headers: object) -> dict[str, str]:
    """An h2 event's header list as text (h2 types it as bytes or str pairs)."""
    out: dict[str, str] = {}
    for name, value in headers:  # type: ignore[attr-defined]
        key = name.decode() if isinstance(name, bytes) else str(name)
        out[key] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def issuer_of(sock: ssl.SSLSocket) -> str:
    """The common name of the certificate's issuer the peer presented."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# --- subprocess side: the HTTPS servers --------------------------------------------------


async def _servers_main(cfg: dict[str, Any]) -> None:
    async def keepalive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        with contextlib.suppress(Exception):
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
        writer.close()

    async def h2_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        requests: dict[int, dict[str, str]] = {}
        bodies: dict[int, int] = {}
        pending: dict[int, bytes] = {}

        def drain() -> None:
            for sid, data in list(pending.items()):
                while data:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk, data = data[:window], data[window:]
                    conn.send_data(sid, chunk, end_stream=not data)
                pending[sid] = data
                if not data:
                    del pending[sid]

        with contextlib.suppress(Exception):
            writer.write(conn.data_to_send())
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        requests[event.stream_id] = text_headers(event.headers)
                        bodies[event.stream_id] = 0
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += len(event.data)
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        head = requests[event.stream_id]
                        path = head[":path"]
                        if path.startswith("/bytes/"):
                            body = b"z" * int(path.rsplit("/", 1)[1])
                        else:
                            text = f"{head[':method']} {head[':authority']} {path} h2"
                            body = f"{text} {bodies[event.stream_id]}".encode()
                        conn.send_headers(
                            event.stream_id,
                            [(":status", "200"), ("content-length", str(len(body)))],
                        )
                        pending[event.stream_id] = body
                drain()
                writer.write(conn.data_to_send())
                await writer.drain()
        writer.close()

    servers = []
    for port, (cert, key), alpn, handler in (
        (GOOD, cfg["good"], ["http/1.1"], keepalive),
        (BAD, cfg["bad"], ["http/1.1"], keepalive),
        (H2, cfg["good"], ["h2"], h2_server),
    ):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(alpn)
        servers.append(await asyncio.start_server(handler, cfg["address"], port, ssl=ctx))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


# --- test side ------------------------------------------------------------------------------


class Tls:
    """The world and the interception CA a client trusts."""

    def __init__(self, world: World, interception_ca: Path) -> None:
        self.world = world
        self.interception_ca = interception_ca

    def connect(
        self,
        port: int,
        *,
        name: str = EU,
        cafile: Path | None = None,
        alpn: list[str] | None = None,
    ) -> tuple[ssl.SSLSocket, str]:
        sock = self.world.connect(DATA, port)
        src = source(sock)
        ctx = ssl.create_default_context(cafile=str(cafile or self.interception_ca))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        try:
            return ctx.wrap_socket(sock, server_hostname=name), src
        except BaseException:
            sock.close()
            raise


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    tmp = tmp_path_factory.mktemp("tlsicpt")
    icpt = ensure_interception_ca(tmp / "icpt")
    good = ca.ensure_ca(tmp / "ca", names=[EU, US])
    bad = ca.ensure_ca(tmp / "other", names=[EU, US])
    interception = {
        "cert": str(icpt.cert),
        "key": str(icpt.key),
        "upstream_ca_file": str(good.ca_cert),
    }
    with make_world(tmp, interception=interception) as world:
        cfg = tmp / "servers.json"
        cfg.write_text(
            json.dumps(
                {
                    "address": DATA,
                    "good": [str(good.server_cert), str(good.server_cert.with_name("server.key"))],
                    "bad": [str(bad.server_cert), str(bad.server_cert.with_name("server.key"))],
                }
            )
        )
        proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{world.inet_ns}",
                sys.executable,
                str(Path(__file__).resolve()),
                "servers",
                str(cfg),
            ],
            stdout=subprocess.PIPE,
            stderr=open(tmp / "servers.err", "w"),  # noqa: SIM115
            text=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        try:
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))  # type: ignore[union-attr]
            reader.start()
            reader.join(20)
            assert line and line[0].strip() == "READY", (tmp / "servers.err").read_text()
            world.set_policy(egress=RULES)
            yield Tls(world, icpt.cert)
        finally:
            stop_process(proc, 10)
            assert proc.stdout is not None
            proc.stdout.close()


def request(method: str, path: str, host: str = EU) -> bytes:
    length = "Content-Length: 0\r\n" if method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}\r\n".encode()


def response(sock: ssl.SSLSocket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed mid-head: {buf!r}"
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    size = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    while len(body) < size:
        data = sock.recv(65536)
        assert data, "closed mid-body"
        body += data
    return int(lines[0].split(" ")[1]), body


def closed(sock: ssl.SSLSocket) -> bool:
    sock.settimeout(5.0)
    try:
        return sock.recv(1024) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True


def test_get_allowed_post_denied(tls: Tls) -> None:
    sock, src = tls.connect(GOOD, alpn=["h2", "http/1.1"])
    with sock:
        # This server speaks HTTP/1.1 only: its choice is the client's too.
        assert sock.selected_alpn_protocol() == "http/1.1"
        assert issuer_of(sock) == "egressd interception CA"
        sock.sendall(request("GET", "/data"))
        assert response(sock) == (200, f"GET {EU} /data http/1.1".encode())
        sock.sendall(request("GET", "/bytes/7"))
        assert response(sock) == (200, f"GET {EU} /bytes/7 http/1.1".encode())
        sock.sendall(request("POST", "/data"))
        status, body = response(sock)
        assert status == 403
        assert json.loads(body) == {"error": "method_not_allowed", "by": "egressd", "host": EU}
        assert closed(sock)
    events = requests_of(tls.world, src, 3)
    assert [(e["method"], e["path"], e["status"], e["verdict"], e["reason"]) for e in events] == [
        ("GET", "/data", 200, "allow", "allowed_request"),
        ("GET", "/bytes/7", 200, "allow", "allowed_request"),
        ("POST", "/data", 403, "deny", "method_not_allowed"),
    ]
    assert all(e["host"] == EU and e["port"] == GOOD for e in events)
    conn = tls.world.wait_event(event="connection", source=src)
    assert (conn["verdict"], conn["reason"], conn["host"]) == ("allow", "allowed_host", EU)


def test_path_outside_the_list_denied(tls: Tls) -> None:
    sock, src = tls.connect(GOOD)
    with sock:
        sock.sendall(request("GET", "/admin"))
        status, body = response(sock)
        assert status == 403
        assert json.loads(body)["error"] == "path_not_allowed"
        assert closed(sock)
    [event] = requests_of(tls.world, src, 1)
    assert (event["path"], event["reason"]) == ("/admin", "path_not_allowed")


def test_host_other_than_the_sni_denied(tls: Tls) -> None:
    sock, src = tls.connect(GOOD)
    with sock:
        sock.sendall(request("GET", "/data", host=US))
        status, body = response(sock)
        assert (status, json.loads(body)["error"]) == (403, "host_sni_mismatch")
    [event] = requests_of(tls.world, src, 1)
    assert event["reason"] == "host_sni_mismatch"


def test_unverified_upstream_refused(tls: Tls) -> None:
    sock = tls.world.connect(DATA, BAD)
    src = source(sock)
    ctx = ssl.create_default_context(cafile=str(tls.interception_ca))
    with sock, pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(sock, server_hostname=EU).recv(1)
    conn = tls.world.wait_event(event="connection", source=src)
    assert (conn["verdict"], conn["reason"], conn["host"]) == (
        "deny",
        "upstream_tls_unverified",
        EU,
    )
    assert conn["bytes_up"] == 0 and conn["bytes_down"] == 0
    samples = parse(tls.world.metrics())
    assert metric_value(
        samples, "egressd_connections_total", reason="upstream_tls_unverified", verdict="deny"
    )


def test_client_that_does_not_trust_the_ca(tls: Tls, tmp_path: Path) -> None:
    other = ca.ensure_ca(tmp_path / "x")
    sock = tls.world.connect(DATA, GOOD)
    src = source(sock)
    ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    with sock, pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(sock, server_hostname=EU)
    conn = tls.world.wait_event(event="connection", source=src)
    assert conn["reason"] == "client_tls_failed"


class H2Client:
    """A blocking HTTP/2 client (h2) over the TLS socket; collects whole streams."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        import h2.config
        import h2.connection

        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.responses: dict[int, dict[str, Any]] = {}
        self.pending: dict[int, bytes] = {}
        self.goaway = False

    def request(self, method: str, path: str, body: bytes = b"", authority: str = EU) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", authority),
        ]
        self.conn.send_headers(sid, headers, end_stream=not body)
        self.responses[sid] = {"status": None, "body": b"", "ended": False, "reset": None}
        if body:
            self.pending[sid] = body
            self.drain()
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def drain(self) -> None:
        """Send request bodies as far as the windows allow."""
        conn = self.conn
        for sid, data in list(self.pending.items()):
            while data:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk, data = data[:window], data[window:]
                conn.send_data(sid, chunk, end_stream=not data)
            self.pending[sid] = data
            if not data:
                del self.pending[sid]

    def wait(self, *sids: int) -> None:
        import h2.events

        self.sock.settimeout(10)
        while not all(self.responses[s]["ended"] or self.responses[s]["reset"] for s in sids):
            data = self.sock.recv(65536)
            if not data:
                break
            for event in self.conn.receive_data(data):
                r = self.responses.get(getattr(event, "stream_id", 0))
                if isinstance(event, h2.events.ResponseReceived) and r is not None:
                    r["status"] = int(text_headers(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived) and r is not None:
                    r["body"] += event.data
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded) and r is not None:
                    r["ended"] = True
                elif isinstance(event, h2.events.StreamReset) and r is not None:
                    r["reset"] = event.error_code
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway = True
            if not self.goaway:
                self.drain()
            self.sock.sendall(self.conn.data_to_send())


def test_http2_through_interception(tls: Tls) -> None:
    sock, src = tls.connect(H2, alpn=["h2", "http/1.1"])
    with sock:
        assert sock.selected_alpn_protocol() == "h2"
        client = H2Client(sock)
        data = client.request("GET", "/data")
        big = client.request("GET", "/bytes/300000")  # beyond the initial windows
        upload = client.request("PUT", "/upload", body=b"u" * 100_000)
        client.wait(data, big, upload)
        assert client.responses[data]["status"] == 200, client.responses[data]
        assert client.responses[data]["body"] == f"GET {EU} /data h2 0".encode()
        assert client.responses[big]["status"] == 200
        assert client.responses[big]["body"] == b"z" * 300_000
        assert client.responses[upload]["body"] == f"PUT {EU} /upload h2 100000".encode()
        denied = client.request("POST", "/data", body=b"exfiltrated")
        other = client.request("GET", "/data", authority=US)
        client.wait(denied, other)
        assert client.responses[denied]["status"] == 403
        body = json.loads(client.responses[denied]["body"])
        assert body == {"error": "method_not_allowed", "by": "egressd", "host": EU}
        # After a denied request nothing new is taken, and the connection ends.
        assert client.responses[other]["reset"] is not None
        client.wait(*client.responses)
        assert closed(sock) or client.goaway
    events = requests_of(tls.world, src, 4)
    assert sorted((e["method"], e["path"], e["status"], e["reason"]) for e in events) == sorted(
        [
            ("GET", "/data", 200, "allowed_request"),
            ("GET", "/bytes/300000", 200, "allowed_request"),
            ("PUT", "/upload", 200, "allowed_request"),
            ("POST", "/data", 403, "method_not_allowed"),
        ]
    )
    big_event = next(e for e in events if e["path"] == "/bytes/300000")
    assert big_event["bytes_down"] == 300_000
    assert next(e for e in events if e["method"] == "PUT")["bytes_up"] == 100_000


def test_http2_authority_other_than_the_sni(tls: Tls) -> None:
    sock, src = tls.connect(H2, alpn=["h2"])
    with sock:
        client = H2Client(sock)
        sid = client.request("GET", "/data", authority=US)
        client.wait(sid)
        assert client.responses[sid]["status"] == 403
        assert json.loads(client.responses[sid]["body"])["error"] == "host_sni_mismatch"
    [event] = requests_of(tls.world, src, 1)
    assert (event["host"], event["reason"]) == (US, "host_sni_mismatch")


def test_keep_alive_many_requests(tls: Tls) -> None:
    sock, src = tls.connect(GOOD)
    with sock:
        for i in range(50):
            sock.sendall(request("GET", f"/bytes/{i}"))
            assert response(sock) == (200, f"GET {EU} /bytes/{i} None".encode())
    assert len(requests_of(tls.world, src, 50)) == 50


if __name__ == "__main__":
    asyncio.run(_servers_main(json.loads(Path(sys.argv[2]).read_text())))
