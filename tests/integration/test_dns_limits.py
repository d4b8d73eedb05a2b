"""The DNS responder's limits and large answers, end to end (the world of test_intercept).

* A job flooding the responder (~3,600 queries/s, allowed and denied names)
  is refused, then dropped, beyond its ``dns_queries_per_s``, while another
  job's queries keep being answered quickly; without the limit the flood
  reaches the upstream.
* A name with 150 A records: over UDP, TC and the records that fit; over TCP
  (dnspython's fallback, glibc's resolver through ``getent``) all of them;
  the proxy itself asks the upstream again over TCP when it truncates.
* ``dns_refusal_rcode: NXDOMAIN``.

The flood runs in a subprocess in the client namespace, bounded in count and
time; the victim's queries are timed from the test process.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from egressd.limits.dns import DEFAULT_MAX_TCP_PER_JOB, MIN_BURST
from egressd.metrics_text import metric_sum, parse
from tests.support.intercept_world import (
    API,
    CLIENT,
    CLIENT2,
    JOB2_ID,
    JOB_ID,
    MANY,
    RESOLVER,
    ROOMY_LIMITS,
    World,
    addresses,
    ask_udp,
    make_world,
    query,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(180)]

FLOOD_RATE = 3600  # queries/s, as in the issue
FLOOD_SECONDS = 6.0
JOB_DNS_RATE = 50
# The other job's p99 while the flood runs: loose, because this 2-core box runs the
# flood, the proxy, the "internet" and other work at once (measured: 50-260 ms limited,
# 5-30 ms with no flood; in the issue, unlimited: 6-11 s and failures).
VICTIM_P99_MS = 500
VICTIM_INTERVAL_S = 0.02
MANY_NAME = "many.data.allowed.test"

# Sends `rate` queries/s for `seconds` from `src` to the resolver, alternating
# allowed names (forwarded upstream) and denied ones, without reading replies;
# prints how many it sent and over how long. Bounded by both.
FLOOD = r"""
import json, socket, sys, time
import dns.message
src, dst, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
sock.bind((src, 0))
sock.setblocking(False)
wires = [
    dns.message.make_query(f"f{i}.data.allowed.test" if i % 2 else f"f{i}.evil.test", "A").to_wire()
    for i in range(2000)
]
sent, tick = 0, 0.01
start = time.monotonic()
while (elapsed := time.monotonic() - start) < seconds:
    due = min(int(elapsed * rate) + 1, int(rate * seconds))
    while sent < due:
        try:
            sock.sendto(wires[sent % len(wires)], (dst, 53))
        except BlockingIOError:
            break
        sent += 1
    time.sleep(tick)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("dnslimits"), second_job=True) as w:
        yield w


def start_flood(world: World, rate: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{world.client_ns}",
            sys.executable,
            "-c",
            FLOOD,
            CLIENT,
            RESOLVER,
            str(rate),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def victim_latencies(world: World, until: Callable[[], bool]) -> tuple[list[float], int]:
    """Job 2 asks for api.allowed.test every VICTIM_INTERVAL_S until `until()`;
    (seconds per answered query, failures: timeouts or wrong answers)."""
    latencies: list[float] = []
    failures = 0
    sock = world.client_socket(CLIENT2, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(2.0)
        while not until():
            q = dns.message.make_query("api.allowed.test", "A")
            started = time.monotonic()
            sock.sendto(q.to_wire(), (RESOLVER, 53))
            try:
                while True:  # skip a late answer to an earlier query
                    reply = dns.message.from_wire(sock.recv(4096))
                    if reply.id == q.id:
                        break
            except TimeoutError:
                failures += 1
                continue
            latencies.append(time.monotonic() - started)
            if addresses(reply) != [API]:
                failures += 1
            time.sleep(VICTIM_INTERVAL_S)
    return latencies, failures


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def flood_upstream_count(world: World) -> int:
    return sum(1 for q in world.upstream_queries() if q["qname"].startswith("f"))


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return metric_sum(parse(text), name, **labels)


def run_flood(world: World, record: Callable[[str, object], None], tag: str) -> dict[str, float]:
    upstream_before = flood_upstream_count(world)
    flood = start_flood(world, FLOOD_RATE, FLOOD_SECONDS)
    try:
        time.sleep(0.3)  # the flood is under way
        latencies, failures = victim_latencies(world, lambda: flood.poll() is not None)
        out, err = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(5)
    assert flood.returncode == 0, err
    report = json.loads(out)
    time.sleep(0.5)  # let the upstream log catch up
    result = {
        "flood_qps": report["sent"] / report["seconds"],
        "victim_queries": len(latencies),
        "victim_failures": failures,
        "victim_p50_ms": 1000 * statistics.median(latencies) if latencies else math.inf,
        "victim_p99_ms": 1000 * p(latencies, 0.99) if latencies else math.inf,
        "victim_max_ms": 1000 * max(latencies, default=math.inf),
        "flood_upstream": flood_upstream_count(world) - upstream_before,
    }
    for key, value in result.items():
        record(f"{tag}_{key}", round(value, 1))
    print(tag, json.dumps({k: round(v, 1) for k, v in result.items()}))
    return result


def test_flood_is_limited_and_others_keep_their_latency(
    world: World, record_property: Callable[[str, object], None]
) -> None:
    world.set_policy(limits={**ROOMY_LIMITS, "dns_queries_per_s": JOB_DNS_RATE})
    world.set_policy(job_id=JOB2_ID)
    try:
        events_before = len(world.events("dns"))
        result = run_flood(world, record_property, "limited")
        assert result["flood_qps"] > 0.8 * FLOOD_RATE  # the flood was a flood
        assert result["victim_failures"] == 0
        assert result["victim_queries"] > 100
        assert result["victim_p99_ms"] < VICTIM_P99_MS
        # At most the job's rate (and its burst) reached the upstream.
        assert result["flood_upstream"] <= JOB_DNS_RATE * (FLOOD_SECONDS + 2)
        text = world.metrics()
        limited = sample(
            text, "egressd_limit_refusals_total", job_id=JOB_ID, reason="dns_rate_limit"
        )
        assert limited > 0.5 * FLOOD_RATE * FLOOD_SECONDS
        assert sample(text, "egressd_limit_refusals_total", job_id=JOB2_ID) == 0
        dropped = sample(text, "egressd_dns_dropped_total", reason="dns_rate_limit")
        assert 0 < dropped < limited  # some refused (REFUSED), the rest dropped
        assert sample(text, "egressd_dns_queries_total", verdict="drop") >= dropped
        # The audit log got a sample, not a line per query; with the count of the rest.
        time.sleep(1.5)  # the last summary
        limited_events = [
            e for e in world.events("dns")[events_before:] if e["reason"] == "dns_rate_limit"
        ]
        assert 1 <= len(limited_events) <= 3 * (FLOOD_SECONDS + 3)
        assert all(e["job_id"] == JOB_ID for e in limited_events)
        logged = len(limited_events) + sum(e["suppressed"] for e in limited_events)
        assert logged == pytest.approx(limited, rel=0.02)
    finally:
        restore(world)


def test_flood_without_the_limit_reaches_upstream(
    world: World, record_property: Callable[[str, object], None]
) -> None:
    """The comparison: the same flood under the policy's maximum rate is not limited
    by rate (it reaches the upstream far beyond the job's usual rate), and the
    responder's per-job lanes (`LANE_WIDTH`) still keep the other job answered:
    before the lanes, its queries timed out or crawled here (as in the issue)."""
    world.set_policy(limits={**ROOMY_LIMITS, "dns_queries_per_s": 10_000})
    world.set_policy(job_id=JOB2_ID)
    try:
        refused_before = sample(
            world.metrics(), "egressd_limit_refusals_total", job_id=JOB_ID, reason="dns_rate_limit"
        )
        result = run_flood(world, record_property, "unlimited")
        assert result["flood_qps"] > 0.8 * FLOOD_RATE
        # More than the limited run may pass (its bound above): the limit, not the
        # machine, is what held that flood. Not a larger margin: the job's lane
        # (`LANE_WIDTH` queries in flight) makes this flood's upstream rate 4 per
        # upstream round trip, which a loaded 2-core machine stretches (549, 400, 285
        # in runs beside other work; 187 beside a benchmark).
        assert result["flood_upstream"] > JOB_DNS_RATE * (FLOOD_SECONDS + 2)
        assert result["victim_failures"] == 0
        refused = sample(
            world.metrics(), "egressd_limit_refusals_total", job_id=JOB_ID, reason="dns_rate_limit"
        )
        assert refused == refused_before
    finally:
        restore(world)


def restore(world: World) -> None:
    """The roomy policies back, and job 1 answered again: a raised rate applies once
    the old bucket lets one query through to the policy (within 1/old rate s)."""
    world.set_policy()
    world.set_policy(job_id=JOB2_ID)
    deadline = time.monotonic() + 15  # after an unlimited flood: the proxy's backlog
    while True:
        try:
            if query(world, "api.allowed.test", timeout=0.5)[0].rcode() == dns.rcode.NOERROR:
                return
        except TimeoutError:
            pass
        assert time.monotonic() < deadline, "job 1 is still limited"
        time.sleep(0.2)


def full_bucket(world: World) -> None:
    """One query at the roomy rate: the job's bucket is full (and stays at the new
    rate's burst when the rate drops)."""
    world.set_policy()
    assert query(world, "api.allowed.test")[0].rcode() == dns.rcode.NOERROR


def test_limited_job_recovers(world: World) -> None:
    full_bucket(world)
    world.set_policy(limits={**ROOMY_LIMITS, "dns_queries_per_s": 5})
    try:
        codes = [query(world, "api.allowed.test")[0].rcode() for _ in range(MIN_BURST + 4)]
        assert codes[:MIN_BURST] == [dns.rcode.NOERROR] * MIN_BURST  # the minimum burst
        assert dns.rcode.REFUSED in codes[MIN_BURST:]
        time.sleep(1.0)
        assert query(world, "api.allowed.test")[0].rcode() == dns.rcode.NOERROR
    finally:
        restore(world)


def test_tcp_queries_are_limited_too(world: World) -> None:
    full_bucket(world)
    world.set_policy(limits={**ROOMY_LIMITS, "dns_queries_per_s": 4})
    try:
        sock = world.client_socket(CLIENT)
        with sock:
            sock.settimeout(5)
            sock.connect((RESOLVER, 53))
            q = dns.message.make_query("api.allowed.test", "A")
            codes: list[dns.rcode.Rcode | None] = []
            for _ in range(4 * MIN_BURST):
                try:
                    codes.append(dns.query.tcp(q, RESOLVER, timeout=5, sock=sock).rcode())
                except (EOFError, ConnectionError):
                    codes.append(None)  # past the refusal budget: the connection is closed
                    break
        assert codes[:MIN_BURST] == [dns.rcode.NOERROR] * MIN_BURST
        assert dns.rcode.REFUSED in codes[MIN_BURST:]
        assert codes[-1] is None
    finally:
        restore(world)


def test_garbage_flood_is_limited_and_logged_sparingly(world: World) -> None:
    """Datagrams that are not DNS spend their job's rate: past it they are dropped
    on receipt, without an audit line each."""
    full_bucket(world)
    world.set_policy(limits={**ROOMY_LIMITS, "dns_queries_per_s": 20})
    try:
        assert query(world, "api.allowed.test")[0].rcode() == dns.rcode.NOERROR  # rate read
        sock = world.client_socket(CLIENT, socket.SOCK_DGRAM)
        with sock:
            src = f"{CLIENT}:{sock.getsockname()[1]}"
            for _ in range(500):
                sock.sendto(b"\xff" * 40, (RESOLVER, 53))
        time.sleep(1.0)
        logged = [e for e in world.events("dns") if e.get("source") == src]
        assert 1 <= len(logged) <= 3 * 20 + 10, len(logged)
        text = world.metrics()
        assert sample(text, "egressd_limit_refusals_total", job_id=JOB_ID) >= 400
        response, _ = query(world, "api.allowed.test", src=CLIENT2)
        assert response.rcode() == dns.rcode.NOERROR  # the other job is answered
    finally:
        restore(world)


def test_tcp_connections_per_job_are_capped(world: World) -> None:
    """A job holding DNS-over-TCP connections open gets DEFAULT_MAX_TCP_PER_JOB of them;
    the next is closed at once, and another job still gets its own."""
    held = []
    try:
        for _ in range(DEFAULT_MAX_TCP_PER_JOB):
            sock = world.connect(RESOLVER, 53)
            held.append(sock)
            q = dns.message.make_query("api.allowed.test", "A")
            assert dns.query.tcp(q, RESOLVER, timeout=5, sock=sock).rcode() == dns.rcode.NOERROR
        extra = world.connect(RESOLVER, 53)
        with extra, pytest.raises((EOFError, ConnectionError)):
            q = dns.message.make_query("api.allowed.test", "A")
            dns.query.tcp(q, RESOLVER, timeout=5, sock=extra)
        other = world.connect(RESOLVER, 53, src=CLIENT2)
        with other:
            q = dns.message.make_query("api.allowed.test", "A")
            assert dns.query.tcp(q, RESOLVER, timeout=5, sock=other).rcode() == dns.rcode.NOERROR
        labels = {"job_id": JOB_ID, "reason": "dns_tcp_connection_limit"}
        assert sample(world.metrics(), "egressd_limit_refusals_total", **labels) >= 1
    finally:
        for sock in held:
            sock.close()
    # Closed connections give their slots back.
    time.sleep(0.3)
    again = world.connect(RESOLVER, 53)
    with again:
        q = dns.message.make_query("api.allowed.test", "A")
        assert dns.query.tcp(q, RESOLVER, timeout=5, sock=again).rcode() == dns.rcode.NOERROR


# --- large answers --------------------------------------------------------------------


def test_large_answer_over_udp_is_truncated_with_what_fits(world: World) -> None:
    response, src = query(world, MANY_NAME)
    assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.TC
    got = addresses(response)
    assert 10 < len(got) < 150 and set(got) <= set(MANY[MANY_NAME])
    # The proxy got the whole answer from the upstream: UDP (TC), then TCP.
    protos = [q["proto"] for q in world.upstream_queries() if q["qname"] == MANY_NAME]
    assert protos[-2:] == ["udp", "tcp"]
    event = world.wait_event(event="dns", source=src)
    assert event["reason"] == "allowed_host" and len(event["answers"]) == 150

    edns = dns.message.make_query(MANY_NAME, "A", use_edns=0, payload=4096)
    wire, _, _ = ask_udp(world, edns.to_wire())
    assert len(wire) <= 1232  # never a fragmented datagram
    bigger = dns.message.from_wire(wire)
    assert bigger.flags & dns.flags.TC and len(got) < len(addresses(bigger)) < 150


def test_large_answer_over_tcp_is_whole(world: World) -> None:
    q = dns.message.make_query(MANY_NAME, "A")
    sock = world.client_socket(CLIENT)
    with sock:
        sock.settimeout(5)
        sock.connect((RESOLVER, 53))
        response = dns.query.tcp(q, RESOLVER, timeout=5, sock=sock)
    assert not response.flags & dns.flags.TC
    assert sorted(addresses(response)) == sorted(MANY[MANY_NAME])


def test_dnspython_falls_back_to_tcp(world: World) -> None:
    q = dns.message.make_query(MANY_NAME, "A")
    udp = world.client_socket(CLIENT, socket.SOCK_DGRAM)
    tcp = world.client_socket(CLIENT)
    with udp, tcp:
        tcp.settimeout(5)
        tcp.connect((RESOLVER, 53))  # dnspython wants it connected; it is used only on TC
        response, used_tcp = dns.query.udp_with_fallback(
            q, RESOLVER, timeout=5, udp_sock=udp, tcp_sock=tcp
        )
    assert used_tcp
    assert len(addresses(response)) == 150


def test_glibc_resolver_gets_every_address(world: World) -> None:
    """`getent ahosts` in the client namespace, resolv.conf naming the proxy's resolver:
    glibc sees TC over UDP and asks again over TCP."""
    etc = Path("/etc/netns") / world.client_ns
    etc.mkdir(parents=True, exist_ok=False)
    try:
        (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\noptions timeout:2 attempts:1\n")
        out = subprocess.run(
            ["ip", "netns", "exec", world.client_ns, "getent", "ahostsv4", MANY_NAME],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        shutil.rmtree(etc)
    assert out.returncode == 0, out.stderr
    got = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert got == set(MANY[MANY_NAME])


# --- refusal rcode --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nxdomain_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("dnsnx"), dns_refusal_rcode="NXDOMAIN") as w:
        yield w


def test_refusal_rcode_nxdomain(nxdomain_world: World) -> None:
    world = nxdomain_world
    response, src = query(world, "evil.test")
    assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer
    event = world.wait_event(event="dns", source=src)
    assert (event["verdict"], event["reason"], event["rcode"]) == (
        "deny",
        "no_matching_rule",
        "NXDOMAIN",
    )
    # Not about the name: stays REFUSED (an allowed name exists).
    assert query(world, "api.allowed.test", "TXT")[0].rcode() == dns.rcode.REFUSED
    # Unchanged: answers and the empty NOERROR for AAAA.
    assert addresses(query(world, "api.allowed.test")[0]) == [API]
    aaaa = query(world, "api.allowed.test", "AAAA")[0]
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer


def test_refusal_rcode_refused_when_configured(world: World) -> None:  # make_world's REFUSED
    response, _ = query(world, "evil.test")
    assert response.rcode() == dns.rcode.REFUSED
