"""The relay on TLS connections themselves (`tls_intercept.TlsLink`), over loopback.

What the interceptor does for an intercepted HTTP/1.1 connection, in one
process (no root): the ClientHello read (`peek_client`), the upstream
handshake verified against the test CA, the client handshake with a minted
leaf, then `relay` with an `HttpGate` straight on the two TLS connections
(no socket pair, no pump task). On asyncio's loop and on uvloop (the
proxy's). The proxy process and its audit events are in `test_tls_intercept`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from egressd.control.interception_ca import ensure_interception_ca
from egressd.policy.matcher import Decision, Verdict
from egressd.proxy import http_rules, tls_intercept
from egressd.proxy.http_gate import HttpGate, RequestRecord
from egressd.proxy.intercept import peek_client
from egressd.proxy.relay import RelayStats, relay
from egressd_harness.topology import ca

pytestmark = pytest.mark.timeout(60)

HOST = "api.allowed.test"
LOOPS = ["asyncio", "uvloop"]


@dataclass
class Pki:
    interception: tls_intercept.Interception
    interception_ca: Path
    server_ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    icpt = ensure_interception_ca(tmp / "icpt")
    test = ca.ensure_ca(tmp / "ca", names=[HOST])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(test.server_cert, test.server_cert.with_name("server.key"))
    return Pki(
        tls_intercept.Interception.load(icpt.cert, icpt.key, upstream_ca_file=test.ca_cert),
        icpt.cert,
        server_ctx,
    )


def run(loop: str, main: Callable[[], Coroutine[object, object, None]]) -> None:
    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


@dataclass
class World:
    """An HTTPS server, a proxy doing what the interceptor does, their records."""

    pki: Pki
    seen: list[str] = field(default_factory=list)  # request lines the server read
    server_ends: list[str] = field(default_factory=list)  # "eof" / "reset" per connection
    records: list[RequestRecord] = field(default_factory=list)
    stats: list[RelayStats] = field(default_factory=list)
    relays: set[asyncio.Task[None]] = field(default_factory=set)
    job: str = "job-a"  # whose connections the next ones are (the session key's)
    resumed: list[bool] = field(default_factory=list)  # per server connection

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        end = "eof"
        self.resumed.append(writer.get_extra_info("ssl_object").session_reused)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n", 1)[0].decode()
                self.seen.append(line)
                path = line.split(" ")[1]
                body = b"ok " + path.encode()
                if path.startswith("/bytes/"):
                    body = b"z" * int(path.split("/")[2])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                writer.write(body)
                await writer.drain()
                if "close" in path:
                    break  # then close_notify and FIN, right behind the body
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, ssl.SSLError):
            end = "reset"
        self.server_ends.append(end)
        writer.close()

    def decide(
        self, method: str, request: http_rules.RequestTarget, upgrade: str | None
    ) -> Decision:
        if request.host == HOST and method == "GET":
            return Decision(Verdict.ALLOW, "allowed_request", None)
        return Decision(Verdict.DENY, "method_not_allowed", None)

    async def intercept(self, client: socket.socket, upstream_at: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        peeked = await peek_client(client, timeout_s=2.0)
        upstream = socket.socket()
        upstream.setblocking(False)
        await loop.sock_connect(upstream, upstream_at)
        interception = self.pki.interception
        resume = (self.job, peeked.sni or "", upstream_at[0], upstream_at[1], ())
        ctx = interception.upstream_context(())
        server = await tls_intercept.TlsEnd.connect(
            upstream, ctx, peeked.sni or "", interception.session(resume)
        )
        leaf = self.pki.interception.leaves.context(peeked.sni or "", ())
        tls_client = await tls_intercept.TlsEnd.accept(client, leaf, peeked.data)
        stats = RelayStats()
        self.stats.append(stats)
        scratch = bytearray(64 * 1024)  # one buffer for both TLS sides and the relay
        try:
            await relay(
                tls_intercept.TlsLink(tls_client, scratch),
                tls_intercept.TlsLink(server, scratch),
                gate=HttpGate(self.decide, self.records.append),
                stats=stats,
                scratch=scratch,
            )
        finally:
            interception.keep_session(resume, server)

    @contextlib.asynccontextmanager
    async def up(self):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.pki.server_ctx)
        upstream_at = server.sockets[0].getsockname()[:2]
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)

        async def accept() -> None:
            while True:
                conn, _ = await loop.sock_accept(lsock)
                conn.setblocking(False)
                task = loop.create_task(self.intercept(conn, upstream_at))
                self.relays.add(task)

        acceptor = loop.create_task(accept())
        try:
            yield lsock.getsockname()[1]
        finally:
            acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acceptor
            await asyncio.wait_for(asyncio.gather(*self.relays, return_exceptions=True), 10)
            lsock.close()
            server.close()


def client_ctx(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.interception_ca))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    size = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    return int(lines[0].split(" ")[1]), await reader.readexactly(size)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode()


@pytest.mark.parametrize("loop", LOOPS)
def test_keep_alive_requests_each_decided_denied_one_ends_it(pki: Pki, loop: str) -> None:
    world = World(pki)

    async def main() -> None:
        async with world.up() as port:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx(pki), server_hostname=HOST
            )
            for i in range(3):
                writer.write(get(f"/data/{i}"))
                assert await read_response(reader) == (200, f"ok /data/{i}".encode())
            writer.write(get("/data/9", "POST"))
            status, body = await read_response(reader)
            assert status == 403
            assert json.loads(body)["error"] == "method_not_allowed"
            assert await reader.read() == b""  # closed after the 403
            writer.close()

    run(loop, main)
    assert world.seen == [f"GET /data/{i} HTTP/1.1" for i in range(3)]
    assert [(r.method, r.status) for r in world.records] == [("GET", 200)] * 3 + [("POST", 403)]
    assert world.stats[0].error is None


@pytest.mark.parametrize("loop", LOOPS)
def test_bulk_response_to_a_slow_reader_arrives_whole(pki: Pki, loop: str) -> None:
    world = World(pki)
    size = 6 * 1024 * 1024  # past the relay's high-water mark many times

    async def main() -> None:
        async with world.up() as port:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx(pki), server_hostname=HOST, limit=2**24
            )
            writer.write(get(f"/bytes/{size}"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.3)  # the proxy's buffers fill: it pauses the server
            got = 0
            while got < size:
                chunk = await reader.read(65536)
                assert chunk, f"ended after {got} bytes"
                assert chunk == b"z" * len(chunk)
                got += len(chunk)
            writer.write(get("/data/after"))
            assert await read_response(reader) == (200, b"ok /data/after")
            writer.close()

    run(loop, main)
    assert world.records[0].bytes_down > size


class BioClient:
    """A TLS client driven by hand, to send records exactly when a test wants."""

    def __init__(self, pki: Pki, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = client_ctx(pki).wrap_bio(self.incoming, self.outgoing, server_hostname=HOST)

    async def handshake(self, *, then: bytes = b"") -> None:
        """Handshake; `then` is sent in the same segment as the client's Finished."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    await loop.sock_sendall(self.sock, self.outgoing.read())
                self.incoming.write(await loop.sock_recv(self.sock, 65536))
        if then:
            self.obj.write(then)
        await loop.sock_sendall(self.sock, self.outgoing.read())

    async def read_all(self) -> bytes:
        """Plaintext until close_notify or FIN."""
        loop = asyncio.get_running_loop()
        out = b""
        while True:
            try:
                data = self.obj.read(65536)
                if not data:
                    return out
                out += data
            except ssl.SSLWantReadError:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    return out
                self.incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return out

    async def close_write(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        await asyncio.get_running_loop().sock_sendall(self.sock, self.outgoing.read())
        self.sock.shutdown(socket.SHUT_WR)


async def bio_client(pki: Pki, port: int) -> BioClient:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return BioClient(pki, sock)


@pytest.mark.parametrize("loop", LOOPS)
def test_request_in_the_handshake_flight_then_half_close(pki: Pki, loop: str) -> None:
    """The request arrives with the client's Finished (already decrypted when the
    relay starts), then close_notify and a FIN: the answer still comes back."""
    world = World(pki)

    async def main() -> None:
        async with world.up() as port:
            client = await bio_client(pki, port)
            await client.handshake(then=get("/data/early"))
            await asyncio.sleep(0.2)  # the request is answered before the client's end
            await client.close_write()
            response = await client.read_all()
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert response.endswith(b"ok /data/early")
            client.sock.close()

    run(loop, main)
    assert world.seen == ["GET /data/early HTTP/1.1"]
    assert world.server_ends == ["eof"]  # the client's end reached the server as an end
    assert world.stats[0].error is None


@pytest.mark.parametrize("loop", LOOPS)
def test_a_broken_record_resets_both_sides(pki: Pki, loop: str) -> None:
    world = World(pki)

    async def main() -> None:
        async with world.up() as port:
            client = await bio_client(pki, port)
            await client.handshake(then=get("/data/1"))
            assert (await asyncio.get_running_loop().sock_recv(client.sock, 65536))[:1] == b"\x17"
            # An application-data record whose MAC cannot verify.
            await asyncio.get_running_loop().sock_sendall(
                client.sock, b"\x17\x03\x03\x00\x20" + b"\x00" * 32
            )
            with contextlib.suppress(ConnectionError):
                rest = await asyncio.get_running_loop().sock_recv(client.sock, 65536)
                assert rest == b""
            client.sock.close()

    run(loop, main)
    assert world.stats[0].error == "client_error"
    assert world.seen == ["GET /data/1 HTTP/1.1"]
    assert world.server_ends == ["reset"]


@pytest.mark.parametrize("loop", LOOPS)
def test_upstream_session_resumed_for_the_same_job_only_and_requests_still_decided(
    pki: Pki, loop: str
) -> None:
    world = World(pki)

    async def one(port: int, method: str = "GET") -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(pki), server_hostname=HOST
        )
        writer.write(get("/data/x", method))
        status, _ = await read_response(reader)
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        return status

    async def main() -> None:
        async with world.up() as port:
            world.job = "job-a"
            assert await one(port) == 200
            assert await one(port) == 200
            # Resumed upstream, the same decisions: denied, 403, never sent.
            assert await one(port, "POST") == 403
            world.job = "job-b"
            assert await one(port) == 200

    run(loop, main)
    # A ticket is only known once a connection has ended: the first of each
    # job is a full handshake (the server's certificate verified), the next ones resume.
    assert world.resumed == [False, True, True, False]
    assert world.seen == ["GET /data/x HTTP/1.1"] * 3
    assert [r.status for r in world.records] == [200, 200, 403, 200]


@pytest.mark.parametrize("loop", LOOPS)
def test_server_end_behind_a_body_the_client_is_slow_to_read_comes_after_it(
    pki: Pki, loop: str
) -> None:
    """The server's close_notify and FIN arrive while the proxy has stopped reading
    it (the client reads slowly): the end is passed on only after every byte."""
    world = World(pki)
    size = 16 * 1024 * 1024  # well past the socket buffers and the relay's high-water mark

    def slow_client(port: int) -> int:
        # A blocking client in a thread: the loop under test is only the proxy's
        # (uvloop's own client-side TLS is not what is tested here).
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx(pki).wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            tls.sendall(get(f"/bytes/{size}/close"))
            time.sleep(0.5)  # the server has sent everything and closed
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200")
            got = len(body)
            while chunk := tls.recv(65536):
                got += len(chunk)
            return got

    async def main() -> None:
        async with world.up() as port:
            assert await asyncio.to_thread(slow_client, port) == size

    run(loop, main)
    assert world.server_ends == ["eof"]
    assert world.stats[0].error is None


@pytest.mark.parametrize("loop", LOOPS)
def test_records_in_one_segment_and_split_records_all_delivered(pki: Pki, loop: str) -> None:
    """`TlsTransport._deliver` stops reading when the memory BIO and the SSL object
    are empty instead of waiting for SSLWantReadError: a record split over two
    segments waits for its rest; a request in two records of one segment is
    read whole."""
    world = World(pki)

    async def main() -> None:
        loop_ = asyncio.get_running_loop()
        async with world.up() as port:
            client = await bio_client(pki, port)
            await client.handshake()
            client.obj.write(get("/data/split"))
            record = client.outgoing.read()
            await loop_.sock_sendall(client.sock, record[:7])
            await asyncio.sleep(0.1)
            await loop_.sock_sendall(client.sock, record[7:])
            request = get("/data/a")
            client.obj.write(request[:9])
            client.obj.write(request[9:])
            await loop_.sock_sendall(client.sock, client.outgoing.read())
            response = b""
            while not response.endswith(b"ok /data/a"):
                try:
                    response += client.obj.read(65536)
                except ssl.SSLWantReadError:
                    data = await asyncio.wait_for(loop_.sock_recv(client.sock, 65536), 5)
                    assert data, response
                    client.incoming.write(data)
            assert response.count(b"HTTP/1.1 200 OK\r\n") == 2
            client.sock.close()

    run(loop, main)
    assert world.seen == [f"GET /data/{p} HTTP/1.1" for p in ("split", "a")]
    assert world.stats[0].error is None
