"""Fairness limits for the egress proxy: pure, clock-injected logic.

* `connections`: per-job concurrent connections and new-connection rate
  (token bucket), and the proxy-wide connection cap;
* `ports`: the source-port allocator (which egress address and port each
  upstream connection binds);
* `pacing`: Earliest Departure Time bandwidth pacing per job and direction,
  under an optional proxy-wide rate;
* `timeouts`: idle and lifetime expiry of relayed connections.

Nothing here does I/O or reads a clock itself: every call takes ``now``
(seconds, monotonic), so the logic is tested with a fake clock and wired
into `egressd.proxy` with `time.monotonic`.

The refusal reasons are constants that counters, audit events and logs use
verbatim.
"""

from __future__ import annotations

import math

JOB_CONNECTION_LIMIT = "job_connection_limit"
JOB_RATE_LIMIT = "job_rate_limit"
PROXY_CONNECTION_LIMIT = "proxy_connection_limit"
PORT_BUDGET_EXHAUSTED = "port_budget_exhausted"
PORT_POOL_EXHAUSTED = "port_pool_exhausted"

IDLE_TIMEOUT = "idle_timeout"
MAX_LIFETIME = "max_lifetime"

REFUSAL_REASONS = (
    JOB_CONNECTION_LIMIT,
    JOB_RATE_LIMIT,
    PROXY_CONNECTION_LIMIT,
    PORT_BUDGET_EXHAUSTED,
    PORT_POOL_EXHAUSTED,
)


def fleet_share(value: int, proxies: int) -> int:
    """One proxy's share of a fleet-wide per-job limit: ``ceil(value / proxies)``, at least 1.

    A job's connection and bandwidth limits are what the job gets from the
    whole fleet; its flows are spread over the proxies by rendezvous hashing
    of the 5-tuple, so each proxy enforces an even share.
    """
    return max(1, math.ceil(value / max(1, proxies)))


__all__ = [
    "IDLE_TIMEOUT",
    "JOB_CONNECTION_LIMIT",
    "JOB_RATE_LIMIT",
    "MAX_LIFETIME",
    "PORT_BUDGET_EXHAUSTED",
    "PORT_POOL_EXHAUSTED",
    "PROXY_CONNECTION_LIMIT",
    "REFUSAL_REASONS",
    "fleet_share",
]
