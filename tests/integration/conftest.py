"""Fixtures shared by the integration tests: the real control plane on loopback, and the
namespaced fleets (one node agent; one proxy behind a real control plane) that several files
bring up once per module. A module names the fleet it uses `fleet` with a one-line fixture."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd.layout import CONTROL_ADDR
from egressd.net import netns as kn
from egressd.policy.jws import policy_digest
from egressd.policy.keys import generate_signing_key, write_key_dir
from egressd_harness.topology import network
from tests.support.agent_fleet import Fleet as AgentFleet
from tests.support.agent_fleet import bring_up, tear_down
from tests.support.control_process import ControlProcess, Paths
from tests.support.proxy_fleet import (
    BASE,
    FORGER,
    JOB,
    JOB_NODE2,
    SITE,
    NodeSim,
    ProxyProcess,
    http,
    running_fleet,
    running_proxy,
)
from tests.support.proxy_fleet import Fleet as ProxyFleet


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path)
    write_key_dir(p.keys, generate_signing_key())
    return p


@pytest.fixture
def spawn(paths: Paths) -> Iterator[list[ControlProcess]]:
    """Started processes are recorded here and always killed at the end."""
    started: list[ControlProcess] = []
    yield started
    for proc in started:
        proc.kill()


# --- one node agent (tests/support/agent_fleet.py) ---


@pytest.fixture(scope="module")
def agent_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentFleet]:
    run_id = secrets.token_hex(3)
    base = f"egd-t{run_id}"
    root = tmp_path_factory.mktemp("agent")
    fleet = AgentFleet(
        run_id=run_id,
        root=root,
        key=generate_signing_key(),
        under=f"{base}u",
        node=f"{base}n",
        proxy_ns={"proxy1": f"{base}p1", "proxy2": f"{base}p2"},
        sandbox_prefix=f"{base}s-",
        config_path=root / "agent.json",
        api_socket=root / "agent.sock",
        state_dir=root / "state",
    )
    try:
        bring_up(fleet)
        yield fleet
    finally:
        tear_down(fleet)


# --- the proxy data plane (tests/support/proxy_fleet.py) ---


@pytest.fixture(scope="module")
def proxy_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFleet]:
    root = tmp_path_factory.mktemp("proxy-dataplane")
    with running_fleet(root) as f:
        kn.ensure_addr(f.node_ns, network.UNDERLAY_IF, f"{FORGER}/24")
        egress = [
            {"cidr": f"{SITE}/32", "ports": [80]},
            {"host": "api.allowed.test", "ports": [80, 443]},
        ]
        f.put(
            f"/v1/jobs/{JOB}/policy",
            {"v": 1, "account": "acme", "nodes": ["node1"], "egress": egress},
        )
        # A policy names registered nodes only: node2 is registered, never started.
        node2 = BASE.nodes[1]
        f.put(
            f"/v1/nodes/{node2.name}",
            {"underlay": str(node2.underlay), "sandbox_cidr": str(node2.sandbox_cidr)},
        )
        f.put(
            f"/v1/jobs/{JOB_NODE2}/policy",
            {"v": 1, "account": "acme", "nodes": ["node2"], "egress": egress},
        )

        www = root / "www"
        www.mkdir()
        (www / "hello.txt").write_text("hello through the tunnel\n")
        f.inet_http = kn.popen_in_netns(
            f.inet,
            [sys.executable, "-m", "http.server", "--bind", SITE, "--directory", str(www), "80"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(root / "inet-http.log").open("wb"),
        )
        yield f


@pytest.fixture
def proxy(proxy_fleet: ProxyFleet) -> Iterator[ProxyProcess]:
    with running_proxy(proxy_fleet) as p:
        yield p


@pytest.fixture
def node(proxy_fleet: ProxyFleet) -> Iterator[NodeSim]:
    _, body = http(proxy_fleet.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{JOB}/policy")
    sim = NodeSim(proxy_fleet, policy_digest(json.loads(body)["jws"]))
    try:
        yield sim
    finally:
        sim.close()
