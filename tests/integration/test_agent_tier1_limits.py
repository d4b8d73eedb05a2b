"""Tier-1 token buckets through a real agent (`egressd agent serve`, see test_agent.py).

The policy's ``limits.max_new_connections_per_s`` and ``limits.dns_queries_per_s``
reach the kernel when a sandbox registers, and each sandbox's verdicts are exported
per sandbox as ``egressd_tier1_sandbox_packets_total{sandbox_id, job_id, verdict,
reason}`` beside the node totals. Its own agent (module-scoped `fleet`).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from egressd.layout import RESOLVER
from tests.support.agent_fleet import DEST, JOB_ID, Fleet, metric
from tests.support.root import AGENT_NEEDS
from tests.support.tier1 import in_netns
from tests.support.waits import wait_for, when

pytestmark = pytest.mark.root(*AGENT_NEEDS)


@pytest.fixture(scope="module")
def fleet(agent_fleet: Fleet) -> Fleet:
    return agent_fleet


SANDBOX_METRIC = "egressd_tier1_sandbox_packets_total"
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() resets, never waits
# api.allowed.test IN A
QUERY = (
    bytes.fromhex("123401000001000000000000") + b"\x03api\x07allowed\x04test\x00\x00\x01\x00\x01"
)


def _sandbox_count(text: str, sandbox_id: str, verdict: str, reason: str) -> float:
    found = metric(
        text, SANDBOX_METRIC, sandbox_id=sandbox_id, job_id=JOB_ID, verdict=verdict, reason=reason
    )
    return found or 0.0


def test_policy_rates_reach_tier1_and_drops_are_exported_per_sandbox(
    fleet: Fleet,
) -> None:
    # 1/s: a burst of 10 (the minimum), and no token back within the test's first second.
    flood = fleet.register(
        "sbx-flood", fleet.policy(limits={"max_new_connections_per_s": 1, "dns_queries_per_s": 1})
    )
    quiet = fleet.register("sbx-quiet", fleet.policy())
    before = fleet.metrics()
    with in_netns(flood.netns):
        conns = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(40)]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(quiet.netns):
        quiet_conns = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(20)]
    start = time.monotonic()
    try:
        for sock in conns + quiet_conns:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            sock.setblocking(False)
            sock.connect_ex((DEST, 443))
        for _ in range(30):
            udp.sendto(QUERY, (str(RESOLVER), 53))
        # Read before the refused SYNs' first retransmission (1 s) could count again.
        text = wait_for(
            lambda: when(
                fleet.metrics(),
                lambda t: _sandbox_count(t, "sbx-flood", "drop", "dns_rate_limit") >= 20,
            ),
            0.8,
            "the flood's drops in /metrics",
            interval=0.05,
        )
        assert time.monotonic() - start < 1.0, "too slow to count exactly"
    finally:
        for sock in conns + quiet_conns + [udp]:
            sock.close()

    assert _sandbox_count(text, "sbx-flood", "drop", "syn_rate_limit") == 30
    assert _sandbox_count(text, "sbx-flood", "drop", "dns_rate_limit") == 20
    assert _sandbox_count(text, "sbx-flood", "redirect", "redirected") >= 20  # 10 SYNs, 10 queries
    # The neighbour at the default 200/s is untouched by the flood next door.
    assert _sandbox_count(text, "sbx-quiet", "redirect", "redirected") >= 20
    assert _sandbox_count(text, "sbx-quiet", "drop", "syn_rate_limit") == 0
    node = {
        r: (metric(text, "egressd_tier1_packets_total", verdict="drop", reason=r) or 0)
        - (metric(before, "egressd_tier1_packets_total", verdict="drop", reason=r) or 0)
        for r in ("syn_rate_limit", "dns_rate_limit")
    }
    assert node == {"syn_rate_limit": 30, "dns_rate_limit": 20}

    fleet.unregister("sbx-flood")
    fleet.unregister("sbx-quiet")
    after = fleet.metrics()
    assert f"# TYPE {SANDBOX_METRIC} counter" in after  # the family stays, empty
    assert 'sandbox_id="sbx-flood"' not in after
    # Node totals keep what the gone sandboxes counted.
    assert (
        metric(after, "egressd_tier1_packets_total", verdict="drop", reason="syn_rate_limit") or 0
    ) >= (metric(text, "egressd_tier1_packets_total", verdict="drop", reason="syn_rate_limit") or 0)
