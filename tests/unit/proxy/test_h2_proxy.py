"""`H2Proxy` between an HTTP/2 client and server (h2 on both ends), over local
socket pairs in one event loop: decisions per stream, flow control end to end,
the 403 and the end of the connection after it, resets, one record per stream."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy import http_rules
from egressd.proxy.h2_proxy import H2Proxy
from egressd.proxy.http_gate import RequestRecord

HOST = "api.allowed.test"


def decide(method: str, request: http_rules.RequestTarget, upgrade: str | None) -> Decision:
    if request.host != HOST:
        return Decision(Verdict.DENY, "host_sni_mismatch", None)
    if method in ("GET", "PUT") and request.path_text.startswith(("/bytes/", "/upload", "/slow")):
        return Decision(Verdict.ALLOW, "allowed_request", None)
    return Decision(Verdict.DENY, "method_not_allowed", None)


def text_headers(headers: object) -> dict[str, str]:
    """An h2 event's header list as text (h2 types it as bytes or str pairs)."""
    out: dict[str, str] = {}
    for name, value in headers:  # type: ignore[attr-defined]
        key = name.decode() if isinstance(name, bytes) else str(name)
        out[key] = value.decode() if isinstance(value, bytes) else str(value)
    return out


async def _server(sock: socket.socket, seen: list[tuple[str, str, int]]) -> None:
    """Answers ``/bytes/N`` with N bytes, ``/upload`` with the body's length; ``/slow``
    never answers (for resets). Sends within its windows."""
    loop = asyncio.get_running_loop()
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    await loop.sock_sendall(sock, conn.data_to_send())
    heads: dict[int, dict[str, str]] = {}
    sizes: dict[int, int] = {}
    pending: dict[int, bytes] = {}
    while data := await loop.sock_recv(sock, 65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                heads[event.stream_id] = text_headers(event.headers)
                sizes[event.stream_id] = 0
            elif isinstance(event, h2.events.DataReceived):
                sizes[event.stream_id] += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                head = heads[event.stream_id]
                seen.append((head[":method"], head[":path"], sizes[event.stream_id]))
                path = head[":path"]
                if path.startswith("/slow"):
                    continue
                body = (
                    b"z" * int(path.rsplit("/", 1)[1])
                    if path.startswith("/bytes/")
                    else str(sizes[event.stream_id]).encode()
                )
                conn.send_headers(event.stream_id, [(":status", "200")])
                pending[event.stream_id] = body
            elif isinstance(event, h2.events.StreamReset):
                seen.append(("RESET", heads[event.stream_id][":path"], 0))
        for sid, body in list(pending.items()):
            while body:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk, body = body[:window], body[window:]
                conn.send_data(sid, chunk, end_stream=not body)
            pending[sid] = body
            if not body:
                del pending[sid]
        await loop.sock_sendall(sock, conn.data_to_send())


@dataclass
class Client:
    sock: socket.socket
    conn: h2.connection.H2Connection = field(
        default_factory=lambda: h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
    )
    responses: dict[int, dict[str, Any]] = field(default_factory=dict)
    pending: dict[int, bytes] = field(default_factory=dict)
    terminated: bool = False

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.send()

    async def send(self) -> None:
        for sid, body in list(self.pending.items()):
            while body:
                window = min(
                    self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk, body = body[:window], body[window:]
                self.conn.send_data(sid, chunk, end_stream=not body)
            self.pending[sid] = body
            if not body:
                del self.pending[sid]
        await asyncio.get_running_loop().sock_sendall(self.sock, self.conn.data_to_send())

    async def request(
        self, method: str, path: str, body: bytes = b"", extra: list[tuple[str, str]] | None = None
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", HOST),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=not body)
        self.responses[sid] = {"status": None, "body": b"", "ended": False, "reset": None}
        if body:
            self.pending[sid] = body
        await self.send()
        return sid

    async def wait(self, *sids: int, until_closed: bool = False) -> None:
        loop = asyncio.get_running_loop()

        def done() -> bool:
            return all(self.responses[s]["ended"] or self.responses[s]["reset"] for s in sids)

        async with asyncio.timeout(5):
            while until_closed or not done():
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    return
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
                        self.terminated = True
                if not self.terminated:
                    await self.send()


@dataclass
class World:
    client: Client
    records: list[RequestRecord]
    seen: list[tuple[str, str, int]]
    proxy_task: asyncio.Task[None]
    server_task: asyncio.Task[None]


async def _world() -> World:
    loop = asyncio.get_running_loop()
    c_app, c_proxy = socket.socketpair()
    u_proxy, u_app = socket.socketpair()
    for sock in (c_app, c_proxy, u_proxy, u_app):
        sock.setblocking(False)
    records: list[RequestRecord] = []
    seen: list[tuple[str, str, int]] = []
    proxy = H2Proxy(decide, records.append)
    world = World(
        Client(c_app),
        records,
        seen,
        loop.create_task(proxy.run(c_proxy, u_proxy)),
        loop.create_task(_server(u_app, seen)),
    )
    await world.client.start()
    return world


async def _close(world: World) -> None:
    for task in (world.proxy_task, world.server_task):
        task.cancel()
    await asyncio.gather(world.proxy_task, world.server_task, return_exceptions=True)
    world.client.sock.close()


async def test_streams_with_flow_control_both_ways() -> None:
    world = await _world()
    client = world.client
    try:
        big = await client.request("GET", "/bytes/300000")  # past every initial window
        upload = await client.request("PUT", "/upload", body=b"u" * 200_000)
        small = await client.request("GET", "/bytes/5")
        await client.wait(big, upload, small)
        assert client.responses[big]["body"] == b"z" * 300_000
        assert client.responses[upload]["body"] == b"200000"
        assert (client.responses[small]["status"], client.responses[small]["body"]) == (
            200,
            b"zzzzz",
        )
        assert sorted(world.seen) == sorted(
            [("GET", "/bytes/300000", 0), ("PUT", "/upload", 200_000), ("GET", "/bytes/5", 0)]
        )
        await asyncio.sleep(0.05)
        by_path = {r.path: r for r in world.records}
        assert by_path["/bytes/300000"].bytes_down == 300_000
        assert by_path["/upload"].bytes_up == 200_000
        assert {r.status for r in world.records} == {200}
        assert {r.decision.reason for r in world.records} == {"allowed_request"}
    finally:
        await _close(world)


async def test_denied_request_gets_403_then_the_connection_ends() -> None:
    world = await _world()
    client = world.client
    try:
        ok = await client.request("GET", "/bytes/3")
        await client.wait(ok)
        denied = await client.request("POST", "/bytes/3", body=b"secret")
        await client.wait(denied)
        assert client.responses[denied]["status"] == 403
        body = json.loads(client.responses[denied]["body"])
        assert body == {"error": "method_not_allowed", "by": "egressd", "host": HOST}
        await client.wait(until_closed=True)
        assert client.terminated  # GOAWAY: nothing open was left to finish
        # The server never saw the denied request.
        assert world.seen == [("GET", "/bytes/3", 0)]
        assert [(r.method, r.status, r.decision.reason) for r in world.records] == [
            ("GET", 200, "allowed_request"),
            ("POST", 403, "method_not_allowed"),
        ]
    finally:
        await _close(world)


async def test_after_a_deny_new_streams_are_refused_and_open_ones_finish() -> None:
    world = await _world()
    client = world.client
    try:
        slow = await client.request("GET", "/slow/1")
        denied = await client.request("GET", "/admin")
        later = await client.request("GET", "/bytes/3")
        await client.wait(denied, later)
        assert client.responses[denied]["status"] == 403
        assert client.responses[later]["reset"] == h2.errors.ErrorCodes.REFUSED_STREAM
        assert not client.terminated  # the slow stream is still open
        # The client gives up on it: the reset reaches the server, then GOAWAY.
        client.conn.reset_stream(slow, h2.errors.ErrorCodes.CANCEL)
        await client.send()
        await client.wait(until_closed=True)
        assert client.terminated
        assert ("RESET", "/slow/1", 0) in world.seen
        assert ("GET", "/bytes/3", 0) not in world.seen
    finally:
        await _close(world)


async def test_authority_and_host_that_differ_end_the_connection() -> None:
    world = await _world()
    client = world.client
    # A client that sends them anyway (h2 refuses to, by default).
    client.conn.config.validate_outbound_headers = False
    try:
        await client.request("GET", "/bytes/1", extra=[("host", "other.test")])
        await client.wait(until_closed=True)
        assert client.terminated  # h2 answers a malformed header block with GOAWAY
        assert world.seen == []
    finally:
        await _close(world)
