"""Names and addresses of the local fleet, as fixed by DESIGN.md.

Pure data: every component and test takes its addresses from here instead of
repeating literals. Nothing in this module touches the kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

GENEVE_PORT = 6081
ADMIN_PORT = 9090
CONTROL_PORT = 8080
DEFAULT_VNI = 1
# Outer IPv4 (20) + UDP (8) + GENEVE base header (8) + job option (28).
GENEVE_OVERHEAD = 20 + 8 + 8 + 28
UNDERLAY_MTU = 1500
SANDBOX_MTU = UNDERLAY_MTU - GENEVE_OVERHEAD
RESOLVER = IPv4Address("100.100.100.53")
METADATA = IPv4Address("169.254.169.254")
DEFAULT_RUN_DIR = Path("/run/egressd")

NET_NS = "egd-net"
INET_NS = "egd-inet"
CTL_NS = "egd-ctl"
UNDERLAY_BRIDGE = "br-under"
INET_BRIDGE = "br-inet"
UNDERLAY = IPv4Network("198.18.0.0/24")
INTERNET = IPv4Network("203.0.113.0/24")
SANDBOX_SUPERNET = IPv4Network("100.96.0.0/16")
CONTROL_ADDR = IPv4Address("198.18.0.2")
INET_GATEWAY = IPv4Address("203.0.113.1")
INET_DNS = IPv4Address("203.0.113.53")
NODE_TUN = "egr0"
PROXY_TUN = "gnv0"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    underlay: IPv4Address
    sandbox_cidr: IPv4Network

    @property
    def netns(self) -> str:
        return f"egd-{self.name}"

    @property
    def gateway(self) -> IPv4Address:
        return self.sandbox_cidr.network_address + 1


@dataclass(frozen=True, slots=True)
class ProxySpec:
    name: str
    underlay: IPv4Address
    egress: IPv4Address

    @property
    def netns(self) -> str:
        return f"egd-{self.name}"


@dataclass(frozen=True, slots=True)
class Site:
    """A server name in the "internet" and the address it lives on."""

    name: str
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class Layout:
    nodes: tuple[NodeSpec, ...]
    proxies: tuple[ProxySpec, ...]
    sites: tuple[Site, ...]
    run_dir: Path = DEFAULT_RUN_DIR
    vni: int = DEFAULT_VNI
    # Namespace name prefix: DESIGN.md's names use "egd-"; tests and benchmarks
    # pass their own so that two fleets never share a namespace.
    prefix: str = "egd-"
    # The fleet's own ranges: always denied whatever a policy says.
    fleet_ranges: tuple[IPv4Network, ...] = field(
        default=(UNDERLAY, SANDBOX_SUPERNET, IPv4Network(f"{RESOLVER}/32"))
    )

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def proxy(self, name: str) -> ProxySpec:
        for proxy in self.proxies:
            if proxy.name == name:
                return proxy
        raise KeyError(name)

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)


def default_layout(run_dir: Path = DEFAULT_RUN_DIR, prefix: str = "egd-") -> Layout:
    return Layout(
        nodes=(
            NodeSpec("node1", IPv4Address("198.18.0.11"), IPv4Network("100.96.1.0/24")),
            NodeSpec("node2", IPv4Address("198.18.0.12"), IPv4Network("100.96.2.0/24")),
        ),
        proxies=(
            ProxySpec("proxy1", IPv4Address("198.18.0.21"), IPv4Address("203.0.113.21")),
            ProxySpec("proxy2", IPv4Address("198.18.0.22"), IPv4Address("203.0.113.22")),
        ),
        sites=(
            Site("api.allowed.test", IPv4Address("203.0.113.10")),
            Site("eu.data.allowed.test", IPv4Address("203.0.113.11")),
            Site("us.data.allowed.test", IPv4Address("203.0.113.11")),
            Site("evil.test", IPv4Address("203.0.113.66")),
            Site("raw.test", IPv4Address("203.0.113.77")),
        ),
        run_dir=run_dir,
        prefix=prefix,
    )
