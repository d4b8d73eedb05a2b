"""Egress end to end: plain Python in runsc sandboxes against the real fleet.

Each test runs one batch of checks in a gVisor sandbox (`udfs/egress_checks.py`,
mounted at /e2e) and asserts on two records: what the sandboxed code saw, and
what the fleet itself wrote down, the proxies' audit events and the node
agent's tier-1 counters on its /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from egressd.agent.client import AgentClient, SandboxInfo
from egressd.layout import (
    ADMIN_PORT,
    CONTROL_ADDR,
    CONTROL_PORT,
    GENEVE_PORT,
    INET_DNS,
    METADATA,
    RESOLVER,
)
from egressd.metrics_text import by_label
from egressd.net import netns as kn
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.inet import CONTENT_SHA256_HEADER, content_sha256
from tests.support.fleet import (
    API,
    API_IP,
    Job,
    LimitedJob,
    api_job,
    conn_events,
    dns_events,
    metric_sum,
    metrics,
    proxy_events,
    run_checks,
)

EVIL_IP = "203.0.113.66"
RAW_IP = "203.0.113.77"
MIB = 1024 * 1024
DOWNLOAD_BYTES = 100 * MIB


def tier1_drops(fleet: Fleet, node: str) -> dict[str, float]:
    return by_label(metrics(fleet, node), "egressd_tier1_packets_total", "reason", verdict="drop")


def proxy_counts(fleet: Fleet, name: str, **labels: str) -> float:
    """A proxy metric summed over every proxy of the fleet."""
    return sum(metric_sum(metrics(fleet, p.name), name, **labels) for p in fleet.layout.proxies)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


@contextmanager
def bare_sandbox(fleet: Fleet, job: Job) -> Iterator[SandboxInfo]:
    """A sandbox registered with the node agent (netns, veth, tier 1) without runsc.

    Lets the test send frames from the sandbox's side of the veth with a plain
    process, as a compromised sandbox runtime would."""
    sandbox_id = f"e2e-bare-{uuid.uuid4().hex[:8]}"
    socket_path = fleet.agent_socket(job.node)

    async def register() -> SandboxInfo:
        async with AgentClient(socket_path) as agent:
            return await agent.register(sandbox_id, job.jws)

    async def unregister() -> None:
        async with AgentClient(socket_path) as agent:
            await agent.unregister(sandbox_id)

    info = asyncio.run(register())
    try:
        yield info
    finally:
        asyncio.run(unregister())


# --- 1. allowed HTTP(S) ---


def test_allowed_https_and_http_with_requests(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "https", "kind": "http", "url": f"https://{API}/data"},
            {"id": "http", "kind": "http", "url": f"http://{API}/data"},
        ],
    )
    for scheme in ("https", "http"):
        r = got[scheme]
        assert r["outcome"] == "ok" and r["status"] == 200, r
        assert r["json"]["site"] == API and r["json"]["scheme"] == scheme, r
        assert r["json"]["path"] == "/data"
        # The server saw a proxy's egress address, never the sandbox's.
        assert r["json"]["client"] in {str(p.egress) for p in fleet.layout.proxies}, r

    for port in (443, 80):
        events = conn_events(fleet, job, dst=API_IP, port=port)
        assert len(events) == 1, events
        e = events[0]
        assert (e["verdict"], e["reason"], e["host"]) == ("allow", "allowed_host", API), e
        assert e["bytes_up"] > 0 and e["bytes_down"] > 0, e
        assert e["mode"] == "enforce" and e["would_deny"] is False, e
        assert e["node"] == "node1" and e["account"] == "e2e", e
        assert str(e["source"]).startswith("100.96.1."), e  # the sandbox's own address
    dns = dns_events(fleet, job, API, "A")
    assert dns and all(e["verdict"] == "allow" and API_IP in e["answers"] for e in dns), dns


# --- 2. a 100 MiB download ---


def test_download_100mib_sha256_matches(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    url = f"https://{API}/bytes/{DOWNLOAD_BYTES}"
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {
                "id": "dl",
                "kind": "download",
                "url": url,
                "timeout": 60,
                "header": CONTENT_SHA256_HEADER,
            },
        ],
        timeout_s=180,
    )["dl"]
    expected = content_sha256(DOWNLOAD_BYTES)
    assert got["outcome"] == "ok" and got["status"] == 200, got
    assert got["bytes"] == DOWNLOAD_BYTES, got
    assert got["sha256"] == got["header_sha256"] == expected, got
    print(
        f"\n100 MiB over HTTPS through the fleet: {got['seconds']} s "
        f"({DOWNLOAD_BYTES / MIB / got['seconds']:.1f} MiB/s)"
    )

    events = conn_events(fleet, job, dst=API_IP, port=443)
    assert len(events) == 1, events
    assert events[0]["verdict"] == "allow" and events[0]["host"] == API, events
    assert events[0]["bytes_down"] >= DOWNLOAD_BYTES, events[0]


# --- 3. 200 concurrent connections ---


def test_200_concurrent_connections_from_one_sandbox(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    n = 200
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {
                "id": "many",
                "kind": "concurrent",
                "host": API,
                "port": 443,
                "tls": True,
                "n": n,
                "timeout": 90,
            },
        ],
    )["many"]
    assert got["opened"] == n and got["ok"] == n, got
    assert got["open_at_end"] == n, got  # all held open at once until every answer was read
    print(f"\n{n} concurrent HTTPS connections from one sandbox: {got['seconds']} s")

    events = conn_events(fleet, job, dst=API_IP, port=443, count=n, timeout_s=15)
    allowed = [e for e in events if e["verdict"] == "allow" and e["host"] == API]
    assert len(allowed) >= n, f"{len(allowed)} allowed of {len(events)} events"
    assert all(e["bytes_down"] > 0 for e in allowed)
    assert len({e["source"] for e in allowed}) == n  # n distinct client connections


# --- 4. a denied name, a raw address without a rule ---


def test_denied_name_is_refused_and_raw_address_is_reset(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "gai", "kind": "getaddrinfo", "name": "evil.test"},
            {"id": "raw_dns", "kind": "dns", "name": "evil.test", "qtype": "A"},
            {"id": "raw_ip", "kind": "tcp", "host": RAW_IP, "port": 443},
            {"id": "raw_ip_http", "kind": "tcp", "host": RAW_IP, "port": 80, "http_host": RAW_IP},
        ],
    )
    # The proxy's default refusal rcode, NXDOMAIN: glibc reports EAI_NONAME ("Name or
    # service not known"), at once and final (REFUSED would be EAI_AGAIN after retries).
    gai, raw = got["gai"], got["raw_dns"]
    assert gai["outcome"] == "gaierror", gai
    assert gai["gai_code"] == socket.EAI_NONAME and gai["ms"] < 1000, gai
    assert (raw["rcode_text"], raw["ancount"], raw["id_matches"]) == ("NXDOMAIN", 0, True), raw
    # The proxy accepted the TCP connection (connect succeeded) and then reset it.
    for key in ("raw_ip", "raw_ip_http"):
        assert got[key]["outcome"] == "reset" and got[key]["stage"] != "connect", got[key]

    dns = dns_events(fleet, job, "evil.test", "A")
    assert len(dns) >= 2, dns  # getaddrinfo's query and the hand-built one
    for e in dns:
        assert (e["verdict"], e["reason"], e["rcode"]) == (
            "deny",
            "no_matching_rule",
            "NXDOMAIN",
        ), e
    for port in (443, 80):
        events = conn_events(fleet, job, dst=RAW_IP, port=port)
        assert len(events) == 1 and events[0]["verdict"] == "deny", events
        assert events[0]["reason"] == "no_matching_rule", events


# --- 5. unreachable: metadata, other sandboxes, the fleet's own addresses ---


def test_fleet_and_metadata_addresses_are_unreachable(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    other = LimitedJob(fleet, "node2", [{"host": API}]).sign()
    node1, proxy1 = fleet.layout.node("node1"), fleet.layout.proxy("proxy1")
    with bare_sandbox(fleet, other) as neighbour, kn.netns_socket(neighbour.netns) as listener:
        # The neighbour listens: were the SYN not dropped, its kernel would answer.
        listener.bind((str(neighbour.ip), 8443))
        listener.listen()
        targets = {
            "metadata": (str(METADATA), 80, "denied_range"),
            "neighbour": (str(neighbour.ip), 8443, "fleet_range"),
            "node_admin": (str(node1.underlay), ADMIN_PORT, "fleet_range"),
            "proxy_admin": (str(proxy1.underlay), ADMIN_PORT, "fleet_range"),
            "proxy_geneve": (str(proxy1.underlay), GENEVE_PORT, "fleet_range"),
            "control": (str(CONTROL_ADDR), CONTROL_PORT, "fleet_range"),
            "gateway": (str(node1.gateway), 443, "fleet_range"),
        }
        before = tier1_drops(fleet, "node1")
        checks: list[dict[str, object]] = [
            {"id": key, "kind": "tcp", "host": host, "port": port, "timeout": 2}
            for key, (host, port, _) in targets.items()
        ]
        checks.append(
            {
                "id": "metadata_http",
                "kind": "http",
                "timeout": 2,
                "url": f"http://{METADATA}/latest/meta-data/iam/security-credentials/",
            }
        )
        got = run_checks(fleet, job, tmp_path, checks, parallel=True)
        after = tier1_drops(fleet, "node1")
    seen = delta(before, after)
    print(f"\ntier-1 drops on node1 during the unreachable checks: {seen}")
    # Tier 1 answers each denied SYN with a RST: refused at once, never a timeout.
    for key in targets:
        assert got[key]["outcome"] == "refused", (key, got[key])
    assert got["metadata_http"]["outcome"] == "error", got["metadata_http"]
    assert "refused" in str(got["metadata_http"]["error"]).lower(), got["metadata_http"]
    want: dict[str, int] = {}
    for _, _, reason in targets.values():
        want[reason] = want.get(reason, 0) + 1
    want["denied_range"] += 1  # the requests GET
    for reason, at_least in want.items():
        assert seen.get(reason, 0) >= at_least, (reason, seen)
    # None of it reached tier 2, and the fake metadata service never served.
    assert proxy_events(fleet, job.job_id, "connection") == []
    inet_log = (fleet.run_dir / "logs" / "inet.log").read_text(errors="replace")
    assert "metadata_served" not in inet_log


# --- 6. domain fronting ---


def test_domain_fronting_is_denied(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    mismatches = {"verdict": "deny", "reason": "host_address_mismatch"}
    before = proxy_counts(fleet, "egressd_connections_total", **mismatches)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            # An allowed address, a denied name in the SNI.
            {
                "id": "sni_evil_at_api",
                "kind": "tcp",
                "host": API_IP,
                "port": 443,
                "sni": "evil.test",
            },
            # A denied address, an allowed name in the Host header / SNI.
            {
                "id": "host_api_at_evil",
                "kind": "tcp",
                "host": EVIL_IP,
                "port": 80,
                "http_host": API,
            },
            {"id": "sni_api_at_evil", "kind": "tcp", "host": EVIL_IP, "port": 443, "sni": API},
        ],
        parallel=True,
    )
    for key, r in got.items():
        assert r["outcome"] == "reset" and r["stage"] != "connect", (key, r)

    (e,) = conn_events(fleet, job, dst=API_IP, port=443)
    # A name that no rule allows is denied as such, whatever address it is sent to.
    assert (e["verdict"], e["reason"], e["host"]) == ("deny", "no_matching_rule", "evil.test")
    assert e["bytes_down"] == 0, e
    for port in (80, 443):
        (e,) = conn_events(fleet, job, dst=EVIL_IP, port=port)
        assert (e["verdict"], e["reason"], e["host"]) == ("deny", "host_address_mismatch", API), e
        assert e["bytes_down"] == 0, e
    assert proxy_counts(fleet, "egressd_connections_total", **mismatches) - before == 2


# --- 7. DNS tunnelling ---


def test_dns_tunnelling_queries_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    secret = base64.b32encode(os.urandom(40)).decode().rstrip("=").lower()[:60]
    assert len(secret) == 60
    before = proxy_counts(fleet, "egressd_dns_queries_total", verdict="deny")
    names = {
        "txt_api": (f"{secret}.{API}", "TXT"),
        "txt_evil": (f"{secret}.evil.test", "TXT"),
        "a_api": (f"{secret}.{API}", "A"),
        "a_evil": (f"{secret}.evil.test", "A"),
        "txt_plain_api": (API, "TXT"),
    }
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [{"id": k, "kind": "dns", "name": n, "qtype": t} for k, (n, t) in names.items()],
    )
    # A name no rule names: the refusal rcode (NXDOMAIN); a type: REFUSED.
    rcodes = {k: "REFUSED" if t == "TXT" else "NXDOMAIN" for k, (_, t) in names.items()}
    for key, r in got.items():
        assert r["outcome"] == "answer" and r["rcode_text"] == rcodes[key], (key, r)
        assert r["ancount"] == 0 and r["id_matches"], (key, r)
    for key, (name, qtype) in names.items():
        events = dns_events(fleet, job, name, qtype)
        assert len(events) == 1, (key, events)
        assert (events[0]["verdict"], events[0]["rcode"]) == ("deny", rcodes[key]), events
        assert events[0]["answers"] == []
        want = "qtype_not_allowed" if qtype == "TXT" else "no_matching_rule"
        assert events[0]["reason"] == want, events
    assert proxy_counts(fleet, "egressd_dns_queries_total", verdict="deny") - before == len(names)


# --- 8. UDP other than DNS ---


def test_udp_other_than_dns_is_dropped_by_tier1(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    # Something listens where the first datagram goes: it must never arrive.
    catcher = kn.netns_socket(fleet.ns("egd-inet"), socket.AF_INET, socket.SOCK_DGRAM)
    catcher.bind((API_IP, 9999))
    catcher.setblocking(False)
    before = tier1_drops(fleet, "node1")
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "udp_api", "kind": "udp", "host": API_IP, "port": 9999, "timeout": 1.5},
            {
                "id": "udp_ntp_resolver",
                "kind": "udp",
                "host": str(RESOLVER),
                "port": 123,
                "timeout": 1.5,
            },
            # DNS straight to the internet's DNS server, around the proxy's responder.
            {
                "id": "dns_direct",
                "kind": "dns",
                "name": API,
                "server": str(INET_DNS),
                "timeout": 1.5,
            },
        ],
        parallel=True,
    )
    after = tier1_drops(fleet, "node1")
    assert got["udp_api"]["outcome"] == "no_reply", got
    assert got["udp_ntp_resolver"]["outcome"] == "no_reply", got
    assert got["dns_direct"]["outcome"] == "timeout", got
    assert delta(before, after).get("udp_not_dns", 0) >= 3, delta(before, after)
    with catcher, pytest.raises(BlockingIOError):
        catcher.recvfrom(4096)
    assert proxy_events(fleet, job.job_id, "dns") == []
    assert proxy_events(fleet, job.job_id, "connection") == []


# --- 9. IPv6 ---


def _ipv6_frames(mac: str) -> list[bytes]:
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    def frame(dst_mac: str, dst: str, l4: object) -> bytes:
        return bytes(Ether(src=mac, dst=dst_mac) / IPv6(src="fe80::1234", dst=dst) / l4)

    gateway = "02:00:00:00:00:01"
    return [
        frame(gateway, "2001:db8::10", TCP(dport=443, flags="S")),
        # NAT64 for 203.0.113.10: an IPv4 destination smuggled in IPv6.
        frame(gateway, "64:ff9b::cb00:710a", TCP(dport=80, flags="S")),
        frame("33:33:00:00:00:01", "ff02::1", UDP(dport=53)),
    ]


SEND_FRAMES = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
    "s.bind((sys.argv[1], 0))\n"
    "for h in sys.argv[2:]:\n"
    "    s.send(bytes.fromhex(h))\n"
)


def test_ipv6_is_dropped_by_tier1(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "v6", "kind": "tcp6", "host": "2001:db8::10", "port": 443, "timeout": 2},
            {
                "id": "v6_nat64",
                "kind": "tcp6",
                "host": "64:ff9b::cb00:710a",
                "port": 443,
                "timeout": 2,
            },
        ],
        parallel=True,
    )
    for key, r in got.items():
        assert r["outcome"] in ("unreachable", "timeout"), (key, r)  # no IPv6 route in the sandbox

    # A sandbox runtime that writes IPv6 frames on the veth itself: tier 1 drops them.
    with bare_sandbox(fleet, job) as sbx:
        frames = _ipv6_frames(str(sbx.raw["mac"]))
        before = tier1_drops(fleet, "node1")
        subprocess.run(
            [
                "nsenter",
                f"--net={sbx.netns_path}",
                sys.executable,
                "-c",
                SEND_FRAMES,
                sbx.interface,
                *(f.hex() for f in frames),
            ],
            check=True,
            timeout=30,
        )
        time.sleep(0.3)
        after = tier1_drops(fleet, "node1")
    seen = delta(before, after)
    print(f"\ntier-1 drops on node1 for {len(frames)} IPv6 frames: {seen}")
    assert seen.get("ipv6", 0) >= len(frames), seen
    assert set(seen) <= {"ipv6", "no_policy"}, seen


# --- report mode ---


def test_report_mode_lets_denied_through_and_logs_would_deny(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet, mode="report")
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "evil", "kind": "http", "url": "https://evil.test/data"},
            {"id": "api", "kind": "http", "url": f"https://{API}/data"},
            {"id": "metadata", "kind": "tcp", "host": str(METADATA), "port": 80, "timeout": 2},
        ],
        parallel=True,
    )
    assert got["evil"]["status"] == 200 and got["evil"]["json"]["site"] == "evil.test", got["evil"]
    assert got["api"]["status"] == 200, got["api"]
    assert got["metadata"]["outcome"] == "refused", got["metadata"]  # tier 1 holds in report mode

    (e,) = conn_events(fleet, job, dst=EVIL_IP, port=443)
    assert (e["verdict"], e["would_deny"], e["reason"]) == ("allow", True, "no_matching_rule"), e
    assert (e["mode"], e["host"]) == ("report", "evil.test"), e
    assert e["bytes_down"] > 0
    (ok,) = conn_events(fleet, job, dst=API_IP, port=443)
    assert (ok["verdict"], ok["would_deny"], ok["reason"]) == ("allow", False, "allowed_host"), ok
    dns = dns_events(fleet, job, "evil.test", "A")
    assert dns and all(d["verdict"] == "allow" and d["would_deny"] is True for d in dns), dns
