"""A UDF that tries to slip a denied SNI past tier 2 with a plain socket.

    python client_hello_probe.py ALLOWED_NAME SNI PAUSE_S

It resolves ALLOWED_NAME through the sandbox's resolver (the proxy's DNS then
knows the job asked for it at that address), connects to that address on 443
and sends a real ClientHello (Python's ssl, into a memory BIO) naming SNI, in
two ways, one JSON line each:

    slow     the first 100 bytes, a pause of PAUSE_S, then the rest
    padded   the whole hello at once, padded (RFC 7685) to 20,000 bytes, past
             the 16 KiB the proxy used to peek

Each outcome says whether the connection was reset, closed or answered, and
the local address the proxy logs as ``source``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import sys
import time
from typing import Any

PADDED_TOTAL = 20_000
PADDING = 0x0015


def real_client_hello(sni: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def padded(hello: bytes, total: int) -> bytes:
    """`hello` (one record) with a padding extension, in 16 KiB records, `total` bytes long."""
    message = hello[5:]
    body = message[4:]
    pos = 2 + 32
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    exts = _without_padding(body[pos + 2 : pos + 2 + ext_len])
    head = body[:pos]
    for pad in range(max(0, total - len(hello) - 40), total):
        new_exts = exts + struct.pack("!HH", PADDING, pad) + bytes(pad)
        new_body = head + struct.pack("!H", len(new_exts)) + new_exts
        new_message = b"\x01" + len(new_body).to_bytes(3, "big") + new_body
        wire = b"".join(
            b"\x16\x03\x01"
            + struct.pack("!H", len(new_message[i : i + 16384]))
            + new_message[i : i + 16384]
            for i in range(0, len(new_message), 16384)
        )
        if len(wire) == total:
            return wire
    raise ValueError("no padding fits")


def _without_padding(exts: bytes) -> bytes:
    """The extensions block without OpenSSL's own padding extension (one of each type)."""
    out, pos = bytearray(), 0
    while pos < len(exts):
        ext_type, length = struct.unpack("!HH", exts[pos : pos + 4])
        if ext_type != PADDING:
            out += exts[pos : pos + 4 + length]
        pos += 4 + length
    return bytes(out)


def attempt(address: str, pieces: list[bytes | float]) -> dict[str, Any]:
    sock = socket.create_connection((address, 443), timeout=10)
    out: dict[str, Any] = {"source": "{}:{}".format(*sock.getsockname()[:2])}
    try:
        for piece in pieces:
            if isinstance(piece, float):
                time.sleep(piece)
            else:
                sock.sendall(piece)
        data = sock.recv(4096)
        out["outcome"] = "data" if data else "eof"
        out["head"] = data[:40].decode("latin-1")
    except ConnectionResetError:
        out["outcome"] = "reset"
    except BrokenPipeError:
        out["outcome"] = "reset"
    except OSError as exc:
        out["outcome"] = f"error: {exc!r}"
    finally:
        sock.close()
    return out


def main(argv: list[str]) -> int:
    allowed, sni, pause = argv[0], argv[1], float(argv[2])
    address = str(socket.getaddrinfo(allowed, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    hello = real_client_hello(sni)
    checks: dict[str, list[bytes | float]] = {
        "slow": [hello[:100], pause, hello[100:]],
        "padded": [padded(hello, PADDED_TOTAL)],
    }
    for name, pieces in checks.items():
        result = attempt(address, pieces)
        print(json.dumps({"id": name, "address": address, "hello_bytes": len(hello), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
