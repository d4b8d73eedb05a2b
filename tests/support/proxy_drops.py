"""The GENEVE datagrams a proxy must drop, one table for both data paths.

The userspace endpoint (egressd/proxy/endpoint.py) and the kernel's px_ingress (bpf/proxy.c)
decide a datagram in the same order and count it under the same reason in
`egressd_geneve_rx_dropped_total{reason}`; test_proxy_dataplane and
test_proxy_kernel_datapath send every row of `DROPS` to their proxy and expect exactly these
counts, so a reason that one path names differently, or a datagram one path lets through,
fails one of them.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from scapy.layers.inet import IP
from scapy.packet import Raw

from egressd.geneve.codec import encode
from egressd.metrics_text import SeriesKey
from tests.support.proxy_fleet import JOB_NODE2, SANDBOX, SITE, NodeSim, syn
from tests.support.waits import wait_for

JOB_UNKNOWN = uuid.UUID("9f9f9f9f-3333-4a9a-9f55-1f0c5ac1d3e2")  # no policy at the control plane
DROPPED = "egressd_geneve_rx_dropped_total"
INNER_IP = 36  # GENEVE header (8) + the job option (4 + 24): where the inner packet starts
ICMP_ECHO = b"\x08\x00\xf7\xff\x00\x00\x00\x00"  # checksum included


@dataclass(frozen=True)
class Drop:
    """One datagram (`send(node, sport)`: its inner TCP source port, if it has one) and the
    reason both data paths must count it under. `slow`: on the kernel path it goes up to the
    Python endpoint (its job is not in the kernel's maps); every other row is decided in tc."""

    reason: str
    send: Callable[[NodeSim, int], None]
    slow: bool = False


def _bad_inner_checksum(node: NodeSim, sport: int) -> None:
    bad = bytearray(encode(1, node.option(), syn(sport)))
    bad[INNER_IP + 10] ^= 0xFF  # the inner IPv4 header checksum
    node.send(bytes(bad))


DROPS: tuple[Drop, ...] = (
    # from 198.18.0.99: not a node address
    Drop(
        "unknown_node",
        lambda node, sport: node.send(encode(1, node.option(), syn(sport)), forged=True),
    ),
    # the job's policy names node2 only
    Drop(
        "job_not_bound_to_node", lambda node, sport: node.send_syn(sport, job=JOB_NODE2), slow=True
    ),
    Drop("source_outside_node_cidr", lambda node, sport: node.send_syn(sport, src="100.96.2.5")),
    Drop("truncated", lambda node, sport: node.send(b"\x00\x01\x02")),
    # GENEVE version 1
    Drop(
        "bad_version",
        lambda node, sport: node.send(bytes([0x47]) + encode(1, node.option(), syn(sport))[1:]),
    ),
    Drop("bad_vni", lambda node, sport: node.send_syn(sport, vni=2)),
    Drop("policy_missing", lambda node, sport: node.send_syn(sport, job=JOB_UNKNOWN), slow=True),
    Drop("inner_bad_checksum", _bad_inner_checksum),
    Drop(
        "proto_not_allowed",
        lambda node, sport: node.send(
            encode(1, node.option(), bytes(IP(src=SANDBOX, dst=SITE, proto=1) / ICMP_ECHO))
        ),
    ),
    # a TCP header of 8 bytes
    Drop(
        "malformed_l4",
        lambda node, sport: node.send(
            encode(1, node.option(), bytes(IP(src=SANDBOX, dst=SITE, proto=6) / Raw(b"\x00" * 8)))
        ),
    ),
)


def send_drops(node: NodeSim, first_sport: int) -> Counter[str]:
    """Send every row of `DROPS` (TCP source ports from `first_sport` up); the counts by
    reason that they must add."""
    for i, drop in enumerate(DROPS):
        drop.send(node, first_sport + i)
    return Counter(drop.reason for drop in DROPS)


def drops_between(before: dict[SeriesKey, float], after: dict[SeriesKey, float]) -> Counter[str]:
    """What each reason counted between two reads of the proxy's /metrics (only the reasons
    that counted something)."""
    out: Counter[str] = Counter()
    for (name, labels), value in after.items():
        if name == DROPPED and value != before.get((name, labels), 0.0):
            out[dict(labels)["reason"]] = int(value - before.get((name, labels), 0.0))
    return out


def wait_for_drops(
    metrics: Callable[[], dict[SeriesKey, float]],
    before: dict[SeriesKey, float],
    expected: Counter[str],
    timeout: float,
) -> None:
    """Until the drops counted since `before` are exactly `expected` (no reason missing, none
    extra); the failure shows what was counted."""
    counted: Counter[str] = Counter()

    def done() -> bool:
        nonlocal counted
        counted = drops_between(before, metrics())
        return counted == expected

    try:
        wait_for(done, timeout, "every drop to be counted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: counted {dict(counted)}, expected {dict(expected)}") from None
