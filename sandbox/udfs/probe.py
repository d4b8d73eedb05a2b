"""Example UDF: try a list of targets, print one JSON line per attempt.

    python probe.py TARGET... [--timeout S]

A target is one of

    http://HOST[:PORT]/PATH, https://...   GET with plain `requests` (TLS verified)
    tcp://HOST:PORT                        a bare TCP connect
    dns:NAME                               a lookup through the sandbox's resolver

Each line is {"target", "ok", ...}: `status` for HTTP, `addresses` for DNS,
`error` when the attempt failed, and `ms`. Denied egress shows up as an error
(a reset, REFUSED, a timeout), never as a crash. Exits 0 when every attempt
ran, whatever the outcomes; 2 on a target it cannot parse.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import requests


def _http(target: str, timeout: float) -> dict[str, Any]:
    resp = requests.get(target, timeout=timeout)
    return {"ok": resp.ok, "status": resp.status_code}


def _tcp(target: str, timeout: float) -> dict[str, Any]:
    parts = urlsplit(target)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{target}: expected tcp://HOST:PORT")
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
        return {"ok": True}


def _dns(target: str, timeout: float) -> dict[str, Any]:
    name = target.removeprefix("dns:")
    socket.setdefaulttimeout(timeout)
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return {"ok": True, "addresses": sorted({str(info[4][0]) for info in infos})}


def attempt(target: str, timeout: float) -> dict[str, Any]:
    if target.startswith(("http://", "https://")):
        kind = _http
    elif target.startswith("tcp://"):
        kind = _tcp
    elif target.startswith("dns:"):
        kind = _dns
    else:
        raise ValueError(f"{target}: expected http(s)://, tcp:// or dns:")
    start = time.monotonic()
    try:
        result = kind(target, timeout)
    except (OSError, requests.RequestException) as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["ms"] = round((time.monotonic() - start) * 1000, 1)
    return {"target": target, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    for target in args.targets:
        try:
            line = attempt(target, args.timeout)
        except ValueError as exc:
            print(f"probe: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
