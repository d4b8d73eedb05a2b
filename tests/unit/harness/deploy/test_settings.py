"""egressd_harness.deploy.settings: the entry points' EGRESSD_* variables, read once and
frozen. Unset, every one is the compose fleet's value (so deploy/compose.yaml
needs nothing new); a bad value is one SettingsError naming the variable, and
the entry point exits with it before it writes, registers or starts anything."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from egressd.agent.config import parse_config as parse_agent_config
from egressd.layout import NodeSpec, default_layout
from egressd.proxy.config import config_from_mapping
from egressd.proxy.registry import static_members
from egressd_harness.deploy import entry, settings
from egressd_harness.deploy.settings import DeploySettings, SettingsError, by_address, from_env
from egressd_harness.topology.fleet import Fleet

ROOT = Path(__file__).resolve().parents[4]

CLUSTER = {
    "EGRESSD_CONTROL_URL": "http://egressd-control.egressd.svc:8080",
    "EGRESSD_UNDERLAY_ADDRESS": "10.244.1.7",
    "EGRESSD_EGRESS_ADDRESS": "10.244.1.7",
    "EGRESSD_PROXY_NAME": "egressd-proxy-5d8f7c9b4-x2kqz",
    "EGRESSD_NODE_NAME": "worker-1",
    "EGRESSD_SANDBOX_CIDR": "100.96.7.0/24",
    "EGRESSD_UNDERLAY_RANGES": "10.244.0.0/16, 10.96.0.0/12,192.168.10.0/24",
}


def test_unset_is_the_compose_fleet() -> None:
    got = from_env({"PATH": "/usr/bin", "EGRESSD_FLEET_DIR": "/fleet"})
    assert got == DeploySettings()
    assert got.control_url == "http://198.18.0.2:8080"
    assert got.underlay is None and got.egress is None and got.proxy_name is None
    assert got.node_name == "node1"
    assert got.sandbox_cidr == IPv4Network("100.96.1.0/24")
    # Exactly the ranges the compose fleet's configs always had.
    assert got.fleet_ranges == default_layout().fleet_ranges


def test_compose_values_set_explicitly_change_nothing() -> None:
    explicit = {
        "EGRESSD_CONTROL_URL": "http://198.18.0.2:8080",
        "EGRESSD_NODE_NAME": "node1",
        "EGRESSD_SANDBOX_CIDR": "100.96.1.0/24",
        "EGRESSD_UNDERLAY_RANGES": "198.18.0.0/24",
    }
    assert from_env(explicit) == DeploySettings()


def test_cluster_values() -> None:
    got = from_env(CLUSTER)
    assert got.control_url == "http://egressd-control.egressd.svc:8080"
    assert got.underlay == got.egress == IPv4Address("10.244.1.7")
    assert got.proxy_name == "egressd-proxy-5d8f7c9b4-x2kqz"
    assert got.node_name == "worker-1"
    assert got.sandbox_cidr == IPv4Network("100.96.7.0/24")
    assert got.fleet_ranges == (
        IPv4Network("10.244.0.0/16"),
        IPv4Network("10.96.0.0/12"),
        IPv4Network("192.168.10.0/24"),
        IPv4Network("100.96.0.0/16"),
        IPv4Network("100.100.100.53/32"),
    )
    # Frozen: read once, never changed under a running role.
    with pytest.raises(AttributeError):
        got.node_name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("EGRESSD_CONTROL_URL", "egressd-control:8080", "http(s) URL"),
        ("EGRESSD_CONTROL_URL", "ftp://egressd-control:8080", "http(s) URL"),
        ("EGRESSD_CONTROL_URL", "http://egressd-control:8080/api", "path"),
        ("EGRESSD_CONTROL_URL", "http://egressd-control:99999", "port"),
        ("EGRESSD_CONTROL_URL", "http://admin:pw@egressd-control:8080", "credentials"),
        ("EGRESSD_CONTROL_URL", "http://[fd00::1]:8080", "IPv4"),
        ("EGRESSD_UNDERLAY_ADDRESS", "10.244.1.300", "IPv4 address"),
        ("EGRESSD_UNDERLAY_ADDRESS", "fd00::7", "IPv4 address"),
        ("EGRESSD_EGRESS_ADDRESS", "proxy", "IPv4 address"),
        ("EGRESSD_PROXY_NAME", "Proxy_1", "[a-z0-9-]"),
        ("EGRESSD_NODE_NAME", "ip-10-0-1-23.ec2.internal", "dots"),
        ("EGRESSD_NODE_NAME", "n" * 64, "1-63"),
        ("EGRESSD_SANDBOX_CIDR", "100.96.1.0/33", "not an IPv4 network"),
        ("EGRESSD_SANDBOX_CIDR", "100.96.1.5/24", "not an IPv4 network"),
        ("EGRESSD_SANDBOX_CIDR", "10.0.0.0/24", "100.96.0.0/16"),
        ("EGRESSD_SANDBOX_CIDR", "100.96.1.0/30", "/29"),
        ("EGRESSD_UNDERLAY_RANGES", "10.0.0.0/8,nope", "'nope'"),
        ("EGRESSD_UNDERLAY_RANGES", " , ", "names no network"),
        ("EGRESSD_NODE_NAME", "", "empty"),
        ("EGRESSD_CONTROL_URL", "  ", "empty"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_variable(var: str, value: str, words: str) -> None:
    env = dict(CLUSTER, **{var: value})
    with pytest.raises(SettingsError) as caught:
        from_env(env)
    message = str(caught.value)
    assert caught.value.reason == "bad_environment"
    assert message.count("EGRESSD_") == 1, message  # only the bad one is named
    assert f"{var}={value!r}" in message and words in message, message


def test_every_bad_variable_is_named_in_the_one_error() -> None:
    env = dict(CLUSTER, EGRESSD_UNDERLAY_ADDRESS="x", EGRESSD_SANDBOX_CIDR="y")
    with pytest.raises(SettingsError) as caught:
        from_env(env)
    assert "EGRESSD_UNDERLAY_ADDRESS='x'" in str(caught.value)
    assert "EGRESSD_SANDBOX_CIDR='y'" in str(caught.value)


def test_control_url_by_address() -> None:
    asked: list[str] = []

    def resolve(host: str) -> IPv4Address:
        asked.append(host)
        return IPv4Address("10.96.12.34")

    url = "http://egressd-control.egressd.svc:8080"
    assert by_address(url, resolve) == "http://10.96.12.34:8080"
    assert by_address("http://egressd-control", resolve) == "http://10.96.12.34"
    assert asked == ["egressd-control.egressd.svc", "egressd-control"]
    # An address stays; https keeps its name (the certificate names it): no lookup.
    assert by_address("http://198.18.0.2:8080", resolve) == "http://198.18.0.2:8080"
    assert by_address("https://control.example:8443", resolve) == "https://control.example:8443"
    assert len(asked) == 2


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in CLUSTER.items():
        monkeypatch.setenv(name, value)
    entry.env.cache_clear()
    monkeypatch.setattr(entry, "resolve_ipv4", lambda host: IPv4Address("10.96.12.34"))
    yield
    entry.env.cache_clear()


@pytest.mark.usefixtures("cluster_env")
def test_entry_writes_cluster_configs_the_daemons_accept() -> None:
    spec = entry.proxy_spec()
    assert (spec.name, str(spec.underlay), str(spec.egress)) == (
        "egressd-proxy-5d8f7c9b4-x2kqz",
        "10.244.1.7",
        "10.244.1.7",
    )
    proxy = config_from_mapping(entry.proxy_config(Fleet(entry.layout(proxies=(spec,))), spec))
    # The control plane's cluster IP is one of the fleet's own addresses.
    assert proxy.control_url == "http://10.96.12.34:8080"
    assert IPv4Address("10.96.12.34") in static_members(
        underlay=proxy.underlay,
        egress=(proxy.egress,),
        control_url=proxy.control_url,
        resolvers=(),
    )
    assert IPv4Network("10.244.0.0/16") in proxy.fleet_ranges

    node = entry.node_spec()
    assert node == NodeSpec("worker-1", IPv4Address("10.244.1.7"), IPv4Network("100.96.7.0/24"))
    fleet = Fleet(entry.layout(nodes=(node,)))
    agent = parse_agent_config(entry.agent_config(fleet, node))
    assert agent.discovery is not None
    assert agent.discovery.proxies_url == "http://egressd-control.egressd.svc:8080/v1/proxies"
    assert agent.fleet_ranges == settings.from_env(CLUSTER).fleet_ranges


def test_entry_point_exits_naming_the_bad_variable_and_does_nothing(tmp_path: Path) -> None:
    run_dir, fleet_dir, log_dir = tmp_path / "run", tmp_path / "fleet", tmp_path / "log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "EGRESSD_RUN_DIR": str(run_dir),
        "EGRESSD_FLEET_DIR": str(fleet_dir),
        "EGRESSD_LOG_DIR": str(log_dir),
        **CLUSTER,
    }
    for role, var in (("proxy", "EGRESSD_UNDERLAY_ADDRESS"), ("node", "EGRESSD_SANDBOX_CIDR")):
        bad = dict(env, **{var: "10.0.0.0/99"})
        done = subprocess.run(
            [sys.executable, "-m", "egressd_harness.deploy", role],
            env=bad,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("entry: bad_environment: ") and var in last, done.stderr
        assert not run_dir.exists() and not fleet_dir.exists() and not log_dir.exists()


def test_resolve_ipv4_asks_the_system_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    assert entry.resolve_ipv4("localhost") == IPv4Address("127.0.0.1")
    monkeypatch.setattr(entry, "WAIT_S", 0.0)
    with pytest.raises(SystemExit, match=r"cannot resolve control plane host 'no-such.invalid'"):
        entry.resolve_ipv4("no-such.invalid")
