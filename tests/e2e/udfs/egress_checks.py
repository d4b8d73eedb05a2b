"""A UDF for the e2e egress tests: run a batch of network checks, one JSON line each.

    python egress_checks.py CHECKS_JSON

CHECKS_JSON is ``{"checks": [...], "parallel": bool}`` (or just the list); each
check is an object with an ``id`` and a ``kind``:

    http        GET `url` with plain `requests` (TLS verified): status, JSON body
    download    stream `url` with `requests`, SHA-256 it: bytes, sha256, header, seconds
    concurrent  open `n` TCP connections to `host`:`port` (TLS when `tls`), keep them
                all open, send one HTTP GET on each, read every answer, then close
    getaddrinfo socket.getaddrinfo(`name`) through the sandbox's resolver
    dns         a DNS query built by hand, sent over UDP to `server`:`port`; the rcode
    tcp         connect to `host`:`port`, then (optionally) a TLS handshake with SNI
                `sni`, or an HTTP request with Host `http_host`, or just wait for
                bytes; the outcome says where it stopped and how
    udp         send a datagram to `host`:`port` and wait `timeout` for any answer
    tcp6        connect to an IPv6 address

Every outcome is data, never a crash: errors are classified (``reset``,
``timeout``, ``refused``, ``unreachable``, ``tls_error``, ``gaierror``,
``error``) with their exception type and errno. With ``"parallel": true`` the
checks run in threads (several timeouts at once); output keeps their order.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

Result = dict[str, Any]


def classify(exc: BaseException) -> Result:
    """An exception as data: the class the tests assert on, plus details."""
    out: Result = {"error": f"{type(exc).__name__}: {exc}", "exc": type(exc).__name__}
    err = getattr(exc, "errno", None)
    if isinstance(err, int):
        out["errno"] = errno.errorcode.get(err, str(err))
    if isinstance(exc, socket.gaierror):
        out["outcome"] = "gaierror"
        out["gai_code"] = exc.args[0] if exc.args else None
    elif isinstance(exc, ConnectionResetError) or err == errno.ECONNRESET:
        out["outcome"] = "reset"
    elif isinstance(exc, ConnectionRefusedError):
        out["outcome"] = "refused"
    elif isinstance(exc, (TimeoutError, socket.timeout)):
        out["outcome"] = "timeout"
    elif err in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        out["outcome"] = "unreachable"
    elif isinstance(exc, ssl.SSLError):
        out["outcome"] = "tls_error"
    elif isinstance(exc, requests.exceptions.Timeout):  # first: ConnectTimeout is both
        out["outcome"] = "timeout"
    elif isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        inner = exc.args[0]
        reason = getattr(inner, "reason", inner)
        out["outcome"] = "reset" if "reset" in str(reason).lower() else "error"
    else:
        out["outcome"] = "error"
    return out


# --- checks ------------------------------------------------------------------


def check_http(c: Result) -> Result:
    resp = requests.get(c["url"], timeout=c.get("timeout", 10), headers=c.get("headers"))
    out: Result = {"outcome": "ok", "status": resp.status_code}
    try:
        out["json"] = resp.json()
    except ValueError:
        out["text"] = resp.text[:200]
    return out


def check_download(c: Result) -> Result:
    start = time.monotonic()
    h = hashlib.sha256()
    size = 0
    with requests.get(c["url"], stream=True, timeout=c.get("timeout", 30)) as resp:
        header = resp.headers.get(c.get("header", "X-Content-SHA256"))
        for chunk in resp.iter_content(chunk_size=1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {
        "outcome": "ok",
        "status": resp.status_code,
        "bytes": size,
        "sha256": h.hexdigest(),
        "header_sha256": header,
        "seconds": round(time.monotonic() - start, 3),
    }


async def _concurrent(c: Result) -> Result:
    host, port, n = c["host"], int(c["port"]), int(c["n"])
    tls = ssl.create_default_context() if c.get("tls") else None
    timeout = float(c.get("timeout", 30))
    request = (f"GET {c.get('path', '/data')} HTTP/1.1\r\nHost: {host}\r\n\r\n").encode()

    async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sni = host if tls else None
        return await asyncio.open_connection(host, port, ssl=tls, server_hostname=sni)

    start = time.monotonic()
    conns = await asyncio.wait_for(
        asyncio.gather(*(opened() for _ in range(n)), return_exceptions=True), timeout
    )
    open_ok = [x for x in conns if isinstance(x, tuple)]
    errors = [classify(x)["error"] for x in conns if isinstance(x, BaseException)]
    # Every connection is open at once; now each completes a GET on its own socket.
    for _, writer in open_ok:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader) -> int:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        if host.encode() not in body:
            raise ValueError(f"body does not name {host}: {body[:100]!r}")
        return status

    statuses = await asyncio.wait_for(
        asyncio.gather(*(answer(r) for r, _ in open_ok), return_exceptions=True), timeout
    )
    still_open = sum(1 for r, _ in open_ok if not r.at_eof())
    for _, writer in open_ok:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in open_ok), return_exceptions=True)
    ok = sum(1 for s in statuses if s == 200)
    errors += [classify(s)["error"] for s in statuses if isinstance(s, BaseException)]
    return {
        "outcome": "ok" if ok == n else "error",
        "opened": len(open_ok),
        "ok": ok,
        "open_at_end": still_open,
        "errors": errors[:5],
        "n_errors": len(errors),
        "seconds": round(time.monotonic() - start, 3),
    }


def check_concurrent(c: Result) -> Result:
    return asyncio.run(_concurrent(c))


def check_getaddrinfo(c: Result) -> Result:
    socket.setdefaulttimeout(c.get("timeout", 5))
    infos = socket.getaddrinfo(c["name"], c.get("port", 443), socket.AF_INET, socket.SOCK_STREAM)
    return {"outcome": "ok", "addresses": sorted({str(i[4][0]) for i in infos})}


QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "TXT": 16, "AAAA": 28, "ANY": 255}
RESOLVER = "100.100.100.53"  # the sandbox's resolv.conf names it
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def dns_query(name: str, qtype: int, qid: int) -> bytes:
    """A standard query with RD set, one question, no EDNS: RFC 1035 4.1 by hand."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def check_dns(c: Result) -> Result:
    qtype = QTYPES[c.get("qtype", "A")]
    qid = int.from_bytes(os.urandom(2), "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(c.get("timeout", 3))
        server = (c.get("server", RESOLVER), int(c.get("port", 53)))
        sock.sendto(dns_query(c["name"], qtype, qid), server)
        reply, peer = sock.recvfrom(4096)
    rid, flags, _qd, an, _ns, _ar = struct.unpack("!HHHHHH", reply[:12])
    rcode = flags & 0xF
    return {
        "outcome": "answer",
        "id_matches": rid == qid,
        "qr": bool(flags & 0x8000),
        "rcode": rcode,
        "rcode_text": RCODES.get(rcode, str(rcode)),
        "ancount": an,
        "tc": bool(flags & 0x0200),
        "size": len(reply),
        "peer": f"{peer[0]}:{peer[1]}",
    }


def http_get(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def check_tcp(c: Result) -> Result:
    timeout = float(c.get("timeout", 3))
    stage = "connect"
    sock = socket.create_connection((c["host"], int(c["port"])), timeout=timeout)
    try:
        sock.settimeout(timeout)
        if c.get("sni"):
            stage = "tls_handshake"
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = ctx.wrap_socket(sock, server_hostname=c["sni"])
            sock = tls
            stage = "tls_read"
            tls.sendall(http_get(c["sni"]))
        elif c.get("http_host"):
            stage = "http_read"
            sock.sendall(http_get(c["http_host"]))
        else:
            stage = "read"  # say nothing: the proxy decides without a name
        data = sock.recv(4096)
    except (OSError, ssl.SSLError) as exc:
        return {**classify(exc), "stage": stage}
    finally:
        sock.close()
    head = data[:64].decode("latin-1")
    return {"outcome": "data" if data else "eof", "stage": stage, "head": head}


def check_udp(c: Result) -> Result:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(float(c.get("timeout", 2)))
        payload = c.get("payload", "egressd-e2e-udp").encode()
        sock.sendto(payload, (c["host"], int(c["port"])))
        try:
            data, peer = sock.recvfrom(4096)
        except TimeoutError:
            return {"outcome": "no_reply"}
        return {"outcome": "reply", "peer": f"{peer[0]}:{peer[1]}", "bytes": len(data)}


def check_tcp6(c: Result) -> Result:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.settimeout(float(c.get("timeout", 3)))
        sock.connect((c["host"], int(c["port"])))
    return {"outcome": "connected"}


KINDS = {
    "http": check_http,
    "download": check_download,
    "concurrent": check_concurrent,
    "getaddrinfo": check_getaddrinfo,
    "dns": check_dns,
    "tcp": check_tcp,
    "udp": check_udp,
    "tcp6": check_tcp6,
}


def run_one(c: Result) -> Result:
    start = time.monotonic()
    try:
        out = KINDS[c["kind"]](c)
    except (OSError, ssl.SSLError, requests.RequestException, TimeoutError, ValueError) as exc:
        out = classify(exc)
    ms = round((time.monotonic() - start) * 1000, 1)
    return {"id": c["id"], "kind": c["kind"], **out, "ms": ms}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if isinstance(spec, list):
        spec = {"checks": spec}
    checks, parallel = spec["checks"], bool(spec.get("parallel", False))
    if parallel:
        with ThreadPoolExecutor(max_workers=len(checks)) as pool:
            results = list(pool.map(run_one, checks))
    else:
        results = [run_one(c) for c in checks]
    for result in results:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
