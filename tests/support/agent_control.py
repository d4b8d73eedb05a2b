"""A real agent (`egressd agent serve`, no proxies) following a real control plane
(`egressd control serve`) on a bridge of their own; tier 1's per-sandbox counters tell how a
frame was decided (tests/integration/test_agent_live_policies.py's docstring draws it). Each
module makes its own `Env` (with its own control-plane options) in a module fixture."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.net import netns
from egressd.policy.keys import SigningKey, write_key_dir
from tests.support.agent_fleet import (
    NODE_IP,
    REPO,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    http_get,
    metric,
)
from tests.support.agent_fleet import Fleet as AgentFleet
from tests.support.control_process import control_argv
from tests.support.processes import tear_down_node
from tests.support.proxy_fleet import http
from tests.support.waits import wait_for

CONTROL_IP = "198.18.0.2"
JOB = uuid.UUID("6f1d2b7e-3c4a-4e5f-8a9b-0c1d2e3f4a5b")
DEST = "203.0.113.10"
SANDBOX_METRIC = "egressd_tier1_sandbox_packets_total"
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER 0


def policy_body(*ports: int, **limits: int) -> dict[str, Any]:
    return {
        "v": 1,
        "job_id": str(JOB),
        "account": "acme",
        "nodes": ["node1"],
        "egress": [{"cidr": f"{DEST}/32", "ports": list(ports)}],
        "limits": limits,
    }


@dataclass
class Env:
    root: Path
    key: SigningKey
    under: str
    node: str
    ctl: str
    sandbox_prefix: str
    run_dir: Path
    state_dir: Path
    token: str = ""
    control_args: list[str] = field(default_factory=list)  # e.g. ["--policy-ttl", "60"]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def api_socket(self) -> Path:
        return self.run_dir / "agents" / "node1.sock"

    def control(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        status, payload = http(
            self.node,
            method,
            CONTROL_IP,
            8080,
            path,
            body,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        return status, (json.loads(payload) if payload else None)

    def agent(self) -> AgentFleet:
        """test_agent's helpers (register, list, metrics) pointed at this agent."""
        return AgentFleet(
            run_id="",
            root=self.root,
            key=self.key,
            under=self.under,
            node=self.node,
            proxy_ns={},
            sandbox_prefix=self.sandbox_prefix,
            config_path=self.root / "agent.json",
            api_socket=self.api_socket,
            state_dir=self.state_dir,
        )

    def agent_log(self) -> str:
        return (self.root / "agent.log").read_text(errors="replace")


def bring_up(env: Env) -> None:
    """The namespaces, the control plane (node1 registered) and the agent, whose watch is up."""
    for ns in (env.under, env.node, env.ctl):
        netns.ensure_netns(ns)
        env.namespaces.append(ns)
        netns.set_link_up(ns, "lo")
    netns.ensure_bridge(env.under, "br0")
    netns.set_link_up(env.under, "br0")
    for tag, ns, ip in (("n", env.node, NODE_IP), ("c", env.ctl, CONTROL_IP)):
        netns.ensure_veth(env.under, f"v{tag}", ns, "u0")
        netns.enslave(env.under, f"v{tag}", "br0")
        netns.set_link_up(env.under, f"v{tag}")
        netns.ensure_addr(ns, "u0", f"{ip}/24")
        netns.set_link_up(ns, "u0")
    keys = env.root / "keys"
    write_key_dir(keys, env.key)
    py = {**os.environ, "PYTHONPATH": str(REPO)}
    token_file = env.root / "admin-token"
    env.procs["control"] = netns.popen_in_netns(
        env.ctl,
        control_argv(
            f"{CONTROL_IP}:8080",
            *env.control_args,
            state=env.root / "ctl-state",
            key=keys / "signing.key",
            token=token_file,
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(env.root / "control.log").open("wb"),
        env=py,
        cwd=str(REPO),
    )
    wait_for(
        lambda: http_get(env.node, CONTROL_IP, 8080, "/v1/jobs")[0] == 200,
        START_TIMEOUT_S,
        "the control plane",
    )
    env.token = token_file.read_text().strip()
    status, body = env.control(
        "PUT", "/v1/nodes/node1", {"underlay": NODE_IP, "sandbox_cidr": "100.96.1.0/24"}
    )
    assert status in (200, 201), body

    config = {
        "name": "node1",
        "underlay": NODE_IP,
        "sandbox_cidr": "100.96.1.0/24",
        "discovery": {"control_url": f"http://{CONTROL_IP}:8080", "interval_s": 60},
        "keys_dir": str(keys),
        "api_socket": str(env.api_socket),
        "state_dir": str(env.state_dir),
        "sandbox_netns_prefix": env.sandbox_prefix,
    }
    (env.root / "agent.json").write_text(json.dumps(config))
    env.procs["agent"] = netns.popen_in_netns(
        env.node,
        [
            sys.executable,
            "-m",
            "egressd",
            "agent",
            "serve",
            "--config",
            str(env.root / "agent.json"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(env.root / "agent.log").open("wb"),
        env=py,
        cwd=str(REPO),
    )

    def ready() -> bool:
        proc = env.procs["agent"]
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}:\n{env.agent_log()[-4000:]}")
        return http_get(env.node, NODE_IP, 9090, "/readyz")[0] == 200

    wait_for(ready, START_TIMEOUT_S, "agent /readyz")
    wait_for(lambda: '"watch_up"' in env.agent_log(), 10, "the agent's watch")


def tear_down(env: Env) -> None:
    tear_down_node(
        env.procs.values(),
        timeout_s=STOP_TIMEOUT_S,
        namespaces=env.namespaces,
        leftovers=[env.sandbox_prefix],
        mounts=[env.state_dir / "bpffs"],
    )


def count(env: Env, sandbox_id: str, verdict: str, reason: str) -> float:
    text = env.agent().metrics()
    return (
        metric(
            text,
            SANDBOX_METRIC,
            sandbox_id=sandbox_id,
            job_id=str(JOB),
            verdict=verdict,
            reason=reason,
        )
        or 0.0
    )


def syn(ns: str, port: int) -> None:
    """One SYN from the sandbox to DEST:port (the socket is gone at once)."""
    sock = netns.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
        sock.setblocking(False)
        sock.connect_ex((DEST, port))
        time.sleep(0.005)
