"""The flow table: which job (and node) each sandbox 5-tuple belongs to.

Filled from the GENEVE receive path (`record`, once per accepted datagram),
read by tier 2 (`lookup`, once per accepted connection or DNS query) and by
the return path (`reverse`, once per packet the kernel sends to `gnv0`).

Keys are plain tuples of ints `(src, sport, dst, dport, proto)` in the
sandbox -> internet direction, addresses as 32-bit ints: hashing a tuple of
small ints is the cheapest key Python has, and the packet path never builds an
`ipaddress` object. `lookup` also takes `IPv4Address` or str for tier 2.

Each entry is a small mutable `Flow` (`info`, `last_seen`, and `tag`, an
opaque value the caller attaches: the tunnel keeps the flow's GENEVE header
there so the return path does not rebuild it per packet).

Expiry: a flow idle (no packet either way: `record` and `reverse` both
refresh it) for `idle_s` is removed by the sweeper task, which runs every
`idle_s / 4` (at most every 30 s). Expiry is by idle time only, for TCP as
well: the data plane does not track TCP state. A TCP connection that is idle
in both directions for longer than `idle_s` loses its flow; the next packet
from the sandbox records it again, but a packet from the proxy first (server
push after a long silence) has no flow and is dropped (`no_flow`) until the
sandbox sends. Tier 2 can avoid that by enabling TCP keepalive on its
sandbox-side sockets with an idle time below `idle_s` (keepalives refresh the
flow in both directions).

Bound: at most `max_flows` entries. A new flow past that is refused
(`record` returns False, counted as `egressd_flows_dropped_total{reason="table_full"}`)
rather than evicting live flows or growing without bound; existing flows
keep working. The caller drops the packet.

Time is passed in (`now`, monotonic seconds) so the table is deterministic
under test. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from egressd.proxy.context import FlowInfo
from egressd.proxy.kernel_maps import ip_int

IPv4Address = ipaddress.IPv4Address
FlowKey = tuple[int, int, int, int, int]

PROTO_TCP = 6
PROTO_UDP = 17
MAX_SWEEP_INTERVAL_S = 30.0


class Flow:
    """One flow's state; mutable so that a packet only touches `last_seen`."""

    __slots__ = ("info", "last_seen", "tag")

    def __init__(self, info: FlowInfo, last_seen: float, tag: object) -> None:
        self.info = info
        self.last_seen = last_seen
        self.tag = tag

    def __repr__(self) -> str:
        return f"Flow(info={self.info!r}, last_seen={self.last_seen!r})"


class FlowTable:
    """Sandbox flows by 5-tuple; implements `egressd.proxy.context.FlowLookup`."""

    def __init__(
        self,
        *,
        idle_s: float,
        max_flows: int,
        metrics: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_s <= 0 or max_flows <= 0:
            raise ValueError("idle_s and max_flows must be positive")
        self.idle_s = idle_s
        self.max_flows = max_flows
        self._clock = clock
        self._flows: dict[FlowKey, Flow] = {}
        self._task: asyncio.Task[None] | None = None
        self.refused = 0
        self.expired = 0
        self._refused_counter: Counter | None = None
        self._expired_counter: Counter | None = None
        if metrics is not None:
            Gauge(
                "egressd_flows", "Flows in the proxy's flow table", registry=metrics
            ).set_function(self.__len__)
            self._refused_counter = Counter(
                "egressd_flows_dropped_total",
                "New flows refused, by reason",
                ["reason"],
                registry=metrics,
            )
            self._refused_counter.labels("table_full")
            self._expired_counter = Counter(
                "egressd_flows_expired_total", "Flows removed after being idle", registry=metrics
            )

    def __len__(self) -> int:
        return len(self._flows)

    # --- the packet path -----------------------------------------------------------

    def record(
        self,
        src: int,
        sport: int,
        dst: int,
        dport: int,
        proto: int,
        info: FlowInfo,
        now: float,
        tag: object = None,
    ) -> bool:
        """Record or refresh the flow of a sandbox -> internet packet.

        An existing flow whose info differs (a new policy digest, or the 5-tuple
        reused by another job) takes the new info. Returns False when a new flow
        does not fit (table full); the caller must drop the packet.
        """
        key = (src, sport, dst, dport, proto)
        flow = self._flows.get(key)
        if flow is not None:
            flow.last_seen = now
            if flow.info is not info:
                flow.info = info
                flow.tag = tag
            return True
        if len(self._flows) >= self.max_flows:
            self.refused += 1
            if self._refused_counter is not None:
                self._refused_counter.labels("table_full").inc()
            return False
        self._flows[key] = Flow(info, now, tag)
        return True

    def get(self, src: int, sport: int, dst: int, dport: int, proto: int) -> Flow | None:
        """The flow entry of a sandbox -> internet 5-tuple (ints), without refreshing it."""
        return self._flows.get((src, sport, dst, dport, proto))

    def reverse(
        self, src: int, sport: int, dst: int, dport: int, proto: int, now: float | None = None
    ) -> Flow | None:
        """The flow a return packet (internet -> sandbox 5-tuple, ints) belongs to.

        Refreshes the flow when `now` is given.
        """
        flow = self._flows.get((dst, dport, src, sport, proto))
        if flow is not None and now is not None:
            flow.last_seen = now
        return flow

    # --- FlowLookup (tier 2) -------------------------------------------------------

    def lookup(
        self,
        src: int | str | IPv4Address,
        sport: int,
        dst: int | str | IPv4Address,
        dport: int,
        proto: int,
    ) -> FlowInfo | None:
        """The flow recorded when the sandbox's packet came in over GENEVE."""
        flow = self._flows.get((ip_int(src), sport, ip_int(dst), dport, proto))
        return flow.info if flow is not None else None

    # --- expiry --------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Remove flows idle for `idle_s` or more; returns how many."""
        at = self._clock() if now is None else now
        cutoff = at - self.idle_s
        stale = [key for key, flow in self._flows.items() if flow.last_seen <= cutoff]
        for key in stale:
            del self._flows[key]
        if stale:
            self.expired += len(stale)
            if self._expired_counter is not None:
                self._expired_counter.inc(len(stale))
        return len(stale)

    @property
    def sweep_interval_s(self) -> float:
        return min(self.idle_s / 4, MAX_SWEEP_INTERVAL_S)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.sweep()

    def start(self) -> asyncio.Task[None]:
        """Start the sweeper as a named task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._sweep_forever(), name="proxy-flow-sweeper"
            )
        return self._task

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
