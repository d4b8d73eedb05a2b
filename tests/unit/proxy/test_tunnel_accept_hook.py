"""The tunnel's `on_accept` hook (the kernel data path's slow path) cannot cost a datagram nor
flood the log: what escapes the hook is logged through a `LogThrottle` (one line per exception
type per interval, then a summary of the held-back count), and the kernel's own map write
failures never escape it (`KernelDatapath.accepted` counts and throttles them itself).

A real tunnel on loopback with a fake TUN and a fake clock (tests/support/proxy.py)."""

from __future__ import annotations

import ipaddress
import socket
import uuid
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from scapy.layers.inet import IP, TCP
from structlog.testing import capture_logs

from egressd.geneve.codec import JobOption, encode
from egressd.proxy.flows import FlowTable
from egressd.proxy.kernel import FAILURE_LOG_INTERVAL_S, KernelDatapath, KernelError, ProxyKernel
from egressd.proxy.registry import NodeEntry, NodeView
from egressd.proxy.tunnel import GeneveTunnel
from tests.support.proxy import (
    JOB,
    NODE1,
    POLICIES,
    POLICY,
    SANDBOX,
    SITE,
    FakeNodes,
    FakePolicies,
    FakeTun,
    until,
)

FLOOD = 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Hook:
    """Raises ValueError on every call while `failing`."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    def __call__(self, job: uuid.UUID, digest: bytes, node: Any, flow: Any) -> None:
        self.calls += 1
        if self.failing:
            raise ValueError("a bug in the hook")


class FailingKernel:
    """Every px_flows write fails (a full map)."""

    def write(self, name: str, key: bytes, value: bytes) -> None:
        if name == "px_flows":
            raise KernelError("map_failed", "update px_flows: No space left on device")

    def delete(self, name: str, key: bytes) -> None:
        pass


class Rig:
    def __init__(self, on_accept: Any, clock: Clock) -> None:
        self.node1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.node1.bind(("127.0.0.2", 0))
        self.tun = FakeTun()
        self.tun.theirs.setblocking(False)  # read by polling from the test's event loop
        view = NodeView(
            [NodeEntry("node1", ipaddress.IPv4Address("127.0.0.2"), NODE1.sandbox_cidr)]
        )
        self.tunnel = GeneveTunnel(
            listen=("127.0.0.1", 0),
            peer_port=self.node1.getsockname()[1],
            vni=1,
            tun=self.tun,  # type: ignore[arg-type]
            nodes=FakeNodes(view),  # type: ignore[arg-type]
            policies=FakePolicies(POLICIES),  # type: ignore[arg-type]
            flows=FlowTable(idle_s=60, max_flows=1000),
            metrics=CollectorRegistry(),
            clock=clock,
            on_accept=on_accept,
        )
        self.tunnel.start()
        bound = self.tunnel.bound
        assert bound is not None
        self.addr = bound
        self.sport = 40000

    def send_syns(self, count: int) -> list[bytes]:
        """`count` SYNs of new flows; their inner packets, as the TUN should get them."""
        sent = []
        for _ in range(count):
            self.sport += 1
            inner = bytes(IP(src=SANDBOX, dst=SITE) / TCP(sport=self.sport, dport=443, flags="S"))
            option = JobOption(JOB.bytes, POLICY.digest)
            self.node1.sendto(encode(1, option, inner), self.addr)
            sent.append(inner)
        return sent

    async def through(self, count: int) -> bool:
        """`count` new SYNs all reach the TUN, as sent."""
        sent = self.send_syns(count)
        return await self.tun_packets(count) == sent

    async def tun_packets(self, count: int) -> list[bytes]:
        got: list[bytes] = []

        def read() -> bool:
            try:
                while True:
                    got.append(self.tun.theirs.recv(65536))
            except BlockingIOError:
                pass
            return len(got) >= count

        await until(read)
        return got

    async def close(self) -> None:
        await self.tunnel.close()
        self.tun.close()
        self.node1.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def hook_rig(clock: Clock) -> AsyncIterator[tuple[Rig, Hook]]:
    hook = Hook()
    rig = Rig(hook, clock)
    yield rig, hook
    await rig.close()


def lines(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


async def test_a_failing_hook_costs_no_datagram_and_logs_once_per_interval(
    hook_rig: tuple[Rig, Hook], clock: Clock
) -> None:
    rig, hook = hook_rig
    with capture_logs() as logs:
        sent = rig.send_syns(FLOOD)
        assert await rig.tun_packets(FLOOD) == sent  # every datagram went on through the TUN
        assert hook.calls == FLOOD
        failed = lines(logs, "accept_hook_failed")
        assert [(e["error"], e["detail"], e["suppressed"]) for e in failed] == [
            ("ValueError", "a bug in the hook", 0)
        ]
        assert failed[0]["log_level"] == "error"

        # The flood stops; the next datagram's batch, past the interval, reports the rest.
        hook.failing = False
        clock.now += FAILURE_LOG_INTERVAL_S
        assert await rig.through(1)
        await until(lambda: len(lines(logs, "accept_hook_failed")) == 2)
        summary = lines(logs, "accept_hook_failed")[1]
        assert (summary["error"], summary["suppressed"]) == ("ValueError", FLOOD - 1)

        # Nothing held back any more: later batches log nothing.
        clock.now += FAILURE_LOG_INTERVAL_S
        assert await rig.through(2)
    assert len(lines(logs, "accept_hook_failed")) == 2


async def test_a_failure_past_the_interval_is_logged_with_the_count_held_back(
    hook_rig: tuple[Rig, Hook], clock: Clock
) -> None:
    rig, _ = hook_rig
    with capture_logs() as logs:
        assert await rig.through(5)
        clock.now += FAILURE_LOG_INTERVAL_S
        assert await rig.through(1)
    failed = lines(logs, "accept_hook_failed")
    # The first line of the second interval carries the 4 held back; no separate summary.
    assert [(e["detail"], e["suppressed"]) for e in failed] == [
        ("a bug in the hook", 0),
        ("a bug in the hook", 4),
    ]


async def test_kernel_write_failures_stay_inside_the_kernel_hook(clock: Clock) -> None:
    kernel = KernelDatapath(
        cast(ProxyKernel, FailingKernel()),
        nodes=list,
        cached=lambda _job: None,
        metrics=CollectorRegistry(),
        clock=clock,
    )
    rig = Rig(kernel.accepted, clock)
    try:
        with capture_logs() as logs:
            sent = rig.send_syns(FLOOD)
            assert await rig.tun_packets(FLOOD) == sent
        assert lines(logs, "accept_hook_failed") == []
        assert [e["suppressed"] for e in lines(logs, "kernel_program_failed")] == [0]
    finally:
        await rig.close()
