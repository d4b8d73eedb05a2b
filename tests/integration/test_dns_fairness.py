"""One job's DNS backlog does not queue another job's queries (the world of test_intercept).

The dns-flood load test's victims were slow for the first seconds of each flood
window on a loaded machine; these pin what was measured about the responder
(docs/decisions.md, "DNS responder: limits, ...": the machine's CPU, not a queue):

* a job whose queries wait on an upstream that never answers holds only its
  own lane (`LANE_WIDTH` upstream queries at a time); another job's queries
  are answered at once, not after the backlog (a shared FIFO or semaphore for
  upstream queries would hold them for seconds);
* a burst within a job's rate (half allowed names no cache answers, half
  denied) leaves another job answered, every query, within a loose bound.
"""

from __future__ import annotations

import random
import socket
import statistics
import time
from collections.abc import Callable, Iterator

import dns.message
import dns.rcode
import pytest

from egressd.proxy.dns import LANE_WIDTH
from tests.support.intercept_world import (
    API,
    CLIENT,
    CLIENT2,
    JOB2_ID,
    RESOLVER,
    ROOMY_LIMITS,
    SILENT,
    World,
    addresses,
    make_world,
    ns_socket,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(120)]

SLOW_NAME = next(iter(SILENT))  # the upstream never answers it (the world's timeout: 1 s)
BACKLOG = 150
BURST = 100
# Measured (2026-12-07, 2-core machine shared with other work): the other job's
# p50 2.6 ms alone, 5.5 ms (max 12.8 ms) beside the silent backlog, 33 ms beside
# it with three busy loops; 5-16 ms alone and 15-45 ms p50 in a burst, 39 -> 104 ms
# (max 136 ms) with three busy loops and other helpers' work. The bounds leave room
# for this machine's stalls; a queue behind the backlog would cost seconds.
VICTIM_P50_MS = 200.0
BURST_SLOWER_MS = 150.0  # the burst's p50 over twice the baseline's
VICTIM_MAX_MS = 750.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("dnsfair"), second_job=True) as w:
        w.set_policy(limits={**ROOMY_LIMITS, "dns_queries_per_s": 1000})
        w.set_policy(job_id=JOB2_ID)
        yield w


def victim_latencies(world: World, seconds: float) -> list[float]:
    """Job 2 asks for api.allowed.test for `seconds`; milliseconds per answer. Every
    query must be answered with the right address."""
    out: list[float] = []
    sock = ns_socket(world.client_ns, socket.SOCK_DGRAM)
    with sock:
        sock.bind((CLIENT2, 0))
        sock.settimeout(3.0)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            q = dns.message.make_query("api.allowed.test", "A")
            started = time.monotonic()
            sock.sendto(q.to_wire(), (RESOLVER, 53))
            while True:
                reply = dns.message.from_wire(sock.recv(4096))
                if reply.id == q.id:
                    break
            out.append(1000 * (time.monotonic() - started))
            assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [API]
            time.sleep(0.01)
    return out


def send_from_job1(world: World, wires: list[bytes]) -> socket.socket:
    sock = ns_socket(world.client_ns, socket.SOCK_DGRAM)
    sock.bind((CLIENT, 0))
    for wire in wires:
        sock.sendto(wire, (RESOLVER, 53))
    return sock


def test_burst_within_the_rate_leaves_others_answered(
    world: World, record_property: Callable[[str, object], None]
) -> None:
    rng = random.Random(7)
    names = [
        f"b{rng.getrandbits(48):012x}.{'data.allowed.test' if i % 2 else 'evil.test'}"
        for i in range(BURST)
    ]
    wires = [dns.message.make_query(name, "A").to_wire() for name in names]
    baseline = victim_latencies(world, 0.5)
    with send_from_job1(world, wires):
        during = victim_latencies(world, 1.0)
    p50, worst = statistics.median(during), max(during)
    record_property("victim_baseline_p50_ms", round(statistics.median(baseline), 1))
    record_property("victim_burst_p50_ms", round(p50, 1))
    record_property("victim_burst_max_ms", round(worst, 1))
    bound = 2 * statistics.median(baseline) + BURST_SLOWER_MS
    assert p50 < bound and worst < VICTIM_MAX_MS, (p50, bound, worst)


# Last: the backlog holds job 1's lane for BACKLOG / LANE_WIDTH upstream timeouts.
def test_backlog_on_a_silent_upstream_holds_only_its_own_lane(
    world: World, record_property: Callable[[str, object], None]
) -> None:
    before = sum(1 for q in world.upstream_queries() if q["qname"] == SLOW_NAME)
    wires = [dns.message.make_query(SLOW_NAME, "A").to_wire() for _ in range(BACKLOG)]
    with send_from_job1(world, wires):
        time.sleep(0.05)
        started = time.monotonic()
        latencies = victim_latencies(world, 0.6)
        elapsed = time.monotonic() - started
        reached = sum(1 for q in world.upstream_queries() if q["qname"] == SLOW_NAME) - before
    p50, worst = statistics.median(latencies), max(latencies)
    record_property("victim_p50_ms", round(p50, 1))
    record_property("victim_max_ms", round(worst, 1))
    assert len(latencies) > 10
    assert p50 < VICTIM_P50_MS and worst < VICTIM_MAX_MS, (p50, worst)
    # Within the first upstream timeout (1 s), only the job's lane went upstream.
    assert elapsed < 0.9
    assert 1 <= reached <= LANE_WIDTH, reached
