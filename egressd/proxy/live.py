"""Open relayed connections follow their job's policy.

The interceptor registers each relayed connection here (`LiveConnections.track`)
with what was recorded when it was accepted (`Recorded`: destination, port,
the client's SNI / Host / protocol, the names the job had resolved to that
address, the proxy's own resolution of the claimed name, the node). When the
job's policy changes (`PolicyStore.listeners`):

* revoked (the control plane answered 404) -> every open connection of the
  job is reset, audit ``end: policy_revoked``;
* replaced (a new digest) -> each open connection is decided again by
  `redecide`, tier 2's pure decision over the recorded facts and the new
  policy; one the new policy no longer allows is reset, ``end:
  policy_changed``; the others carry on, their pacing moved to the new
  policy's bandwidth (new connections get the new limits anyway, as they
  read the policy at admission);
* expired -> a timer at the policy's ``exp`` (armed while the job has open
  connections) resets them with ``end: policy_expired`` unless a newer
  policy with a later ``exp`` is held by then.

A reset sets `RelayStats.end` and cancels the connection's task: the relay
aborts both sides (RST) and the interceptor writes the audit event, as it
does for ``idle_timeout``. All of it happens on the event loop as soon as the
proxy learns of the change, well within a second.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from egressd.policy.jws import VerifiedPolicy
from egressd.policy.matcher import match_address
from egressd.policy.model import Policy
from egressd.proxy import http_rules, tier2

IPv4Address = ipaddress.IPv4Address

POLICY_REVOKED = "policy_revoked"
POLICY_CHANGED = "policy_changed"
POLICY_EXPIRED = "policy_expired"
LIVE_ENDS = (POLICY_REVOKED, POLICY_CHANGED, POLICY_EXPIRED)

log = structlog.get_logger("egressd.proxy.live")


class Recorded(NamedTuple):
    """What tier 2 knew of a connection when it allowed it.

    Immutable; a named tuple rather than a frozen dataclass: one is made per
    relayed connection, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) costs ~4x as much."""

    dst: IPv4Address
    dport: int
    node: str
    protocol: str | None = None
    sni: str | None = None
    http_host: str | None = None
    target_port: int | None = None
    ech: bool = False
    sniff_error: str | None = None
    learned: frozenset[str] = frozenset()
    proxy_ips: frozenset[IPv4Address] = frozenset()


def redecide(
    policy: Policy | None, rec: Recorded, *, fleet_ranges: Sequence[Any] = ()
) -> str | None:
    """The end reason when `policy` no longer allows the connection, else None (pure)."""
    if policy is None:
        return POLICY_REVOKED
    if rec.node not in policy.nodes:
        return POLICY_CHANGED
    decision = tier2.address_precheck(policy, rec.dst, rec.dport, fleet_ranges=fleet_ranges)
    if decision is None:
        by_address = match_address(policy, rec.dst, rec.dport, fleet_ranges=fleet_ranges)
        if by_address.allowed:
            decision = by_address
        else:
            decision = tier2.decide_named(
                policy,
                dst_ip=rec.dst,
                dst_port=rec.dport,
                sni=rec.sni,
                http_host=rec.http_host,
                resolved_names=rec.learned,
                proxy_resolves=rec.proxy_ips,
                fleet_ranges=fleet_ranges,
                sniff_error=rec.sniff_error,
                protocol=rec.protocol,
                ech=rec.ech,
                target_port=rec.target_port,
            ).decision
    decision = http_rules.inspectable(decision, rec.protocol)
    return None if tier2.apply_mode(policy, decision).allowed else POLICY_CHANGED


@dataclass(eq=False, slots=True)
class _Live:
    recorded: Recorded
    task: asyncio.Task[Any]
    stats: Any  # relay.RelayStats: `end` is set before the task is cancelled
    retune: Callable[[Policy], None] | None = None
    ended: bool = False


@dataclass(slots=True)
class _Job:
    conns: set[_Live] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None
    exp: float | None = None


class LiveConnections:
    """The open relayed connections of every job, and their resets."""

    def __init__(
        self,
        *,
        lookup: Callable[[uuid.UUID], VerifiedPolicy | None],
        fleet_ranges: Callable[[], Sequence[Any]],
        on_end: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookup = lookup
        self._fleet_ranges = fleet_ranges
        self._on_end = on_end
        self._clock = clock
        self._jobs: dict[uuid.UUID, _Job] = {}

    def count(self, job_id: uuid.UUID | None = None) -> int:
        if job_id is not None:
            job = self._jobs.get(job_id)
            return 0 if job is None else len(job.conns)
        return sum(len(j.conns) for j in self._jobs.values())

    def track(
        self,
        job_id: uuid.UUID,
        recorded: Recorded,
        stats: Any,
        policy: Policy,
        retune: Callable[[Policy], None] | None = None,
        *,
        task: asyncio.Task[Any] | None = None,
    ) -> _Tracking:
        """Register `task` (the current task by default) as the job's relayed
        connection for as long as the ``with`` block runs.

        A plain context manager, not a generator one: entered once per relayed
        connection (issue 10's short-connection profile)."""
        if task is None:
            task = asyncio.current_task()
            assert task is not None
        return _Tracking(self, job_id, _Live(recorded, task, stats, retune), policy.exp)

    def _add(self, job_id: uuid.UUID, entry: _Live, exp: int | None) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job()
        job.conns.add(entry)
        self._arm(job_id, job, exp)
        return job

    def _remove(self, job_id: uuid.UUID, job: _Job, entry: _Live) -> None:
        conns = job.conns
        conns.discard(entry)
        if not conns and self._jobs.get(job_id) is job:
            if job.timer is not None:
                job.timer.cancel()
            del self._jobs[job_id]

    def policy_changed(
        self, job_id: uuid.UUID, _previous: VerifiedPolicy | None, current: VerifiedPolicy | None
    ) -> None:
        """A `PolicyStore` listener: re-decide the job's open connections."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        policy = None if current is None else current.policy
        fleet_ranges = self._fleet_ranges()
        for entry in list(job.conns):
            reason = redecide(policy, entry.recorded, fleet_ranges=fleet_ranges)
            if reason is not None:
                self._end(job_id, entry, reason)
            elif policy is not None and entry.retune is not None:
                entry.retune(policy)
        if policy is not None:
            self._arm(job_id, job, policy.exp)

    def _arm(self, job_id: uuid.UUID, job: _Job, exp: int | None) -> None:
        if exp is None or (job.exp is not None and job.exp == exp and job.timer is not None):
            return
        if job.timer is not None:
            job.timer.cancel()
        job.exp = float(exp)
        delay = max(0.0, job.exp - self._clock())
        job.timer = asyncio.get_running_loop().call_later(delay, self._expired, job_id, job)

    def _expired(self, job_id: uuid.UUID, job: _Job) -> None:
        job.timer = None
        held = self._lookup(job_id)
        if held is not None and held.policy.exp is not None and held.policy.exp > self._clock():
            self._arm(job_id, job, held.policy.exp)  # renewed in time
            return
        for entry in list(job.conns):
            self._end(job_id, entry, POLICY_EXPIRED)

    def _end(self, job_id: uuid.UUID, entry: _Live, reason: str) -> None:
        if entry.ended or entry.task.done():
            return
        entry.ended = True
        entry.stats.end = reason
        entry.task.cancel()
        if self._on_end is not None:
            self._on_end(reason)
        log.info(
            "connection_reset_by_policy",
            job_id=str(job_id),
            dst=str(entry.recorded.dst),
            port=entry.recorded.dport,
            end=reason,
        )

    def close(self) -> None:
        for job in self._jobs.values():
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None


class _Tracking:
    """`LiveConnections.track`'s context manager: the entry is registered on
    entry and removed on exit, however the block ends."""

    __slots__ = ("_entry", "_exp", "_job", "_job_id", "_live")

    def __init__(
        self, live: LiveConnections, job_id: uuid.UUID, entry: _Live, exp: int | None
    ) -> None:
        self._live = live
        self._job_id = job_id
        self._entry = entry
        self._exp = exp
        self._job: _Job | None = None

    def __enter__(self) -> None:
        self._job = self._live._add(self._job_id, self._entry, self._exp)

    def __exit__(self, *_exc: object) -> None:
        job, self._job = self._job, None
        if job is not None:
            self._live._remove(self._job_id, job, self._entry)


__all__ = [
    "LIVE_ENDS",
    "POLICY_CHANGED",
    "POLICY_EXPIRED",
    "POLICY_REVOKED",
    "LiveConnections",
    "Recorded",
    "redecide",
]
