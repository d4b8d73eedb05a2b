"""A UDF for the live-policy e2e test: one long download, and how it ended.

    python slow_download.py HOST PATH

Connects to HOST:80 (resolved through the sandbox's DNS), GETs PATH, prints
``{"event": "flowing"}`` once 64 KiB arrived (flushed, so the test can act
while the download runs), then reads until the end and prints
``{"event": "ended", "outcome": "reset"|"eof"|"timeout"|"error", "received": N,
"error": ..., "t": WALL_CLOCK}``.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main() -> int:
    host, path = sys.argv[1], sys.argv[2]
    received, said, outcome, error = 0, False, "eof", None
    try:
        with socket.create_connection((host, 80), timeout=20) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            while chunk := sock.recv(65536):
                received += len(chunk)
                if not said and received >= 65536:
                    print(json.dumps({"event": "flowing", "received": received}), flush=True)
                    said = True
    except ConnectionResetError as exc:
        outcome, error = "reset", str(exc)
    except TimeoutError as exc:
        outcome, error = "timeout", str(exc)
    except OSError as exc:
        outcome, error = "error", f"{type(exc).__name__}: {exc}"
    ended = {
        "event": "ended",
        "outcome": outcome,
        "received": received,
        "error": error,
        "t": time.time(),
    }
    print(json.dumps(ended), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
