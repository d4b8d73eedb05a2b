"""A UDF for the tier-1 refusal e2e test: how fast does a denied connection fail?

    python denied_connect.py TARGETS_JSON

TARGETS_JSON is a list of ``{"id", "kind": "socket"|"requests", "host", "port"|"url",
"timeout"}``. Each target prints one JSON line: its id, ``outcome`` (``refused``,
``timeout``, ``connected``, ``error``), the errno name when there is one, the
exception text, and ``ms``, the wall time the attempt took.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time
from typing import Any

import requests


def attempt_socket(t: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(float(t.get("timeout", 5)))
        sock.connect((t["host"], int(t["port"])))
    return {"outcome": "connected"}


def attempt_requests(t: dict[str, Any]) -> dict[str, Any]:
    resp = requests.get(t["url"], timeout=float(t.get("timeout", 5)))
    return {"outcome": "connected", "status": resp.status_code}


def classify(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"}
    err = getattr(exc, "errno", None)
    if isinstance(err, int):
        out["errno"] = errno.errorcode.get(err, str(err))
    text = str(exc).lower()
    if isinstance(exc, ConnectionRefusedError) or "refused" in text:
        out["outcome"] = "refused"
    elif isinstance(exc, (TimeoutError, requests.exceptions.Timeout)) or "timed out" in text:
        out["outcome"] = "timeout"
    else:
        out["outcome"] = "error"
    return out


def main() -> int:
    for target in json.loads(sys.argv[1]):
        run = attempt_requests if target.get("kind") == "requests" else attempt_socket
        start = time.monotonic()
        try:
            result = run(target)
        except (OSError, requests.exceptions.RequestException) as exc:
            result = classify(exc)
        result["ms"] = round((time.monotonic() - start) * 1000, 3)
        print(json.dumps({"id": target["id"], **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
