"""Per-node sandbox CIDRs on Kubernetes: every pod of the node-agent DaemonSet gets one
environment, so the manifests must never hand the agents a fixed CIDR (every node the
same, and the control plane refuses the second); they say `auto`, the entry code writes
an agent config with `"sandbox_cidr": "auto"` the agent accepts, and the control
plane's pool lies where the fleet routes sandbox addresses. Compose keeps its
explicit CIDR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.config import parse_config as parse_agent_config
from egressd.control.config import parse_sandbox_pool
from egressd.layout import SANDBOX_SUPERNET
from egressd_harness.deploy import entry, settings
from egressd_harness.topology.fleet import Fleet
from tests.support.deploy import ROOT, compose
from tests.support.kubernetes import FIELD_VALUES, TARGETS, entry_env, one

CLUSTER_NODE = {
    "EGRESSD_CONTROL_URL": "http://egressd-control.egressd.svc:8080",
    "EGRESSD_UNDERLAY_ADDRESS": "10.244.1.7",
    "EGRESSD_NODE_NAME": "worker-1",
    "EGRESSD_SANDBOX_CIDR": "auto",
    "EGRESSD_UNDERLAY_RANGES": "10.244.0.0/16",
}


def rendered_node_env(target: str, node_name: str, pod_ip: str) -> dict[str, str]:
    """The node-agent container's environment as the kubelet would give it on one node."""
    data = one(target, "ConfigMap", "egressd-fleet")["data"]
    fields = {**FIELD_VALUES, "spec.nodeName": node_name, "status.podIP": pod_ip}
    values = {}
    for item in entry_env(target, "node"):
        source = item.get("valueFrom", {})
        if "value" in item:
            values[item["name"]] = item["value"]
        elif "fieldRef" in source:
            values[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            values[item["name"]] = data[source["configMapKeyRef"]["key"]]
    return values


def test_auto_is_a_setting() -> None:
    got = settings.from_env(CLUSTER_NODE)
    assert got.sandbox_cidr is None
    # Unset is still the compose fleet's fixed CIDR; a typo is still an error.
    assert settings.from_env({}).sandbox_cidr == IPv4Network("100.96.1.0/24")
    with pytest.raises(settings.SettingsError, match="EGRESSD_SANDBOX_CIDR='Auto'"):
        settings.from_env({**CLUSTER_NODE, "EGRESSD_SANDBOX_CIDR": "Auto"})


@pytest.mark.parametrize("target", TARGETS)
def test_daemonset_nodes_do_not_share_a_fixed_sandbox_cidr(target: str) -> None:
    """Two nodes of the DaemonSet: no CIDR in the environment, so neither can
    have one that the other has too; both ask the control plane."""
    a = settings.from_env(rendered_node_env(target, "worker-1", "10.244.1.7"))
    b = settings.from_env(rendered_node_env(target, "worker-2", "10.244.2.9"))
    assert a.node_name != b.node_name
    assert a.sandbox_cidr is None and b.sandbox_cidr is None, (
        "the node-agent DaemonSet hands every node the same fixed sandbox CIDR"
    )
    env = {e["name"]: e for e in entry_env(target, "node")}
    assert env["EGRESSD_SANDBOX_CIDR"] == {"name": "EGRESSD_SANDBOX_CIDR", "value": "auto"}


@pytest.mark.parametrize("target", TARGETS)
def test_the_control_plane_pool_is_where_the_fleet_routes_sandboxes(target: str) -> None:
    control = one(target, "StatefulSet", "egressd-control")
    args = control["spec"]["template"]["spec"]["containers"][0]["args"]
    options = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--"))
    pool = parse_sandbox_pool(options["sandbox-pool"], int(options["sandbox-prefix"]))
    # Proxies route the sandbox supernet to their tunnel and every tier denies it.
    assert pool.network.subnet_of(SANDBOX_SUPERNET)
    # Enough blocks for a fleet bigger than the example's: at least 100 nodes.
    assert pool.blocks >= 100


def test_compose_keeps_an_explicit_cidr() -> None:
    node = compose()["services"]["node"]
    # Not the values compose interpolates (EGRESSD_DATAPATH: ${EGRESSD_DATAPATH:-kernel}).
    literal = {k: v for k, v in node["environment"].items() if "${" not in v}
    assert settings.from_env(literal).sandbox_cidr == IPv4Network("100.96.1.0/24")


@pytest.fixture
def cluster_node_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name, value in CLUSTER_NODE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGRESSD_FLEET_DIR", str(tmp_path / "fleet"))
    entry.env.cache_clear()
    yield tmp_path / "fleet"
    entry.env.cache_clear()


@pytest.mark.usefixtures("cluster_node_env")
def test_entry_writes_an_auto_agent_config_the_agent_accepts() -> None:
    spec = entry.node_spec()
    assert (spec.name, spec.underlay) == ("worker-1", IPv4Address("10.244.1.7"))
    body = entry.agent_config(Fleet(entry.layout(nodes=(spec,))), spec)
    assert body["sandbox_cidr"] == "auto"
    assert body["registration"]["admin_token_file"] == str(entry.env().fleet_dir / "admin-token")
    agent = parse_agent_config(json.loads(json.dumps(body)))
    assert agent.sandbox_cidr is None
    assert agent.registration is not None and agent.registration.wait_s == entry.WAIT_S
    assert agent.discovery is not None
    assert agent.discovery.control_url == "http://egressd-control.egressd.svc:8080"


@pytest.mark.usefixtures("cluster_node_env")
def test_entry_in_auto_mode_leaves_registration_to_the_agent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registered: list[Any] = []
    monkeypatch.setattr(entry, "register", lambda *a, **k: registered.append(a))
    monkeypatch.setenv("EGRESSD_RUN_DIR", str(tmp_path / "run"))
    entry.env.cache_clear()
    monkeypatch.setattr(entry, "writable_proc_sys", lambda: None)
    monkeypatch.setattr(
        entry,
        "link_fleet_dirs",
        lambda: (tmp_path / "run" / "config").mkdir(parents=True, exist_ok=True),
    )
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "admin-token").write_text("t\n")
    _, _, config_path = entry.start_node()
    assert registered == []
    assert json.loads(config_path.read_text())["sandbox_cidr"] == "auto"
    # An explicit CIDR is registered by the entry code, as before.
    monkeypatch.setenv("EGRESSD_SANDBOX_CIDR", "100.96.7.0/24")
    entry.env.cache_clear()
    _, _, config_path = entry.start_node()
    assert registered == [
        ("nodes", "worker-1", {"underlay": "10.244.1.7", "sandbox_cidr": "100.96.7.0/24"})
    ]
    assert json.loads(config_path.read_text())["sandbox_cidr"] == "100.96.7.0/24"


def test_agent_cli_prints_one_line_when_the_control_plane_cannot_give_a_cidr(
    tmp_path: Path,
) -> None:
    """`egressd agent serve` with "auto" and no control plane: exit 2, one line, and
    nothing set up (it never reaches the sysctls, the TUN or tier 1)."""
    token = tmp_path / "admin-token"
    token.write_text("t\n")
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "name": "worker-1",
                "underlay": "127.0.0.1",
                "sandbox_cidr": "auto",
                "discovery": {"control_url": "http://127.0.0.1:9", "timeout_s": 0.5},
                "registration": {"admin_token_file": str(token), "wait_s": 0.5},
                "state_dir": str(tmp_path / "state"),
                "api_socket": str(tmp_path / "agent.sock"),
            }
        )
    )
    # As root, in a network namespace of its own: were it to go on past the
    # registration, its sysctls and TUN would not touch the host's.
    isolate = ["unshare", "--net", "--"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*isolate, sys.executable, "-m", "egressd", "agent", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("egressd: error: sandbox_cidr: control_unreachable: PUT "), last
    assert "/v1/nodes/worker-1" in last
    assert not (tmp_path / "state").exists() and not (tmp_path / "agent.sock").exists()
