"""The node's job API: how the demo (and operators' tools) run a UDF on a compose node.

A warehouse node takes jobs from its scheduler; this is the smallest such
door. It listens on the node's underlay address, port 8070 (sandboxes cannot
reach it: tier 1 drops the underlay, tier 2 denies it):

    GET  /healthz                                   200 {"status": "ok"}
    POST /v1/run  (Authorization: Bearer <admin token>)
         {"policy": "<JWS>", "udf": "probe.py", "args": ["https://..."], "timeout": 60}
      -> 200 {"exit_code": 0, "stdout": "...", "stderr": "...", "ms": 812}

It runs exactly `egressd sandbox run --node NODE --policy FILE --mount
UDFS:/udfs --timeout T -- python3 /udfs/UDF ARGS...` on this node: the agent
verifies the policy, the UDF runs in a gVisor sandbox. Only the UDFs shipped
in the image (`sandbox/udfs/*.py`) can be named, at most `MAX_CONCURRENT`
run at once, and the caller needs the fleet's admin token.
"""

from __future__ import annotations

import hmac
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from egressd.layout import NodeSpec
from egressd_harness.deploy.health import env

MAX_CONCURRENT = 4
MAX_BODY = 256 * 1024
MAX_TIMEOUT_S = 300.0
_UDF = re.compile(r"[a-z0-9_]+\.py")


def sandbox_argv(
    node: str,
    run_dir: Path,
    policy: Path,
    udf: str,
    args: list[str],
    timeout: float,
    udfs: Path | None = None,
) -> list[str]:
    """`egressd sandbox run` of `/udfs/UDF ARGS` with `udfs` (default `env().udfs`) at /udfs."""
    return [
        sys.executable,
        "-m",
        "egressd",
        "sandbox",
        "run",
        "--run-dir",
        str(run_dir),
        "--node",
        node,
        "--policy",
        str(policy),
        "--mount",
        f"{env().udfs if udfs is None else udfs}:/udfs",
        "--timeout",
        str(timeout),
        "--",
        "python3",
        f"/udfs/{udf}",
        *args,
    ]


class JobServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], node: NodeSpec, run_dir: Path, token: str) -> None:
        super().__init__(address, Handler)
        self.node = node
        self.run_dir = run_dir
        self.token = token
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)


class Handler(BaseHTTPRequestHandler):
    server: JobServer

    def log_message(self, fmt: str, *args: Any) -> None:
        print(json.dumps({"event": "jobs_http", "line": fmt % args}), file=sys.stderr, flush=True)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not_found"})

    def do_POST(self) -> None:
        if self.path != "/v1/run":
            self._reply(404, {"error": "not_found"})
            return
        auth = self.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.server.token}".encode()):
            self._reply(401, {"error": "unauthorized"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise ValueError("body size")
            req = json.loads(self.rfile.read(length))
            policy, udf = req["policy"], req["udf"]
            args = req.get("args", [])
            timeout = float(req.get("timeout", 60))
            if not isinstance(policy, str) or not isinstance(udf, str) or not _UDF.fullmatch(udf):
                raise ValueError("policy and udf must be strings; udf a file name like probe.py")
            if not (env().udfs / udf).is_file():
                raise ValueError(f"no UDF {udf}")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ValueError("args must be a list of strings")
            if not 0 < timeout <= MAX_TIMEOUT_S:
                raise ValueError(f"timeout must be in (0, {MAX_TIMEOUT_S}]")
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(400, {"error": "bad_request", "detail": str(exc)})
            return
        if not self.server.slots.acquire(timeout=timeout):
            self._reply(503, {"error": "busy"})
            return
        try:
            self._reply(200, self._run(policy, udf, args, timeout))
        finally:
            self.server.slots.release()

    def _run(self, policy: str, udf: str, args: list[str], timeout: float) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile(
            "w", suffix=".jws", dir=self.server.run_dir / "config"
        ) as fh:
            fh.write(policy.strip() + "\n")
            fh.flush()
            argv = sandbox_argv(
                self.server.node.name, self.server.run_dir, Path(fh.name), udf, args, timeout
            )
            start = time.monotonic()
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=timeout + 30, check=False
                )
            except subprocess.TimeoutExpired as exc:
                return {
                    "exit_code": -1,
                    "stdout": str(exc.stdout or ""),
                    "stderr": "timeout",
                    "ms": 0,
                }
        ms = round((time.monotonic() - start) * 1000)
        return {
            "exit_code": done.returncode,
            "stdout": done.stdout,
            "stderr": done.stderr[-20000:],
            "ms": ms,
        }


def start_in_thread(
    node: NodeSpec, run_dir: Path, address: tuple[str, int], token: str
) -> JobServer:
    server = JobServer(address, node, run_dir, token)
    threading.Thread(target=server.serve_forever, name="jobs-api", daemon=True).start()
    return server


def run_udf(
    url: str, token: str, policy: str, udf: str, args: list[str], timeout: float = 60.0
) -> dict[str, Any]:
    """Client side: POST /v1/run and return the answer."""
    import urllib.request

    body = json.dumps({"policy": policy, "udf": udf, "args": args, "timeout": timeout}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/run", data=body, method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout + 60) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result
