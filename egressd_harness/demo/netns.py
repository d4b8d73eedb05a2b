"""The demo's namespaces backend: the local topology fleet (`egressd demo`).

Brings the fleet up (`egressd_harness.topology.fleet.Fleet`), has its control plane sign,
runs the probe with `egressd sandbox run` on the job's node (job A on node1, job B on node2),
reads a node agent's `/metrics` from inside the node's namespace and the proxies' logs from
the run directory, then tears the fleet down (unless `keep`) and prints the core's report.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from egressd.layout import ADMIN_PORT
from egressd_harness.demo import core
from egressd_harness.deploy import jobs
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.probe import ProbeError, http_request

UDFS = Path(__file__).resolve().parents[2] / "sandbox" / "udfs"


class NetnsBackend:
    settle_s = 0.5

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def sign(self, payload: dict[str, object]) -> str:
        return self.fleet.sign_policy(payload)

    def run_probe(self, job: core.Job, jws: str, args: Sequence[str]) -> core.ProbeRun:
        # `sandbox run` takes the policy as a file.
        jws_path = self.fleet.run_dir / "config" / f"demo-job-{job.label}.jws"
        jws_path.write_text(jws + "\n")
        argv = jobs.sandbox_argv(
            job.node,
            self.fleet.run_dir,
            jws_path,
            core.PROBE_UDF,
            list(args),
            core.SANDBOX_TIMEOUT_S,
            udfs=UDFS,
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
        return core.ProbeRun(done.returncode, done.stdout, done.stderr)

    def node_metrics(self, node: str) -> str | None:
        spec = self.fleet.layout.node(node)
        try:
            reply = http_request(
                self.fleet.ns(spec.netns), "GET", str(spec.underlay), ADMIN_PORT, "/metrics"
            )
        except ProbeError:
            return None
        return reply.body.decode()

    def audit_lines(self) -> Iterable[str]:
        logs = self.fleet.run_dir / "logs"
        return core.read_lines(logs / f"{p.name}.log" for p in self.fleet.layout.proxies)


def run_demo(fleet: Fleet, *, keep: bool = False) -> int:
    """The demo on `fleet`, brought up here and down afterwards unless `keep`; exit code."""
    rows: list[core.Row] = []
    try:
        fleet.up()
        rows = core.run(NetnsBackend(fleet), core.jobs(fleet.layout))
    finally:
        if not keep:
            fleet.down()
    return core.report(rows)
