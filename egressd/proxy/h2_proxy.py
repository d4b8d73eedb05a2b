"""HTTP/2 through interception: each request decided as on HTTP/1.1, streams re-issued upstream.

HTTP/2 cannot be gated by forwarding the client's bytes: the header blocks of
one direction share one HPACK state, so leaving out a denied request's frames
would corrupt every later header block. So when ALPN settled on ``h2`` with
both sides (`egressd.proxy.tls_intercept`), the proxy ends HTTP/2 on both
(h2, sans-IO) and re-issues each allowed request upstream:

* A request (``HEADERS`` opening a stream) is decided by `decide`, the very
  function the HTTP/1.1 gate takes (method, a `RequestTarget` of ``:path``
  and ``:authority`` (or ``host``; both and different: ``http_malformed``)).
  Allowed: a stream is opened upstream with the client's header list (h2 has
  validated it: pseudo-headers, no connection-specific fields). Denied: the
  stream gets ``403`` with the same JSON body as HTTP/1.1, no new stream is
  accepted after it (``REFUSED_STREAM``), and the connection ends with
  GOAWAY once the streams already open are done, as HTTP/1.1 closes after a
  403. A decision that would need the proxy's own DNS resolution cannot
  occur here (the Host must be the SNI) and denies if it does.
* Data, trailers, ``RST_STREAM`` and 1xx responses go across per stream.
  Flow control is end to end: what one side sent is acknowledged to it
  (its window reopened) only once it has been handed to the other side
  within that side's window, so a slow reader slows its peer down instead
  of filling the proxy's memory. Server push is disabled upstream.
* One `RequestRecord` per stream (`on_request`), with the status the server
  answered and the bytes of its bodies, as for HTTP/1.1.

It works on two connected plain sockets (the relay's side toward the client,
and the upstream TLS connection's plaintext side, `tls_intercept.bridge`),
so pacing, timeouts and live policy changes stay the relay's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from egressd.policy.matcher import Decision, Verdict
from egressd.proxy import http_rules
from egressd.proxy.http_gate import DENY_STATUS, Decide, RequestRecord, deny_response

_BUFFER = 64 * 1024
_CLIENT = "client"
_UPSTREAM = "upstream"


@dataclass(slots=True)
class _Outbox:
    """What waits for one stream's send window on one side: (data, bytes to
    acknowledge to the other side once sent), then trailers or the end."""

    chunks: collections.deque[tuple[bytes, int]] = field(default_factory=collections.deque)
    trailers: list[tuple[bytes, bytes]] | None = None
    end: bool = False
    done: bool = False


def _deny_parts(reason: str, host: str | None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 403's header list and body (the HTTP/1.1 gate's body, `deny_response`)."""
    body = deny_response(reason, host=host).split(b"\r\n\r\n", 1)[1]
    headers = [
        (b":status", str(DENY_STATUS).encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return headers, body


class H2Proxy:
    """One intercepted HTTP/2 connection: `run(client, upstream)` until either ends."""

    def __init__(self, decide: Decide, on_request: Callable[[RequestRecord], None]) -> None:
        self._decide = decide
        self._on_request = on_request
        self._c = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._u = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._up_of: dict[int, int] = {}  # client stream -> upstream stream
        self._client_of: dict[int, int] = {}  # upstream stream -> client stream
        self._records: dict[int, RequestRecord] = {}  # by client stream
        self._outboxes: dict[tuple[str, int], _Outbox] = {}
        self._denied = False  # a request was denied: no new stream, GOAWAY when idle
        self._finished = asyncio.Event()
        self.requests = 0

    async def run(self, client: socket.socket, upstream: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._client_sock, self._upstream_sock = client, upstream
        self._locks = {_CLIENT: asyncio.Lock(), _UPSTREAM: asyncio.Lock()}
        self._c.initiate_connection()
        self._u.initiate_connection()
        self._u.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 0})
        await self._flush()
        readers = [
            loop.create_task(self._read(client, self._c, self._from_client)),
            loop.create_task(self._read(upstream, self._u, self._from_upstream)),
        ]
        finished = loop.create_task(self._finished.wait())
        try:
            await asyncio.wait([*readers, finished], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*readers, finished):
                task.cancel()
            await asyncio.gather(*readers, finished, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), 1.0)
            for record in self._records.values():
                self._on_request(record)
            self._records.clear()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    async def _read(
        self,
        sock: socket.socket,
        conn: h2.connection.H2Connection,
        handle: Callable[[h2.events.Event], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(sock, _BUFFER):
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                return  # h2 queued its GOAWAY; `run` flushes it
            for event in events:
                handle(event)
            await self._flush()
            if self._denied and not self._records and not self._finished.is_set():
                self._c.close_connection()
                await self._flush()
                self._finished.set()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for side, conn, sock in (
            (_CLIENT, self._c, self._client_sock),
            (_UPSTREAM, self._u, self._upstream_sock),
        ):
            async with self._locks[side]:
                data = conn.data_to_send()
                if data:
                    await loop.sock_sendall(sock, data)

    # --- the client's events ------------------------------------------------------------

    def _from_client(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            record = self._records.get(event.stream_id)
            up = self._up_of.get(event.stream_id)
            if record is None or up is None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            record.bytes_up += len(event.data)
            self._queue(_UPSTREAM, up, event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                self._queue_end(_UPSTREAM, up)
        elif isinstance(event, h2.events.StreamEnded):
            up = self._up_of.get(event.stream_id)
            if up is not None and not self._outbox(_UPSTREAM, up).end:
                self._queue_end(_UPSTREAM, up)
        elif isinstance(event, h2.events.TrailersReceived):
            up = self._up_of.get(event.stream_id)
            if up is not None:
                self._outbox(_UPSTREAM, up).trailers = list(event.headers)
                self._queue_end(_UPSTREAM, up)
        elif isinstance(event, h2.events.StreamReset):
            up = self._up_of.get(event.stream_id)
            if up is not None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._u.reset_stream(up, h2.errors.ErrorCodes.CANCEL)
            self._stream_done(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._drain_all(_CLIENT, getattr(event, "stream_id", 0))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._finished.set()

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        fields = [(bytes(k), bytes(v)) for k, v in event.headers]
        pseudo = {k.decode("latin-1"): v.decode("latin-1") for k, v in fields if k.startswith(b":")}
        hosts = {v.decode("latin-1") for k, v in fields if k == b"host"}
        method = pseudo.get(":method", "")
        authority = pseudo.get(":authority")
        if authority is not None:
            hosts.add(authority)
        host = next(iter(hosts)) if len(hosts) == 1 else None
        target = (authority or "") if method == http_rules.CONNECT else pseudo.get(":path", "")
        request = http_rules.request_target(method, target, host)
        record = RequestRecord(
            method=method,
            path=request.path_text,
            host=request.host,
            decision=Decision(Verdict.DENY, http_rules.HTTP_MALFORMED, None),
        )
        self.requests += 1
        if self._denied:
            # After a denied request, as HTTP/1.1 ends the connection: nothing new.
            self._c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if len(hosts) > 1:
            self._refuse(sid, record, http_rules.HTTP_MALFORMED)
            return
        decided: Any = self._decide(method, request, None)
        if inspect.isawaitable(decided):
            # Only a Host other than the SNI could need the proxy's own
            # resolution, and that is denied before; never wait here.
            close = getattr(decided, "close", None)
            if close is not None:
                close()
            decided = Decision(Verdict.DENY, http_rules.HOST_ADDRESS_MISMATCH, None)
        record.decision = getattr(decided, "decision", decided)
        record.would_deny = bool(getattr(decided, "would_deny", False))
        if not decided.allowed:
            self._refuse(sid, record, record.decision.reason)
            return
        up = self._u.get_next_available_stream_id()
        try:
            self._u.send_headers(up, fields, end_stream=event.stream_ended is not None)
        except h2.exceptions.TooManyStreamsError:
            self._c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._on_request(record)
            return
        self._records[sid] = record
        self._up_of[sid] = up
        self._client_of[up] = sid
        if event.stream_ended is not None:  # no body: this direction is over
            box = self._outbox(_UPSTREAM, up)
            box.end = box.done = True

    def _refuse(self, sid: int, record: RequestRecord, reason: str) -> None:
        if record.decision.reason != reason or record.decision.allowed:
            record.decision = Decision(Verdict.DENY, reason, record.decision.rule)
        headers, body = _deny_parts(reason, record.host)
        self._c.send_headers(sid, headers)
        self._c.send_data(sid, body, end_stream=True)
        record.status = DENY_STATUS
        record.bytes_down = len(body)
        self._denied = True
        self._on_request(record)

    # --- the server's events ----------------------------------------------------------------

    def _from_upstream(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            sid = self._client_of.get(event.stream_id)
            if sid is None:
                return
            headers = list(event.headers)
            record = self._records.get(sid)
            if record is not None and isinstance(event, h2.events.ResponseReceived):
                status = dict(headers).get(b":status", b"")
                record.status = int(status) if status.isdigit() else None
            end = (
                event.stream_ended is not None
                if isinstance(event, h2.events.ResponseReceived)
                else False
            )
            self._c.send_headers(sid, headers, end_stream=end)
            if end:
                box = self._outbox(_CLIENT, sid)
                box.end = box.done = True
                self._check_done(sid)
        elif isinstance(event, h2.events.DataReceived):
            sid = self._client_of.get(event.stream_id)
            if sid is None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._u.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            record = self._records.get(sid)
            if record is not None:
                record.bytes_down += len(event.data)
            self._queue(_CLIENT, sid, event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                self._queue_end(_CLIENT, sid)
        elif isinstance(event, h2.events.StreamEnded):
            sid = self._client_of.get(event.stream_id)
            if sid is not None and not self._outbox(_CLIENT, sid).end:
                self._queue_end(_CLIENT, sid)
        elif isinstance(event, h2.events.TrailersReceived):
            sid = self._client_of.get(event.stream_id)
            if sid is not None:
                self._outbox(_CLIENT, sid).trailers = list(event.headers)
                self._queue_end(_CLIENT, sid)
        elif isinstance(event, h2.events.StreamReset):
            sid = self._client_of.get(event.stream_id)
            if sid is not None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._c.reset_stream(sid, event.error_code)
                self._stream_done(sid)
        elif isinstance(event, h2.events.PushedStreamReceived):
            if event.pushed_stream_id is not None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._u.reset_stream(
                        event.pushed_stream_id, h2.errors.ErrorCodes.REFUSED_STREAM
                    )
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._drain_all(_UPSTREAM, getattr(event, "stream_id", 0))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._finished.set()

    # --- flow control ---------------------------------------------------------------------

    def _outbox(self, side: str, sid: int) -> _Outbox:
        box = self._outboxes.get((side, sid))
        if box is None:
            box = self._outboxes[(side, sid)] = _Outbox()
        return box

    def _queue(self, side: str, sid: int, data: bytes, flow: int) -> None:
        self._outbox(side, sid).chunks.append((data, flow))
        self._drain(side, sid)

    def _queue_end(self, side: str, sid: int) -> None:
        self._outbox(side, sid).end = True
        self._drain(side, sid)

    def _drain_all(self, side: str, stream_id: int) -> None:
        if stream_id:
            if (side, stream_id) in self._outboxes:
                self._drain(side, stream_id)
            return
        for key_side, sid in list(self._outboxes):
            if key_side == side:
                self._drain(side, sid)

    def _drain(self, side: str, sid: int) -> None:
        """Send what the window of `side`'s stream `sid` allows; acknowledge it to
        the other side; then the trailers or the end."""
        box = self._outboxes.get((side, sid))
        if box is None or box.done:
            return
        dst, src = (self._c, self._u) if side == _CLIENT else (self._u, self._c)
        src_sid = self._up_of.get(sid) if side == _CLIENT else self._client_of.get(sid)
        try:
            while box.chunks:
                data, flow = box.chunks[0]
                window = min(dst.local_flow_control_window(sid), dst.max_outbound_frame_size)
                if window <= 0:
                    return
                if len(data) > window:
                    # Part of it: the rest waits; acknowledge in proportion at the end.
                    dst.send_data(sid, data[:window])
                    box.chunks[0] = (data[window:], flow)
                    continue
                dst.send_data(sid, data)
                box.chunks.popleft()
                if src_sid is not None and flow:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        src.acknowledge_received_data(flow, src_sid)
            if box.end:
                if box.trailers is not None:
                    dst.send_headers(sid, box.trailers, end_stream=True)
                else:
                    dst.end_stream(sid)
                box.done = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            box.chunks.clear()
            box.done = True
        if box.done:
            client_sid = sid if side == _CLIENT else self._client_of.get(sid)
            if client_sid is not None:
                self._check_done(client_sid)

    def _check_done(self, sid: int) -> None:
        """A stream is over once both directions have ended."""
        up = self._up_of.get(sid)
        if up is None:
            return
        towards_client = self._outboxes.get((_CLIENT, sid))
        towards_server = self._outboxes.get((_UPSTREAM, up))
        if (
            towards_client is not None
            and towards_client.done
            and (towards_server is not None and towards_server.done)
        ):
            self._stream_done(sid)

    def _stream_done(self, sid: int) -> None:
        record = self._records.pop(sid, None)
        up = self._up_of.pop(sid, None)
        if up is not None:
            self._client_of.pop(up, None)
            self._outboxes.pop((_UPSTREAM, up), None)
        self._outboxes.pop((_CLIENT, sid), None)
        if record is not None:
            self._on_request(record)
