"""What the proxy's DNS responder told each job: name -> addresses, with expiry.

Tier 2 uses it both ways: for a connection without a name (no SNI, no Host)
the names this job resolved to the destination address (`names_for`), and to
check that a claimed name agrees with the destination (`addresses_for`).

Decisions:

* TTLs are clamped to [`MIN_TTL_S`, `MAX_TTL_S`] = [5 s, 1 h]. The floor: an
  answer with TTL 0 (common behind load balancers) must still let the client
  connect right after resolving. The ceiling: an address that a name no longer
  has must not keep that name for long (a name's old address may have been
  handed to someone else), and a client that caches longer than the clamp
  still works, because tier 2 then asks the proxy's own resolver.
* Each job holds at most `max_per_job` (name, address) entries; recording one
  more evicts the oldest (least recently recorded or refreshed), so a job that
  resolves many names cannot grow the proxy's memory unboundedly. The number
  of jobs is bounded the same way (`max_jobs`, least recently recorded job
  dropped first); jobs come from verified flows, so this is a backstop.
* Expired entries are never returned; they are removed when met and by
  `prune`, which the service may call periodically.
* Time is passed in (`now`, monotonic seconds), so the class is pure and
  deterministic under test. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import ipaddress
import math
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

IPv4Address = ipaddress.IPv4Address

MIN_TTL_S = 5.0
MAX_TTL_S = 3600.0
DEFAULT_MAX_PER_JOB = 4096
DEFAULT_MAX_JOBS = 65536


def clamp_ttl(ttl: float) -> float:
    """A TTL within [MIN_TTL_S, MAX_TTL_S]; negative or NaN counts as 0."""
    if math.isnan(ttl) or ttl < MIN_TTL_S:
        return MIN_TTL_S
    return min(float(ttl), MAX_TTL_S)


@dataclass(slots=True)
class _JobNames:
    # (name, address) -> expiry, oldest first.
    entries: OrderedDict[tuple[str, IPv4Address], float] = field(default_factory=OrderedDict)
    by_ip: dict[IPv4Address, set[str]] = field(default_factory=dict)
    by_name: dict[str, set[IPv4Address]] = field(default_factory=dict)

    def add(self, name: str, ip: IPv4Address, expiry: float) -> None:
        key = (name, ip)
        if key in self.entries:
            self.entries.move_to_end(key)
        else:
            self.by_ip.setdefault(ip, set()).add(name)
            self.by_name.setdefault(name, set()).add(ip)
        self.entries[key] = expiry

    def remove(self, name: str, ip: IPv4Address) -> None:
        if self.entries.pop((name, ip), None) is None:
            return
        names = self.by_ip.get(ip)
        if names is not None:
            names.discard(name)
            if not names:
                del self.by_ip[ip]
        ips = self.by_name.get(name)
        if ips is not None:
            ips.discard(ip)
            if not ips:
                del self.by_name[name]

    def evict_oldest(self) -> None:
        (name, ip), _ = next(iter(self.entries.items()))
        self.remove(name, ip)


class ResolvedNames:
    """Per-job name <-> address pairs learned from the proxy's DNS answers."""

    __slots__ = ("_jobs", "max_jobs", "max_per_job")

    def __init__(
        self, *, max_per_job: int = DEFAULT_MAX_PER_JOB, max_jobs: int = DEFAULT_MAX_JOBS
    ) -> None:
        if max_per_job < 1 or max_jobs < 1:
            raise ValueError("max_per_job and max_jobs must be >= 1")
        self.max_per_job = max_per_job
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[uuid.UUID, _JobNames] = OrderedDict()

    def record(
        self,
        job_id: uuid.UUID,
        host: str,
        ips: Iterable[IPv4Address],
        ttl: float,
        now: float,
    ) -> None:
        """Remember that the proxy's DNS answered `host` with `ips` for `job_id`.

        `host` must already be normalised (`egressd.policy.names.normalize_host`).
        """
        expiry = now + clamp_ttl(ttl)
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _JobNames()
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(job_id)
        for ip in ips:
            job.add(host, ipaddress.IPv4Address(ip), expiry)
        while len(job.entries) > self.max_per_job:
            job.evict_oldest()

    def names_for(self, job_id: uuid.UUID, ip: IPv4Address, now: float) -> set[str]:
        """Names this job resolved to `ip` that have not expired."""
        job = self._jobs.get(job_id)
        if job is None:
            return set()
        names = job.by_ip.get(ip)
        if not names:
            return set()
        live: set[str] = set()
        for name in list(names):
            if job.entries[(name, ip)] > now:
                live.add(name)
            else:
                job.remove(name, ip)
        return live

    def addresses_for(self, job_id: uuid.UUID, host: str, now: float) -> set[IPv4Address]:
        """Unexpired addresses that this job was given for `host` (normalised)."""
        job = self._jobs.get(job_id)
        if job is None:
            return set()
        ips = job.by_name.get(host)
        if not ips:
            return set()
        live: set[IPv4Address] = set()
        for ip in list(ips):
            if job.entries[(host, ip)] > now:
                live.add(ip)
            else:
                job.remove(host, ip)
        return live

    def prune(self, now: float) -> int:
        """Drop every expired entry (and jobs left empty); returns how many went."""
        dropped = 0
        for job_id in list(self._jobs):
            job = self._jobs[job_id]
            for (name, ip), expiry in list(job.entries.items()):
                if expiry <= now:
                    job.remove(name, ip)
                    dropped += 1
            if not job.entries:
                del self._jobs[job_id]
        return dropped

    def forget_job(self, job_id: uuid.UUID) -> None:
        self._jobs.pop(job_id, None)

    def size(self, job_id: uuid.UUID | None = None) -> int:
        """Entries held for one job, or for all jobs."""
        if job_id is not None:
            job = self._jobs.get(job_id)
            return 0 if job is None else len(job.entries)
        return sum(len(job.entries) for job in self._jobs.values())

    def __len__(self) -> int:
        return len(self._jobs)
