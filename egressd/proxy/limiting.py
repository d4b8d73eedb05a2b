"""The proxy's limits: `egressd.limits` wired to its configuration, metrics and clock.

`ProxyLimits` is what the interceptor asks, per connection:

1. `admit` (before anything else is done for the job): proxy-wide and per-job
   concurrency, per-job new-connection rate;
2. `acquire_port` (before the upstream connect): the source (address, port);
3. `pacing`: the job's EDT pacers for the relay; `timeouts` for its expiry.

A job's ``max_connections``, ``max_new_connections_per_s`` and
``bandwidth_bps`` are fleet-wide: this proxy enforces its share
(`egressd.limits.fleet_share`) of them, by the number of proxies registered
with the control plane (`proxy_count`). ``ports_per_destination`` is per
proxy: it counts source ports of this proxy's egress addresses, which is what
a destination sees.

Limits are enforced in report mode too: report mode is for rolling out
egress rules, and limits protect the other jobs on the proxy.

DNS (`egressd.limits.dns`): `dns` holds each job's query rate
(``dns_queries_per_s``, the job's own rate at this proxy, not a share),
refusal budget, upstream queries in flight and audit sampling; the DNS
responder asks it and counts its refusals here (reasons ``dns_rate_limit``,
``dns_inflight_limit``).

Metrics: refusals per job and reason; connections and source ports held per
job now; ports in use per egress address and destination; bytes per job and
direction. Per-job and per-destination gauges drop their series once at
zero (every 10 s), so the label sets stay about as large as what is in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from egressd.limits import fleet_share
from egressd.limits.connections import ConnectionLimiter
from egressd.limits.dns import DnsQueryLimiter
from egressd.limits.pacing import DEFAULT_HORIZON_S, BandwidthShaper
from egressd.limits.ports import Destination, Lease, PortPoolConfig, SourcePortAllocator
from egressd.limits.timeouts import Timeouts
from egressd.policy.model import Limits

PRUNE_INTERVAL_S = 10.0
DEFAULT_MAX_CONNECTIONS = 65_536


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The proxy-wide part of the limits (from `ProxyConfig`, whose defaults are these)."""

    port_pool: PortPoolConfig
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    bandwidth_bps: int = 0  # per direction; 0: no proxy-wide rate
    timeouts: Timeouts = field(default_factory=Timeouts)
    pacing_horizon_s: float = DEFAULT_HORIZON_S

    @classmethod
    def default(cls, egress: object) -> LimitsConfig:
        return cls(port_pool=PortPoolConfig(addresses=(egress,)))  # type: ignore[arg-type]


class _Metrics:
    def __init__(self, registry: CollectorRegistry, capacity: int) -> None:
        self.refusals = Counter(
            "egressd_limit_refusals_total",
            "Connections and DNS queries refused by a limit, by job and reason",
            ["job_id", "reason"],
            registry=registry,
        )
        self.job_connections = Gauge(
            "egressd_job_connections",
            "Connections a job holds at this proxy now",
            ["job_id"],
            registry=registry,
        )
        self.job_ports = Gauge(
            "egressd_job_source_ports",
            "Source ports a job holds toward a destination now",
            ["job_id", "destination"],
            registry=registry,
        )
        self.ports_in_use = Gauge(
            "egressd_source_ports_in_use",
            "Source ports in use per egress address and destination",
            ["egress", "destination"],
            registry=registry,
        )
        Gauge(
            "egressd_source_ports_capacity",
            "Source (address, port) pairs toward one destination",
            registry=registry,
        ).set(capacity)
        self.job_bytes = Counter(
            "egressd_job_bytes_total",
            "Bytes relayed per job and direction (up: sandbox to internet)",
            ["job_id", "direction"],
            registry=registry,
        )
        self.admitted = Gauge(
            "egressd_connections_admitted",
            "Connections holding an admission slot at this proxy now",
            registry=registry,
        )


class _Series:
    """A labelled gauge's children cached by a hashable key (no label
    formatting per update); children at zero are removed by `sweep`, so the
    label sets stay about as large as what is in use. A child reads its value
    when scraped: an update is one list store, not the gauge's locked ``set``
    (six of them per connection, issue 10's short-connection profile)."""

    __slots__ = ("_children", "_gauge")

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        # key -> [label values, child, its value]
        self._children: dict[object, list[Any]] = {}

    def set(self, key: Any, value: int, labels: Callable[[Any], tuple[str, ...]]) -> None:
        """`value` for `key`'s series; `labels(key)` its label values, asked when
        the series is made."""
        entry = self._children.get(key)
        if entry is None:
            if not value:
                return
            names = labels(key)
            entry = self._children[key] = [names, self._gauge.labels(*names), value]
            entry[1].set_function(lambda: entry[2])
        entry[2] = value

    def sweep(self) -> None:
        for key, (names, _, value) in list(self._children.items()):
            if not value:
                del self._children[key]
                with contextlib.suppress(KeyError):
                    self._gauge.remove(*names)


def _job_labels(job: object) -> tuple[str]:
    return (str(job),)


def _pair_labels(key: tuple[object, object]) -> tuple[str, str]:
    """(job or egress address, destination): the label values."""
    return (str(key[0]), str(key[1]))


class JobPacing:
    """One connection's handle on its job's pacers (`egressd.proxy.relay.Pacing`)."""

    __slots__ = ("_count", "_job", "_rate_bps", "_shaper", "burst_bytes", "horizon_s")

    def __init__(
        self,
        shaper: BandwidthShaper,
        job: uuid.UUID,
        rate_bps: int,
        count: Callable[[uuid.UUID, str, int], None],
    ) -> None:
        self._shaper = shaper
        self._job = job
        self._count = count
        self.horizon_s = shaper.horizon_s
        self.set_rate(rate_bps)

    def set_rate(self, rate_bps: int) -> None:
        """Pace at `rate_bps` from now on (a replaced policy's bandwidth, on open connections)."""
        self._rate_bps = rate_bps
        self.burst_bytes = int(rate_bps / 8 * self.horizon_s)

    def departure(self, direction: str, size: int, now: float) -> float:
        self._count(self._job, direction, size)
        return self._shaper.departure(self._job, direction, size, rate_bps=self._rate_bps, now=now)


class ProxyLimits:
    """Connection caps, source ports and pacing for one proxy process."""

    def __init__(
        self,
        config: LimitsConfig,
        *,
        registry: CollectorRegistry,
        proxy_count: Callable[[], int] = lambda: 1,
    ) -> None:
        self.config = config
        self.timeouts = config.timeouts
        self._proxy_count = proxy_count
        self.connections = ConnectionLimiter(config.max_connections)
        self.dns = DnsQueryLimiter()
        self.ports = SourcePortAllocator(config.port_pool)
        self.shaper = BandwidthShaper(
            proxy_rate_bps=config.bandwidth_bps or None, horizon_s=config.pacing_horizon_s
        )
        self._metrics = metrics = _Metrics(registry, config.port_pool.capacity)
        # Read when scraped, not set twice per connection.
        metrics.admitted.set_function(lambda: self.connections.total)
        self._job_connections = _Series(metrics.job_connections)
        self._job_ports = _Series(metrics.job_ports)
        self._ports_in_use = _Series(metrics.ports_in_use)
        self._job_bytes: dict[tuple[uuid.UUID, str], Callable[[float], None]] = {}
        self._refusals: dict[tuple[uuid.UUID | None, str], Callable[[float], None]] = {}
        self._task: asyncio.Task[None] | None = None
        # The last policy limits' shares (`_shares`): connections mostly come
        # with the same `Limits` object (the job's held policy) and proxy count.
        self._shared: tuple[Limits | None, int, tuple[int, int, int]] = (None, 0, (1, 1, 1))

    # admission

    def _shares(self, limits: Limits) -> tuple[int, int, int]:
        """This proxy's `fleet_share` of the job's max_connections,
        max_new_connections_per_s and bandwidth_bps (pure in `limits` and the
        proxy count; the last answer is kept, by identity)."""
        proxies = self._proxy_count()
        last, last_proxies, shares = self._shared
        if last is limits and last_proxies == proxies:
            return shares
        shares = (
            fleet_share(limits.max_connections, proxies),
            fleet_share(limits.max_new_connections_per_s, proxies),
            fleet_share(limits.bandwidth_bps, proxies),
        )
        self._shared = (limits, proxies, shares)
        return shares

    def admit(self, job: uuid.UUID, limits: Limits, now: float) -> str | None:
        """None: admitted (call `release` when the connection is over); else the refusal reason."""
        max_connections, new_per_s, _ = self._shares(limits)
        refusal = self.connections.admit(
            job, max_connections=max_connections, new_per_s=new_per_s, now=now
        )
        if refusal is None:
            self._job_connections_changed(job)
        return refusal

    def release(self, job: uuid.UUID) -> None:
        self.connections.release(job)
        self._job_connections_changed(job)

    def refused(self, job: uuid.UUID | None, reason: str) -> None:
        """One connection or query refused by a limit: the counter's child is cached,
        not looked up by its labels each time (refusals come in floods)."""
        inc = self._refusals.get((job, reason))
        if inc is None:
            if len(self._refusals) > 65_536:
                self._refusals.clear()
            inc = self._refusals[(job, reason)] = self._metrics.refusals.labels(
                "" if job is None else str(job), reason
            ).inc
        inc(1)

    def dns_refused(self, job: uuid.UUID, reason: str) -> None:
        """`refused`, for the DNS responder's queries over a limit."""
        self.refused(job, reason)

    def _job_connections_changed(self, job: uuid.UUID) -> None:
        self._job_connections.set(job, self.connections.active(job), _job_labels)

    # source ports

    def acquire_port(
        self, job: uuid.UUID, destination: Destination, limits: Limits, now: float
    ) -> Lease | str:
        lease = self.ports.acquire(
            job, destination, max_per_job=limits.ports_per_destination, now=now
        )
        if isinstance(lease, Lease):
            self._ports_changed(lease)
        return lease

    def release_port(self, lease: Lease, now: float, *, time_wait: bool = True) -> None:
        self.ports.release(lease, now, time_wait=time_wait)
        self._ports_changed(lease)

    def quarantine_port(self, lease: Lease, now: float) -> None:
        self.ports.quarantine(lease, now)
        self._ports_changed(lease)

    def _ports_changed(self, lease: Lease) -> None:
        held, in_use = self.ports.counts(lease)
        destination = lease.destination
        self._job_ports.set((lease.job, destination), held, _pair_labels)
        self._ports_in_use.set((lease.address, destination), in_use, _pair_labels)

    # pacing

    def pacing(self, job: uuid.UUID, limits: Limits) -> JobPacing:
        return JobPacing(self.shaper, job, self._shares(limits)[2], self._count_bytes)

    def retune(self, pacing: JobPacing, limits: Limits) -> None:
        """Move an open connection's pacing to `limits` (a replaced policy's)."""
        pacing.set_rate(fleet_share(limits.bandwidth_bps, self._proxy_count()))

    def _count_bytes(self, job: uuid.UUID, direction: str, size: int) -> None:
        inc = self._job_bytes.get((job, direction))
        if inc is None:
            if len(self._job_bytes) > 65_536:
                self._job_bytes.clear()
            inc = self._job_bytes[(job, direction)] = self._metrics.job_bytes.labels(
                str(job), direction
            ).inc
        inc(size)

    # housekeeping

    def prune(self, now: float, loop_now: float) -> None:
        self.connections.prune(now)
        self.dns.prune(now)
        self.ports.prune(now)
        self.shaper.prune(loop_now)
        for series in (self._job_connections, self._job_ports, self._ports_in_use):
            series.sweep()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            self.prune(time.monotonic(), loop.time())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="egressd-limits-prune"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["JobPacing", "LimitsConfig", "ProxyLimits"]
