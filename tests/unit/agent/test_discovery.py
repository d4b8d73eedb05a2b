"""Proxy discovery: config, parsing /v1/proxies, merging with the static list, the
data path and health monitor taking a new list, and the polling loop against a
real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from egressd.agent.config import ConfigError, HealthSettings, ProxyEndpoint, parse_config
from egressd.agent.datapath import Datapath
from egressd.agent.discovery import DiscoveryError, ProxyDiscovery, merge, parse_proxies
from egressd.agent.hashing import flow_key
from egressd.agent.health import HealthMonitor

BASE: dict[str, Any] = {"name": "node1", "underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"}
P1 = ProxyEndpoint("proxy1", IPv4Address("198.18.0.21"))
P2 = ProxyEndpoint("proxy2", IPv4Address("198.18.0.22"))
P3 = ProxyEndpoint("proxy3", IPv4Address("198.18.0.23"))


# --- config ---------------------------------------------------------------------


def test_static_config_still_requires_proxies() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE)
    assert err.value.field == "proxies"
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "proxies": []})
    assert err.value.field == "proxies"


def test_discovery_allows_an_empty_static_list() -> None:
    config = parse_config({**BASE, "discovery": {"control_url": "http://198.18.0.2:8080"}})
    assert config.proxies == ()
    assert config.discovery is not None
    assert config.discovery.proxies_url == "http://198.18.0.2:8080/v1/proxies"
    assert config.discovery.interval_s == 5.0


def test_discovery_with_static_seed() -> None:
    config = parse_config(
        {
            **BASE,
            "proxies": [{"name": "proxy1", "underlay": "198.18.0.21"}],
            "discovery": {
                "control_url": "http://198.18.0.2:8080/",
                "interval_s": 1,
                "timeout_s": 0.5,
            },
        }
    )
    assert config.proxies == (P1,)
    assert config.discovery is not None and config.discovery.interval_s == 1.0


@pytest.mark.parametrize(
    ("discovery", "field"),
    [
        ("http://x", "discovery"),
        ({}, "discovery.control_url"),
        ({"control_url": "ftp://198.18.0.2"}, "discovery.control_url"),
        ({"control_url": "http://198.18.0.2:8080/v1"}, "discovery.control_url"),
        ({"control_url": "http://198.18.0.2", "interval_s": 0}, "discovery.interval_s"),
        ({"control_url": "http://198.18.0.2", "interval_s": True}, "discovery.interval_s"),
        ({"control_url": "http://198.18.0.2", "url": "x"}, "discovery.url"),
    ],
)
def test_bad_discovery_settings(discovery: object, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "discovery": discovery})
    assert err.value.field == field


# --- parsing and merging --------------------------------------------------------------


def test_parse_proxies_skips_bad_entries_and_keeps_the_rest() -> None:
    body = {
        "proxies": [
            {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"},
            {"name": "Bad_Name", "underlay": "198.18.0.30"},
            {"name": "proxy4", "underlay": "not-an-ip"},
            {"name": "proxy5", "underlay": "198.18.0.21"},  # address taken
            {"name": "proxy1", "underlay": "198.18.0.31"},  # name taken
            {"name": "proxy6", "underlay": "198.18.0.11"},  # the node itself
            "junk",
            {"name": "proxy2", "underlay": "198.18.0.22"},
        ]
    }
    proxies, skipped = parse_proxies(body, own_underlay=IPv4Address("198.18.0.11"))
    assert proxies == [P1, P2]
    assert len(skipped) == 6


@pytest.mark.parametrize("body", [None, [], {"nodes": []}, {"proxies": {}}])
def test_parse_proxies_rejects_a_wrong_shape(body: object) -> None:
    with pytest.raises(DiscoveryError) as err:
        parse_proxies(body)
    assert err.value.result == "bad_response"


def test_merge_keeps_static_first_and_skips_clashes() -> None:
    clash_name = ProxyEndpoint("proxy1", IPv4Address("198.18.0.99"))
    clash_addr = ProxyEndpoint("other", IPv4Address("198.18.0.21"))
    assert merge([P1], [P3, clash_name, P2, clash_addr]) == (P1, P2, P3)
    assert merge([], []) == ()
    assert merge([P2], []) == (P2,)


# --- the data path takes a new list ------------------------------------------------------


@pytest.fixture
def datapath() -> Iterator[Datapath]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    config = parse_config({**BASE, "discovery": {"control_url": "http://198.18.0.2:8080"}})
    try:
        yield Datapath(config, ours.fileno(), tx_socket=object(), rx_socket=object())  # type: ignore[arg-type]
    finally:
        ours.close()
        theirs.close()


def flows(dp: Datapath, n: int) -> dict[str, int]:
    """Which proxy each of `n` flows would take now."""
    out: dict[str, int] = {}
    for i in range(n):
        key = flow_key("100.96.1.2", "203.0.113.10", 6, 40000 + i, 443)
        entry = dp._new_flow(key)
        assert entry is not None
        name = dp.proxy_names[entry[0]]
        out[name] = out.get(name, 0) + 1
    return out


def test_datapath_starts_empty_and_learns_proxies(datapath: Datapath) -> None:
    dp = datapath
    assert dp.active_proxies == () and dp.healthy == ()
    dp.set_proxies([P1, P2])
    assert dp.active_proxies == ("proxy1", "proxy2")
    assert dp.healthy == ()  # not before the health monitor says so
    dp.proxy_health("proxy1", True)
    dp.proxy_health("proxy2", True)
    dp.set_proxies([P1, P2, P3])
    dp.proxy_health("proxy3", True)
    spread = flows(dp, 300)
    assert set(spread) == {"proxy1", "proxy2", "proxy3"}
    assert min(spread.values()) > 50


def test_datapath_forgets_a_removed_proxy(datapath: Datapath) -> None:
    dp = datapath
    dp.set_proxies([P1, P2])
    dp.proxy_health("proxy1", True)
    dp.proxy_health("proxy2", True)
    key = flow_key("100.96.1.2", "203.0.113.10", 6, 40000, 443)
    entry = dp._new_flow(key)
    assert entry is not None
    dp._flows[key] = entry
    gone = dp.proxy_names[entry[0]]
    kept = ({"proxy1", "proxy2"} - {gone}).pop()
    dp.set_proxies([p for p in (P1, P2) if p.name == kept])
    assert dp.active_proxies == (kept,)
    assert dp.healthy == (kept,)
    assert key not in dp._flows
    assert set(flows(dp, 50)) == {kept}
    # A late health report for the removed proxy changes nothing.
    dp.proxy_health(gone, True)
    assert dp.healthy == (kept,)
    # Return packets from its address are no longer accepted.
    gone_addr = str((P1 if gone == "proxy1" else P2).underlay)
    assert gone_addr not in dp._proxy_by_ip
    # Counters of every proxy ever known stay (their metrics must not go backwards).
    assert set(dp.proxy_names) == {"proxy1", "proxy2"}


def test_datapath_proxy_moving_address(datapath: Datapath) -> None:
    dp = datapath
    dp.set_proxies([P1])
    dp.proxy_health("proxy1", True)
    moved = ProxyEndpoint("proxy1", IPv4Address("198.18.0.41"))
    dp.set_proxies([moved])
    assert dp.healthy == ()  # must be probed again at its new address
    assert dp._proxy_by_ip == {"198.18.0.41": 0}
    dp.proxy_health("proxy1", True)
    entry = dp._new_flow(flow_key("100.96.1.2", "203.0.113.10", 6, 1, 443))
    assert entry is not None and entry[1] == ("198.18.0.41", 0)


def test_static_datapath_unchanged() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        config = parse_config(
            {
                **BASE,
                "proxies": [
                    {"name": "proxy1", "underlay": "198.18.0.21"},
                    {"name": "proxy2", "underlay": "198.18.0.22"},
                ],
            }
        )
        dp = Datapath(config, ours.fileno(), tx_socket=object(), rx_socket=object())  # type: ignore[arg-type]
        assert dp.active_proxies == ("proxy1", "proxy2")
        dp.proxy_health("proxy2", True)
        assert dp.healthy == ("proxy2",)
    finally:
        ours.close()
        theirs.close()


# --- the health monitor takes a new list ------------------------------------------------------


def test_health_update_adds_and_removes() -> None:
    changes: list[tuple[str, bool]] = []
    monitor = HealthMonitor([P1], HealthSettings(), lambda n, up: changes.append((n, up)))
    monitor.record("proxy1", True)
    assert changes == [("proxy1", True)]
    monitor.update([P2])
    assert changes == [("proxy1", True), ("proxy1", False)]
    assert set(monitor.states) == {"proxy2"}
    monitor.record("proxy1", True)  # a probe that was in flight: ignored
    monitor.record("proxy2", True)
    assert changes[-1] == ("proxy2", True)
    monitor.update([P2, P3])  # unchanged proxy2 keeps its state
    assert monitor.healthy() == ("proxy2",)


# --- the polling loop against a real server ---------------------------------------------------


class FakeControl:
    def __init__(self) -> None:
        self.body: Any = {"proxies": []}
        self.status = 200

    async def handler(self, _request: web.Request) -> web.Response:
        if self.status != 200:
            return web.Response(status=self.status)
        if isinstance(self.body, bytes):
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response(self.body)


@pytest.fixture
async def control() -> AsyncIterator[tuple[FakeControl, str]]:
    fake = FakeControl()
    app = web.Application()
    app.router.add_get("/v1/proxies", fake.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_discovery_polls_and_keeps_last_good_list(control: tuple[FakeControl, str]) -> None:
    fake, url = control
    config = parse_config(
        {
            **BASE,
            "proxies": [{"name": "proxy1", "underlay": "198.18.0.21"}],
            "discovery": {"control_url": url, "interval_s": 0.5, "timeout_s": 0.5},
        }
    )
    assert config.discovery is not None
    updates: list[tuple[str, ...]] = []
    registry = CollectorRegistry()
    fake.body = {
        "proxies": [{"name": "proxy2", "underlay": "198.18.0.22", "egress": "203.0.113.22"}]
    }
    disc = ProxyDiscovery(
        config.discovery,
        config.proxies,
        lambda ps: updates.append(tuple(p.name for p in ps)),
        own_underlay=config.underlay,
        registry=registry,
    )
    await disc.start()
    try:
        assert updates == [("proxy1", "proxy2")]
        fake.body["proxies"].append({"name": "proxy3", "underlay": "198.18.0.23", "egress": "x"})
        await asyncio.sleep(0.7)
        assert updates[-1] == ("proxy1", "proxy2", "proxy3")
        n = len(updates)
        fake.status = 500
        await asyncio.sleep(0.6)
        fake.status = 200
        fake.body = b"{not json"
        await asyncio.sleep(0.6)
        assert len(updates) == n  # failures keep the last list
        assert disc.proxies == (P1, P2, P3)
        assert (
            registry.get_sample_value("egressd_proxy_discovery_total", {"result": "http_error"})
            or 0
        ) >= 1
        assert (
            registry.get_sample_value("egressd_proxy_discovery_total", {"result": "bad_response"})
            or 0
        ) >= 1
        fake.body = {"proxies": []}  # everything deregistered: the static proxy stays
        await asyncio.sleep(0.6)
        assert updates[-1] == ("proxy1",)
    finally:
        await disc.stop()


async def test_discovery_unreachable_control_plane_is_not_fatal() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = parse_config(
        {**BASE, "discovery": {"control_url": f"http://127.0.0.1:{port}", "timeout_s": 0.2}}
    )
    assert config.discovery is not None
    registry = CollectorRegistry()
    disc = ProxyDiscovery(config.discovery, (), lambda ps: None, registry=registry)
    await disc.start()
    try:
        assert disc.proxies == ()
        assert (
            registry.get_sample_value("egressd_proxy_discovery_total", {"result": "unreachable"})
            == 1
        )
    finally:
        await disc.stop()
