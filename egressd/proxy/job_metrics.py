"""Denials per job at the proxy: ``egressd_job_denials_total{job_id,kind,reason}``.

Issue 14: "which job was denied what, and why" must have an answer in the
metrics too. ``egressd_connections_total{verdict,reason}`` and
``egressd_dns_queries_total{verdict}`` stay as they are (node-wide, a fixed
label set); this counter adds the job:

* ``kind`` ``connection``: a TCP connection tier 2 denied (the interceptor's
  ``_finish``, verdict ``deny``), with its reason (``no_matching_rule``,
  ``denied_range``, ``policy_missing``, a limit's reason, ...);
* ``kind`` ``dns``: a query the DNS responder refused (verdict ``deny``) or,
  over a limit's refusal budget, dropped, with its reason.

A denial without a job (``unknown_flow``: no flow, so no job) is not counted
here; the node-wide counters have it.

Cardinality is bounded:

* a job's series are removed when its policy leaves the proxy: at once when
  the policy is revoked (the control plane's 404 for a deleted job, through
  `PolicyStore.listeners`), and by `sweep` (run on a denial, at most every
  `SWEEP_INTERVAL_S`) once the proxy no longer holds an unexpired policy for
  the job (expired, evicted from the cache, never fetched) and the job has had
  no denial for `IDLE_S`, which leaves a scrape or two to see a denial of a job
  whose policy could not be had;
* at most `max_jobs` jobs (`DEFAULT_MAX_JOBS`) have series; a denial of one
  more job removes the series of the job denied least recently (counted in
  ``egressd_job_denials_evicted_total``);
* ``kind`` has two values and ``reason`` is one of the proxy's fixed reason
  strings, so a job has at most a few dozen series.

A counter removed and later created again starts from zero: Prometheus's
``rate()``/``increase()`` read that as a counter reset, as for a restart.

`on(ctx)` gives the one instance of a proxy's metrics registry (the
interceptor and the DNS responder share it). Not thread-safe: the proxy's
event loop owns it.
"""

from __future__ import annotations

import contextlib
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from egressd.proxy import audit
from egressd.proxy.context import FlowInfo, ProxyContext

CONNECTION = "connection"
DNS = "dns"
KINDS = (CONNECTION, DNS)

#: Jobs with series at once (each a few series: kinds x reasons seen).
DEFAULT_MAX_JOBS = 512
#: How often `sweep` runs at most (on a denial).
SWEEP_INTERVAL_S = 10.0
#: A job whose policy is not held keeps its series this long after its last denial.
IDLE_S = 60.0

#: Verdicts that count as a denial.
_DENIED = frozenset({audit.VERDICT_DENY, audit.VERDICT_DROP})


class JobDenials:
    """The counter and the bookkeeping that keeps its label sets bounded."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_jobs: int = DEFAULT_MAX_JOBS,
        holds: Callable[[uuid.UUID], bool] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.max_jobs = max_jobs
        self._holds = holds
        self._monotonic = monotonic
        self._counter = Counter(
            "egressd_job_denials_total",
            "Connections and DNS queries the proxy denied, by job, kind and reason "
            "(series removed when the job's policy leaves the proxy)",
            ["job_id", "kind", "reason"],
            registry=registry,
        )
        self._evicted = Counter(
            "egressd_job_denials_evicted_total",
            "Jobs whose denial series were removed to stay within the cap on jobs",
            registry=registry,
        )
        # job -> {(kind, reason): child}, least recently denied first
        self._jobs: OrderedDict[uuid.UUID, dict[tuple[str, str], Any]] = OrderedDict()
        self._last: dict[uuid.UUID, float] = {}
        self._next_sweep = monotonic() + SWEEP_INTERVAL_S

    # --- counting ------------------------------------------------------------------

    def denied(self, job_id: uuid.UUID, kind: str, reason: str) -> None:
        """One denial of `kind` for `job_id`, with `reason`."""
        now = self._monotonic()
        children = self._jobs.get(job_id)
        if children is None:
            children = self._jobs[job_id] = {}
            while len(self._jobs) > self.max_jobs:
                oldest = next(iter(self._jobs))
                self.forget(oldest)
                self._evicted.inc()
        else:
            self._jobs.move_to_end(job_id)
        child = children.get((kind, reason))
        if child is None:
            child = children[(kind, reason)] = self._counter.labels(str(job_id), kind, reason)
        child.inc()
        self._last[job_id] = now
        if now >= self._next_sweep:
            self.sweep(now)

    def connection(self, flow: FlowInfo | None, verdict: str, reason: str) -> None:
        """A finished tier-2 connection: counted if it was denied and has a job."""
        if flow is not None and verdict in _DENIED:
            self.denied(flow.job_id, CONNECTION, reason)

    def dns(self, flow: FlowInfo | None, verdict: str, reason: str) -> None:
        """An answered (or dropped) DNS query: counted if it was denied and has a job."""
        if flow is not None and verdict in _DENIED:
            self.denied(flow.job_id, DNS, reason)

    # --- removal -------------------------------------------------------------------

    def forget(self, job_id: uuid.UUID) -> None:
        """Remove every series of `job_id`."""
        children = self._jobs.pop(job_id, None)
        self._last.pop(job_id, None)
        if children is None:
            return
        label = str(job_id)
        for kind, reason in children:
            with contextlib.suppress(KeyError):
                self._counter.remove(label, kind, reason)

    def policy_changed(self, job_id: uuid.UUID, previous: object, current: object) -> None:
        """A `PolicyStore` listener: a revoked policy (`current` None) ends the job's series."""
        if current is None:
            self.forget(job_id)

    def sweep(self, now: float | None = None) -> list[uuid.UUID]:
        """Remove the series of jobs whose policy the proxy no longer holds and
        that have had no denial for `IDLE_S`; the jobs removed."""
        now = self._monotonic() if now is None else now
        self._next_sweep = now + SWEEP_INTERVAL_S
        if self._holds is None:
            return []
        gone = [
            job for job, last in self._last.items() if now - last >= IDLE_S and not self._holds(job)
        ]
        for job in gone:
            self.forget(job)
        return gone

    def jobs(self) -> list[uuid.UUID]:
        """The jobs that have series, least recently denied first."""
        return list(self._jobs)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, JobDenials] = weakref.WeakKeyDictionary()


def on(ctx: ProxyContext) -> JobDenials:
    """The `JobDenials` of `ctx`'s registry, made (and subscribed to the policy
    source's revocations, if it has ``listeners``) on first use."""
    found = _by_registry.get(ctx.registry)
    if found is not None:
        return found
    holds = getattr(ctx.policies, "holds", None)
    found = _by_registry[ctx.registry] = JobDenials(ctx.registry, holds=holds)
    listeners = getattr(ctx.policies, "listeners", None)
    if listeners is not None:
        listeners.append(found.policy_changed)
    return found
