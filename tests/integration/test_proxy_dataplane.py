"""`egressd proxy serve` as a real process: GENEVE in, TPROXY, SYN-ACK back, drops by reason.

A fleet of its own under a fresh prefix (`egd-t<hex>-`, built with
`egressd_harness.topology.network`; tests/support/proxy_fleet.py, fixtures in conftest.py): `ctl` (the real control plane, a subprocess),
`proxy1` (the real proxy, a subprocess under `nsenter --net=...`), `inet`
(an HTTP server on 203.0.113.10:80) and `node1`, which plays the node: a UDP
socket on 198.18.0.11:6081 that sends GENEVE built with scapy +
`egressd.geneve.encode` and reads the proxy's replies. A second address on
node1's underlay interface, 198.18.0.99, is the "non-node" sender.

The last test runs a minimal node agent in node1 (a TUN with the sandbox
address, GENEVE both ways) so that a plain `socket.connect` from a sandbox
address gets an HTTP answer from the inet server through the proxy.

Everything is removed in finalizers: processes first, then the namespaces.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP

from egressd.geneve.codec import decode
from egressd.net import netns as kn
from tests.support.proxy_drops import send_drops, wait_for_drops
from tests.support.proxy_fleet import (
    JOB,
    REPLY_TIMEOUT_S,
    SITE,
    Fleet,
    NodeSim,
    ProxyProcess,
    agent_for,
    assert_syn_ack,
    dropped,
    http,
    sandbox_get,
)
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS)


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    return proxy_fleet


# --- tests -------------------------------------------------------------------------------------


def test_an_allowed_syn_gets_a_syn_ack_through_geneve(proxy: ProxyProcess, node: NodeSim) -> None:
    node.send_syn(41000)
    assert_syn_ack(node.expect_syn_ack(41000), 41000)
    metrics = proxy.metrics()
    assert metrics[("egressd_geneve_rx_packets_total", ())] >= 1
    assert metrics[("egressd_geneve_tx_packets_total", ())] >= 1
    assert metrics[("egressd_policy_fetch_total", (("result", "ok"),))] == 1
    # The nftables table is what DESIGN.md describes.
    listing = kn.run_in_netns(
        proxy.fleet.proxy_ns, ["nft", "-j", "list", "table", "inet", "egressd"]
    )
    rules = [i["rule"] for i in json.loads(listing.stdout)["nftables"] if "rule" in i]
    assert [r["chain"] for r in rules] == ["prerouting"] * 3 + ["input"]
    assert [next(e["tproxy"]["port"] for e in r["expr"] if "tproxy" in e) for r in rules[:3]] == [
        15053,
        15053,
        15001,
    ]


def test_forged_datagrams_are_dropped_and_counted_by_reason(
    proxy: ProxyProcess, node: NodeSim
) -> None:
    node.send_syn(42000)  # warm up: the policy is fetched and cached
    node.expect_syn_ack(42000)
    before = proxy.metrics()

    expected = send_drops(node, 42001)
    node.send_syn(42100)  # and a legitimate SYN right after
    assert_syn_ack(node.expect_syn_ack(42100), 42100)

    wait_for_drops(proxy.metrics, before, expected, REPLY_TIMEOUT_S)
    after = proxy.metrics()
    for reason in ("options_past_end", "inner_bad_checksum", "flow_table_full"):
        assert ("egressd_geneve_rx_dropped_total", (("reason", reason),)) in after  # pre-registered
        assert dropped(after, reason) - dropped(before, reason) == expected[reason]
    # None of the forged SYNs produced a reply.
    node.sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError):
        while True:
            inner = IP(bytes(decode(node.sock.recv(65536)).inner))
            assert inner[TCP].dport in (42000, 42100), inner.summary()


def test_sigterm_leaves_nothing_behind(fleet: Fleet, node: NodeSim) -> None:
    proxy = ProxyProcess(fleet)
    try:
        proxy.wait_ready()
        node.send_syn(43000)
        node.expect_syn_ack(43000)
        assert proxy.terminate() == 0, proxy.log()
    finally:
        proxy.kill()
    ns = fleet.proxy_ns
    assert (
        kn.run_in_netns(ns, ["nft", "list", "table", "inet", "egressd"], check=False).returncode
        != 0
    )
    assert kn.run_in_netns(ns, ["ip", "link", "show", "gnv0"], check=False).returncode != 0
    assert "fwmark" not in kn.run_in_netns(ns, ["ip", "rule"]).stdout
    assert kn.run_in_netns(ns, ["ip", "route", "show", "table", "100"]).stdout.strip() == ""
    assert "100.96.0.0/16" not in kn.run_in_netns(ns, ["ip", "route"]).stdout
    events = [
        json.loads(line)["event"] for line in proxy.log().splitlines() if line.startswith("{")
    ]
    assert "proxy_started" in events and events[-1] == "stopped"
    assert "nft_remove_incomplete" not in events and "stop_step_failed" not in events


# --- a sandbox connection end to end, through a minimal node agent -----------------------------


def test_a_sandbox_connection_gets_its_http_answer_through_the_proxy(
    fleet: Fleet, proxy: ProxyProcess, node: NodeSim
) -> None:
    node.close()  # the agent takes 198.18.0.11:6081
    with agent_for(fleet, JOB, digest=node.digest):
        wait_for(lambda: http(fleet.inet, "GET", SITE, 80, "/hello.txt")[0] == 200, 10, "inet http")
        answer = sandbox_get(fleet, "/hello.txt")
        assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
        assert answer.endswith(b"hello through the tunnel\n")

        def connections() -> list[dict[str, Any]]:
            events = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
            return [e for e in events if e.get("event") == "connection"]

        wait_for(
            lambda: bool(connections()), 5, "the connection's audit event"
        )  # logged at its end
        event = connections()[-1]
        assert (event["verdict"], event["reason"]) == ("allow", "allowed_cidr")
        assert event["job_id"] == str(JOB)
        assert event["component"] == "proxy"
        assert event["node"] == "node1"
        metrics = proxy.metrics()
        assert metrics[("egressd_geneve_rx_packets_total", ())] >= 4
        assert metrics[("egressd_geneve_tx_packets_total", ())] >= 3
