"""The local topology's network, built under a private prefix, checked, rebuilt and destroyed.

Every test uses its own namespace prefix (`egd-tNNNN-`), never the real
`egd-` names, and removes its namespaces in fixture finalizers.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
from collections.abc import Iterator

import pytest

from egressd.layout import INET_DNS, METADATA, default_layout
from egressd.net import netns as kn
from egressd_harness.topology import network
from tests.support.netns import fresh_prefix

pytestmark = pytest.mark.root("nsenter")

LAYOUT = default_layout()
TIMEOUT_S = 5.0


def root_links() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {
        line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.strip()
    }


def brief(ns: str) -> str:
    """`ip -br` links and addresses, plus routes: the state that must not change on rebuild."""
    parts = [
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout
        for args in (["-br", "link"], ["-br", "-4", "addr"], ["-4", "route"])
    ]
    return "\n".join(parts)


def teardown(prefix: str) -> None:
    network.destroy(LAYOUT, prefix)
    for name in kn.list_netns(prefix):  # anything a failed test left under this prefix
        kn.delete_netns(name)


class Topology:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.plan = network.plan(LAYOUT, prefix)
        self.root_before: set[str] = set()
        self.root_after: set[str] = set()

    def ns(self, layout_name: str) -> str:
        return network.netns_name(layout_name, self.prefix)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology(fresh_prefix())
    t.root_before = root_links()
    try:
        network.build(LAYOUT, t.prefix)
        t.root_after = root_links()
        yield t
    finally:
        teardown(t.prefix)
    assert kn.list_netns(t.prefix) == ()


def tcp_exchange(server_ns: str, server_addr: str, client_ns: str) -> str:
    """Accept one connection in `server_ns`, send from `client_ns`.

    Returns the client address that the server saw.
    """
    with kn.netns_socket(server_ns, socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind((server_addr, 0))
        server.listen(1)
        server.settimeout(TIMEOUT_S)
        port = server.getsockname()[1]
        with kn.netns_socket(client_ns, socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT_S)
            client.connect((server_addr, port))
            conn, peer = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
    return peer[0]


def connect_error(client_ns: str, address: str, port: int = 80) -> int:
    with kn.netns_socket(client_ns, socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT_S)
        try:
            client.connect((address, port))
        except OSError as exc:
            return exc.errno or 0
    return 0


# --- pure plan -----------------------------------------------------------------


def test_plan_uses_the_prefix_and_short_interface_names() -> None:
    plan = network.plan(LAYOUT, "egd-t0000-")
    assert plan.namespaces == (
        "egd-t0000-net",
        "egd-t0000-ctl",
        "egd-t0000-node1",
        "egd-t0000-node2",
        "egd-t0000-proxy1",
        "egd-t0000-proxy2",
        "egd-t0000-inet",
    )
    for member in plan.members:
        for veth in member.veths:
            assert len(veth.port) <= 15 and len(veth.ifname) <= 15
    default_plan = network.plan(LAYOUT)
    assert default_plan.net.name == "egd-net"
    assert {node.netns for node in LAYOUT.nodes} <= set(default_plan.namespaces)


def test_only_proxies_get_a_default_route() -> None:
    plan = network.plan(LAYOUT, "egd-t0000-")
    with_default = {m.role for m in plan.members for r in m.routes if r.dst.prefixlen == 0}
    assert with_default == {"proxy"}


# --- built topology ----------------------------------------------------------------


def test_namespaces_and_addresses_exist(topo: Topology) -> None:
    assert set(kn.list_netns(topo.prefix)) == set(topo.plan.namespaces)
    status = network.describe(LAYOUT, topo.prefix)
    assert status.problems == ()

    def addrs(layout_ns: str, ifname: str) -> set[str]:
        state = kn.netns_state(topo.ns(layout_ns))
        link = state.link(ifname)
        assert link is not None, f"{ifname} missing in {layout_ns}"
        assert link.up and (ifname == "lo" or link.mtu == 1500)
        return {str(a) for a in link.addresses}

    assert addrs("egd-ctl", "under0") == {"198.18.0.2/24"}
    assert addrs("egd-node1", "under0") == {"198.18.0.11/24"}
    assert addrs("egd-node2", "under0") == {"198.18.0.12/24"}
    assert addrs("egd-proxy1", "under0") == {"198.18.0.21/24"}
    assert addrs("egd-proxy1", "egress0") == {"203.0.113.21/24"}
    assert addrs("egd-proxy2", "egress0") == {"203.0.113.22/24"}
    inet = addrs("egd-inet", "inet0")
    assert "203.0.113.1/24" in inet and f"{INET_DNS}/32" in inet
    assert {f"{site.address}/32" for site in LAYOUT.sites} <= inet
    assert f"{METADATA}/32" in addrs("egd-inet", "lo")
    net = kn.netns_state(topo.ns("egd-net"))
    assert {link.name for link in net.links if link.master == "br-under"} == {
        "u-ctl",
        "u-node1",
        "u-node2",
        "u-proxy1",
        "u-proxy2",
    }
    assert {link.name for link in net.links if link.master == "br-inet"} == {
        "i-proxy1",
        "i-proxy2",
        "i-inet",
    }


def test_routes_and_sysctls(topo: Topology) -> None:
    proxy = kn.netns_state(topo.ns("egd-proxy1"))
    defaults = [r for r in proxy.routes if r.dst.prefixlen == 0]
    assert [(str(r.gateway), r.dev) for r in defaults] == [("203.0.113.1", "egress0")]
    for name in ("egd-net", "egd-ctl", "egd-node1", "egd-node2", "egd-inet"):
        assert not [r for r in kn.netns_state(topo.ns(name)).routes if r.dst.prefixlen == 0], name
    node = topo.ns("egd-node1")
    assert kn.get_sysctl(node, "net.ipv4.ip_forward") == "1"
    assert kn.get_sysctl(node, "net.ipv4.conf.all.rp_filter") == "0"
    assert kn.get_sysctl(topo.ns("egd-proxy1"), "net.ipv4.ip_forward") == "0"


def test_root_namespace_gets_no_interface(topo: Topology) -> None:
    assert topo.root_after == topo.root_before


def test_node_reaches_proxy_over_the_underlay(topo: Topology) -> None:
    seen = tcp_exchange(topo.ns("egd-proxy1"), "198.18.0.21", topo.ns("egd-node1"))
    assert seen == "198.18.0.11"
    seen = tcp_exchange(topo.ns("egd-ctl"), "198.18.0.2", topo.ns("egd-node2"))
    assert seen == "198.18.0.12"


def test_udp_over_the_underlay(topo: Topology) -> None:
    with kn.netns_socket(topo.ns("egd-proxy2"), socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("198.18.0.22", 0))
        server.settimeout(TIMEOUT_S)
        with kn.netns_socket(topo.ns("egd-node1"), socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"geneve?", ("198.18.0.22", server.getsockname()[1]))
            data, peer = server.recvfrom(64)
    assert (data, peer[0]) == (b"geneve?", "198.18.0.11")


def test_proxy_reaches_the_internet_from_its_egress_address(topo: Topology) -> None:
    assert (
        tcp_exchange(topo.ns("egd-inet"), "203.0.113.10", topo.ns("egd-proxy1")) == "203.0.113.21"
    )
    assert (
        tcp_exchange(topo.ns("egd-inet"), "203.0.113.66", topo.ns("egd-proxy2")) == "203.0.113.22"
    )


@pytest.mark.parametrize("layout_ns", ["egd-node1", "egd-node2", "egd-ctl"])
@pytest.mark.parametrize(
    "address", ["203.0.113.10", "203.0.113.1", str(INET_DNS), str(METADATA), "1.1.1.1"]
)
def test_nodes_and_control_cannot_reach_the_internet(
    topo: Topology, layout_ns: str, address: str
) -> None:
    assert connect_error(topo.ns(layout_ns), address) == errno.ENETUNREACH


def test_build_twice_is_idempotent(topo: Topology) -> None:
    before = {name: brief(name) for name in topo.plan.namespaces}
    network.build(LAYOUT, topo.prefix)
    assert {name: brief(name) for name in topo.plan.namespaces} == before
    assert network.describe(LAYOUT, topo.prefix).problems == ()
    assert root_links() == topo.root_before


def test_build_repairs_a_missing_piece(topo: Topology) -> None:
    node = topo.ns("egd-node2")
    kn.run_in_netns(node, ["ip", "addr", "flush", "dev", "under0"])
    assert network.describe(LAYOUT, topo.prefix).problems != ()
    network.build(LAYOUT, topo.prefix)
    assert network.describe(LAYOUT, topo.prefix).problems == ()
    assert tcp_exchange(topo.ns("egd-proxy1"), "198.18.0.21", node) == "198.18.0.12"


def test_describe_is_json_ready(topo: Topology) -> None:
    data = network.describe(LAYOUT, topo.prefix).to_dict()
    assert data["ok"] is True
    assert json.loads(json.dumps(data)) == data


# --- destroy and the netns helpers ------------------------------------------------


def test_destroy_removes_every_namespace_of_the_prefix() -> None:
    prefix = fresh_prefix()
    try:
        before = root_links()
        network.build(LAYOUT, prefix)
        kn.ensure_netns(f"{prefix}sbx-a1")  # a sandbox namespace the agent would have made
        removed = network.destroy(LAYOUT, prefix)
        assert set(removed) == {*network.plan(LAYOUT, prefix).namespaces, f"{prefix}sbx-a1"}
        assert kn.list_netns(prefix) == ()
        assert network.destroy(LAYOUT, prefix) == ()  # absent: no error
        assert root_links() == before
        status = network.describe(LAYOUT, prefix)
        assert len(status.missing) == len(network.plan(LAYOUT, prefix).namespaces)
    finally:
        teardown(prefix)


@pytest.fixture
def scratch_ns() -> Iterator[str]:
    name = f"{fresh_prefix()}x"
    try:
        yield name
    finally:
        kn.delete_netns(name)
    assert not kn.netns_exists(name)


def test_netns_helpers_are_idempotent(scratch_ns: str) -> None:
    kn.ensure_netns(scratch_ns)
    kn.ensure_netns(scratch_ns)
    assert scratch_ns in kn.list_netns(scratch_ns)
    for _ in range(2):
        kn.ensure_bridge(scratch_ns, "br0")
        kn.ensure_veth(scratch_ns, "va", scratch_ns, "vb")
        kn.enslave(scratch_ns, "va", "br0")
        kn.set_mtu(scratch_ns, "vb", 1400)
        kn.set_link_up(scratch_ns, "vb")
        kn.ensure_addr(scratch_ns, "vb", "10.77.0.2/24")
        kn.ensure_route(scratch_ns, "10.78.0.0/16", via="10.77.0.1")
        kn.set_sysctl(scratch_ns, "net.ipv4.ip_forward", 1)
    state = kn.netns_state(scratch_ns)
    vb = state.link("vb")
    assert vb is not None and vb.mtu == 1400 and vb.up
    assert [str(a) for a in vb.addresses] == ["10.77.0.2/24"]
    assert state.link("va").master == "br0"  # type: ignore[union-attr]
    assert any(str(r.dst) == "10.78.0.0/16" and str(r.gateway) == "10.77.0.1" for r in state.routes)
    kn.ensure_addr(scratch_ns, "vb", "10.77.0.2/16")  # same address, new prefix: replaced
    assert [str(a) for a in kn.netns_state(scratch_ns).link("vb").addresses] == ["10.77.0.2/16"]  # type: ignore[union-attr]
    assert kn.get_sysctl(scratch_ns, "net.ipv4.ip_forward") == "1"
    assert kn.delete_netns(scratch_ns) is True
    assert kn.delete_netns(scratch_ns) is False


def test_netns_errors_are_typed(scratch_ns: str) -> None:
    with pytest.raises(kn.NetError) as info:
        kn.ensure_addr(scratch_ns, "lo", "10.0.0.1/8")
    assert info.value.reason == "netns_missing"
    assert not kn.netns_exists(scratch_ns)  # a query never creates the namespace
    kn.ensure_netns(scratch_ns)
    with pytest.raises(kn.NetError) as info:
        kn.set_link_up(scratch_ns, "nope0")
    assert info.value.reason == "link_missing"
    with pytest.raises(kn.NetError) as info:
        kn.ensure_veth(scratch_ns, "this-name-is-too-long", scratch_ns, "b")
    assert info.value.reason == "invalid_name"
    with pytest.raises(kn.NetError) as info:
        kn.run_in_netns(scratch_ns, ["sh", "-c", "echo oops >&2; exit 3"])
    assert info.value.reason == "command_failed" and "oops" in info.value.detail
    assert isinstance(info.value.__cause__, subprocess.CalledProcessError)
    with pytest.raises(kn.NetError) as info:
        kn.ensure_route(scratch_ns, "10.9.0.0/16", via="10.8.0.1")  # gateway not on any link
    assert info.value.reason == "route_failed" and info.value.errno == errno.ENETUNREACH


def test_run_in_netns_sees_only_the_namespace(scratch_ns: str) -> None:
    kn.ensure_netns(scratch_ns)
    out = kn.run_in_netns(scratch_ns, ["ip", "-o", "link"]).stdout
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    # nsenter keeps the caller's mounts: /sys/fs/cgroup stays visible (unlike `ip netns exec`).
    assert (
        kn.run_in_netns(scratch_ns, ["ls", "/sys/fs/cgroup"]).stdout
        == subprocess.run(
            ["ls", "/sys/fs/cgroup"], capture_output=True, text=True, check=True
        ).stdout
    )
