"""Connection caps: per-job concurrency and new-connection rate, and a proxy-wide cap.

`ConnectionLimiter.admit` is called once per connection, before anything is
connected upstream; an admitted connection holds its slot until `release`.
The checks, in order, each with its refusal reason:

1. the proxy's concurrent connections < ``max_total`` (`PROXY_CONNECTION_LIMIT`);
2. the job's concurrent connections < its ``max_connections`` (`JOB_CONNECTION_LIMIT`);
3. a token from the job's bucket (`JOB_RATE_LIMIT`): it refills at
   ``max_new_connections_per_s`` tokens/s and holds at most one second's worth,
   so a job may burst its per-second allowance and no more.

Concurrency is checked before a token is taken: a connection refused for
concurrency does not also spend the job's rate. The limits come with each
call (they live in the job's policy, which may be refreshed at any time); a
changed rate applies from that call on, keeping the tokens already earned.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from egressd.limits import JOB_CONNECTION_LIMIT, JOB_RATE_LIMIT, PROXY_CONNECTION_LIMIT

#: Forget idle jobs (no connection, full bucket) once this many are tracked.
PRUNE_AT = 4096


@dataclass(slots=True)
class TokenBucket:
    """Tokens refill at `rate` per second up to `capacity`."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        return cls(rate=rate, capacity=rate, tokens=rate, stamp=now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def set_rate(self, rate: float, now: float) -> None:
        if rate != self.rate:
            self.refill(now)
            self.rate = self.capacity = rate
            self.tokens = min(self.tokens, rate)

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def is_full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.capacity


@dataclass(slots=True)
class _Job:
    active: int
    bucket: TokenBucket


class ConnectionLimiter:
    """Concurrent-connection and new-connection-rate accounting for one proxy."""

    def __init__(self, max_total: int) -> None:
        if max_total < 1:
            raise ValueError("max_total must be at least 1")
        self.max_total = max_total
        self.total = 0
        self._jobs: dict[Hashable, _Job] = {}

    def admit(
        self, job: Hashable, *, max_connections: int, new_per_s: float, now: float
    ) -> str | None:
        """None if the connection may go on (and now holds a slot), else the refusal reason."""
        if self.total >= self.max_total:
            return PROXY_CONNECTION_LIMIT
        state = self._jobs.get(job)
        if state is None:
            if len(self._jobs) >= PRUNE_AT:
                self.prune(now)
            state = self._jobs[job] = _Job(0, TokenBucket.full(new_per_s, now))
        else:
            state.bucket.set_rate(new_per_s, now)
        if state.active >= max_connections:
            return JOB_CONNECTION_LIMIT
        if not state.bucket.take(now):
            return JOB_RATE_LIMIT
        state.active += 1
        self.total += 1
        return None

    def release(self, job: Hashable) -> None:
        """Give back the slot of an admitted connection."""
        state = self._jobs.get(job)
        if state is None or state.active <= 0:
            raise ValueError(f"release without admit for job {job!r}")
        state.active -= 1
        self.total -= 1

    def active(self, job: Hashable) -> int:
        state = self._jobs.get(job)
        return 0 if state is None else state.active

    def jobs(self) -> dict[Hashable, int]:
        """Concurrent connections per job, for jobs that hold any."""
        return {job: s.active for job, s in self._jobs.items() if s.active}

    def prune(self, now: float) -> int:
        """Forget jobs with no connection and a full bucket (nothing to remember); returns how many."""
        idle = [job for job, s in self._jobs.items() if s.active == 0 and s.bucket.is_full(now)]
        for job in idle:
            del self._jobs[job]
        return len(idle)


__all__ = ["ConnectionLimiter", "TokenBucket"]
