"""The demo's compose backend: the compose fleet's `demo` service
(`python -m egressd_harness.deploy demo`).

Both jobs run on node1 (the compose fleet's one node), through the node's job API
(`egressd_harness.deploy.jobs`); the control plane signs (`entry.control`); node1's
`/metrics` is read over the underlay, the proxies' logs from the `logs` volume (every
`proxy-*.log`). With `--then-idle` (the compose service) the exit code is recorded for the
healthcheck (`health.health("demo")`) and the container stays up.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from egressd.layout import ADMIN_PORT, default_layout
from egressd_harness.demo import core
from egressd_harness.deploy import entry, health, jobs

NODE = "node1"
NODE_ADDR = "198.18.0.11"


class ComposeBackend:
    settle_s = 1.0

    def __init__(self, node_url: str, token: str, log_dir: Path | None = None) -> None:
        self.node_url = node_url
        self.token = token
        self.log_dir = entry.env().log_dir if log_dir is None else log_dir

    def sign(self, payload: dict[str, object]) -> str:
        return str(entry.control("PUT", f"/v1/jobs/{payload['job_id']}/policy", payload)["jws"])

    def run_probe(self, job: core.Job, jws: str, args: Sequence[str]) -> core.ProbeRun:
        done = jobs.run_udf(
            self.node_url,
            self.token,
            jws,
            core.PROBE_UDF,
            list(args),
            timeout=core.SANDBOX_TIMEOUT_S,
        )
        return core.ProbeRun(int(done["exit_code"]), str(done["stdout"]), str(done["stderr"]))

    def node_metrics(self, node: str) -> str | None:
        # One node: every job runs on NODE, at NODE_ADDR.
        _, body = health.http_get(f"http://{NODE_ADDR}:{ADMIN_PORT}/metrics")
        return body.decode()

    def audit_lines(self) -> Iterable[str]:
        return core.read_lines(sorted(self.log_dir.glob("proxy-*.log")))


def demo_jobs() -> list[core.Job]:
    return core.jobs(default_layout(), node_b=NODE)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m egressd_harness.deploy demo")
    parser.add_argument("--node-url", default=f"http://{NODE_ADDR}:{health.JOBS_PORT}")
    parser.add_argument("--then-idle", action="store_true", help="record the result, then stay up")
    args = parser.parse_args(argv)
    try:
        code = core.report(
            core.run(ComposeBackend(args.node_url, entry.admin_token()), demo_jobs())
        )
    except Exception as exc:  # noqa: BLE001 - reported, and the healthcheck sees the failure
        print(f"demo failed: {type(exc).__name__}: {exc}", flush=True)
        code = 1
    if not args.then_idle:
        return code
    health.DEMO_RESULT.write_text(f"{code}\n")
    while True:
        time.sleep(3600)
