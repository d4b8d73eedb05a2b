"""The fleet's own addresses are never reachable through the proxy (`fleet_address`).

Two worlds, both real:

* `egressd proxy serve` as a process, with the real control plane as its
  registry (the fleet of `test_proxy_dataplane`: `ctl`, `proxy1`, `node1`,
  `inet` under a fresh `egd-t<hex>-` prefix). A minimal node agent in node1
  (a TUN with the sandbox address, GENEVE both ways) lets plain sockets from
  the sandbox address go through the proxy. The "internet" answers on
  203.0.113.22 and .23 (port 80, each connection logged) and serves DNS at
  203.0.113.53 with names that resolve to them. The job's policy has a cidr
  rule for all of 203.0.113.0/24 and a host rule `*.allowed.test`. A proxy
  record "proxy2" (egress 203.0.113.22) is registered: that address must be
  denied although the cidr rule covers it, and a proxy registered while the
  proxy runs ("proxy3", egress .23) must be denied from the next refresh on,
  and reachable again once it is removed.
* The real interceptor in the small world of `test_intercept`, whose context
  has plain fleet ranges and no member addresses (as with an empty
  registry): a connection to the proxy's own egress address, even on the port
  that would be its own source port, is reset without a connect attempt.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.rcode
import pytest

from egressd.layout import CONTROL_ADDR
from egressd.limits.ports import DEFAULT_SOURCE_PORTS
from egressd.net import netns as kn
from egressd.policy.jws import policy_digest
from egressd_harness.topology import network
from tests.support import intercept_world as ti
from tests.support.netns import fresh_prefix
from tests.support.proxy_fleet import (
    LAYOUT,
    MINI_AGENT,
    NODE,
    PROXY,
    REPO,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Fleet,
    ProxyProcess,
    http,
    start_control,
    stop_process,
    trust_control_key,
)
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS)

JOB = uuid.UUID("6c1f1b2a-4d4d-4a9a-9f55-1f0c5ac1d3e2")
SANDBOX = "100.96.1.7"
RESOLVER = "100.100.100.53"
OWN_EGRESS = str(PROXY.egress)  # 203.0.113.21
PROXY2 = ("proxy2", "198.18.0.22", "203.0.113.22")
PROXY3 = ("proxy3", "198.18.0.23", "203.0.113.23")
SITE = "203.0.113.10"
TARGETS = (PROXY2[2], PROXY3[2])
ZONE = [
    ("api.allowed.test", "A", SITE),
    ("fleet.allowed.test", "A", PROXY2[2]),
    ("self.allowed.test", "A", OWN_EGRESS),
    ("mixed.allowed.test", "A", PROXY2[2]),
    ("mixed.allowed.test", "A", SITE),
]

INET = textwrap.dedent(
    """
    import asyncio, sys
    from egressd_harness.topology.dnsserver import DnsServer, Zone
    zone_json, log_path, ready, *hosts = sys.argv[1:]
    import json

    async def main():
        log = open(log_path, "a", buffering=1)
        dns = DnsServer(Zone.build([tuple(r) for r in json.loads(zone_json)]), "203.0.113.53")
        await dns.start()

        def serve(host):
            async def handle(reader, writer):
                log.write(host + "\\n")
                try:
                    await reader.readuntil(b"\\r\\n\\r\\n")
                except Exception:
                    pass
                writer.write(b"HTTP/1.0 200 OK\\r\\n\\r\\nhello from " + host.encode())
                await writer.drain()
                writer.close()
            return handle

        servers = [await asyncio.start_server(serve(h), h, 80) for h in hosts]
        open(ready, "w").close()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class World:
    def __init__(self, fleet: Fleet, proxy: ProxyProcess) -> None:
        self.fleet = fleet
        self.proxy = proxy
        # Records are found by the sandbox socket's source; one proxy serves the module.
        self.sources = ti.SourcePorts()

    @property
    def served(self) -> list[str]:
        """The inet addresses that got a connection, in order."""
        path = self.fleet.root / "inet-served.log"
        return path.read_text().split() if path.exists() else []

    def events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.proxy.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event:
                        out.append(record)
        return out

    def wait_event(self, event: str, **match: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [
                e for e in self.events(event) if all(e.get(k) == v for k, v in match.items())
            ]
            return bool(found)

        wait_for(check, 8.0, f"a {event} event with {match}")
        return found[-1]

    def sandbox_socket(self, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
        sock = self.sources.bind(
            lambda: kn.netns_socket(self.fleet.node_ns, socket.AF_INET, kind), SANDBOX
        )
        sock.settimeout(5.0)
        return sock

    def get(self, dst: str, port: int = 80) -> bytes:
        """An HTTP exchange from the sandbox: the answer, or ConnectionResetError."""
        with contextlib.closing(self.sandbox_socket()) as sock:
            sock.connect((dst, port))
            sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    def expect_reset(self, dst: str, port: int = 80) -> str:
        with contextlib.closing(self.sandbox_socket()) as sock:
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                sock.connect((dst, port))
                sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                data = sock.recv(1024)
                raise AssertionError(f"expected a reset, got {data!r}")
            return "{}:{}".format(*sock.getsockname()[:2])

    def resolve(self, name: str) -> dns.message.Message:
        with contextlib.closing(self.sandbox_socket(socket.SOCK_DGRAM)) as sock:
            sock.sendto(dns.message.make_query(name, "A").to_wire(), (RESOLVER, 53))
            data, _ = sock.recvfrom(65535)
        return dns.message.from_wire(data)

    def register(self, name: str, underlay: str, egress: str) -> None:
        self.fleet.put(f"/v1/proxies/{name}", {"underlay": underlay, "egress": egress})

    def deregister(self, name: str) -> None:
        status, body = http(
            self.fleet.ctl,
            "DELETE",
            str(CONTROL_ADDR),
            8080,
            f"/v1/proxies/{name}",
            headers={"Authorization": f"Bearer {self.fleet.admin_token}"},
        )
        assert status in (200, 204), body

    def metric(self, name: str, **labels: str) -> float:
        return self.proxy.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("fleet-addresses")
    f = Fleet(prefix=fresh_prefix(), root=root)
    procs: list[subprocess.Popen[bytes]] = []
    proxy: ProxyProcess | None = None
    try:
        network.build(LAYOUT, f.prefix)
        for address in TARGETS:
            kn.ensure_addr(f.inet, network.INET_IF, f"{address}/32")
        trust_control_key(f)
        start_control(f)
        f.put(
            f"/v1/nodes/{NODE.name}",
            {"underlay": str(NODE.underlay), "sandbox_cidr": str(NODE.sandbox_cidr)},
        )
        f.put(f"/v1/proxies/{PROXY.name}", {"underlay": str(PROXY.underlay), "egress": OWN_EGRESS})
        f.put(f"/v1/proxies/{PROXY2[0]}", {"underlay": PROXY2[1], "egress": PROXY2[2]})
        f.put(
            f"/v1/jobs/{JOB}/policy",
            {
                "v": 1,
                "account": "acme",
                "nodes": [NODE.name],
                "egress": [
                    {"cidr": "203.0.113.0/24", "ports": [80, 16384]},
                    {"host": "*.allowed.test", "ports": [80]},
                ],
            },
        )
        _, body = http(f.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{JOB}/policy")
        jws = json.loads(body)["jws"]
        inet_ready = root / "inet-ready"
        procs.append(
            kn.popen_in_netns(
                f.inet,
                [
                    sys.executable,
                    "-c",
                    INET,
                    json.dumps(ZONE),
                    str(root / "inet-served.log"),
                    str(inet_ready),
                    *TARGETS,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(root / "inet.log").open("wb"),
                cwd=str(REPO),
            )
        )
        wait_for(inet_ready.exists, START_TIMEOUT_S, "the inet servers")

        proxy = ProxyProcess(f)
        proxy.wait_ready()
        agent_ready = root / "agent-ready"
        procs.append(
            kn.popen_in_netns(
                f.node_ns,
                [
                    sys.executable,
                    "-c",
                    MINI_AGENT,
                    "sbx0",
                    SANDBOX,
                    str(NODE.underlay),
                    str(PROXY.underlay),
                    str(JOB),
                    policy_digest(jws).hex(),
                    str(agent_ready),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(root / "agent.log").open("wb"),
                cwd=str(REPO),
            )
        )
        wait_for(agent_ready.exists, START_TIMEOUT_S, "the mini agent")
        kn.run_in_netns(
            f.node_ns, ["ip", "route", "replace", f"{RESOLVER}/32", "dev", "sbx0", "src", SANDBOX]
        )
        w = World(f, proxy)
        # The registry's first answer is in: proxy2's egress is a fleet address.
        w.wait_event("fleet_addresses")
        yield w
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        if proxy is not None:
            proxy.kill()
        stop_process(f.control)
        network.destroy(LAYOUT, f.prefix)
        for name in kn.list_netns(f.prefix):
            kn.delete_netns(name)


def test_the_registry_fleet_set_is_logged(world: World) -> None:
    event = world.events("fleet_addresses")[-1]
    for address in (
        OWN_EGRESS,
        str(PROXY.underlay),
        PROXY2[1],
        PROXY2[2],
        str(NODE.underlay),
        str(CONTROL_ADDR),
        RESOLVER,
        "203.0.113.53",
    ):
        assert address in event["addresses"], address
    assert world.metric("egressd_fleet_addresses") == len(event["addresses"])


def test_a_cidr_rule_does_not_reach_another_proxy(world: World) -> None:
    before = world.metric("egressd_connections_total", verdict="deny", reason="fleet_address")
    src = world.expect_reset(PROXY2[2])
    event = world.wait_event("connection", source=src)
    assert (event["verdict"], event["reason"], event["dst"]) == ("deny", "fleet_address", PROXY2[2])
    assert PROXY2[2] not in world.served  # never connected upstream
    after = world.metric("egressd_connections_total", verdict="deny", reason="fleet_address")
    assert after == before + 1


@pytest.mark.parametrize("port", [80, DEFAULT_SOURCE_PORTS[0]])
def test_the_proxy_never_connects_to_itself(world: World, port: int) -> None:
    # DEFAULT_SOURCE_PORTS[0] is the first source port the proxy would bind:
    # without the deny, that connect would be a TCP self-connect.
    src = world.expect_reset(OWN_EGRESS, port)
    event = world.wait_event("connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "fleet_address")


def test_the_fleet_set_is_kept_current(world: World) -> None:
    # Not a fleet address yet: the cidr rule reaches it.
    assert world.get(PROXY3[2]).endswith(b"hello from " + PROXY3[2].encode())
    world.register(*PROXY3)
    try:
        world.wait_event("fleet_addresses", added=[PROXY3[1], PROXY3[2]])
        served = world.served.count(PROXY3[2])
        src = world.expect_reset(PROXY3[2])
        assert world.wait_event("connection", source=src)["reason"] == "fleet_address"
        assert world.served.count(PROXY3[2]) == served
    finally:
        world.deregister(PROXY3[0])
    world.wait_event("fleet_addresses", removed=[PROXY3[1], PROXY3[2]])
    assert world.get(PROXY3[2]).endswith(b"hello from " + PROXY3[2].encode())


def test_dns_answers_with_fleet_addresses_are_filtered(world: World) -> None:
    only = world.resolve("fleet.allowed.test")
    assert only.rcode() == dns.rcode.NXDOMAIN and not only.answer
    event = world.wait_event("dns", qname="fleet.allowed.test")
    assert event["reason"] == "rebinding"
    assert event["dropped"] == [{"address": PROXY2[2], "reason": "fleet_address"}]

    own = world.resolve("self.allowed.test")
    assert own.rcode() == dns.rcode.NXDOMAIN
    assert world.wait_event("dns", qname="self.allowed.test")["dropped"] == [
        {"address": OWN_EGRESS, "reason": "fleet_address"}
    ]

    mixed = world.resolve("mixed.allowed.test")
    assert mixed.rcode() == dns.rcode.NOERROR
    assert [r.address for rrset in mixed.answer for r in rrset] == [SITE]
    event = world.wait_event("dns", qname="mixed.allowed.test")
    assert event["answers"] == [SITE]
    assert event["dropped"] == [{"address": PROXY2[2], "reason": "fleet_address"}]


def test_a_name_that_resolves_to_the_fleet_is_denied(world: World) -> None:
    # The host rule allows fleet.allowed.test; the proxy's own resolution
    # drops the fleet address, and the address is denied before any name counts.
    with contextlib.closing(world.sandbox_socket()) as sock:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.connect((PROXY2[2], 80))
            sock.sendall(b"GET / HTTP/1.0\r\nHost: fleet.allowed.test\r\n\r\n")
            raise AssertionError(f"expected a reset, got {sock.recv(1024)!r}")
        src = "{}:{}".format(*sock.getsockname()[:2])
    event = world.wait_event("connection", source=src)
    assert (event["verdict"], event["reason"]) == ("deny", "fleet_address")


# --- the self-connect guard in the interceptor itself -----------------------------------


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ti.World]:
    with ti.make_world(tmp_path_factory.mktemp("fleet-bare")) as w:
        yield w


@pytest.mark.parametrize("port", [80, DEFAULT_SOURCE_PORTS[0]])
def test_own_egress_is_never_connected_even_without_member_addresses(
    bare: ti.World, port: int
) -> None:
    # The context knows only the fleet ranges (an empty registry): tier 2's
    # cidr rule allows 203.0.113.21, and the connect step refuses it.
    bare.set_policy(egress=[{"cidr": "203.0.113.0/24", "ports": [80, port]}])
    src = bare.expect_reset(ti.EGRESS, port)
    event = bare.wait_event(event="connection", source=src)
    assert (event["verdict"], event["reason"], event["dst"]) == ("deny", "fleet_address", ti.EGRESS)
    # Everything else in the cidr rule is still reachable.
    with contextlib.closing(bare.connect(ti.API, 80)) as sock:
        _, answer = ti.http_get(sock, "x", "/bytes/10")
    assert b" 200 " in answer.split(b"\r\n", 1)[0], answer[:100]
