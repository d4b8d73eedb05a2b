"""Agent configuration: the example file loads, defaults, and every error names its field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from egressd import layout
from egressd.agent.config import AgentConfig, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[3] / "node-agent" / "agent.example.json"
MINIMAL: dict[str, Any] = {
    "name": "node1",
    "underlay": "198.18.0.11",
    "sandbox_cidr": "100.96.1.0/24",
    "proxies": [{"name": "proxy1", "underlay": "198.18.0.21"}],
}


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.name == "node1"
    assert [p.name for p in config.proxies] == ["proxy1", "proxy2"]
    assert str(config.gateway) == "100.96.1.1"
    assert config.sandbox_mtu == layout.SANDBOX_MTU


def test_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.vni == layout.DEFAULT_VNI == 1
    assert config.api_socket == Path("/run/egressd/agents/node1.sock")
    assert config.state_dir == Path("/run/egressd/agents/node1")
    assert config.admin_port == 9090
    assert config.geneve_port == 6081
    assert config.tun == "egr0"
    assert config.resolver == layout.RESOLVER
    assert config.fleet_ranges == layout.Layout((), (), ()).fleet_ranges
    assert config.sandbox_netns_prefix == "egd-sbx-"
    health = config.health
    assert (health.interval_s, health.down_after, health.up_after) == (1.0, 3, 2)
    assert health.timeout_s < health.interval_s


def test_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]


def test_health_interval_sets_timeout() -> None:
    config = parse_config({**MINIMAL, "health": {"interval_s": 0.2}})
    assert config.health.timeout_s == 0.2


def _with(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(MINIMAL)
    target: Any = obj
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    last = parts[-1]
    if value is _DELETE:
        del target[int(last) if last.isdigit() else last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return obj


_DELETE = object()

BAD = [
    ("name", _DELETE, "name"),
    ("name", "Node_1", "name"),
    ("underlay", "198.18.0.300", "underlay"),
    ("underlay", "198.18.0.21", "underlay"),  # a proxy's address
    ("sandbox_cidr", "100.96.1.0", "sandbox_cidr"),
    ("sandbox_cidr", "100.96.1.1/24", "sandbox_cidr"),
    ("sandbox_cidr", "100.96.1.0/30", "sandbox_cidr"),
    ("proxies", [], "proxies"),
    ("proxies", "proxy1", "proxies"),
    ("proxies.0.underlay", "x", "proxies[0].underlay"),
    ("proxies.0.name", "P!", "proxies[0].name"),
    ("proxies.0.port", 1, "proxies[0].port"),
    ("vni", 1 << 24, "vni"),
    ("vni", True, "vni"),
    ("keys_dir", "relative/keys", "keys_dir"),
    ("admin_port", 0, "admin_port"),
    ("tun", "a-very-long-tun-name", "tun"),
    ("fleet_ranges", ["10.0.0.1/8"], "fleet_ranges[0]"),
    ("health.down_after", 0, "health.down_after"),
    ("health.timeout_s", 5, "health.timeout_s"),
    ("health.bogus", 1, "health.bogus"),
    ("sandbox_mtu", 1500, "sandbox_mtu"),
    ("colour", "blue", "colour"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_errors_name_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value))
    assert info.value.field == field
    assert info.value.reason == "invalid_config"


def test_duplicate_proxies() -> None:
    obj = _with(
        "proxies",
        [{"name": "a", "underlay": "198.18.0.21"}, {"name": "a", "underlay": "198.18.0.22"}],
    )
    with pytest.raises(ConfigError) as info:
        parse_config(obj)
    assert info.value.field == "proxies"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(MINIMAL))
    assert isinstance(load_config(good), AgentConfig)


def test_state_dir_with_a_dot_is_refused() -> None:
    from egressd.agent.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "name": "node1",
                "underlay": "198.18.0.11",
                "sandbox_cidr": "100.96.1.0/24",
                "proxies": [{"name": "proxy1", "underlay": "198.18.0.21"}],
                "state_dir": "/tmp/tmp.abc/node1",
            }
        )
    assert info.value.field == "state_dir"


def test_datapath_defaults_to_userspace_and_takes_kernel() -> None:
    from egressd.agent.config import ConfigError, parse_config

    assert parse_config(MINIMAL).datapath == "userspace"
    assert parse_config({**MINIMAL, "datapath": "kernel"}).datapath == "kernel"
    for bad, field in (
        ({"datapath": "xdp"}, "datapath"),
        ({"datapath": 1}, "datapath"),
        ({"datapath": "kernel", "offload": True}, "offload"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config({**MINIMAL, **bad})
        assert info.value.field == field
