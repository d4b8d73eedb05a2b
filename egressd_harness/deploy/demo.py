"""The compose fleet's demo: `egressd demo`'s two jobs, run through the `node` service.

Signs job A (api.allowed.test, *.data.allowed.test) and job B (evil.test) at
the control plane, runs the example probe UDF for each in a gVisor sandbox on
node1 through the node's job API (`egressd_harness.deploy.jobs`), and judges every
attempt from where it was decided, as `egressd demo` does
(`egressd_harness.fleetdemo.evaluate`): the proxies' audit events (read from the
`logs` volume, every proxy's file) and node1's tier-1 counters. Prints the
table; exit code 0 when every verdict is the expected one. With `--then-idle`
(the compose service) it records the result for the healthcheck and stays up.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

from egressd.layout import ADMIN_PORT, default_layout
from egressd.metrics_text import by_label, parse
from egressd_harness.deploy import entry, jobs
from egressd_harness.fleetdemo import Job, Row, evaluate, payload, print_table
from egressd_harness.fleetdemo import jobs as fleet_jobs

RESULT = Path("/tmp/egressd-demo.result")
NODE = "node1"
NODE_ADDR = "198.18.0.11"


def demo_jobs() -> list[Job]:
    return fleet_jobs(default_layout(), node_b=NODE)


def audit_events(job_id: str, log_dir: Path = entry.LOG_DIR) -> list[dict[str, object]]:
    """Every proxy's audit events of one job (`proxy-*.log` in the logs volume)."""
    events = []
    for path in sorted(log_dir.glob("proxy-*.log")):
        for line in path.read_text(errors="replace").splitlines():
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


def tier1_counts(node_addr: str = NODE_ADDR) -> dict[str, float]:
    _, body = entry.http_get(f"http://{node_addr}:{ADMIN_PORT}/metrics")
    return by_label(parse(body.decode()), "egressd_tier1_packets_total", "reason", verdict="drop")


def sign(payload: dict[str, object]) -> str:
    return str(entry.control("PUT", f"/v1/jobs/{payload['job_id']}/policy", payload)["jws"])


def run(node_url: str) -> int:
    token = entry.admin_token()
    rows: list[Row] = []
    for job in demo_jobs():
        job_id = str(uuid.uuid4())
        jws = sign(payload(job, job_id))
        before = tier1_counts()
        targets = [e.target for e in job.expectations]
        done = jobs.run_udf(
            node_url, token, jws, "probe.py", ["--timeout", "3", *targets], timeout=120
        )
        if done["exit_code"] != 0:
            print(f"job {job.label}: sandbox exited {done['exit_code']}: {done['stderr'][-800:]}")
            return 1
        attempts = [json.loads(ln) for ln in done["stdout"].splitlines() if ln.startswith("{")]
        time.sleep(1.0)  # connection events are logged when the relay closes
        after = tier1_counts()
        delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
        rows += evaluate(job, attempts, audit_events(job_id), delta)
    print_table(rows)
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} verdicts as expected", flush=True)
    return 0 if rows and not bad else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m egressd_harness.deploy demo")
    parser.add_argument("--node-url", default=f"http://{NODE_ADDR}:{entry.JOBS_PORT}")
    parser.add_argument("--then-idle", action="store_true", help="record the result, then stay up")
    args = parser.parse_args(argv)
    try:
        code = run(args.node_url)
    except Exception as exc:  # noqa: BLE001 - reported, and the healthcheck sees the failure
        print(f"demo failed: {type(exc).__name__}: {exc}", flush=True)
        code = 1
    if not args.then_idle:
        return code
    RESULT.write_text(f"{code}\n")
    while True:
        time.sleep(3600)
