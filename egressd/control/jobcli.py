"""The `job` verb: a job's policy lifecycle against the control plane.

    egressd job put POLICY.json [--job-id UUID]   sign and hold it; prints the JWS
    egressd job get JOB_ID [--json]               the JWS the control plane holds
    egressd job delete JOB_ID                     revoke it (proxies reset its connections)
    egressd job list [--json]                     every job: id, account, digest, exp, nodes

Common options: `--control URL` (default the topology's http://198.18.0.2:8080),
`--netns NS` (default: the topology's control namespace `{--prefix}ctl` when
it exists, else this namespace: the control plane listens on the underlay,
which the host namespace has no route to, so the CLI opens its socket inside
that namespace, as `egressd topology` does), `--token-file FILE` or the
environment variable `EGRESSD_ADMIN_TOKEN` for put/delete (default: the
topology's `{--run-dir}/admin-token` when readable).

POLICY.json is the payload without timestamps (the control plane sets
`iat`/`nbf`/`exp`); its `job_id` names the job unless `--job-id` does. Errors
(an HTTP error from the control plane, no answer) are one line on stderr and
exit code 1; a bad argument or unreadable file exits 2.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from egressd.cliutil import CliError
from egressd.layout import CONTROL_ADDR, DEFAULT_RUN_DIR
from egressd.net import netns as kn

DEFAULT_CONTROL_URL = f"http://{CONTROL_ADDR}:8080"
TOKEN_ENV = "EGRESSD_ADMIN_TOKEN"
TIMEOUT_S = 10.0


class JobCliError(CliError):
    """A failed exchange with the control plane: exit code 1 with this line."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, exit_code=1)


def _token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"--token-file {args.token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise CliError(f"--token-file {args.token_file}: empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    default = Path(args.run_dir) / "admin-token"
    try:
        token = default.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise CliError(f"no admin token: pass --token-file FILE or set {TOKEN_ENV}")
    return token


def _netns(args: argparse.Namespace) -> str | None:
    if args.netns is not None:
        return args.netns or None
    candidate = f"{args.prefix}ctl"
    return candidate if kn.netns_exists(candidate) else None


def request(
    args: argparse.Namespace, method: str, path: str, body: bytes | None = None, *, auth: bool
) -> tuple[int, Any]:
    """One HTTP exchange with the control plane: (status, parsed JSON body or None)."""
    url = urlsplit(args.control)
    if url.scheme != "http" or not url.hostname:
        raise CliError(f"--control {args.control}: must be http://HOST[:PORT]")
    port = url.port or 80
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {_token(args)}"
    ns = _netns(args)
    try:
        if ns is not None:
            sock = kn.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except (kn.NetError, OSError) as exc:
        raise JobCliError(f"cannot open a socket in {ns or 'this namespace'}: {exc}") from exc
    conn = http.client.HTTPConnection(url.hostname, port, timeout=TIMEOUT_S)
    where = f"{args.control}" + (f" (from netns {ns})" if ns else "")
    try:
        sock.settimeout(TIMEOUT_S)
        sock.connect((url.hostname, port))
        conn.sock = sock
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise JobCliError(f"control plane {where} unreachable: {exc}") from exc
    finally:
        conn.close()
        sock.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return resp.status, parsed


def _fail(status: int, body: Any, what: str) -> JobCliError:
    if isinstance(body, dict) and "error" in body:
        detail = body["error"]
        if body.get("field"):
            detail += f" ({body['field']})"
        if body.get("detail"):
            detail += f": {body['detail']}"
    else:
        detail = f"HTTP {status}"
    return JobCliError(f"{what}: {detail}")


def _job_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise CliError(f"not a job id (UUID): {text!r}") from None


def cmd_put(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(Path(args.policy).read_bytes())
    except OSError as exc:
        raise CliError(f"{args.policy}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CliError(f"{args.policy}: not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise CliError(f"{args.policy}: must be a JSON object")
    job = args.job_id or payload.get("job_id")
    if not isinstance(job, str):
        raise CliError(f"{args.policy}: no job_id (put one in the file or pass --job-id)")
    job = _job_id(job)
    status, body = request(
        args, "PUT", f"/v1/jobs/{job}/policy", json.dumps(payload).encode(), auth=True
    )
    if status != 200 or not isinstance(body, dict):
        raise _fail(status, body, f"put {job}")
    print(json.dumps(body, indent=2) if args.json else body["jws"])
    print(f"job {job}: digest {body['digest']}, exp {body['exp']}", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    job = _job_id(args.job)
    status, body = request(args, "GET", f"/v1/jobs/{job}/policy", auth=False)
    if status == 404:
        raise JobCliError(f"get {job}: the control plane holds no policy for this job")
    if status != 200 or not isinstance(body, dict):
        raise _fail(status, body, f"get {job}")
    print(json.dumps(body, indent=2) if args.json else body["jws"])
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    job = _job_id(args.job)
    status, body = request(args, "DELETE", f"/v1/jobs/{job}/policy", auth=True)
    if status == 404:
        raise JobCliError(f"delete {job}: the control plane holds no policy for this job")
    if status != 204:
        raise _fail(status, body, f"delete {job}")
    print(f"job {job}: deleted", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    status, body = request(args, "GET", "/v1/jobs", auth=False)
    if status != 200 or not isinstance(body, dict):
        raise _fail(status, body, "list")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for job in body.get("jobs", []):
        nodes = ",".join(job.get("nodes", []))
        print(f"{job['job_id']}  {job.get('account')}  {job['digest']}  exp={job['exp']}  {nodes}")
    return 0


def register(sub: Any) -> None:
    """Add the `job` verb to the top-level subparsers `sub`."""
    job = sub.add_parser("job", help="a job's policy at the control plane: put, get, delete, list")
    verbs = job.add_subparsers(dest="job_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control", default=DEFAULT_CONTROL_URL, metavar="URL")
        p.add_argument(
            "--netns",
            default=None,
            metavar="NS",
            help="namespace to connect from (default: {prefix}ctl if it exists; '' for this one)",
        )
        p.add_argument("--prefix", default="egd-", help="topology namespace prefix")
        p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
        p.add_argument("--token-file", default=None, metavar="FILE")

    put = verbs.add_parser("put", help="sign and hold a policy; prints the JWS")
    put.add_argument("policy", metavar="POLICY.json")
    put.add_argument("--job-id", default=None)
    put.add_argument("--json", action="store_true", help="print the whole answer")
    put.set_defaults(handler=cmd_put)
    get = verbs.add_parser("get", help="print the JWS the control plane holds")
    get.add_argument("job", metavar="JOB_ID")
    get.add_argument("--json", action="store_true")
    get.set_defaults(handler=cmd_get)
    delete = verbs.add_parser("delete", help="revoke a job's policy")
    delete.add_argument("job", metavar="JOB_ID")
    delete.set_defaults(handler=cmd_delete)
    lst = verbs.add_parser("list", help="list every job")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=cmd_list)
    for p in (put, get, delete, lst):
        common(p)
