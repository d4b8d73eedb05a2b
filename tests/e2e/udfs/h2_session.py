"""A UDF for the HTTP/2 e2e test: one TLS connection, HTTP/2 (h2), several streams.

    python h2_session.py HOST PORT STEPS_JSON

The TLS connection verifies the server with the sandbox's CA bundle and offers
``h2`` and ``http/1.1`` by ALPN. STEPS_JSON is a list of ``{"id", "method",
"path", "body"?, "authority"?}``, all sent at once on the one connection. Prints
one JSON line with the negotiated ALPN, then one per step: its id, ``status``,
the body as ``json`` (or its ``length``), or ``reset`` (an error code), and a
last line ``{"goaway": bool}``.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def main() -> int:
    host, port, steps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    ctx = ssl.create_default_context(cafile=CA_BUNDLE)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=host)
    print(json.dumps({"alpn": sock.selected_alpn_protocol()}), flush=True)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    streams: dict[int, dict[str, object]] = {}
    bodies: dict[int, bytes] = {}
    for step in steps:
        sid = conn.get_next_available_stream_id()
        body = str(step.get("body", "")).encode()
        headers = [
            (":method", step["method"]),
            (":path", step["path"]),
            (":scheme", "https"),
            (":authority", step.get("authority", host)),
        ]
        conn.send_headers(sid, headers, end_stream=not body)
        if body:
            conn.send_data(sid, body, end_stream=True)  # small: within the initial window
        streams[sid] = {"id": step["id"]}
        bodies[sid] = b""
    sock.sendall(conn.data_to_send())
    goaway = False
    open_ = set(streams)
    try:
        while open_:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                sid = getattr(event, "stream_id", 0)
                if isinstance(event, h2.events.ResponseReceived):
                    streams[sid]["status"] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    bodies[sid] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    open_.discard(sid)
                elif isinstance(event, h2.events.StreamReset):
                    streams[sid]["reset"] = int(event.error_code)
                    open_.discard(sid)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    goaway = True
            sock.sendall(conn.data_to_send())
        # After a denied stream the proxy ends the connection: wait for its GOAWAY.
        sock.settimeout(3)
        while not goaway and (data := sock.recv(65536)):
            goaway = any(
                isinstance(e, h2.events.ConnectionTerminated) for e in conn.receive_data(data)
            )
    except (OSError, ssl.SSLError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    for sid, out in streams.items():
        try:
            out["json"] = json.loads(bodies[sid])
        except ValueError:
            out["length"] = len(bodies[sid])
        print(json.dumps(out), flush=True)
    print(json.dumps({"goaway": goaway}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
