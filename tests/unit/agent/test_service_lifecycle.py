"""AgentService's start and stop with every part faked (pure: no kernel, no sockets).

What is checked is the unwinding (egressd.lifecycle): the order of the undo
steps, that a step which raises does not skip the ones after it, and that a
failed start undoes exactly what was done.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from egressd.agent import service as svc
from egressd.agent.api import ApiError
from egressd.agent.config import parse_config
from egressd.agent.tier1 import Tier1Error

CONFIG = {
    "name": "node1",
    "underlay": "198.18.0.11",
    "sandbox_cidr": "100.96.1.0/24",
    "proxies": [{"name": "proxy1", "underlay": "198.18.0.21"}],
    "discovery": {"control_url": "http://198.18.0.2:8080"},
}

# The unwinding, in order, after a clean start (each fake records its undo).
STOP_ORDER = [
    "admin.close",
    "api.close",
    "manager.unregister_all",
    "launchers.close",
    "watch.close",
    "control.close",
    "discovery.stop",
    "health.stop",
    "events.stop",
    "datapath.stop",
    "tier1.close",
    "tun.close",
]


class Faults:
    """Which fake steps raise: `name -> exception`."""

    def __init__(self) -> None:
        self.raises: dict[str, BaseException] = {}
        self.journal: list[str] = []

    def step(self, name: str) -> None:
        self.journal.append(name)
        if name in self.raises:
            raise self.raises[name]

    async def astep(self, name: str) -> None:
        self.step(name)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults()

    def part(prefix: str, **methods: str) -> type:
        """A fake class whose methods record `prefix.method` (async if named so)."""

        def make(name: str, kind: str) -> Any:
            if kind == "async":

                async def a(self: object, *_a: object, **_k: object) -> None:
                    await f.astep(f"{prefix}.{name}")

                return a

            def s(self: object, *_a: object, **_k: object) -> None:
                f.step(f"{prefix}.{name}")

            return s

        attrs = {name: make(name, kind) for name, kind in methods.items()}
        attrs["__init__"] = lambda self, *a, **k: None
        return type(f"Fake_{prefix}", (), attrs)

    tun = SimpleNamespace(name="egr0", ifindex=7, fd=-1, close=lambda: f.step("tun.close"))
    monkeypatch.setattr(svc, "ensure_sysctls", lambda: None)
    monkeypatch.setattr(svc, "_write_sysctl", lambda key, value: None)
    monkeypatch.setattr(svc, "open_tun", lambda *a, **k: tun)
    tier1 = part("tier1", load="sync", close="sync")
    tier1.open_events = lambda self: object()  # type: ignore[attr-defined]
    monkeypatch.setattr(svc, "Tier1", tier1)
    datapath = part("datapath", start="sync", stop="sync", set_proxies="sync")
    datapath.proxy_health = lambda self, *a: None  # type: ignore[attr-defined]
    monkeypatch.setattr(svc, "Datapath", datapath)
    manager = part("manager", unregister_all="async", expire="async", refresh_job="async")
    manager.cleanup_leftovers = lambda self: []  # type: ignore[attr-defined]
    for attr in ("by_ifindex", "jobs", "tier1_totals", "tier1_by_sandbox", "get"):
        setattr(manager, attr, lambda self, *a: {})
    manager.__len__ = lambda self: 0  # type: ignore[attr-defined]
    monkeypatch.setattr(svc, "SandboxManager", manager)
    monkeypatch.setattr(svc, "Tier1EventReader", part("events", start="sync", stop="async"))
    health = part("health", start="async", stop="async", update="sync")
    health.states = {}  # type: ignore[attr-defined]
    monkeypatch.setattr(svc, "HealthMonitor", health)
    discovery = part("discovery", start="async", stop="async", refresh="async")
    discovery.proxies = ()  # type: ignore[attr-defined]
    monkeypatch.setattr(svc, "ProxyDiscovery", discovery)
    monkeypatch.setattr(svc, "ControlPolicies", part("control", start="async", close="async"))
    monkeypatch.setattr(svc, "AgentPolicyWatch", part("watch", start="sync", close="async"))
    collector = part("collector")
    collector.describe = lambda self: []  # type: ignore[attr-defined]
    collector.collect = lambda self: []  # type: ignore[attr-defined]
    monkeypatch.setattr(svc, "AgentCollector", collector)
    monkeypatch.setattr(svc, "Launchers", part("launchers", close="sync", gone="sync"))
    monkeypatch.setattr(svc, "ApiServer", part("api", start="async", close="async"))

    async def start_admin(*_a: object, **_k: object) -> object:
        f.step("admin.start")
        return SimpleNamespace(host="198.18.0.11", port=9090, close=lambda: f.astep("admin.close"))

    monkeypatch.setattr(svc, "start_admin", start_admin)
    return f


def run_agent(faults: Faults) -> svc.AgentService:
    agent = svc.AgentService(parse_config(CONFIG))

    async def go() -> None:
        await agent.start()
        faults.journal.clear()
        await agent.stop()

    asyncio.run(go())
    return agent


def test_stop_unwinds_everything_in_reverse(faults: Faults) -> None:
    agent = run_agent(faults)
    assert faults.journal == STOP_ORDER
    assert not agent.ready()


def test_a_failing_step_does_not_skip_the_others(faults: Faults) -> None:
    faults.raises["datapath.stop"] = OSError(9, "Bad file descriptor")
    faults.raises["watch.close"] = RuntimeError("watch")
    with pytest.raises(OSError):  # the last error, after every step ran
        run_agent(faults)
    assert faults.journal == STOP_ORDER


def test_a_tier1_unload_failure_is_logged_not_raised(faults: Faults) -> None:
    faults.raises["tier1.close"] = Tier1Error("bpffs", "busy")
    run_agent(faults)
    assert faults.journal == STOP_ORDER


def test_a_failed_start_undoes_what_was_done_and_keeps_a_foreign_socket(faults: Faults) -> None:
    """The API socket belongs to another agent: its close (which unlinks it) is not run."""
    faults.raises["api.start"] = ApiError("socket_in_use", "another process serves it")
    agent = svc.AgentService(parse_config(CONFIG))
    with pytest.raises(svc.AgentStartupError) as info:
        asyncio.run(agent.start())
    assert info.value.reason == "api"
    done = faults.journal[faults.journal.index("api.start") + 1 :]
    assert done == STOP_ORDER[STOP_ORDER.index("manager.unregister_all") :]
