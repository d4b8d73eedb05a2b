"""`egressd demo`: two jobs, two signed policies, real gVisor sandboxes.

Brings the local fleet up, has the control plane sign a policy for job A
(api.allowed.test and *.data.allowed.test, node1) and job B (evil.test only,
node2), runs the example probe UDF with plain `requests` in a runsc sandbox
for each job, then reads the verdicts back from where they are decided: the
proxies' audit log (DNS and connection events of that job) and the node
agent's tier-1 counters. Prints a table, tears the fleet down, and exits 0
only if every verdict is the expected one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from egressd.layout import ADMIN_PORT, Layout
from egressd.metrics_text import by_label, parse
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.probe import ProbeError, http_request

UDFS = Path(__file__).resolve().parents[1] / "sandbox" / "udfs"


@dataclass(frozen=True, slots=True)
class Expectation:
    target: str
    verdict: str  # "allow" or "deny"
    where: str  # "proxy:connection", "proxy:dns", "tier1:<reason>"
    host: str | None = None
    dst: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    label: str
    node: str
    hosts: tuple[tuple[str, tuple[int, ...]], ...]
    expectations: tuple[Expectation, ...]
    job_id: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    job: str
    target: str
    expected: str
    seen: str
    ok: bool


def jobs(layout: Layout, *, node_b: str = "node2") -> list[Job]:
    """Job A on node1 and job B on `node_b` (the compose fleet has one node)."""
    api = str(layout.site("api.allowed.test").address)
    raw = str(layout.site("raw.test").address)
    other_sandbox = str(layout.node("node2").sandbox_cidr.network_address + 2)
    a = Job(
        "A",
        "node1",
        (("api.allowed.test", (443, 80)), ("*.data.allowed.test", (443,))),
        (
            Expectation(
                "https://api.allowed.test/data",
                "allow",
                "proxy:connection",
                host="api.allowed.test",
            ),
            Expectation(
                "http://api.allowed.test/", "allow", "proxy:connection", host="api.allowed.test"
            ),
            Expectation(
                "https://eu.data.allowed.test/",
                "allow",
                "proxy:connection",
                host="eu.data.allowed.test",
            ),
            Expectation("https://evil.test/", "deny", "proxy:dns", host="evil.test"),
            Expectation("http://169.254.169.254/latest/meta-data/", "deny", "tier1:denied_range"),
            Expectation(f"tcp://{other_sandbox}:443", "deny", "tier1:fleet_range"),
            Expectation(f"tcp://{raw}:443", "deny", "proxy:connection", dst=raw),
        ),
    )
    b = Job(
        "B",
        node_b,
        (("evil.test", (443,)),),
        (
            Expectation("https://evil.test/", "allow", "proxy:connection", host="evil.test"),
            Expectation(
                "https://api.allowed.test/data", "deny", "proxy:dns", host="api.allowed.test"
            ),
            Expectation(f"tcp://{api}:443", "deny", "proxy:connection", dst=api),
        ),
    )
    return [a, b]


def payload(job: Job, job_id: str) -> dict[str, object]:
    return {
        "v": 1,
        "job_id": job_id,
        "account": "demo",
        "nodes": [job.node],
        "egress": [{"host": h, "ports": list(p)} for h, p in job.hosts],
    }


def tier1_counts(fleet: Fleet, node: str) -> dict[str, float]:
    """The node agent's tier-1 drop counters, by reason."""
    spec = fleet.layout.node(node)
    try:
        reply = http_request(
            fleet.ns(spec.netns), "GET", str(spec.underlay), ADMIN_PORT, "/metrics"
        )
    except ProbeError:
        return {}
    samples = parse(reply.body.decode())
    return by_label(samples, "egressd_tier1_packets_total", "reason", verdict="drop")


def audit_events(fleet: Fleet, job_id: str) -> list[dict[str, object]]:
    events = []
    for proxy in fleet.layout.proxies:
        path = fleet.run_dir / "logs" / f"{proxy.name}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(event, dict)
                and event.get("job_id") == job_id
                and event.get("event") in ("dns", "connection")
            ):
                events.append(event)
    return events


def run_sandbox(fleet: Fleet, job: Job, jws_path: Path) -> list[dict[str, object]]:
    targets = [e.target for e in job.expectations]
    argv = [
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
        str(jws_path),
        "--mount",
        f"{UDFS}:/udfs",
        "--timeout",
        "120",
        "--",
        "python3",
        "/udfs/probe.py",
        "--timeout",
        "3",
        *targets,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"sandbox for job {job.label} exited {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def judge(
    exp: Expectation,
    attempt: dict[str, object] | None,
    events: list[dict[str, object]],
    tier1_delta: dict[str, float],
) -> str:
    """What the fleet decided for one attempt, as `verdict:reason (where)`."""
    kind, _, detail = exp.where.partition(":")
    if kind == "tier1":
        dropped = tier1_delta.get(detail, 0) > 0
        failed = attempt is not None and not attempt.get("ok")
        return f"deny:{detail} (tier 1)" if dropped and failed else f"no tier-1 {detail} drop"
    wanted = "dns" if detail == "dns" else "connection"
    for event in events:
        if event.get("event") != wanted:
            continue
        if (
            exp.host is not None
            and wanted == "dns"
            and event.get("qname", "").rstrip(".") != exp.host  # type: ignore[attr-defined]
        ):
            continue
        if exp.host is not None and wanted == "connection" and event.get("host") != exp.host:
            continue
        if exp.dst is not None and str(event.get("dst", "")).split(":")[0] != exp.dst:
            continue
        return f"{event.get('verdict')}:{event.get('reason')} (proxy {wanted})"
    return f"no {wanted} audit event"


def evaluate(
    job: Job,
    attempts: Iterable[dict[str, object]],
    events: list[dict[str, object]],
    tier1_delta: dict[str, float],
) -> list[Row]:
    by_target = {str(a.get("target")): a for a in attempts}
    rows = []
    for exp in job.expectations:
        attempt = by_target.get(exp.target)
        seen = judge(exp, attempt, events, tier1_delta)
        ok = seen.startswith(exp.verdict + ":")
        if exp.verdict == "allow":
            ok = ok and attempt is not None and bool(attempt.get("ok"))
        rows.append(Row(job.label, exp.target, f"{exp.verdict} ({exp.where})", seen, ok))
    return rows


def print_table(rows: list[Row]) -> None:
    w_target = max(len(r.target) for r in rows)
    w_exp = max(len(r.expected) for r in rows)
    print(f"{'job':<4} {'attempt':<{w_target}}  {'expected':<{w_exp}}  {'verdict (where decided)'}")
    for r in rows:
        mark = "" if r.ok else "   <-- UNEXPECTED"
        print(f"{r.job:<4} {r.target:<{w_target}}  {r.expected:<{w_exp}}  {r.seen}{mark}")


def run_demo(fleet: Fleet, *, keep: bool = False) -> int:
    rows: list[Row] = []
    try:
        fleet.up()
        for job in jobs(fleet.layout):
            job_id = str(uuid.uuid4())
            jws = fleet.sign_policy(payload(job, job_id))
            jws_path = fleet.run_dir / "config" / f"demo-job-{job.label}.jws"
            jws_path.write_text(jws + "\n")
            before = tier1_counts(fleet, job.node)
            attempts = run_sandbox(fleet, job, jws_path)
            time.sleep(0.5)  # connection events are logged when the relay closes
            after = tier1_counts(fleet, job.node)
            delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
            rows += evaluate(job, attempts, audit_events(fleet, job_id), delta)
    finally:
        if not keep:
            fleet.down()
    print_table(rows)
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} verdicts as expected")
    return 0 if rows and not bad else 1
