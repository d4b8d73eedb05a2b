"""Per-node sandbox CIDRs from the control plane's pool, end to end with real processes:
one `egressd control serve --sandbox-pool 100.96.8.0/23 --sandbox-prefix 24` and two real
agents (`egressd agent serve`, `"sandbox_cidr": "auto"`) on their own nodes.

Topology (namespaces ``egd-t<run id>...``, none connected to the host):

    egd-t<id>u: bridge br0 ──veth── egd-t<id>c   control plane 198.18.0.2:8080
                           ──veth── egd-t<id>n1  node1 198.18.0.11, an agent
                           ──veth── egd-t<id>n2  node2 198.18.0.12, an agent

Checked: the two agents come up with distinct CIDRs from the pool, and the
sandboxes they make get addresses in them; after both agents and the control
plane are stopped and started again (agents in the other order), each node has
its CIDR back; a third node finds the pool exhausted and its agent exits 2 with
one line, having set nothing up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.client import AgentClient, SandboxInfo
from egressd.net import netns
from egressd.policy.keys import SigningKey, generate_signing_key, write_key_dir
from tests.support.agent_fleet import REPO, START_TIMEOUT_S, STOP_TIMEOUT_S, http_get
from tests.support.processes import tear_down_node
from tests.support.proxy_fleet import http
from tests.support.root import AGENT_NEEDS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*AGENT_NEEDS)

CONTROL_IP = "198.18.0.2"
NODES = {"node1": "198.18.0.11", "node2": "198.18.0.12"}
POOL = IPv4Network("100.96.8.0/23")  # two /24 blocks: two nodes fill it
JOB = uuid.UUID("3c2d1b7e-4a5f-4e6d-9b8a-1c2d3e4f5a6b")


@dataclass
class Env:
    root: Path
    key: SigningKey
    base: str
    token: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def under(self) -> str:
        return f"{self.base}u"

    @property
    def ctl(self) -> str:
        return f"{self.base}c"

    def ns(self, node: str) -> str:
        return f"{self.base}{node[0]}{node[-1]}"  # node1 -> ...n1

    def sandbox_prefix(self, node: str) -> str:
        return f"{self.base}s{node[-1]}-"

    def socket(self, node: str) -> Path:
        return self.root / f"{node}.sock"

    def state_dir(self, node: str) -> Path:
        return self.root / f"state-{node}"

    @property
    def token_file(self) -> Path:
        return self.root / "admin-token"

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def control(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        status, payload = http(
            self.ns("node1"),
            method,
            CONTROL_IP,
            8080,
            path,
            body,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        return status, (json.loads(payload) if payload else None)

    def popen(self, name: str, ns: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            return netns.popen_in_netns(
                ns,
                [sys.executable, "-m", "egressd", *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                cwd=str(REPO),
            )

    # -- processes --

    def start_control(self) -> None:
        keys = self.root / "keys"
        self.procs["control"] = self.popen(
            "control",
            self.ctl,
            [
                "control",
                "serve",
                "--listen",
                f"{CONTROL_IP}:8080",
                "--state-dir",
                str(self.root / "ctl-state"),
                "--key",
                str(keys / "signing.key"),
                "--admin-token-file",
                str(self.token_file),
                "--sandbox-pool",
                str(POOL),
                "--sandbox-prefix",
                "24",
            ],
        )
        wait_for(
            lambda: http_get(self.ns("node1"), CONTROL_IP, 8080, "/readyz")[0] == 200,
            START_TIMEOUT_S,
            "the control plane",
        )
        self.token = self.token_file.read_text().strip()

    def agent_config(self, node: str, underlay: str) -> Path:
        config = {
            "name": node,
            "underlay": underlay,
            "sandbox_cidr": "auto",
            "discovery": {"control_url": f"http://{CONTROL_IP}:8080", "interval_s": 60},
            "registration": {"admin_token_file": str(self.token_file), "wait_s": 10},
            "keys_dir": str(self.root / "keys"),
            "api_socket": str(self.socket(node)),
            "state_dir": str(self.state_dir(node)),
            "sandbox_netns_prefix": self.sandbox_prefix(node),
        }
        path = self.root / f"{node}.json"
        path.write_text(json.dumps(config))
        return path

    def start_agent(self, node: str) -> None:
        config = self.agent_config(node, NODES[node])
        proc = self.popen(node, self.ns(node), ["agent", "serve", "--config", str(config)])
        self.procs[node] = proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{node} exited {proc.returncode}:\n{self.log(node)[-3000:]}")
            return http_get(self.ns(node), NODES[node], 9090, "/readyz")[0] == 200

        wait_for(ready, START_TIMEOUT_S, f"{node} /readyz")

    def stop(self, name: str) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise

    # -- the agents' view --

    def register_sandbox(self, node: str, sandbox_id: str, jws: str) -> SandboxInfo:
        async def go() -> SandboxInfo:
            async with AgentClient(self.socket(node), timeout_s=30) as agent:
                return await agent.register(sandbox_id, jws)

        return asyncio.run(go())

    def unregister_sandbox(self, node: str, sandbox_id: str) -> None:
        async def go() -> None:
            async with AgentClient(self.socket(node), timeout_s=30) as agent:
                await agent.unregister(sandbox_id)

        asyncio.run(go())

    def allocated(self, node: str) -> list[str]:
        """The CIDRs the agent logged as allocated, in order (one per start)."""
        out = []
        for line in self.log(node).splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "sandbox_cidr_allocated":
                    out.append(event["sandbox_cidr"])
        return out


def _setup(env: Env) -> None:
    for ns in (env.under, env.ctl, *(env.ns(n) for n in NODES)):
        netns.ensure_netns(ns)
        env.namespaces.append(ns)
        netns.set_link_up(ns, "lo")
    netns.ensure_bridge(env.under, "br0")
    netns.set_link_up(env.under, "br0")
    members = [("c", env.ctl, CONTROL_IP), *((n[-1], env.ns(n), ip) for n, ip in NODES.items())]
    for tag, ns, ip in members:
        netns.ensure_veth(env.under, f"v{tag}", ns, "u0")
        netns.enslave(env.under, f"v{tag}", "br0")
        netns.set_link_up(env.under, f"v{tag}")
        netns.ensure_addr(ns, "u0", f"{ip}/24")
        netns.set_link_up(ns, "u0")
    write_key_dir(env.root / "keys", env.key)


def _teardown(env: Env) -> None:
    tear_down_node(
        env.procs.values(),
        timeout_s=STOP_TIMEOUT_S,
        namespaces=env.namespaces,
        leftovers=[env.sandbox_prefix(node) for node in NODES],
        mounts=[env.state_dir(node) / "bpffs" for node in NODES],
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    env = Env(
        root=tmp_path_factory.mktemp("cidr-pool"),
        key=generate_signing_key(),
        base=f"egd-t{secrets.token_hex(3)}",
    )
    try:
        _setup(env)
        yield env
    finally:
        _teardown(env)


def node_cidrs(env: Env) -> dict[str, IPv4Network]:
    status, body = env.control("GET", "/v1/nodes")
    assert status == 200, body
    return {n["name"]: IPv4Network(n["sandbox_cidr"]) for n in body["nodes"]}


def sandbox_in(env: Env, node: str, cidr: IPv4Network, jws: str, sandbox_id: str) -> None:
    """A sandbox made by the agent on `node` lives in `cidr`, gateway its first address."""
    info = env.register_sandbox(node, sandbox_id, jws)
    try:
        assert info.ip in cidr, (node, info.ip, cidr)
        assert info.gateway == cidr.network_address + 1
        assert info.prefixlen == cidr.prefixlen
        eth0 = netns.netns_state(info.netns).link("eth0")
        assert eth0 is not None and [str(a) for a in eth0.addresses] == [
            f"{info.ip}/{cidr.prefixlen}"
        ]
    finally:
        env.unregister_sandbox(node, sandbox_id)


def put_policy(env: Env) -> str:
    body = {
        "v": 1,
        "account": "acme",
        "nodes": list(NODES),
        "egress": [{"host": "api.allowed.test", "ports": [443]}],
    }
    status, answer = env.control("PUT", f"/v1/jobs/{JOB}/policy", body)
    assert status == 200, answer
    return str(answer["jws"])


def test_two_agents_get_distinct_cidrs_from_the_pool(env: Env) -> None:
    env.start_control()
    env.start_agent("node1")
    env.start_agent("node2")
    cidrs = node_cidrs(env)
    assert set(cidrs) == set(NODES)
    assert cidrs["node1"] != cidrs["node2"] and not cidrs["node1"].overlaps(cidrs["node2"])
    assert all(c.subnet_of(POOL) and c.prefixlen == 24 for c in cidrs.values())
    for node, underlay in NODES.items():
        assert env.allocated(node) == [str(cidrs[node])]
        status, record = env.control("GET", f"/v1/nodes/{node}")
        assert status == 200 and record["underlay"] == underlay
    jws = put_policy(env)  # a policy may name only registered nodes: the agents did that
    for node in NODES:
        sandbox_in(env, node, cidrs[node], jws, f"sbx-{node}")


def test_same_cidrs_after_the_agents_and_the_control_plane_restart(env: Env) -> None:
    before = node_cidrs(env)
    for name in ("node1", "node2", "control"):
        assert env.stop(name) == 0, env.log(name)[-2000:]
    env.start_control()
    for node in ("node2", "node1"):  # the other order: allocation order must not matter
        env.start_agent(node)
    assert node_cidrs(env) == before
    jws = put_policy(env)
    for node in NODES:
        assert env.allocated(node) == [str(before[node])] * 2
        sandbox_in(env, node, before[node], jws, f"sbx2-{node}")


def test_a_third_node_finds_the_pool_exhausted_and_its_agent_exits_with_one_line(
    env: Env,
) -> None:
    config = env.agent_config("node3", "198.18.0.13")
    done = subprocess.run(
        netns.netns_argv(
            env.ns("node1"),
            [
                sys.executable,
                "-m",
                "egressd",
                "agent",
                "serve",
                "--config",
                str(config),
            ],
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("egressd: error: sandbox_cidr: sandbox_pool_exhausted: PUT "), last
    assert f"no free /24 in {POOL}" in last
    # Fail closed: nothing of the agent was made, nothing registered.
    assert not env.state_dir("node3").exists() and not env.socket("node3").exists()
    assert env.control("GET", "/v1/nodes/node3")[0] == 404
    assert set(node_cidrs(env)) == set(NODES)
    # The running agents were not disturbed.
    for node, ip in NODES.items():
        assert http_get(env.ns(node), ip, 9090, "/readyz")[0] == 200
