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

Proxy-wide rate (per direction): the proxy's rate is shared like a
weighted max-min fair link. Every ``recompute_s`` the shaper looks at the
jobs that asked for a departure time within ``active_window_s``:

* a job whose pacer was behind (it offered chunks faster than its rate) is
  *backlogged*: it would take all it may, so it counts with its rate;
* any other job is *light*: it counts with what it actually sent.

The scale is computed again at once when a job becomes backlogged.
If the backlogged rates and the light usage fit in the proxy's rate, every
job gets its own rate; otherwise every job's rate is scaled by
``(proxy_rate - light usage) / backlogged rates``: jobs saturating one proxy
share what the light ones leave in proportion to their rates, and a job that
only trickles (whatever rate its policy grants) takes no share it does not use.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

DEFAULT_HORIZON_S = 0.05
DEFAULT_ACTIVE_WINDOW_S = 0.5


@dataclass(slots=True)
class EdtPacer:
    """One rate's timestamp: ``last`` is the departure time of the latest chunk."""

    last: float = 0.0

    def departure(self, size: int, rate_Bps: float, now: float) -> float:  # noqa: N803 - bytes/s
        start = max(now, self.last)
        self.last = start + size / rate_Bps
        return self.last


#: The smallest scale: a job is slowed to at most 1/1000 of its rate, never stopped.
MIN_SCALE = 0.001


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
    ) -> None:
        if proxy_rate_bps is not None and proxy_rate_bps <= 0:
            raise ValueError("proxy_rate_bps must be positive (None: no proxy-wide rate)")
        if horizon_s <= 0 or active_window_s <= 0:
            raise ValueError("horizon_s and active_window_s must be positive")
        self.proxy_rate_Bps = None if proxy_rate_bps is None else proxy_rate_bps / 8.0
        self.horizon_s = horizon_s
        self.active_window_s = active_window_s
        self.recompute_s = active_window_s / 2
        self._senders: dict[tuple[Hashable, str], _Sender] = {}
        # Per direction: (scale, when it was computed).
        self._scales: dict[str, tuple[float, float]] = {}

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
            if sender.pacer.last > now:
                if now - sender.backlogged > self.active_window_s:
                    # Light -> backlogged: the share changes now, not at the
                    # next recompute (else two newcomers overshoot the proxy's
                    # rate together for up to `recompute_s`).
                    self._scales.pop(direction, None)
                sender.backlogged = now
        sender.sent += size
        return sender.pacer.departure(size, rate_Bps * self.scale(direction, now), now)

    def scale(self, direction: str, now: float) -> float:
        """The factor (at most 1) by which every job's rate in `direction` is scaled now."""
        if self.proxy_rate_Bps is None:
            return 1.0
        cached = self._scales.get(direction)
        if cached is None or now - cached[1] >= self.recompute_s:
            cached = self._scales[direction] = (self._compute_scale(direction, now), now)
        return cached[0]

    def _compute_scale(self, direction: str, now: float) -> float:
        assert self.proxy_rate_Bps is not None
        backlogged = light = 0.0
        for (_, d), s in self._senders.items():
            if d != direction:
                continue
            elapsed = now - s.since
            if now - s.seen <= self.active_window_s:
                if now - s.backlogged <= self.active_window_s:
                    backlogged += s.rate_Bps
                else:
                    light += min(s.rate_Bps, s.sent / max(elapsed, self.recompute_s))
            s.sent, s.since = 0, now
        if backlogged == 0.0 or backlogged + light <= self.proxy_rate_Bps:
            return 1.0
        return max(MIN_SCALE, (self.proxy_rate_Bps - light) / backlogged)

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


__all__ = ["DEFAULT_ACTIVE_WINDOW_S", "DEFAULT_HORIZON_S", "BandwidthShaper", "EdtPacer"]
