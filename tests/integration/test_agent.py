"""`egressd agent serve` as a real process in a throwaway node namespace.

Topology (every namespace named ``egd-t<run id>...``, none connected to the host):

    egd-t<id>u: bridge br0 ──veth── egd-t<id>n   node, 198.18.0.11, runs the agent
                           ──veth── egd-t<id>p1  proxysim 1, 198.18.0.21
                           ──veth── egd-t<id>p2  proxysim 2, 198.18.0.22

Each proxysim is two small processes: a /healthz server on :9090 and a GENEVE
endpoint on UDP 6081 that decodes every datagram with `egressd.geneve.decode`,
appends what it saw (job option, inner 5-tuple and TCP flags, outer source
port) to a JSON-lines file, and answers a TCP SYN with a SYN-ACK inside
GENEVE (built with scapy). Sandboxes are plain network namespaces made by the
agent (prefix ``egd-t<id>s-``); the test connects from them with sockets
created inside them, no runsc needed.

The tests run in file order against one agent; the last one stops it with
SIGTERM and checks that nothing is left behind. The fleet is tests/support/agent_fleet.py's
(fixture in conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from typing import Any

import pytest

from egressd.agent.client import AgentClientError
from egressd.agent.hashing import Rendezvous, flow_hash, flow_key, outer_source_port
from egressd.net import netns
from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import generate_signing_key
from tests.support.agent_fleet import (
    DEST,
    JOB_ID,
    NODE_IP,
    PROXIES,
    STOP_TIMEOUT_S,
    Fleet,
    link_names,
    metric,
)
from tests.support.processes import is_mount
from tests.support.root import AGENT_NEEDS
from tests.support.waits import wait_for, when

pytestmark = pytest.mark.root(*AGENT_NEEDS)


@pytest.fixture(scope="module")
def fleet(agent_fleet: Fleet) -> Fleet:
    return agent_fleet


# --- helpers that act from a sandbox -------------------------------------------------


def connect_from(ns: str, dest: str, port: int, timeout: float = 5.0) -> tuple[int, bool]:
    """Open a TCP connection from inside `ns`; (local port, connected?). Resets on close."""
    sock = netns.netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.settimeout(timeout)
        sock.bind(("0.0.0.0", 0))
        local_port = sock.getsockname()[1]
        try:
            sock.connect((dest, port))
        except OSError:
            return local_port, False
        return local_port, True


def mark(fleet: Fleet) -> dict[str, int]:
    """How many records each proxysim has so far (to look only at later ones)."""
    return {proxy: len(fleet.records(proxy)) for proxy in PROXIES}


def syns(
    fleet: Fleet, since: dict[str, int] | None = None
) -> dict[int, tuple[str, dict[str, Any]]]:
    """Inner source port -> (proxy, record) for every SYN the proxysims saw after `since`."""
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    for proxy in PROXIES:
        start = since[proxy] if since else 0
        for rec in fleet.records(proxy)[start:]:
            if rec.get("flags") == "S":
                out[rec["sport"]] = (proxy, rec)
    return out


# --- the tests, in order ---------------------------------------------------------------


def test_agent_is_ready_and_exports_metrics(fleet: Fleet) -> None:
    text = wait_for(
        lambda: when(fleet.metrics(), lambda t: metric(t, "egressd_proxy_up", proxy="proxy2") == 1),
        10,
        "both proxies up",
    )
    assert metric(text, "egressd_proxy_up", proxy="proxy1") == 1
    assert metric(text, "egressd_sandboxes") == 0
    assert metric(text, "egressd_tier1_packets_total", verdict="drop", reason="spoofed_ip") == 0
    assert metric(text, "egressd_tunnel_packets_total", proxy="proxy1", direction="tx") == 0
    assert metric(text, "egressd_tunnel_dropped_total", reason="no_healthy_proxy") == 0
    assert "egr0" in link_names(fleet.node)
    assert os.stat(fleet.api_socket).st_mode & 0o777 == 0o600


def test_register_rejections_have_distinct_reasons(fleet: Fleet) -> None:
    cases = {
        "job_not_bound_to_node": fleet.policy(nodes=["node2"]),
        "expired": fleet.policy(iat=1_600_000_000, nbf=1_600_000_000, exp=1_600_000_600),
        "bad_signature": _tamper(fleet.policy()),
        "unknown_kid": sign_payload(
            json.loads(_payload_json(fleet.policy())), generate_signing_key()
        ),
    }
    for reason, jws in cases.items():
        with pytest.raises(AgentClientError) as info:
            fleet.register(f"rej-{reason}", jws)
        assert (info.value.kind, info.value.reason, info.value.status) == (
            "policy_rejected",
            reason,
            400,
        ), info.value
    with pytest.raises(AgentClientError) as bad:
        fleet.register("bad/id", fleet.policy())
    assert (bad.value.kind, bad.value.reason) == ("bad_request", "bad_sandbox_id")
    # Nothing was made for any of them.
    assert netns.list_netns(fleet.sandbox_prefix) == ()
    assert not any(n.startswith("sb") for n in link_names(fleet.node))
    assert fleet.list() == []


def _payload_json(jws: str) -> str:
    import base64

    body = jws.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def _tamper(jws: str) -> str:
    import base64

    head, _body, sig = jws.split(".")
    payload = json.loads(_payload_json(jws))
    payload["egress"].append({"cidr": "0.0.0.0/0", "ports": ["1-65535"]})
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def test_register_builds_the_sandbox(fleet: Fleet) -> None:
    jws = fleet.policy()
    info = fleet.register("sbx-one", jws)
    assert str(info.ip) == "100.96.1.2"
    assert str(info.gateway) == "100.96.1.1"
    assert info.netns.startswith(fleet.sandbox_prefix)
    assert info.mtu == 1436 and str(info.resolver) == "100.100.100.53"
    assert info.job_id == JOB_ID
    assert info.raw["digest"] == policy_digest(jws).hex()
    state = netns.netns_state(info.netns)
    eth0 = state.link("eth0")
    assert eth0 is not None and eth0.up and eth0.mtu == 1436
    assert [str(a) for a in eth0.addresses] == ["100.96.1.2/24"]
    assert any(str(r.dst) == "0.0.0.0/0" and str(r.gateway) == "100.96.1.1" for r in state.routes)
    host = netns.netns_state(fleet.node).link(info.raw["host_veth"])
    assert host is not None and host.up and host.mtu == 1436
    assert [str(a) for a in host.addresses] == ["100.96.1.1/32"]
    with pytest.raises(AgentClientError) as dup:
        fleet.register("sbx-one", jws)
    assert (dup.value.kind, dup.value.reason, dup.value.status) == (
        "conflict",
        "duplicate_sandbox",
        409,
    )
    assert [s.sandbox_id for s in fleet.list()] == ["sbx-one"]


def test_flows_are_tunnelled_with_job_option_and_stable_ports(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    since = mark(fleet)
    ports = []
    for _ in range(16):
        port, ok = connect_from(info.netns, DEST, 443)
        assert ok, f"connect() from the sandbox failed (flow {port})\n{fleet.agent_stderr()}"
        ports.append(port)
    seen = wait_for(
        lambda: when(syns(fleet, since), lambda s: all(p in s for p in ports)),
        5,
        "every SYN at a proxysim",
    )
    digest = info.raw["digest"]
    rz = Rendezvous(PROXIES)
    used = set()
    for port in ports:
        proxy, rec = seen[port]
        key = flow_key(info.ip, DEST, 6, port, 443)
        assert proxy == rz.pick(flow_hash(key)), "rendezvous choice"
        assert rec["job"] == uuid.UUID(JOB_ID).hex and rec["digest"] == digest
        assert rec["vni"] == 1 and rec["src"] == NODE_IP
        assert (rec["inner_src"], rec["inner_dst"], rec["dport"]) == (str(info.ip), DEST, 443)
        assert rec["outer_sport"] == outer_source_port(key)
        assert 49152 <= rec["outer_sport"] <= 65535
        used.add(proxy)
        # The rest of the flow (the ACK that completes the handshake) takes the same path.
        later = wait_for(
            lambda p=proxy, q=port: [
                r for r in fleet.records(p)[since[p] :] if r.get("sport") == q and r["flags"] != "S"
            ],
            5,
            f"the rest of flow {port}",
        )
        assert all(r["outer_sport"] == rec["outer_sport"] for r in later)
        other = next(p for p in PROXIES if p != proxy)
        assert not [r for r in fleet.records(other)[since[other] :] if r.get("sport") == port]
    assert used == set(PROXIES), "flows spread over both proxies"
    assert len({seen[p][1]["outer_sport"] for p in ports}) >= len(ports) - 1
    text = fleet.metrics()
    tx = sum(
        metric(text, "egressd_tunnel_packets_total", proxy=p, direction="tx") or 0 for p in PROXIES
    )
    rx = sum(
        metric(text, "egressd_tunnel_packets_total", proxy=p, direction="rx") or 0 for p in PROXIES
    )
    assert tx >= 32 and rx >= 16
    assert (
        metric(text, "egressd_tier1_packets_total", verdict="redirect", reason="redirected") or 0
    ) >= 32
    assert metric(text, "egressd_sandboxes") == 1


def test_tier1_drops_what_the_policy_cannot_allow(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    before = fleet.metrics()
    since = mark(fleet)
    _port, ok = connect_from(info.netns, DEST, 22, timeout=1.0)
    assert not ok
    _, ok = connect_from(info.netns, "169.254.169.254", 80, timeout=1.0)
    assert not ok
    after = fleet.metrics()
    for reason in ("port_not_allowed", "denied_range"):
        labels = {"verdict": "drop", "reason": reason}
        was = metric(before, "egressd_tier1_packets_total", **labels) or 0
        assert (metric(after, "egressd_tier1_packets_total", **labels) or 0) > was, reason
    assert syns(fleet, since) == {}


def test_dead_proxy_is_avoided_within_5s(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    health = fleet.health["proxy1"]
    health.send_signal(signal.SIGKILL)
    health.wait(timeout=10)
    killed = time.monotonic()
    wait_for(
        lambda: metric(fleet.metrics(), "egressd_proxy_up", proxy="proxy1") == 0,
        5.0,
        "egressd_proxy_up{proxy=proxy1} 0",
        interval=0.2,
    )
    assert time.monotonic() - killed <= 5.5
    assert metric(fleet.metrics(), "egressd_proxy_up", proxy="proxy2") == 1
    since = mark(fleet)
    ports = []
    for _ in range(12):
        port, ok = connect_from(info.netns, DEST, 443)
        assert ok
        ports.append(port)
    seen = wait_for(
        lambda: when(syns(fleet, since), lambda s: all(p in s for p in ports)),
        5,
        "SYNs after proxy1 went down",
    )
    assert {seen[p][0] for p in ports} == {"proxy2"}


def test_unregister_removes_everything(fleet: Fleet) -> None:
    info = next(s for s in fleet.list() if s.sandbox_id == "sbx-one")
    host_veth = info.raw["host_veth"]
    fleet.unregister("sbx-one")
    assert not netns.netns_exists(info.netns)
    assert host_veth not in link_names(fleet.node)
    dump = subprocess.run(
        [
            "bpftool",
            "-j",
            "map",
            "dump",
            "pinned",
            str(fleet.state_dir / "bpffs" / "maps" / "t1_sandboxes"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(dump.stdout) == []
    assert fleet.list() == []
    assert metric(fleet.metrics(), "egressd_sandboxes") == 0
    with pytest.raises(AgentClientError) as gone:
        fleet.unregister("sbx-one")
    assert (gone.value.kind, gone.value.reason, gone.value.status) == (
        "not_found",
        "unknown_sandbox",
        404,
    )
    # The address is free again.
    again = fleet.register("sbx-two", fleet.policy())
    assert str(again.ip) == "100.96.1.2"


def test_sigterm_leaves_nothing_behind(fleet: Fleet) -> None:
    fleet.register("sbx-three", fleet.policy())
    assert len(netns.list_netns(fleet.sandbox_prefix)) == 2
    agent = fleet.agent
    assert agent is not None
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=STOP_TIMEOUT_S) == 0, fleet.agent_stderr()
    assert netns.list_netns(fleet.sandbox_prefix) == ()
    links = link_names(fleet.node)
    assert "egr0" not in links
    assert not any(n.startswith("sb") for n in links), links
    assert not fleet.api_socket.exists()
    assert not is_mount(fleet.state_dir / "bpffs")
    assert not list((fleet.state_dir / "sandboxes").glob("*.json"))
    log = fleet.agent_stderr()
    assert '"event": "agent_stopped"' in log
