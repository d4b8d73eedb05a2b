"""The flow table: record, lookup (tier 2), reverse (return path), idle expiry, the bound."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid

import pytest
from prometheus_client import CollectorRegistry

from egressd.proxy.context import FlowInfo, FlowLookup
from egressd.proxy.flows import PROTO_TCP, PROTO_UDP, FlowTable

SANDBOX = int(ipaddress.IPv4Address("100.96.1.5"))
SITE = int(ipaddress.IPv4Address("203.0.113.10"))
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
INFO = FlowInfo(job_id=JOB, digest=b"\x01" * 8, node="node1")


def table(**kwargs: object) -> FlowTable:
    args: dict[str, object] = {"idle_s": 300.0, "max_flows": 1000}
    args.update(kwargs)
    return FlowTable(**args)  # type: ignore[arg-type]


def test_record_then_lookup_in_every_address_form() -> None:
    flows = table()
    assert flows.record(SANDBOX, 40000, SITE, 443, PROTO_TCP, INFO, now=1.0, tag=b"hdr")
    assert flows.lookup(SANDBOX, 40000, SITE, 443, PROTO_TCP) == INFO
    assert (
        flows.lookup(
            ipaddress.IPv4Address("100.96.1.5"),
            40000,
            ipaddress.IPv4Address("203.0.113.10"),
            443,
            6,
        )
        == INFO
    )
    assert flows.lookup("100.96.1.5", 40000, "203.0.113.10", 443, 6) == INFO
    # Another protocol, port or direction is another flow.
    assert flows.lookup(SANDBOX, 40000, SITE, 443, PROTO_UDP) is None
    assert flows.lookup(SANDBOX, 40001, SITE, 443, PROTO_TCP) is None
    assert flows.lookup(SITE, 443, SANDBOX, 40000, PROTO_TCP) is None
    assert len(flows) == 1


def test_it_satisfies_the_tier2_protocol() -> None:
    lookup: FlowLookup = table()
    assert (
        lookup.lookup(ipaddress.IPv4Address("1.2.3.4"), 1, ipaddress.IPv4Address("5.6.7.8"), 2, 6)
        is None
    )


def test_reverse_finds_the_flow_of_a_reply_and_refreshes_it() -> None:
    flows = table(idle_s=10.0)
    flows.record(SANDBOX, 40000, SITE, 443, PROTO_TCP, INFO, now=0.0, tag=b"hdr")
    flow = flows.reverse(SITE, 443, SANDBOX, 40000, PROTO_TCP, now=8.0)
    assert flow is not None
    assert flow.info == INFO
    assert flow.tag == b"hdr"
    assert flows.reverse(SANDBOX, 40000, SITE, 443, PROTO_TCP) is None  # not a reply
    # The reply at t=8 kept the flow alive past t=10.
    assert flows.sweep(now=15.0) == 0
    assert flows.sweep(now=18.0) == 1
    assert flows.reverse(SITE, 443, SANDBOX, 40000, PROTO_TCP) is None


def test_reverse_without_now_does_not_refresh() -> None:
    flows = table(idle_s=10.0)
    flows.record(SANDBOX, 40000, SITE, 443, PROTO_TCP, INFO, now=0.0)
    assert flows.reverse(SITE, 443, SANDBOX, 40000, PROTO_TCP) is not None
    assert flows.sweep(now=10.0) == 1


def test_a_new_info_replaces_the_old_one() -> None:
    flows = table()
    flows.record(SANDBOX, 40000, SITE, 443, PROTO_TCP, INFO, now=0.0, tag=b"old")
    newer = FlowInfo(job_id=JOB, digest=b"\x02" * 8, node="node1")
    flows.record(SANDBOX, 40000, SITE, 443, PROTO_TCP, newer, now=1.0, tag=b"new")
    flow = flows.get(SANDBOX, 40000, SITE, 443, PROTO_TCP)
    assert flow is not None
    assert (flow.info, flow.tag, flow.last_seen) == (newer, b"new", 1.0)
    assert len(flows) == 1


def test_the_table_refuses_new_flows_when_full_and_counts_them() -> None:
    metrics = CollectorRegistry()
    flows = table(max_flows=3, metrics=metrics)
    for sport in range(3):
        assert flows.record(SANDBOX, 1000 + sport, SITE, 443, PROTO_TCP, INFO, now=0.0)
    assert not flows.record(SANDBOX, 2000, SITE, 443, PROTO_TCP, INFO, now=0.0)
    assert not flows.record(SANDBOX, 2001, SITE, 443, PROTO_TCP, INFO, now=0.0)
    # Existing flows keep working; the refused one was not stored.
    assert flows.record(SANDBOX, 1000, SITE, 443, PROTO_TCP, INFO, now=1.0)
    assert flows.lookup(SANDBOX, 2000, SITE, 443, PROTO_TCP) is None
    assert len(flows) == 3
    assert flows.refused == 2
    assert metrics.get_sample_value("egressd_flows_dropped_total", {"reason": "table_full"}) == 2
    assert metrics.get_sample_value("egressd_flows") == 3
    # Expiry makes room again.
    assert flows.sweep(now=400.0) == 3
    assert flows.record(SANDBOX, 2000, SITE, 443, PROTO_TCP, INFO, now=400.0)


def test_sweep_removes_only_idle_flows_and_counts_them() -> None:
    metrics = CollectorRegistry()
    flows = table(idle_s=60.0, metrics=metrics)
    flows.record(SANDBOX, 1, SITE, 443, PROTO_TCP, INFO, now=0.0)
    flows.record(SANDBOX, 2, SITE, 443, PROTO_TCP, INFO, now=30.0)
    flows.record(SANDBOX, 1, SITE, 443, PROTO_TCP, INFO, now=50.0)  # refreshed
    flows.record(SANDBOX, 3, SITE, 53, PROTO_UDP, INFO, now=0.0)
    assert flows.sweep(now=80.0) == 1  # only sport 3 (idle since 0)
    assert flows.sweep(now=110.0) == 2
    assert len(flows) == 0
    assert metrics.get_sample_value("egressd_flows_expired_total") == 3


@pytest.mark.parametrize(("idle_s", "interval"), [(4.0, 1.0), (300.0, 30.0), (3600.0, 30.0)])
def test_sweep_interval(idle_s: float, interval: float) -> None:
    assert table(idle_s=idle_s).sweep_interval_s == interval


async def test_the_sweeper_task_expires_flows_and_stops() -> None:
    clock = {"now": 0.0}
    flows = FlowTable(idle_s=0.2, max_flows=10, clock=lambda: clock["now"])
    flows.record(SANDBOX, 1, SITE, 443, PROTO_TCP, INFO, now=0.0)
    task = flows.start()
    assert task.get_name() == "proxy-flow-sweeper"
    assert flows.start() is task
    clock["now"] = 1.0
    for _ in range(50):
        if not len(flows):
            break
        await asyncio.sleep(0.02)
    assert len(flows) == 0
    await flows.close()
    assert task.cancelled()
    await flows.close()


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        FlowTable(idle_s=0, max_flows=1)
    with pytest.raises(ValueError):
        FlowTable(idle_s=1, max_flows=0)
