"""A UDF for the per-request e2e test: one `requests.Session` (keep-alive), several requests.

    python http_session.py STEPS_JSON

STEPS_JSON is a list of ``{"id", "method", "url", "headers"?, "data"?}``, run in
order on one Session, so requests to one host reuse one connection while the
server keeps it open. Each step prints one JSON line: its id, ``status``, the
body as ``json`` (or ``text``), or ``error`` when the request failed.
"""

from __future__ import annotations

import json
import sys

import requests


def main() -> int:
    with requests.Session() as session:
        for step in json.loads(sys.argv[1]):
            out: dict[str, object] = {"id": step["id"]}
            try:
                resp = session.request(
                    step["method"],
                    step["url"],
                    headers=step.get("headers"),
                    data=step.get("data"),
                    timeout=10,
                )
                out["status"] = resp.status_code
                try:
                    out["json"] = resp.json()
                except ValueError:
                    out["text"] = resp.text[:200]
            except requests.exceptions.RequestException as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
