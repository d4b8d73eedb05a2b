"""Earliest Departure Time (EDT) bandwidth pacing, per job and direction.

Each job has one pacer per direction (``up``: sandbox to internet, ``down``:
back). A chunk of ``size`` bytes gets the departure time

    departure = max(now, last) + size / rate        (rate in bytes per second)

and ``last = departure``: chunks leave no faster than the rate, and a job
that was quiet does not bank credit for a burst later. The relay writes a
chunk at its departure time; a chunk whose departure lies beyond the
*horizon* (``departure - now > horizon_s``) makes the relay stop reading from
that chunk's source until the departure comes within the horizon again, so
a paced connection is slowed by TCP's own backpressure and nothing is ever
dropped. What one job buffers is bounded by about ``rate * horizon`` plus one
chunk per connection.

Proxy-wide rate (per direction): the proxy's rate is shared max-min fair,
the way a fair queue shares a link: every job in a direction is paced at
``min(its rate, level)``, with one *level* per direction chosen so that the
jobs' demands, each cut at the level, fill the proxy's rate. Every
``recompute_s`` the shaper looks at the jobs that asked for a departure time
within ``active_window_s``:

* a job whose pacer was more than ``slack_s`` ahead of now (it offered chunks
  faster than it may send them) is *backlogged*: it would take all it may,
  so its demand is its rate;
* any other job is *light*: its demand is what it actually sent.

The level is computed again at once when a job becomes backlogged, or when
the light jobs have asked for more bytes since it was computed than the proxy
carries in ``recompute_s`` (so a job granted far more than the proxy, which
never falls behind its own pacer, bursts at most that much before the level
holds it). When the demands fit in the proxy's rate there is no level (no
job is slowed below its own rate); otherwise a job that asks less than an
equal share gets what it asks, and the others split the rest equally. So every active job can count
on an equal share of the proxy, whatever rates the other jobs' policies
grant: a policy with a huge rate takes no more than its share when others
want theirs, and a job that only trickles takes no share it does not use.

Why not shares in proportion to the jobs' rates: a job granted 100 Gbit/s
would leave a 1 MB/s job a hundred-thousandth of the proxy, and a chunk
already read waits out the departure it got, however the shares change after
(CI saw a 78 KB chunk given 78 s).

``slack_s`` is the relay's: a chunk due within it is written at once. A pacer
that is ahead by less holds nothing back; counting it as backlogged would
make a 100 Gbit/s job that sent two small chunks in one event-loop tick (the
loop's clock does not move within a tick) demand its whole rate.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

DEFAULT_HORIZON_S = 0.05
DEFAULT_ACTIVE_WINDOW_S = 0.5
#: The relay writes a chunk due within this much now (the pacer's timestamp keeps
#: the long-run rate exact; small chunks are not held for microseconds), and a
#: pacer ahead of now by no more than this is not backlogged.
PACE_SLACK_S = 0.002


@dataclass(slots=True)
class EdtPacer:
    """One rate's timestamp: ``last`` is the departure time of the latest chunk."""

    last: float = 0.0

    def departure(self, size: int, rate_Bps: float, now: float) -> float:  # noqa: N803 - bytes/s
        start = max(now, self.last)
        self.last = start + size / rate_Bps
        return self.last


def fair_level(demands: Iterable[float], capacity: float) -> float:
    """The max-min fair level: ``sum(min(d, level) for d in demands) == capacity``,
    or infinity when the demands fit (``sum(demands) <= capacity``).

    Demands below an equal share of what is left are met in full; the rest get
    that share. The level is never below ``capacity / len(demands)``.
    """
    ordered = sorted(demands)
    left = capacity
    for index, demand in enumerate(ordered):
        share = left / (len(ordered) - index)
        if demand > share:
            return share
        left -= demand
    return math.inf


@dataclass(slots=True)
class _Sender:
    pacer: EdtPacer
    rate_Bps: float  # noqa: N815 - Bps: bytes/s, where rate_bps is bits/s
    seen: float  # its latest departure request
    backlogged: float  # when its pacer was last found behind (-inf: never)
    sent: int  # bytes since `since`
    since: float


class BandwidthShaper:
    """EDT pacers per (job, direction), under an optional proxy-wide rate per direction."""

    def __init__(
        self,
        *,
        proxy_rate_bps: int | None = None,
        horizon_s: float = DEFAULT_HORIZON_S,
        active_window_s: float = DEFAULT_ACTIVE_WINDOW_S,
        slack_s: float = PACE_SLACK_S,
    ) -> None:
        if proxy_rate_bps is not None and proxy_rate_bps <= 0:
            raise ValueError("proxy_rate_bps must be positive (None: no proxy-wide rate)")
        if horizon_s <= 0 or active_window_s <= 0 or slack_s < 0:
            raise ValueError("horizon_s and active_window_s must be positive, slack_s not negative")
        self.proxy_rate_Bps = None if proxy_rate_bps is None else proxy_rate_bps / 8.0
        self.horizon_s = horizon_s
        self.active_window_s = active_window_s
        self.slack_s = slack_s
        self.recompute_s = active_window_s / 2
        self._senders: dict[tuple[Hashable, str], _Sender] = {}
        # Per direction: (level in bytes/s, when it was computed), and the bytes
        # asked for since then.
        self._levels: dict[str, tuple[float, float]] = {}
        self._asked: dict[str, int] = {}

    def departure(
        self, job: Hashable, direction: str, size: int, *, rate_bps: int, now: float
    ) -> float:
        """When a chunk of `size` bytes of `job` going `direction` may leave."""
        key = (job, direction)
        sender = self._senders.get(key)
        rate_Bps = rate_bps / 8.0  # noqa: N806 - bytes/s, from bits/s
        if sender is None:
            sender = self._senders[key] = _Sender(EdtPacer(now), rate_Bps, now, -math.inf, 0, now)
        else:
            sender.rate_Bps = rate_Bps
            sender.seen = now
            if sender.pacer.last - now > self.slack_s:
                if now - sender.backlogged > self.active_window_s:
                    # Light -> backlogged: the level changes now, not at the
                    # next recompute (else two newcomers overshoot the proxy's
                    # rate together for up to `recompute_s`).
                    self._levels.pop(direction, None)
                sender.backlogged = now
        sender.sent += size
        if self.proxy_rate_Bps is not None and now - sender.backlogged > self.active_window_s:
            # More bytes since the level was computed than the proxy carries in a
            # period: light jobs alone are over its rate (a job granted far more
            # than the proxy, never behind its own pacer); look again now.
            asked = self._asked.get(direction, 0) + size
            self._asked[direction] = asked
            if asked > self.proxy_rate_Bps * self.recompute_s:
                self._levels.pop(direction, None)
        return sender.pacer.departure(size, min(rate_Bps, self.level(direction, now)), now)

    def level(self, direction: str, now: float) -> float:
        """The rate (bytes/s) no job in `direction` is paced above now; infinity: none."""
        if self.proxy_rate_Bps is None:
            return math.inf
        cached = self._levels.get(direction)
        if cached is None or now - cached[1] >= self.recompute_s:
            cached = self._levels[direction] = (self._compute_level(direction, now), now)
        return cached[0]

    def _compute_level(self, direction: str, now: float) -> float:
        assert self.proxy_rate_Bps is not None
        self._asked[direction] = 0
        demands: list[float] = []
        for (_, d), s in self._senders.items():
            if d != direction:
                continue
            elapsed = now - s.since
            if now - s.seen <= self.active_window_s:
                if now - s.backlogged <= self.active_window_s:
                    demands.append(s.rate_Bps)
                else:
                    demands.append(min(s.rate_Bps, s.sent / max(elapsed, self.recompute_s)))
            s.sent, s.since = 0, now
        return fair_level(demands, self.proxy_rate_Bps)

    def beyond_horizon(self, departure: float, now: float) -> bool:
        return departure - now > self.horizon_s

    def prune(self, now: float) -> int:
        """Forget senders quiet for a while (their pacer is in the past anyway)."""
        quiet = [
            key
            for key, s in self._senders.items()
            if now - s.seen > self.active_window_s and s.pacer.last <= now
        ]
        for key in quiet:
            del self._senders[key]
        return len(quiet)


__all__ = [
    "DEFAULT_ACTIVE_WINDOW_S",
    "DEFAULT_HORIZON_S",
    "PACE_SLACK_S",
    "BandwidthShaper",
    "EdtPacer",
    "fair_level",
]
