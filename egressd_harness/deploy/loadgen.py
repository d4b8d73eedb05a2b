"""The `locust` service (compose profile `load`): a load-generator node.

It is a node like `node` (its own agent, registered as `loadgen`, sandbox
CIDR 100.96.9.0/24: EGRESSD_NODE_NAME and EGRESSD_SANDBOX_CIDR in
deploy/compose.yaml, required; proxies discovered from the control plane). It has the
control plane sign a policy for one load job (api.allowed.test, ports 80 and
443), registers a load-generator namespace with its agent exactly as a
sandbox is registered (veth, tier-1 eBPF, GENEVE tunnel to a proxy), and runs
`loadtests/locustfile.py` headless inside that namespace, so every request
takes the sandbox path. The run is bounded (`EGRESSD_LOAD_RUN_TIME`, default
60s; users `EGRESSD_LOAD_USERS`, default 10; user class `EGRESSD_LOAD_CLASS`,
default Steady); afterwards the namespace is unregistered and the container
stays up with the agent so that its metrics can be read.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from pathlib import Path

from egressd.agent.client import AgentClient
from egressd.layout import RESOLVER
from egressd_harness.deploy import entry, health, settings


def payload(job_id: str, node: str) -> dict[str, object]:
    return {
        "v": 1,
        "job_id": job_id,
        "account": "load",
        "nodes": [node],
        "egress": [{"host": "api.allowed.test", "ports": [80, 443]}],
    }


async def run_load(fleet_run_dir: Path, node: str) -> int:
    job_id = str(uuid.uuid4())
    jws = str(entry.control("PUT", f"/v1/jobs/{job_id}/policy", payload(job_id, node))["jws"])
    sandbox_id = f"load-{job_id[:8]}"
    async with AgentClient(fleet_run_dir / "agents" / f"{node}.sock") as agent:
        info = await agent.register(sandbox_id, jws)
        try:
            etc = Path("/etc/netns") / info.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
            load = entry.env()
            users = str(load.load_users)
            argv = [
                "ip",
                "netns",
                "exec",
                info.netns,
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(load.locustfile),
                "--headless",
                "--host",
                "http://api.allowed.test",
                "-u",
                users,
                "-r",
                users,
                "-t",
                load.load_run_time,
                "--only-summary",
                load.load_class,
            ]
            entry.log("load_start", argv=argv)
            proc = await asyncio.create_subprocess_exec(*argv)
            return await proc.wait()
        finally:
            await agent.unregister(sandbox_id)


def _healthy() -> bool:
    try:
        return health.health("loadgen") == 0
    except (OSError, SystemExit):
        return False


def main(_argv: list[str]) -> int:
    # Its name and CIDR come from the environment like any node's (deploy/compose.yaml);
    # the defaults are node1's, which a second node must never take.
    given = entry.env().given
    missing = [v for v in (settings.NODE_NAME, settings.SANDBOX_CIDR) if v not in given]
    if missing:
        raise SystemExit(f"loadgen: {' and '.join(missing)} must be set (a node of its own)")
    fleet, spec, config = entry.start_node()

    def load_when_ready() -> None:
        while not _healthy():
            threading.Event().wait(1.0)
        code = asyncio.run(run_load(fleet.run_dir, spec.name))
        entry.log("load_done", code=code)

    threading.Thread(target=load_when_ready, daemon=True).start()
    return entry.supervise(spec.name, entry.egressd("agent", "serve", "--config", str(config)))
