"""An HTTP/2 site for the test internet (h2 by ALPN only): what HTTP/2 through
an intercepting proxy is shown against (`egressd_harness.topology.inet`).

Every request gets ``200`` and JSON ``{"site": <:authority without port>,
"path", "method", "protocol": "h2", "client": <peer IP>, "body_bytes"}``;
``GET /bytes/{n}`` gets n bytes (at most 16 MiB). Responses are sent within
the client's flow-control windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import h2.config
import h2.connection
import h2.events
import h2.exceptions

MAX_BYTES = 16 * 1024 * 1024


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def h2_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def serve_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/2 connection, until the client closes it."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    peer = writer.get_extra_info("peername")
    heads: dict[int, dict[str, str]] = {}
    sizes: dict[int, int] = {}
    pending: dict[int, bytes] = {}
    with contextlib.suppress(ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    heads[event.stream_id] = {_text(k): _text(v) for k, v in event.headers}
                    sizes[event.stream_id] = 0
                elif isinstance(event, h2.events.DataReceived):
                    sizes[event.stream_id] = sizes.get(event.stream_id, 0) + len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in heads:
                    pending[event.stream_id] = _answer(
                        conn,
                        event.stream_id,
                        heads.pop(event.stream_id),
                        sizes.pop(event.stream_id, 0),
                        peer,
                    )
                elif isinstance(event, h2.events.StreamReset):
                    pending.pop(event.stream_id, None)
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
            writer.write(conn.data_to_send())
            await writer.drain()
    writer.close()


def _answer(
    conn: h2.connection.H2Connection, sid: int, head: dict[str, str], size: int, peer: object
) -> bytes:
    path = head.get(":path", "/")
    if path.startswith("/bytes/") and path[7:].isdigit() and int(path[7:]) <= MAX_BYTES:
        body = b"x" * int(path[7:])
        content_type = "application/octet-stream"
    else:
        about = {
            "site": head.get(":authority", "").rsplit(":", 1)[0],
            "path": path.split("?", 1)[0],
            "method": head.get(":method", ""),
            "protocol": "h2",
            "client": peer[0] if isinstance(peer, tuple) else None,
            "body_bytes": size,
        }
        body = json.dumps(about).encode()
        content_type = "application/json"
    conn.send_headers(
        sid,
        [(":status", "200"), ("content-type", content_type), ("content-length", str(len(body)))],
    )
    return body
