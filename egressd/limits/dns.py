"""Per-job DNS query limits at one proxy: pure, clock-injected logic.

`DnsQueryLimiter` keeps, per job:

* the query bucket (`admit`, reason `DNS_RATE_LIMIT`): refills at the
  policy's ``limits.dns_queries_per_s`` and holds one second's worth, at least
  `MIN_BURST` (one lookup with a search list of three domains is up to 8
  queries at once: A and AAAA for each candidate name; 10 is tier 1's minimum
  too, so the proxy never refuses a burst that tier 1 let through);
* the answer budget for refusals (`answer_refusal`): a job over its rate is
  answered REFUSED at up to the same rate again, and what is beyond is
  dropped. A refusal tells a well-behaved client at once (no 5 s timeout
  per retry); answering every datagram of a flood would make the proxy do
  work per datagram for the attacker, so past twice its rate the flood is
  dropped and costs the sender its timeouts instead;
* upstream queries in flight (`begin_upstream` / `end_upstream`, reason
  `DNS_INFLIGHT_LIMIT`): a job's queries that wait for the upstream
  resolver are capped, so a job within its rate but with a slow or
  slow-answering name cannot hold the responder's task pool or the upstream
  path that other jobs need;
* DNS-over-TCP connections open (`begin_tcp` / `end_tcp`, reason
  `DNS_TCP_CONNECTION_LIMIT`): the responder's connection slots are shared,
  and a job holding them all (idle for the idle timeout each) would leave the
  others no TCP for their large answers;
* the audit-log sampler (`log_refusal`): a flood would otherwise write one
  audit line per datagram. The first rate-limited query of a job is logged,
  then at most one per `LOG_INTERVAL_S`, each carrying how many were not
  logged since the previous one (``suppressed``); `flush` hands out what is
  left when a flood stops.

The rate is the job's own at every proxy (not a fleet share as for
connections): a sandbox's queries come from many source ports and are spread
over the proxies by flow hash, so an even share would refuse a legitimate
burst that happened to hash unevenly; tier 1 holds the per-sandbox rate on
the node, and the proxy's limit protects the proxy and its upstream path.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from egressd.limits.connections import TokenBucket

DNS_RATE_LIMIT = "dns_rate_limit"
DNS_INFLIGHT_LIMIT = "dns_inflight_limit"
DNS_TCP_CONNECTION_LIMIT = "dns_tcp_connection_limit"

MIN_BURST = 10
LOG_INTERVAL_S = 1.0
DEFAULT_MAX_INFLIGHT_PER_JOB = 64
DEFAULT_MAX_TCP_PER_JOB = 16
#: Forget idle jobs (nothing in flight, full buckets, nothing to log) once this many are tracked.
PRUNE_AT = 4096


def burst(rate: float) -> float:
    """The bucket's capacity for `rate` queries/s: one second's worth, at least `MIN_BURST`."""
    return max(float(rate), float(MIN_BURST))


def _bucket(rate: float, now: float) -> TokenBucket:
    size = burst(rate)
    return TokenBucket(rate=float(rate), capacity=size, tokens=size, stamp=now)


def _set_rate(bucket: TokenBucket, rate: float, now: float) -> None:
    if bucket.rate != rate:
        bucket.refill(now)
        bucket.rate = float(rate)
        bucket.capacity = burst(rate)
        bucket.tokens = min(bucket.tokens, bucket.capacity)


@dataclass(slots=True)
class _Job:
    queries: TokenBucket
    answers: TokenBucket  # refusals that are answered rather than dropped
    inflight: int = 0
    tcp: int = 0
    suppressed: int = 0
    rated: bool = True  # False: created before the policy's rate was known
    logged_at: float | None = None


class DnsQueryLimiter:
    """Per-job DNS query rate, refusal budget, upstream in-flight cap and log sampling."""

    def __init__(
        self,
        *,
        max_inflight_per_job: int = DEFAULT_MAX_INFLIGHT_PER_JOB,
        max_tcp_per_job: int = DEFAULT_MAX_TCP_PER_JOB,
    ) -> None:
        if max_inflight_per_job < 1 or max_tcp_per_job < 1:
            raise ValueError("max_inflight_per_job and max_tcp_per_job must be at least 1")
        self.max_inflight_per_job = max_inflight_per_job
        self.max_tcp_per_job = max_tcp_per_job
        self._jobs: dict[Hashable, _Job] = {}

    def _known(self, job: Hashable) -> _Job:
        """The job's state, for counts that need no rate; the first `admit` gives
        it full buckets at the policy's rate."""
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job(
                _bucket(MIN_BURST, 0.0), _bucket(MIN_BURST, 0.0), rated=False
            )
        return state

    def _job(self, job: Hashable, rate: float, now: float) -> _Job:
        state = self._jobs.get(job)
        if state is None:
            if len(self._jobs) >= PRUNE_AT:
                self.prune(now)
            state = self._jobs[job] = _Job(_bucket(rate, now), _bucket(rate, now))
        elif not state.rated:
            state.queries, state.answers, state.rated = _bucket(rate, now), _bucket(rate, now), True
        else:
            _set_rate(state.queries, rate, now)
            _set_rate(state.answers, rate, now)
        return state

    def admit(self, job: Hashable, *, rate: float, now: float) -> str | None:
        """None: the query may be answered (a token is spent); else `DNS_RATE_LIMIT`."""
        return None if self._job(job, rate, now).queries.take(now) else DNS_RATE_LIMIT

    def take_known(self, job: Hashable, now: float) -> bool | None:
        """`admit` at the rate last seen, for a fast path that has not read the policy:
        None if `job` is not known yet (call `admit` once the policy is read), else
        whether a token was taken (then `set_rate` with the policy's rate, if read)."""
        state = self._jobs.get(job)
        if state is None or not state.rated:
            return None
        return state.queries.take(now)

    def charge(self, job: Hashable, now: float) -> None:
        """Spend a token for a datagram that is not a query (malformed), at the rate
        last seen or, for a job not seen yet, `MIN_BURST`/s: garbage is limited (and
        its audit lines with it) like queries."""
        state = self._jobs.get(job)
        if state is None or not state.rated:
            state = self._job(job, MIN_BURST, now)
        state.queries.take(now)

    def set_rate(self, job: Hashable, rate: float, now: float) -> None:
        """The policy's rate for `job`, from now on (tokens already earned are kept)."""
        self._job(job, rate, now)

    def answer_refusal(self, job: Hashable, now: float) -> bool:
        """For a query over the rate: True to answer it (REFUSED), False to drop it."""
        state = self._jobs.get(job)
        return state is not None and state.answers.take(now)

    def begin_upstream(self, job: Hashable) -> str | None:
        """None: the job may ask the upstream (call `end_upstream` after); else the reason."""
        state = self._known(job)
        if state.inflight >= self.max_inflight_per_job:
            return DNS_INFLIGHT_LIMIT
        state.inflight += 1
        return None

    def end_upstream(self, job: Hashable) -> None:
        state = self._jobs.get(job)
        if state is None or state.inflight <= 0:
            raise ValueError(f"end_upstream without begin_upstream for job {job!r}")
        state.inflight -= 1

    def begin_tcp(self, job: Hashable) -> str | None:
        """None: the job may hold one more DNS-over-TCP connection (call `end_tcp`
        when it closes); else `DNS_TCP_CONNECTION_LIMIT`."""
        state = self._known(job)
        if state.tcp >= self.max_tcp_per_job:
            return DNS_TCP_CONNECTION_LIMIT
        state.tcp += 1
        return None

    def end_tcp(self, job: Hashable) -> None:
        state = self._jobs.get(job)
        if state is None or state.tcp <= 0:
            raise ValueError(f"end_tcp without begin_tcp for job {job!r}")
        state.tcp -= 1

    def inflight(self, job: Hashable) -> int:
        state = self._jobs.get(job)
        return 0 if state is None else state.inflight

    def log_refusal(self, job: Hashable, now: float) -> int | None:
        """For a rate-limited query: None if it is not to be logged (it is counted as
        suppressed), else how many were suppressed before it (log it with that)."""
        state = self._jobs.get(job)
        if state is None:
            return 0
        if state.logged_at is not None and now - state.logged_at < LOG_INTERVAL_S:
            state.suppressed += 1
            return None
        suppressed, state.suppressed, state.logged_at = state.suppressed, 0, now
        return suppressed

    def flush(self, now: float) -> dict[Hashable, int]:
        """Jobs whose suppressed refusals are older than `LOG_INTERVAL_S`, and how many
        (log one summary each); they are forgotten here."""
        out: dict[Hashable, int] = {}
        for job, state in self._jobs.items():
            if state.suppressed and (
                state.logged_at is None or now - state.logged_at >= LOG_INTERVAL_S
            ):
                out[job] = state.suppressed
                state.suppressed, state.logged_at = 0, now
        return out

    def prune(self, now: float) -> int:
        """Forget jobs with nothing in flight, full buckets and nothing to log; returns how many."""
        idle = [
            job
            for job, s in self._jobs.items()
            if s.inflight == 0
            and s.tcp == 0
            and not s.suppressed
            and s.queries.is_full(now)
            and s.answers.is_full(now)
        ]
        for job in idle:
            del self._jobs[job]
        return len(idle)

    def __len__(self) -> int:
        return len(self._jobs)


__all__ = [
    "DEFAULT_MAX_INFLIGHT_PER_JOB",
    "DNS_INFLIGHT_LIMIT",
    "DNS_RATE_LIMIT",
    "DNS_TCP_CONNECTION_LIMIT",
    "LOG_INTERVAL_S",
    "MIN_BURST",
    "DnsQueryLimiter",
    "burst",
]
