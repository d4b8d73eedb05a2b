"""Proxy health: a pure per-proxy state machine and the probing loop around it.

Each proxy is probed with ``GET http://<underlay>:9090/healthz`` every
`interval_s` (1 s) with a short timeout. A probe succeeds on HTTP 200 and
fails on anything else (another status, a refused or reset connection, a
timeout). The state machine:

* A proxy starts ``unknown``, which counts as not healthy: no flow is sent
  to a proxy that has not answered yet. The first success makes it ``up``
  (there is no earlier evidence to outweigh); `down_after` consecutive
  failures make it ``down``.
* ``up`` -> ``down`` after `down_after` (3) consecutive failures.
* ``down`` -> ``up`` after `up_after` (2) consecutive successes.

With the defaults a dead proxy is marked down 2-3.5 s after it stops
answering (three probes, the last one timing out), so new flows avoid it
within 5 s; on that transition the data path forgets the flows pinned to it.

`HealthMonitor` owns one named task per proxy; `on_change(name, up)` is
called on the event loop for every transition. The `egressd_proxy_up{proxy}`
gauge is read from `HealthMonitor.states` at scrape time by the agent's
collector (`egressd.agent.datapath.AgentCollector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp
import structlog

from egressd.agent.config import HealthSettings, ProxyEndpoint

log = structlog.get_logger("egressd.agent.health")


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class HealthState:
    """The state machine of one proxy; `observe` feeds it one probe result."""

    __slots__ = ("down_after", "failures", "state", "successes", "up_after")

    def __init__(self, *, down_after: int = 3, up_after: int = 2) -> None:
        if down_after < 1 or up_after < 1:
            raise ValueError("down_after and up_after must be >= 1")
        self.down_after = down_after
        self.up_after = up_after
        self.state = Health.UNKNOWN
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive

    @property
    def up(self) -> bool:
        return self.state is Health.UP

    def observe(self, ok: bool) -> Health | None:
        """Record one probe result; return the new state on a transition, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            if self.state is Health.UNKNOWN or (
                self.state is Health.DOWN and self.successes >= self.up_after
            ):
                self.state = Health.UP
                return self.state
        else:
            self.failures += 1
            self.successes = 0
            if self.state is not Health.DOWN and self.failures >= self.down_after:
                self.state = Health.DOWN
                return self.state
        return None


ChangeCallback = Callable[[str, bool], None]


class HealthMonitor:
    """Probes every proxy on its own named task; reports transitions to `on_change`."""

    def __init__(
        self,
        proxies: Sequence[ProxyEndpoint],
        settings: HealthSettings,
        on_change: ChangeCallback,
    ) -> None:
        self._proxies = tuple(proxies)
        self._settings = settings
        self._on_change = on_change
        self.states: dict[str, HealthState] = {
            p.name: HealthState(down_after=settings.down_after, up_after=settings.up_after)
            for p in proxies
        }
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def healthy(self) -> tuple[str, ...]:
        return tuple(name for name, st in self.states.items() if st.up)

    def snapshot(self) -> Mapping[str, Health]:
        return {name: st.state for name, st in self.states.items()}

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
        # No keep-alive: a probe must prove the proxy still accepts connections.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        for proxy in self._proxies:
            self._start_probe(proxy)

    def _start_probe(self, proxy: ProxyEndpoint) -> None:
        task = asyncio.create_task(self._probe_loop(proxy), name=f"health:{proxy.name}")
        self._tasks[proxy.name] = task

    def update(self, proxies: Sequence[ProxyEndpoint]) -> None:
        """Probe exactly `proxies` from now on (proxy discovery).

        A proxy that left, or whose address changed, loses its state: if it was
        up, `on_change(name, False)` is called first. A new (or moved) proxy
        starts ``unknown`` and is probed at once.
        """
        new = {p.name: p for p in proxies}
        old = {p.name: p for p in self._proxies}
        for name, proxy in old.items():
            if new.get(name) == proxy:
                continue
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
            state = self.states.pop(name, None)
            if state is not None and state.up:
                log.info("proxy_health", proxy=name, state="removed")
                self._on_change(name, False)
        self._proxies = tuple(proxies)
        for name, proxy in new.items():
            if name not in self.states:
                self.states[name] = HealthState(
                    down_after=self._settings.down_after, up_after=self._settings.up_after
                )
            if self._session is not None and name not in self._tasks:
                self._start_probe(proxy)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def record(self, name: str, ok: bool) -> None:
        """Feed one probe result (the loop's; also used by tests)."""
        state = self.states.get(name)
        if state is None:  # removed by `update` while its probe was in flight
            return
        new = state.observe(ok)
        if new is None:
            return
        log.info("proxy_health", proxy=name, state=new.value)
        self._on_change(name, new is Health.UP)

    async def probe(self, proxy: ProxyEndpoint) -> bool:
        assert self._session is not None, "start() first"
        url = f"http://{proxy.underlay}:{self._settings.port}{self._settings.path}"
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _probe_loop(self, proxy: ProxyEndpoint) -> None:
        interval = self._settings.interval_s
        next_at = time.monotonic()
        while True:
            ok = await self.probe(proxy)
            self.record(proxy.name, ok)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # a slow probe: do not fire a burst to catch up
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)
