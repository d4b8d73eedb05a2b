"""Example UDF: GET one URL with plain `requests`, print what came back.

    python fetch_allowed.py URL [--timeout S]

Prints one JSON line: {"url", "status", "bytes", "sha256"} and exits 0 for a
2xx answer, 1 for any other status; on a connection or TLS error it prints
{"url", "error"} and exits 2. No proxy settings, no SDK: egress is transparent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        resp = requests.get(args.url, timeout=args.timeout)
    except requests.RequestException as exc:
        print(json.dumps({"url": args.url, "error": f"{type(exc).__name__}: {exc}"}))
        return 2
    body = resp.content
    print(
        json.dumps(
            {
                "url": args.url,
                "status": resp.status_code,
                "bytes": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )
    )
    return 0 if resp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
