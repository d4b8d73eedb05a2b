"""Helpers for the end-to-end tests (tests/e2e) against a running local fleet.

Everything goes through the fleet's real interfaces: the control plane signs
policies, `egressd sandbox run` launches runsc, the proxies' audit logs and
the daemons' /metrics tell what was decided.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.layout import ADMIN_PORT
from egressd.metrics_text import Scrape, parse
from egressd.metrics_text import metric_sum as metric_sum  # re-exported for the e2e tests
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.probe import http_request

REPO = Path(__file__).resolve().parents[2]
UDFS = REPO / "sandbox" / "udfs"


@dataclass
class Job:
    """A job with a policy signed by the fleet's control plane."""

    fleet: Fleet
    node: str
    egress: Sequence[Mapping[str, object]]
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    mode: str = "enforce"
    jws: str = ""

    def sign(self) -> Job:
        payload = {
            "v": 1,
            "job_id": self.job_id,
            "account": "e2e",
            "nodes": [self.node],
            "mode": self.mode,
            "egress": self.egress,
        }
        self.jws = self.fleet.sign_policy(payload)
        return self

    def policy_file(self, tmp: Path) -> Path:
        path = tmp / f"{self.job_id}.jws"
        path.write_text(self.jws + "\n")
        return path


def sandbox_argv(
    fleet: Fleet,
    job: Job,
    policy_file: Path,
    argv: Sequence[str],
    *,
    mounts: Sequence[str] = (),
    timeout_s: float | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`egressd sandbox run` for `job`, as an operator would type it (UDFs at /udfs)."""
    cmd = [
        sys.executable,
        "-m",
        "egressd",
        "sandbox",
        "run",
        "--run-dir",
        str(fleet.run_dir),
        "--node",
        job.node,
        "--policy",
        str(policy_file),
        "--mount",
        f"{UDFS}:/udfs",
        *[f"--mount={m}" for m in mounts],
        *extra,
    ]
    if timeout_s is not None:
        cmd += ["--timeout", str(timeout_s)]
    return [*cmd, "--", *argv]


def sandbox_run(
    fleet: Fleet,
    job: Job,
    tmp: Path,
    argv: Sequence[str],
    *,
    mounts: Sequence[str] = (),
    timeout_s: float = 240,
    policy_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a sandbox to completion; its output and exit code."""
    cmd = sandbox_argv(
        fleet,
        job,
        policy_file or job.policy_file(tmp),
        argv,
        mounts=mounts,
        timeout_s=timeout_s - 10,
    )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


def probe(
    fleet: Fleet, job: Job, tmp: Path, targets: Sequence[str], *, timeout: float = 3.0
) -> dict[str, dict[str, Any]]:
    """Run the example probe UDF in a sandbox; one result per target."""
    done = sandbox_run(
        fleet, job, tmp, ["python3", "/udfs/probe.py", "--timeout", str(timeout), *targets]
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {str(r["target"]): r for r in results}


def proxy_events(fleet: Fleet, job_id: str, event: str | None = None) -> list[dict[str, Any]]:
    out = []
    for proxy in fleet.layout.proxies:
        path = fleet.run_dir / "logs" / f"{proxy.name}.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if not isinstance(item, dict) or item.get("job_id") != job_id:
                continue
            if event is None or item.get("event") == event:
                out.append(item)
    return out


def wait_events(
    fleet: Fleet,
    job_id: str,
    event: str,
    pred: Callable[[dict[str, object]], bool],
    timeout_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Events matching `pred`, waiting a little: connection events are logged at close."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in proxy_events(fleet, job_id, event) if pred(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def metrics(fleet: Fleet, member: str) -> Scrape:
    """A node's or proxy's /metrics, parsed (egressd.metrics_text; `metric_sum` sums it)."""
    try:
        spec = fleet.layout.node(member)
        ns, addr = fleet.ns(spec.netns), str(spec.underlay)
    except KeyError:
        pspec = fleet.layout.proxy(member)
        ns, addr = fleet.ns(pspec.netns), str(pspec.underlay)
    reply = http_request(ns, "GET", addr, ADMIN_PORT, "/metrics")
    return parse(reply.body.decode())


# --- jobs with limits, and the egress checks run in a sandbox (udfs/egress_checks.py) ----------

E2E_UDFS = Path(__file__).resolve().parents[1] / "e2e" / "udfs"  # mounted at /e2e
CHECKS = "/e2e/egress_checks.py"

API = "api.allowed.test"
API_IP = "203.0.113.10"

# Limits high enough that none of these tests is about limits.
ROOMY_LIMITS = {
    "max_connections": 1024,
    "max_new_connections_per_s": 2000,
    "ports_per_destination": 2048,
    "bandwidth_bps": 10_000_000_000,
}


@dataclass
class LimitedJob(Job):
    """`Job` with explicit limits in its signed policy."""

    limits: dict[str, int] = field(default_factory=lambda: dict(ROOMY_LIMITS))

    def sign(self) -> LimitedJob:
        payload = {
            "v": 1,
            "job_id": self.job_id,
            "account": "e2e",
            "nodes": [self.node],
            "mode": self.mode,
            "egress": self.egress,
            "limits": self.limits,
        }
        self.jws = self.fleet.sign_policy(payload)
        return self


def api_job(fleet: Fleet, node: str = "node1", mode: str = "enforce") -> LimitedJob:
    return LimitedJob(fleet, node, [{"host": API, "ports": [443, 80]}], mode=mode).sign()


def run_checks(
    fleet: Fleet,
    job: Job,
    tmp: Path,
    checks: Sequence[Mapping[str, object]],
    *,
    parallel: bool = False,
    timeout_s: float = 120,
) -> dict[str, dict[str, Any]]:
    """Run `checks` in one sandbox of `job`; the results by check id."""
    spec = json.dumps({"checks": list(checks), "parallel": parallel})
    done = sandbox_run(
        fleet, job, tmp, ["python3", CHECKS, spec], mounts=[f"{E2E_UDFS}:/e2e"], timeout_s=timeout_s
    )
    assert done.returncode == 0, f"sandbox exited {done.returncode}: {done.stderr[-2000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_id = {str(r["id"]): r for r in results}
    if os.environ.get("EGRESSD_E2E_SHOW"):  # print what the sandbox saw (with -s)
        for r in results:
            print(json.dumps(r)[:400])
    assert set(by_id) == {str(c["id"]) for c in checks}, done.stdout + done.stderr[-2000:]
    return by_id


def conn_events(
    fleet: Fleet,
    job: Job,
    *,
    dst: str,
    port: int | None = None,
    count: int = 1,
    timeout_s: float = 8.0,
) -> list[dict[str, Any]]:
    """The job's connection events to dst[:port], waiting until `count` are logged."""

    def pred(e: dict[str, object]) -> bool:
        return e.get("dst") == dst and (port is None or e.get("port") == port)

    deadline = time.monotonic() + timeout_s
    while True:
        found = wait_events(fleet, job.job_id, "connection", pred, timeout_s=0.5)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def dns_events(
    fleet: Fleet, job: Job, qname: str, qtype: str | None = None
) -> list[dict[str, Any]]:
    def pred(e: dict[str, object]) -> bool:
        name = str(e.get("qname") or "").rstrip(".").lower()
        return name == qname.lower() and (qtype is None or e.get("qtype") == qtype)

    return wait_events(fleet, job.job_id, "dns", pred, timeout_s=5.0)


# --- a keep-alive HTTP session in a sandbox (udfs/http_session.py) ------------------------------


def run_steps(
    fleet: Fleet, job: Job, tmp: Path, steps: list[dict[str, object]]
) -> dict[str, dict[str, object]]:
    done = sandbox_run(
        fleet,
        job,
        tmp,
        ["python3", "/e2e/http_session.py", json.dumps(steps)],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=120,
    )
    assert done.returncode == 0, f"sandbox exited {done.returncode}: {done.stderr[-2000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if os.environ.get("EGRESSD_E2E_SHOW"):
        for r in results:
            print(json.dumps(r)[:400])
    by_id = {str(r["id"]): r for r in results}
    assert set(by_id) == {str(s["id"]) for s in steps}, done.stdout + done.stderr[-2000:]
    return by_id


# --- live policies: the `egressd job` CLI, log times ----------------------------------------------

SLOW_BPS = 8_000_000  # fleet-wide: 500 kB/s per proxy, so 200 MB take minutes


def log_time(item: dict[str, object]) -> float:
    return datetime.datetime.fromisoformat(str(item["time"])).timestamp()


def job_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "job",
            *args,
            "--run-dir",
            str(fleet.run_dir),
            "--prefix",
            fleet.layout.prefix,
            "--token-file",
            str(fleet.admin_token_file),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
