"""HTTP from inside a namespace, without a child process.

The CLI runs in the host's namespace, which has no route into the fleet; a
socket created inside a member namespace (`netns_socket`) reaches the
underlay as that member would.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass

from egressd.errors import EgressdError
from egressd.net import netns as kn


class ProbeError(EgressdError):
    """An HTTP exchange inside a namespace that failed below HTTP."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def http_request(
    ns: str,
    method: str,
    host: str,
    port: int,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 2.0,
) -> Reply:
    try:
        sock = kn.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    except kn.NetError as exc:
        raise ProbeError("no_socket", exc.detail) from exc
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        sock.settimeout(timeout_s)
        sock.connect((host, port))
        conn.sock = sock
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.read())
    except (OSError, http.client.HTTPException) as exc:
        raise ProbeError(
            "http_failed", f"{method} http://{host}:{port}{path} in {ns}: {exc}"
        ) from exc
    finally:
        conn.close()
        sock.close()


def is_ready(ns: str, host: str, port: int, path: str = "/readyz") -> bool:
    try:
        return http_request(ns, "GET", host, port, path, timeout_s=1.0).status == 200
    except ProbeError:
        return False
