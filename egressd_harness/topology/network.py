"""The local fleet's network: namespaces, bridges, veths, addresses, routes.

`plan()` turns a `Layout` into a `TopologyPlan`, pure data; `build()` applies a
plan to the kernel idempotently (build twice = same state, no error) and then
checks it with `describe()`; `destroy()` removes the namespaces.

    {prefix}net     br-under (198.18.0.0/24), br-inet (203.0.113.0/24), no addresses
    {prefix}ctl     under0 198.18.0.2/24
    {prefix}nodeN   under0 198.18.0.1N/24; ip_forward=1, rp_filter=0
    {prefix}proxyN  under0 198.18.0.2N/24, egress0 203.0.113.2N/24,
                    default via 203.0.113.1
    {prefix}inet    inet0 203.0.113.1/24 + every site address and 203.0.113.53 as /32;
                    lo 169.254.169.254/32 (the metadata service)

Every veth is created inside `{prefix}net` with its peer placed straight into
the member namespace, so the caller's (host) namespace never holds a fleet
interface. The bridge-side end of a veth is named `u-<member>` on br-under and
`i-<member>` on br-inet. No namespace gets a route to the host; the only
default routes are the proxies' (to the inet gateway).

`prefix` defaults to "egd-" (the names in DESIGN.md); tests pass their own
(e.g. "egd-t1234-") so that they never touch a developer's real topology.
A layout namespace name `egd-X` becomes `{prefix}X`.

Proxies keep ip_forward=0: a proxy terminates connections (TPROXY to a local
listener) and never routes a sandbox's packets onward, so a packet that escapes
its nftables rules is dropped rather than forwarded to the internet.

The kernel here has no `dummy` driver, so the metadata address lives on `lo`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import structlog

from egressd.layout import (
    CONTROL_ADDR,
    CTL_NS,
    INET_BRIDGE,
    INET_DNS,
    INET_GATEWAY,
    INET_NS,
    INTERNET,
    METADATA,
    NET_NS,
    UNDERLAY,
    UNDERLAY_BRIDGE,
    UNDERLAY_MTU,
    Layout,
)
from egressd.net import netns as kn

DEFAULT_PREFIX = "egd-"
LAYOUT_PREFIX = "egd-"
UNDERLAY_IF = "under0"
EGRESS_IF = "egress0"
INET_IF = "inet0"
LOOPBACK = "lo"
SANDBOX_NS_PART = "sbx-"

IPv4Interface = ipaddress.IPv4Interface
IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

_log = structlog.get_logger("egressd_harness.topology.network")


def netns_name(layout_name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The namespace for a layout name (`egd-node1`) under `prefix`."""
    if not layout_name.startswith(LAYOUT_PREFIX):
        raise ValueError(f"layout namespace {layout_name!r} does not start with {LAYOUT_PREFIX!r}")
    return kn.check_netns_name(prefix + layout_name.removeprefix(LAYOUT_PREFIX))


@dataclass(frozen=True, slots=True)
class Veth:
    """One veth: `port` is enslaved to `bridge` in the bridge namespace,
    `ifname` lives in the member namespace and carries `addresses`."""

    bridge: str
    port: str
    ifname: str
    addresses: tuple[IPv4Interface, ...]


@dataclass(frozen=True, slots=True)
class Route:
    dst: IPv4Network
    via: IPv4Address | None
    dev: str


@dataclass(frozen=True, slots=True)
class NamespacePlan:
    name: str
    role: str  # net, ctl, node, proxy, inet
    veths: tuple[Veth, ...] = ()
    lo_addresses: tuple[IPv4Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    sysctls: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TopologyPlan:
    prefix: str
    net: NamespacePlan
    bridges: tuple[str, ...]
    members: tuple[NamespacePlan, ...]
    mtu: int = UNDERLAY_MTU

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.net.name, *(m.name for m in self.members))

    def member(self, name: str) -> NamespacePlan:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)


def _short(layout_name: str) -> str:
    return layout_name.removeprefix(LAYOUT_PREFIX)


def _underlay(layout_name: str, address: IPv4Address) -> Veth:
    return Veth(
        bridge=UNDERLAY_BRIDGE,
        port=kn.check_ifname(f"u-{_short(layout_name)}"),
        ifname=UNDERLAY_IF,
        addresses=(IPv4Interface(f"{address}/{UNDERLAY.prefixlen}"),),
    )


def plan(layout: Layout, prefix: str = DEFAULT_PREFIX) -> TopologyPlan:
    """The namespaces, links, addresses, routes and sysctls for `layout`."""
    forward_off = (("net.ipv4.ip_forward", "0"),)
    members: list[NamespacePlan] = [
        NamespacePlan(
            name=netns_name(CTL_NS, prefix),
            role="ctl",
            veths=(_underlay(CTL_NS, CONTROL_ADDR),),
            sysctls=forward_off,
        )
    ]
    for node in layout.nodes:
        members.append(
            NamespacePlan(
                name=netns_name(node.netns, prefix),
                role="node",
                veths=(_underlay(node.netns, node.underlay),),
                sysctls=(
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.default.rp_filter", "0"),
                ),
            )
        )
    for proxy in layout.proxies:
        members.append(
            NamespacePlan(
                name=netns_name(proxy.netns, prefix),
                role="proxy",
                veths=(
                    _underlay(proxy.netns, proxy.underlay),
                    Veth(
                        bridge=INET_BRIDGE,
                        port=kn.check_ifname(f"i-{_short(proxy.netns)}"),
                        ifname=EGRESS_IF,
                        addresses=(IPv4Interface(f"{proxy.egress}/{INTERNET.prefixlen}"),),
                    ),
                ),
                routes=(Route(IPv4Network("0.0.0.0/0"), INET_GATEWAY, EGRESS_IF),),
                sysctls=forward_off,
            )
        )
    extra = sorted({site.address for site in layout.sites} | {INET_DNS})
    members.append(
        NamespacePlan(
            name=netns_name(INET_NS, prefix),
            role="inet",
            veths=(
                Veth(
                    bridge=INET_BRIDGE,
                    port=kn.check_ifname(f"i-{_short(INET_NS)}"),
                    ifname=INET_IF,
                    addresses=(
                        IPv4Interface(f"{INET_GATEWAY}/{INTERNET.prefixlen}"),
                        *(IPv4Interface(f"{a}/32") for a in extra if a != INET_GATEWAY),
                    ),
                ),
            ),
            lo_addresses=(IPv4Interface(f"{METADATA}/32"),),
            sysctls=forward_off,
        )
    )
    return TopologyPlan(
        prefix=prefix,
        net=NamespacePlan(name=netns_name(NET_NS, prefix), role="net", sysctls=forward_off),
        bridges=(UNDERLAY_BRIDGE, INET_BRIDGE),
        members=tuple(members),
    )


# --- apply -------------------------------------------------------------------


def build(layout: Layout, prefix: str = DEFAULT_PREFIX) -> TopologyPlan:
    """Create (or complete) the topology; raise NetError if it still differs afterwards."""
    p = plan(layout, prefix)
    for name in p.namespaces:
        kn.ensure_netns(name)
    net = p.net.name
    kn.set_link_up(net, LOOPBACK)
    for bridge in p.bridges:
        kn.ensure_bridge(net, bridge)
        kn.set_mtu(net, bridge, p.mtu)
        kn.set_link_up(net, bridge)
    _apply_sysctls(p.net)
    for member in p.members:
        kn.set_link_up(member.name, LOOPBACK)
        for address in member.lo_addresses:
            kn.ensure_addr(member.name, LOOPBACK, address)
        for veth in member.veths:
            kn.ensure_veth(net, veth.port, member.name, veth.ifname)
            kn.set_mtu(net, veth.port, p.mtu)
            kn.set_mtu(member.name, veth.ifname, p.mtu)
            kn.enslave(net, veth.port, veth.bridge)
            kn.set_link_up(net, veth.port)
            kn.set_link_up(member.name, veth.ifname)
            for address in veth.addresses:
                kn.ensure_addr(member.name, veth.ifname, address)
        for route in member.routes:
            kn.ensure_route(member.name, route.dst, via=route.via, dev=route.dev)
        _apply_sysctls(member)
    status = describe(layout, prefix)
    if status.problems:
        raise kn.NetError("topology_drift", "; ".join(status.problems))
    _log.info("topology_built", prefix=prefix, namespaces=list(p.namespaces))
    return p


def _apply_sysctls(member: NamespacePlan) -> None:
    for key, value in member.sysctls:
        kn.set_sysctl(member.name, key, value)


def destroy(layout: Layout, prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """Delete the layout's namespaces and any `{prefix}sbx-*` sandbox namespace.

    Kills no process; returns the names that were removed.
    """
    p = plan(layout, prefix)
    names = [*(m.name for m in p.members), p.net.name, *kn.list_netns(prefix + SANDBOX_NS_PART)]
    removed = tuple(name for name in names if kn.delete_netns(name))
    _log.info("topology_destroyed", prefix=prefix, removed=list(removed))
    return removed


# --- describe ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopologyStatus:
    prefix: str
    states: tuple[kn.NetnsState, ...]
    missing: tuple[str, ...]
    problems: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "ok": not self.problems,
            "problems": list(self.problems),
            "missing_namespaces": list(self.missing),
            "namespaces": {
                state.name: {
                    "links": [
                        {
                            "name": link.name,
                            "kind": link.kind,
                            "up": link.up,
                            "mtu": link.mtu,
                            "master": link.master,
                            "addresses": [str(a) for a in link.addresses],
                        }
                        for link in state.links
                    ],
                    "routes": [
                        {
                            "dst": str(r.dst),
                            "via": str(r.gateway) if r.gateway else None,
                            "dev": r.dev,
                        }
                        for r in state.routes
                    ],
                }
                for state in self.states
            },
        }


def describe(
    layout: Layout, prefix: str = DEFAULT_PREFIX, *, sysctls: bool = True
) -> TopologyStatus:
    """The kernel's view of the topology and every way it differs from `plan()`."""
    p = plan(layout, prefix)
    problems: list[str] = []
    states: dict[str, kn.NetnsState] = {}
    missing = tuple(name for name in p.namespaces if not kn.netns_exists(name))
    problems += [f"{name}: namespace missing" for name in missing]
    for name in p.namespaces:
        if name not in missing:
            states[name] = kn.netns_state(name)
    if p.net.name in states:
        net = states[p.net.name]
        for bridge in p.bridges:
            problems += _link_problems(
                net, bridge, kind="bridge", mtu=p.mtu, master=None, addresses=()
            )
    for member in (p.net, *p.members):
        state = states.get(member.name)
        if state is None:
            continue
        lo = state.link(LOOPBACK)
        if lo is None or not lo.up:
            problems.append(f"{member.name}/lo: down")
        for address in member.lo_addresses:
            if lo is None or address not in lo.addresses:
                problems.append(f"{member.name}/lo: missing {address}")
        for veth in member.veths:
            problems += _link_problems(
                state, veth.ifname, kind="veth", mtu=p.mtu, master=None, addresses=veth.addresses
            )
            if p.net.name in states:
                problems += _link_problems(
                    states[p.net.name],
                    veth.port,
                    kind="veth",
                    mtu=p.mtu,
                    master=veth.bridge,
                    addresses=(),
                )
        for route in member.routes:
            if not any(
                r.dst == route.dst and r.gateway == route.via and r.dev == route.dev
                for r in state.routes
            ):
                problems.append(
                    f"{member.name}: missing route {route.dst} via {route.via} dev {route.dev}"
                )
        default = IPv4Network("0.0.0.0/0")
        if not any(r.dst == default for r in member.routes) and any(
            r.dst == default for r in state.routes
        ):
            problems.append(f"{member.name}: unexpected default route")
        if sysctls:
            for key, value in member.sysctls:
                if (have := kn.get_sysctl(member.name, key)) != value:
                    problems.append(f"{member.name}: {key}={have}, wanted {value}")
    return TopologyStatus(
        prefix=prefix, states=tuple(states.values()), missing=missing, problems=tuple(problems)
    )


def _link_problems(
    state: kn.NetnsState,
    name: str,
    *,
    kind: str,
    mtu: int,
    master: str | None,
    addresses: tuple[IPv4Interface, ...],
) -> list[str]:
    where = f"{state.name}/{name}"
    link = state.link(name)
    if link is None:
        return [f"{where}: missing"]
    out = []
    if link.kind != kind:
        out.append(f"{where}: kind {link.kind}, wanted {kind}")
    if not link.up:
        out.append(f"{where}: down")
    if link.mtu != mtu:
        out.append(f"{where}: mtu {link.mtu}, wanted {mtu}")
    if master is not None and link.master != master:
        out.append(f"{where}: master {link.master}, wanted {master}")
    out += [f"{where}: missing {a}" for a in addresses if a not in link.addresses]
    return out
