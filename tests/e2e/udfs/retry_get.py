"""A UDF for the live-policy e2e tests: GET a URL again and again until it works.

    python retry_get.py URL COUNT GAP TIMEOUT

Prints ``{"ready": true}``, then one JSON line per attempt (``i``, ``ok``,
``status`` or ``error``, ``t``: the wall clock when the attempt ended, the
host's clock) and stops after the first successful one or COUNT attempts,
GAP seconds apart, each with TIMEOUT seconds (DNS included).
"""

from __future__ import annotations

import json
import sys
import time

import requests


def main() -> int:
    url, count, gap, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    print(json.dumps({"ready": True}), flush=True)
    for i in range(count):
        out: dict[str, object] = {"i": i}
        try:
            response = requests.get(url, timeout=timeout)
            out.update(ok=response.status_code == 200, status=response.status_code)
        except requests.RequestException as exc:
            out.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        out["t"] = time.time()
        print(json.dumps(out), flush=True)
        if out["ok"]:
            return 0
        time.sleep(gap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
