"""Helpers for end-to-end tests against a running local fleet.

Everything goes through the fleet's real interfaces: the control plane signs
policies, `egressd sandbox run` launches runsc, the proxies' audit logs and
the daemons' /metrics tell what was decided.
"""

from __future__ import annotations

import json
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
