"""Proxy health: the state machine with scripted results, and the monitor's timing."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from egressd.agent.config import HealthSettings, ProxyEndpoint
from egressd.agent.health import Health, HealthMonitor, HealthState


def run(state: HealthState, results: str) -> list[Health | None]:
    """Feed 'o' (success) / 'x' (failure) results; the transitions they cause."""
    return [state.observe(c == "o") for c in results]


def test_starts_unknown_and_not_up() -> None:
    state = HealthState()
    assert state.state is Health.UNKNOWN
    assert not state.up


def test_first_success_from_unknown_is_up() -> None:
    state = HealthState()
    assert run(state, "o") == [Health.UP]
    assert state.up


def test_unknown_goes_down_after_three_misses() -> None:
    state = HealthState()
    assert run(state, "xxx") == [None, None, Health.DOWN]


@pytest.mark.parametrize(
    ("script", "final"),
    [
        ("oxx", Health.UP),  # two misses are not enough
        ("oxxx", Health.DOWN),
        ("oxxoxx", Health.UP),  # misses must be consecutive
        ("oxxxo", Health.DOWN),  # one success is not enough to come back
        ("oxxxoo", Health.UP),
        ("oxxxoxo", Health.DOWN),  # successes must be consecutive too
        ("oxxxoxoo", Health.UP),
        ("oooooo", Health.UP),
        ("xxxxxxxx", Health.DOWN),
    ],
)
def test_transitions(script: str, final: Health) -> None:
    state = HealthState(down_after=3, up_after=2)
    run(state, script)
    assert state.state is final


def test_transitions_reported_once() -> None:
    state = HealthState()
    events = [e for e in run(state, "oooxxxxxxooooo") if e is not None]
    assert events == [Health.UP, Health.DOWN, Health.UP]


def test_custom_thresholds() -> None:
    state = HealthState(down_after=1, up_after=3)
    assert run(state, "oxooo") == [Health.UP, Health.DOWN, None, None, Health.UP]
    with pytest.raises(ValueError):
        HealthState(down_after=0)


PROXIES = (
    ProxyEndpoint("proxy1", ipaddress.IPv4Address("198.18.0.21")),
    ProxyEndpoint("proxy2", ipaddress.IPv4Address("198.18.0.22")),
)


class ScriptedMonitor(HealthMonitor):
    """A monitor whose probes answer from a table instead of the network."""

    alive: dict[str, bool]

    async def probe(self, proxy: ProxyEndpoint) -> bool:
        await asyncio.sleep(0)
        return self.alive[proxy.name]


async def test_monitor_reports_changes_and_names_tasks() -> None:
    changes: list[tuple[str, bool, float]] = []
    start = time.monotonic()
    settings = HealthSettings(interval_s=0.05, timeout_s=0.02)
    monitor = ScriptedMonitor(
        PROXIES, settings, lambda n, up: changes.append((n, up, time.monotonic()))
    )
    monitor.alive = {"proxy1": True, "proxy2": True}
    await monitor.start()
    try:
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {"health:proxy1", "health:proxy2"} <= names
        await asyncio.sleep(0.03)
        assert sorted(monitor.healthy()) == ["proxy1", "proxy2"]
        killed = time.monotonic()
        monitor.alive["proxy1"] = False
        await asyncio.sleep(0.3)
        assert monitor.healthy() == ("proxy2",)
        down = [c for c in changes if c[0] == "proxy1" and c[1] is False]
        assert len(down) == 1
        # Three misses at the interval: down within ~3 intervals (5 s budget at 1 s).
        assert down[0][2] - killed <= 4 * settings.interval_s + 0.1
        monitor.alive["proxy1"] = True
        await asyncio.sleep(0.25)
        assert sorted(monitor.healthy()) == ["proxy1", "proxy2"]
    finally:
        await monitor.stop()
    assert [(n, up) for n, up, _ in changes] == [
        ("proxy1", True),
        ("proxy2", True),
        ("proxy1", False),
        ("proxy1", True),
    ]
    assert start <= changes[0][2]
    assert not {t.get_name() for t in asyncio.all_tasks()} & {"health:proxy1", "health:proxy2"}
