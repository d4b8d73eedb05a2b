"""The proxy's view of the node registry, refreshed from the control plane.

A proxy accepts GENEVE only from registered node addresses and routes return
packets to the node whose sandbox CIDR holds the destination, so it keeps two
indexes of `GET /v1/nodes` (`{"nodes": [{"name", "underlay", "sandbox_cidr"}]}`):

* `node_by_underlay(ip)`: a dict keyed by the address *string*, because that
  is what `recvfrom` returns (no `ipaddress` object per packet);
* `node_for_sandbox(ip)`: per prefix length, a dict from network address (an
  int) to the node; the control plane keeps node CIDRs disjoint, so at most
  one prefix length can match, and the loop is over the distinct prefix
  lengths in use (usually one).

Each refresh builds a new `NodeView` and swaps it in with one assignment: the
packet path always sees a whole view, never a half-updated one.

The same refresh counts the proxies registered with the control plane
(`GET /v1/proxies`): a job's fleet-wide limits are split evenly over them
(`egressd.limits.fleet_share`). Until that count is known, and while it
cannot be fetched, the last count is used (1 at first: this proxy alone).

The same answers also say which addresses belong to the fleet: every node's
underlay, every proxy's underlay and egress. Together with the addresses the
proxy knows from its configuration (`static_members`: its own, the control
plane's, the resolvers') they make `fleet`, a `FleetAddresses` that tier 2
and the DNS responder always deny (``fleet_address``, DESIGN.md: "kept
current from the control plane's registry"). An entry that the node index
skips (invalid CIDR, a collision) still gives its address to the fleet set:
being unsure whether an address is the fleet's is a reason to deny it. A
change builds a new set (higher ``version``), swaps it in with one assignment,
logs it (``fleet_addresses``) and calls `on_fleet_change`; an unchanged
answer changes nothing, so caches keyed on the set keep their entries.

Failure handling: a failed refresh (control plane unreachable, HTTP error, a
body that is not the expected shape) keeps the last good view and is counted
(`egressd_registry_refresh_total{result}`) and logged when the state changes
(not every 2 s). One invalid entry in an otherwise good answer is skipped and
logged; the rest of the answer is used. Readiness is "at least one successful
fetch": until then the proxy knows no node and would drop everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from egressd.control.watch_client import read_json_body
from egressd.policy.addresses import FleetAddresses

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

NODES_PATH = "/v1/nodes"
PROXIES_PATH = "/v1/proxies"
FETCH_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 4 * 1024 * 1024
REFRESH_RESULTS = ("ok", "http_error", "unreachable", "bad_response")

log = structlog.get_logger("egressd.proxy.registry")


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """A registered node; `cidr_base`/`cidr_mask` are the CIDR as ints for the packet path."""

    name: str
    underlay: IPv4Address
    sandbox_cidr: IPv4Network
    underlay_str: str = field(init=False)
    cidr_base: int = field(init=False)
    cidr_mask: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "underlay_str", str(self.underlay))
        object.__setattr__(self, "cidr_base", int(self.sandbox_cidr.network_address))
        object.__setattr__(self, "cidr_mask", int(self.sandbox_cidr.netmask))

    def owns(self, ip: int) -> bool:
        """Whether the address (an int) is in this node's sandbox CIDR."""
        return ip & self.cidr_mask == self.cidr_base


class NodeView:
    """An immutable snapshot of the registry with both indexes."""

    __slots__ = ("_by_prefix", "_by_underlay", "_by_underlay_int", "nodes")

    def __init__(self, nodes: Iterable[NodeEntry]) -> None:
        self.nodes: tuple[NodeEntry, ...] = tuple(nodes)
        by_underlay: dict[str, NodeEntry] = {}
        by_prefix: dict[int, dict[int, NodeEntry]] = {}
        for node in self.nodes:
            by_underlay[node.underlay_str] = node
            by_prefix.setdefault(node.sandbox_cidr.prefixlen, {})[node.cidr_base] = node
        self._by_underlay: Mapping[str, NodeEntry] = MappingProxyType(by_underlay)
        # The same index by the address's 32-bit value: a flow lookup asks with an
        # `IPv4Address`, whose text (``str``) costs ~10x its ``int``.
        self._by_underlay_int: dict[int, NodeEntry] = {
            int(node.underlay): node for node in by_underlay.values()
        }
        # Longest prefix first, as a tuple of (mask, table) for the packet path.
        self._by_prefix: tuple[tuple[int, dict[int, NodeEntry]], ...] = tuple(
            ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF, table)
            for plen, table in sorted(by_prefix.items(), reverse=True)
        )

    def node_by_underlay(self, ip: int | str | IPv4Address) -> NodeEntry | None:
        """The node whose underlay is `ip` (an int: an IPv4 address's value)."""
        if type(ip) is IPv4Address:
            return self._by_underlay_int.get(int(ip))
        if type(ip) is int:
            return self._by_underlay_int.get(ip)
        # Text, or anything else as its text (as before: an IPv6 address matches nothing).
        return self._by_underlay.get(ip if type(ip) is str else str(ip))

    def node_for_sandbox(self, ip: int | str | IPv4Address) -> NodeEntry | None:
        addr = ip if type(ip) is int else int(IPv4Address(ip))
        for mask, table in self._by_prefix:
            node = table.get(addr & mask)
            if node is not None:
                return node
        return None

    def __len__(self) -> int:
        return len(self.nodes)


EMPTY_VIEW = NodeView(())


class RegistryError(Exception):
    """A refresh that failed; `result` is the counter label."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


def parse_nodes(body: object) -> tuple[list[NodeEntry], list[str]]:
    """Entries of a `GET /v1/nodes` answer, and one problem string per skipped entry.

    Raises RegistryError("bad_response") when the answer itself has the wrong shape.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("nodes"), list):
        raise RegistryError("bad_response", 'answer is not {"nodes": [...]}')
    entries: list[NodeEntry] = []
    problems: list[str] = []
    seen_underlay: set[IPv4Address] = set()
    for index, item in enumerate(body["nodes"]):
        try:
            if not isinstance(item, Mapping):
                raise ValueError("not an object")
            name, underlay, cidr = item.get("name"), item.get("underlay"), item.get("sandbox_cidr")
            if (
                not isinstance(name, str)
                or not isinstance(underlay, str)
                or not isinstance(cidr, str)
            ):
                raise ValueError("name, underlay and sandbox_cidr must be strings")
            entry = NodeEntry(name, IPv4Address(underlay), IPv4Network(cidr, strict=True))
        except ValueError as exc:
            problems.append(f"nodes[{index}]: {exc}")
            continue
        overlap = next((e for e in entries if e.sandbox_cidr.overlaps(entry.sandbox_cidr)), None)
        if entry.underlay in seen_underlay or overlap is not None:
            # The control plane refuses collisions; if one shows up anyway, the
            # first wins rather than the return path becoming ambiguous.
            problems.append(f"nodes[{index}] ({name}): underlay or sandbox_cidr collides")
            continue
        seen_underlay.add(entry.underlay)
        entries.append(entry)
    return entries, problems


def parse_proxy_count(body: object) -> int:
    """How many proxies a `GET /v1/proxies` answer lists (at least 1: this proxy)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("proxies"), list):
        raise RegistryError("bad_response", 'answer is not {"proxies": [...]}')
    return max(1, len(body["proxies"]))


def parse_member_addresses(
    body: object, key: str, fields: tuple[str, ...]
) -> tuple[frozenset[IPv4Address], list[str]]:
    """Every IPv4 address in `fields` of the entries of `body[key]`, and one
    problem string per field that is not one.

    Lenient on purpose (unlike `parse_nodes`): an address is taken from any
    entry that has one, whatever else is wrong with the entry. Raises
    RegistryError("bad_response") when the answer itself has the wrong shape.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get(key), list):
        raise RegistryError("bad_response", f'answer is not {{"{key}": [...]}}')
    found: set[IPv4Address] = set()
    problems: list[str] = []
    for index, item in enumerate(body[key]):
        if not isinstance(item, Mapping):
            continue  # counted by the entry parser
        for name in fields:
            value = item.get(name)
            try:
                found.add(IPv4Address(value if isinstance(value, str) else ""))
            except ValueError:
                problems.append(f"{key}[{index}].{name}: not an IPv4 address")
    return frozenset(found), problems


def static_members(
    *,
    underlay: IPv4Address,
    egress: Iterable[IPv4Address],
    control_url: str,
    resolvers: Iterable[IPv4Address],
) -> frozenset[IPv4Address]:
    """The fleet addresses a proxy knows without the registry: its own
    underlay and egress addresses, the control plane's (when `control_url`
    names it by address) and the resolvers'."""
    members = {underlay, *egress, *resolvers}
    host = urlsplit(control_url).hostname
    if host is not None:
        with contextlib.suppress(ValueError):
            members.add(IPv4Address(host))
    return frozenset(members)


def _listed(addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> list[str]:
    return [str(a) for a in sorted(addresses, key=lambda a: (a.version, int(a)))]


class NodeRegistry:
    """The node registry, refreshed every `refresh_s` by a named task."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        control_url: str,
        *,
        refresh_s: float,
        metrics: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
        fleet: FleetAddresses | None = None,
        on_fleet_change: Callable[[FleetAddresses], None] | None = None,
    ) -> None:
        self._session = session
        #: Always denied by tier 2 and DNS: `fleet`'s ranges and members (the
        #: static ones it starts with, plus what the registry lists).
        self.fleet: FleetAddresses = fleet if fleet is not None else FleetAddresses()
        self._static_members = self.fleet.members
        self._node_members: frozenset[IPv4Address] = frozenset()
        self._proxy_members: frozenset[IPv4Address] = frozenset()
        self._on_fleet_change = on_fleet_change
        self._url = control_url.rstrip("/") + NODES_PATH
        self._proxies_url = control_url.rstrip("/") + PROXIES_PATH
        #: Proxies registered with the control plane (the divisor of fleet-wide limits).
        self.proxy_count = 1
        self._refresh_s = refresh_s
        self._clock = clock
        self.view: NodeView = EMPTY_VIEW
        self.last_success: float | None = None
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._refreshes = Counter(
            "egressd_registry_refresh_total",
            "Node registry refreshes from the control plane, by result",
            ["result"],
            registry=metrics,
        )
        for result in REFRESH_RESULTS:
            self._refreshes.labels(result)
        Gauge(
            "egressd_registry_nodes", "Nodes in the proxy's registry view", registry=metrics
        ).set_function(lambda: len(self.view))
        Gauge(
            "egressd_registry_proxies",
            "Proxies registered with the control plane (fleet-wide limits are split over them)",
            registry=metrics,
        ).set_function(lambda: self.proxy_count)
        Gauge(
            "egressd_fleet_addresses",
            "Fleet member addresses that tier 2 and DNS always deny (fleet_address)",
            registry=metrics,
        ).set_function(lambda: len(self.fleet.members))
        Gauge(
            "egressd_registry_age_seconds",
            "Seconds since the last successful registry refresh (-1: never)",
            registry=metrics,
        ).set_function(self._age)

    # --- the packet path's lookups -------------------------------------------------

    def node_by_underlay(self, ip: int | str | IPv4Address) -> NodeEntry | None:
        return self.view.node_by_underlay(ip)

    def node_for_sandbox(self, ip: int | str | IPv4Address) -> NodeEntry | None:
        return self.view.node_for_sandbox(ip)

    @property
    def ready(self) -> bool:
        return self.last_success is not None

    def _age(self) -> float:
        return -1.0 if self.last_success is None else self._clock() - self.last_success

    # --- refreshing ----------------------------------------------------------------

    async def refresh(self) -> bool:
        """Fetch once; on success swap the view in. Never raises for a failed fetch."""
        try:
            body = await self._fetch()
            entries, problems = parse_nodes(body)
            node_members, _ = parse_member_addresses(body, "nodes", ("underlay",))
        except RegistryError as exc:
            self._refreshes.labels(exc.result).inc()
            if not self._failing:
                log.warning(
                    "registry_refresh_failed",
                    result=exc.result,
                    detail=exc.detail,
                    keeping_nodes=len(self.view),
                )
            self._failing = True
            return False
        self._refreshes.labels("ok").inc()
        for problem in problems:
            log.warning("registry_entry_skipped", detail=problem)
        old = self.view
        new = NodeView(entries)
        self.view = new
        self.last_success = self._clock()
        if self._failing or old.nodes != new.nodes or old is EMPTY_VIEW:
            log.info(
                "registry_refreshed",
                nodes=[f"{n.name}={n.underlay}/{n.sandbox_cidr}" for n in new.nodes],
                recovered=self._failing,
            )
        self._failing = False
        self._node_members = node_members
        await self._refresh_proxies()
        self._update_fleet()
        return True

    async def _refresh_proxies(self) -> None:
        try:
            body = await self._fetch(self._proxies_url)
            count = parse_proxy_count(body)
            members, problems = parse_member_addresses(body, "proxies", ("underlay", "egress"))
        except RegistryError as exc:
            # The last proxies' addresses stay in the fleet set.
            log.debug("registry_proxies_failed", result=exc.result, detail=exc.detail)
            return
        for problem in problems:
            log.warning("registry_entry_skipped", detail=problem)
        self._proxy_members = members
        if count != self.proxy_count:
            log.info("registry_proxies", proxies=count, was=self.proxy_count)
            self.proxy_count = count

    def _update_fleet(self) -> None:
        old = self.fleet
        new = old.with_members(self._static_members | self._node_members | self._proxy_members)
        if new is old:
            return
        self.fleet = new
        log.info(
            "fleet_addresses",
            version=new.version,
            addresses=_listed(new.members),
            added=_listed(new.members - old.members),
            removed=_listed(old.members - new.members),
        )
        if self._on_fleet_change is not None:
            self._on_fleet_change(new)

    async def _fetch(self, url: str | None = None) -> object:
        url = url or self._url
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        try:
            async with self._session.get(url, timeout=timeout) as response:
                if response.status != 200:
                    raise RegistryError("http_error", f"GET {url}: HTTP {response.status}")
                return await read_json_body(response, MAX_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RegistryError("unreachable", f"GET {url}: {exc!r}") from exc
        except ValueError as exc:
            raise RegistryError("bad_response", f"GET {url}: {exc}") from exc

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    def start(self) -> asyncio.Task[None]:
        """Start the refresh loop (first fetch right away) as a named task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="proxy-registry-refresh"
            )
        return self._task

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
