"""The proxy's JSON configuration, its admin listener and the `proxy serve` CLI's refusals."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from egressd import layout
from egressd.admin import AdminError, start_admin
from egressd.proxy.config import (
    DEFAULT_FLEET_RANGES,
    ConfigError,
    ProxyConfig,
    config_from_mapping,
    load_config,
)

MINIMAL: dict[str, Any] = {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"}


def write(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "proxy.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_minimal_config_takes_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config == ProxyConfig(
        name="proxy1",
        underlay=ipaddress.IPv4Address("198.18.0.21"),
        egress=ipaddress.IPv4Address("203.0.113.21"),
    )
    assert config.vni == 1
    assert config.control_url == "http://198.18.0.2:8080"
    assert config.keys_dir == Path("/run/egressd/keys")
    assert (config.admin_port, config.geneve_port) == (9090, 6081)
    assert config.admin_host == "198.18.0.21"
    assert config.tun == "gnv0"
    assert (config.tproxy_tcp_port, config.tproxy_dns_port) == (15001, 15053)
    assert config.resolver == layout.RESOLVER
    assert config.upstream_resolver == ipaddress.IPv4Address("203.0.113.53")
    assert config.sandbox_supernet == ipaddress.IPv4Network("100.96.0.0/16")
    assert config.fleet_ranges == DEFAULT_FLEET_RANGES
    assert config.flow_idle_s == 300
    assert config.node_refresh_s == 2
    assert config.mtu == 1500 - 64


def test_every_field_can_be_set(tmp_path: Path) -> None:
    doc = {
        **MINIMAL,
        "vni": 7,
        "control_url": "http://127.0.0.1:18080/",
        "keys_dir": str(tmp_path / "keys"),
        "admin_port": 19090,
        "geneve_port": 16081,
        "tun": "gnvt0",
        "tproxy_tcp_port": 25001,
        "tproxy_dns_port": 25053,
        "resolver": "100.100.100.53",
        "upstream_resolver": "203.0.113.54",
        "sandbox_supernet": "100.96.0.0/12",
        "fleet_ranges": ["198.18.0.0/24", "100.100.100.53/32"],
        "flow_idle_s": 12.5,
        "max_flows": 1000,
        "node_refresh_s": 0.5,
        "mtu": 1400,
    }
    config = load_config(write(tmp_path, doc))
    assert config.vni == 7
    assert config.keys_dir == tmp_path / "keys"
    assert config.fleet_ranges == (
        ipaddress.IPv4Network("198.18.0.0/24"),
        ipaddress.IPv4Network("100.100.100.53/32"),
    )
    assert config.flow_idle_s == 12.5
    assert config.max_flows == 1000
    assert config.tun == "gnvt0"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Proxy_1"}, "name"),
        ({"underlay": "198.18.0.300"}, "underlay"),
        ({"underlay": 3323068437}, "underlay"),
        ({"egress": "::1"}, "egress"),
        ({"vni": 1 << 24}, "vni"),
        ({"vni": True}, "vni"),
        ({"vni": 1.0}, "vni"),
        ({"control_url": "ftp://198.18.0.2/"}, "control_url"),
        ({"control_url": "http:///nohost"}, "control_url"),
        ({"keys_dir": ""}, "keys_dir"),
        ({"admin_port": 0}, "admin_port"),
        ({"geneve_port": 70000}, "geneve_port"),
        ({"tun": "a-name-that-is-too-long"}, "tun"),
        ({"tun": "bad/name"}, "tun"),
        ({"tproxy_dns_port": 15001}, "tproxy_dns_port"),
        ({"resolver": "8.8.8.8"}, "resolver"),
        ({"sandbox_supernet": "100.96.0.1/16"}, "sandbox_supernet"),
        ({"sandbox_supernet": "100.96.0.0"}, "sandbox_supernet"),
        ({"fleet_ranges": "198.18.0.0/24"}, "fleet_ranges"),
        ({"fleet_ranges": ["198.18.0.0/24", "nope"]}, "fleet_ranges[1]"),
        ({"flow_idle_s": 0}, "flow_idle_s"),
        ({"flow_idle_s": "300"}, "flow_idle_s"),
        ({"node_refresh_s": -1}, "node_refresh_s"),
        ({"max_flows": 0}, "max_flows"),
        ({"mtu": 100}, "mtu"),
        ({"mtu": 65535}, "mtu"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_each_bad_value_names_its_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**MINIMAL, **change})
    assert info.value.reason == "invalid_config"
    assert info.value.detail.startswith(f"{field}: "), info.value.detail


@pytest.mark.parametrize("missing", ["name", "underlay", "egress"])
def test_required_fields(missing: str) -> None:
    doc = {k: v for k, v in MINIMAL.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^invalid_config: {missing}: required"):
        config_from_mapping(doc)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"name": "proxy1", "name": "proxy2", "underlay": "198.18.0.21", "egress": "203.0.113.21"}',
        '{"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21", "flow_idle_s": NaN}',
    ],
)
def test_unparseable_files(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.detail.startswith("$: ") or info.value.detail.startswith("flow_idle_s")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.json")


def test_cli_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "vni": -1})
    result = subprocess.run(
        [sys.executable, "-m", "egressd", "proxy", "serve", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("egressd: error: ")
    assert "vni: must be an integer" in lines[0]


# --- the admin listener ----------------------------------------------------------------


async def test_admin_serves_metrics_health_and_readiness() -> None:
    registry = CollectorRegistry()
    Counter("egressd_test_things_total", "things", registry=registry).inc(3)
    state = {"ready": False}
    admin = await start_admin(
        registry,
        host="127.0.0.1",
        port=0,
        ready=lambda: state["ready"],
        reasons=lambda: ["tun_down"],
    )
    try:
        assert admin.port > 0
        base = f"http://127.0.0.1:{admin.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as r:
                assert r.status == 200
                assert await r.json() == {"status": "ok"}
            async with session.get(f"{base}/readyz") as r:
                assert r.status == 503
                assert await r.json() == {"status": "not_ready", "reasons": ["tun_down"]}
            state["ready"] = True
            async with session.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with session.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert "egressd_test_things_total 3.0" in await r.text()
    finally:
        await admin.close()
        await admin.close()  # idempotent


async def test_admin_bind_failure_is_an_admin_error() -> None:
    first = await start_admin(CollectorRegistry(), host="127.0.0.1", port=0, ready=lambda: True)
    try:
        with pytest.raises(AdminError) as info:
            # SO_REUSEADDR does not allow two listeners on one port.
            await start_admin(
                CollectorRegistry(), host="127.0.0.1", port=first.port, ready=lambda: True
            )
        assert info.value.reason == "bind_failed"
    finally:
        await first.close()


def test_digest_grace_defaults_to_five_seconds_and_is_bounded() -> None:
    assert config_from_mapping(MINIMAL).digest_grace_s == 5.0
    assert config_from_mapping({**MINIMAL, "digest_grace_s": 0}).digest_grace_s == 0.0
    assert config_from_mapping({**MINIMAL, "digest_grace_s": 2.5}).digest_grace_s == 2.5
    for bad in (-1, 301, "5", True, float("nan")):
        with pytest.raises(ConfigError, match=r"^invalid_config: digest_grace_s: "):
            config_from_mapping({**MINIMAL, "digest_grace_s": bad})
