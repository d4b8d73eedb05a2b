"""Proxy discovery: the agent learns the fleet's proxies from the control plane.

With `discovery` in the agent's config, `ProxyDiscovery` fetches
``GET <control_url>/v1/proxies`` (``{"proxies": [{"name", "underlay", "egress"}]}``)
every `interval_s` and hands the agent the proxies to use: the static ones of
the config file first, then every registered proxy whose name and underlay
address the static list does not already hold (`merge`). The agent applies a
new list to the data path and the health monitor (`egressd.agent.service`):
a new proxy starts "unknown" and takes flows after its first healthy probe,
exactly like a static one; a proxy that left the registry stops taking new
flows at once and its flows are forgotten (they move to another proxy, as on
a proxy failure).

Failure handling mirrors the proxy's node registry (`egressd.proxy.registry`):
a failed fetch (control plane unreachable, HTTP error, a body of the wrong
shape) keeps the last good list, so the data path never depends on the
control plane being up; results are counted in
``egressd_proxy_discovery_total{result}`` and logged when the result changes,
not at every attempt. One invalid entry (bad name or address, the node's own
address, an address another proxy already has) is skipped and logged; the
rest of the answer is used. An empty registry is a valid answer: only the
static proxies remain.

Reads of the control plane need no token (the control plane serves reads on
the underlay only); the agent never writes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter

from egressd import strictjson
from egressd.agent.config import DiscoverySettings, ProxyEndpoint

log = structlog.get_logger("egressd.agent.discovery")

MAX_BODY_BYTES = 4 * 1024 * 1024
RESULTS = ("ok", "http_error", "unreachable", "bad_response")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class DiscoveryError(Exception):
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(f"{result}: {detail}")
        self.result = result
        self.detail = detail


def parse_proxies(
    body: object, *, own_underlay: ipaddress.IPv4Address | None = None
) -> tuple[list[ProxyEndpoint], list[str]]:
    """The proxies of a `/v1/proxies` answer and a description of each skipped entry.

    Raises `DiscoveryError("bad_response")` when the answer as a whole has the wrong shape.
    """
    if not isinstance(body, dict) or not isinstance(body.get("proxies"), list):
        raise DiscoveryError("bad_response", 'expected {"proxies": [...]}')
    out: list[ProxyEndpoint] = []
    skipped: list[str] = []
    names: set[str] = set()
    addrs: set[ipaddress.IPv4Address] = set()
    for i, item in enumerate(body["proxies"]):
        if not isinstance(item, dict):
            skipped.append(f"proxies[{i}]: not an object")
            continue
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            skipped.append(f"proxies[{i}].name: must match [a-z0-9][a-z0-9-]{{0,62}}")
            continue
        try:
            underlay = ipaddress.IPv4Address(item.get("underlay"))
        except ValueError:
            skipped.append(f"proxies[{i}].underlay: not an IPv4 address")
            continue
        if name in names:
            skipped.append(f"proxies[{i}]: duplicate name {name}")
            continue
        if underlay in addrs:
            skipped.append(f"proxies[{i}]: {name} shares underlay {underlay} with another proxy")
            continue
        if own_underlay is not None and underlay == own_underlay:
            skipped.append(f"proxies[{i}]: {name} has this node's own underlay {underlay}")
            continue
        names.add(name)
        addrs.add(underlay)
        out.append(ProxyEndpoint(name, underlay))
    return out, skipped


def merge(
    static: Sequence[ProxyEndpoint], discovered: Iterable[ProxyEndpoint]
) -> tuple[ProxyEndpoint, ...]:
    """The static proxies, then each discovered one whose name and address are new."""
    out = list(static)
    names = {p.name for p in static}
    addrs = {p.underlay for p in static}
    for proxy in sorted(discovered, key=lambda p: p.name):
        if proxy.name in names or proxy.underlay in addrs:
            continue
        names.add(proxy.name)
        addrs.add(proxy.underlay)
        out.append(proxy)
    return tuple(out)


UpdateCallback = Callable[[tuple[ProxyEndpoint, ...]], None]


class ProxyDiscovery:
    """Polls the control plane's proxy registry; calls `on_update` when the list changes."""

    def __init__(
        self,
        settings: DiscoverySettings,
        static: Sequence[ProxyEndpoint],
        on_update: UpdateCallback,
        *,
        own_underlay: ipaddress.IPv4Address | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.static = tuple(static)
        self.proxies: tuple[ProxyEndpoint, ...] = self.static
        self._on_update = on_update
        self._own = own_underlay
        self._last_result: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetches = Counter(
            "egressd_proxy_discovery",
            "Proxy list fetches from the control plane, by result",
            ["result"],
            registry=registry,
        )
        for result in RESULTS:
            self.fetches.labels(result)

    def apply(self, discovered: Iterable[ProxyEndpoint]) -> bool:
        """Merge a fetched list with the static one; call `on_update` if it changed."""
        proxies = merge(self.static, discovered)
        if proxies == self.proxies:
            return False
        added = sorted({p.name for p in proxies} - {p.name for p in self.proxies})
        removed = sorted({p.name for p in self.proxies} - {p.name for p in proxies})
        self.proxies = proxies
        log.info(
            "proxies_discovered", proxies=[p.name for p in proxies], added=added, removed=removed
        )
        self._on_update(proxies)
        return True

    async def fetch(self) -> list[ProxyEndpoint]:
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(self.settings.proxies_url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise DiscoveryError("http_error", f"HTTP {resp.status}")
                data = await resp.content.read(MAX_BODY_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError("unreachable", str(exc) or type(exc).__name__) from exc
        if len(data) > MAX_BODY_BYTES:
            raise DiscoveryError("bad_response", f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = strictjson.loads(data)
        except ValueError as exc:
            raise DiscoveryError("bad_response", f"not JSON: {exc}") from exc
        proxies, skipped = parse_proxies(body, own_underlay=self._own)
        for problem in skipped:
            log.warning("proxy_entry_skipped", problem=problem)
        return proxies

    async def refresh(self) -> bool:
        """One fetch; True if it succeeded. A failure keeps the current list."""
        try:
            proxies = await self.fetch()
        except DiscoveryError as exc:
            self._record(exc.result, exc.detail)
            return False
        self._record("ok", "")
        self.apply(proxies)
        return True

    def _record(self, result: str, detail: str) -> None:
        self.fetches.labels(result).inc()
        if result != self._last_result:
            if result == "ok":
                log.info("proxy_discovery_ok", url=self.settings.proxies_url)
            else:
                log.warning(
                    "proxy_discovery_failed",
                    url=self.settings.proxies_url,
                    result=result,
                    detail=detail,
                    keeping=[p.name for p in self.proxies],
                )
            self._last_result = result

    async def start(self) -> None:
        """First fetch now (its failure is not fatal), then poll on a task."""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="proxy-discovery")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
