"""EDT pacing: exact departures, long-run rates in a simulated relay, proxy-wide sharing."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.limits.pacing import (
    DEFAULT_ACTIVE_WINDOW_S,
    DEFAULT_HORIZON_S,
    PACE_SLACK_S,
    BandwidthShaper,
    EdtPacer,
    fair_level,
)

MBIT = 1_000_000
CHUNK = 16 * 1024


# a relay loop with a fake clock


@dataclass
class Flow:
    """One job's relay in one direction: sends from `start` until `stop`.

    With `period`, the source offers one chunk every `period` seconds (light
    traffic); without, it always has data (the relay reads whenever it may).
    """

    job: Hashable
    rate_bps: int
    direction: str = "up"
    start: float = 0.0
    stop: float = float("inf")
    chunk: int = CHUNK
    period: float | None = None
    last: float | None = None
    departures: list[float] = field(default_factory=list)
    offered_at: float | None = None

    def wants(self, now: float) -> bool:
        if self.period is None:
            return True
        if self.offered_at is None:
            self.offered_at = self.start
        return now >= self.offered_at

    def bytes_between(self, t1: float, t2: float) -> int:
        return self.chunk * sum(1 for d in self.departures if t1 < d <= t2)

    def rate_between(self, t1: float, t2: float) -> float:
        """Bits per second that left in (t1, t2]."""
        return self.bytes_between(t1, t2) * 8 / (t2 - t1)


def relay(shaper: BandwidthShaper, flows: list[Flow], until: float, dt: float = 0.001) -> None:
    """Every `dt`, each sending flow reads and schedules chunks while its latest departure
    is within the horizon (beyond it, the relay stops reading: backpressure)."""
    step = 0
    while (now := step * dt) < until:
        for flow in flows:
            if not flow.start <= now < flow.stop:
                continue
            while flow.wants(now) and (
                flow.last is None or not shaper.beyond_horizon(flow.last, now)
            ):
                flow.last = shaper.departure(
                    flow.job, flow.direction, flow.chunk, rate_bps=flow.rate_bps, now=now
                )
                flow.departures.append(flow.last)
                if flow.period is not None:
                    assert flow.offered_at is not None
                    flow.offered_at += flow.period
        step += 1


def assert_rate(measured: float, expected: float, tolerance: float) -> None:
    assert measured == pytest.approx(expected, rel=tolerance), (measured / MBIT, expected / MBIT)


# EdtPacer


def test_pacer_departure_is_max_of_now_and_last_plus_size_over_rate() -> None:
    pacer = EdtPacer()
    assert pacer.departure(512, 1024.0, now=0.0) == 0.5
    assert pacer.last == 0.5
    assert pacer.departure(512, 1024.0, now=0.25) == 1.0  # queued behind the previous chunk
    assert pacer.departure(256, 1024.0, now=0.25) == 1.25
    assert pacer.departure(1024, 512.0, now=3.0) == 5.0  # quiet: starts from now
    assert pacer.departure(1024, 2048.0, now=5.0) == 5.5  # last == now
    assert pacer.last == 5.5


def test_pacer_does_not_bank_credit_after_idle() -> None:
    pacer = EdtPacer(last=0.0)
    assert pacer.departure(1000, 1000.0, now=0.0) == 1.0
    # 100 s quiet: the next chunks are still spaced by size / rate
    assert pacer.departure(1000, 1000.0, now=101.0) == 102.0
    assert pacer.departure(1000, 1000.0, now=101.0) == 103.0
    assert pacer.departure(1000, 1000.0, now=101.0) == 104.0


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=1 << 20),
            st.floats(min_value=1.0, max_value=1e10),
            st.floats(min_value=0.0, max_value=10.0),
        ),
        max_size=50,
    )
)
def test_pacer_matches_the_formula(chunks: list[tuple[int, float, float]]) -> None:
    pacer = EdtPacer()
    now = last = 0.0
    for size, rate, dt in chunks:
        now += dt
        expected = max(now, last) + size / rate
        got = pacer.departure(size, rate, now)
        assert got == expected
        assert got >= last
        assert got >= now + size / rate
        last = got


# BandwidthShaper: validation and basics


@pytest.mark.parametrize(
    "kwargs",
    [
        {"proxy_rate_bps": 0},
        {"proxy_rate_bps": -1},
        {"horizon_s": 0},
        {"horizon_s": -0.1},
        {"active_window_s": 0},
        {"active_window_s": -1},
        {"slack_s": -0.001},
    ],
)
def test_shaper_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BandwidthShaper(**kwargs)


def test_shaper_defaults() -> None:
    shaper = BandwidthShaper()
    assert shaper.horizon_s == DEFAULT_HORIZON_S
    assert shaper.active_window_s == DEFAULT_ACTIVE_WINDOW_S
    assert shaper.proxy_rate_Bps is None
    assert shaper.slack_s == PACE_SLACK_S
    assert shaper.level("up", 0.0) == math.inf
    assert BandwidthShaper(proxy_rate_bps=8_000).proxy_rate_Bps == 1000.0


def test_shaper_departure_uses_bits_per_second() -> None:
    shaper = BandwidthShaper()
    # 8000 bit/s = 1000 bytes/s
    assert shaper.departure("a", "up", 500, rate_bps=8000, now=10.0) == 10.5
    assert shaper.departure("a", "up", 500, rate_bps=8000, now=10.0) == 11.0
    assert shaper.departure("a", "up", 250, rate_bps=8000, now=10.75) == 11.25


def test_shaper_no_credit_banking_after_idle() -> None:
    shaper = BandwidthShaper()
    assert shaper.departure("a", "up", 1000, rate_bps=8000, now=0.0) == 1.0
    assert shaper.departure("a", "up", 1000, rate_bps=8000, now=50.0) == 51.0
    assert shaper.departure("a", "up", 1000, rate_bps=8000, now=50.0) == 52.0


def test_shaper_no_burst_after_idle_in_a_relay() -> None:
    shaper = BandwidthShaper()
    first = Flow("a", 8 * MBIT, start=0.0, stop=1.0)
    second = Flow("a", 8 * MBIT, start=6.0, stop=8.0)
    relay(shaper, [first], until=1.0)
    relay(shaper, [second], until=8.0)
    # in the first 100 ms after the idle, no more than the rate's share (plus the horizon's
    # chunks that leave within it)
    burst = second.bytes_between(6.0, 6.1) * 8
    assert burst <= 8 * MBIT * 0.1 + CHUNK * 8
    assert_rate(second.rate_between(6.0, 8.0), 8 * MBIT, 0.01)
    assert min(second.departures) > 6.0


def test_directions_are_independent() -> None:
    shaper = BandwidthShaper()
    up = shaper.departure("a", "up", 100_000, rate_bps=8000, now=0.0)
    assert up == 100.0
    assert shaper.departure("a", "down", 1000, rate_bps=8000, now=0.0) == 1.0
    assert shaper.departure("a", "up", 1000, rate_bps=8000, now=0.0) == 101.0
    assert shaper.departure("b", "up", 1000, rate_bps=8000, now=0.0) == 1.0  # jobs too


def test_beyond_horizon_is_strict() -> None:
    shaper = BandwidthShaper(horizon_s=0.25)
    assert not shaper.beyond_horizon(1.25, now=1.0)
    assert shaper.beyond_horizon(1.2500001, now=1.0)
    assert not shaper.beyond_horizon(0.5, now=1.0)  # in the past
    default = BandwidthShaper()
    assert not default.beyond_horizon(10.0 + DEFAULT_HORIZON_S / 2, now=10.0)
    assert default.beyond_horizon(10.0 + DEFAULT_HORIZON_S * 2, now=10.0)


# long-run rates in a simulated relay


@pytest.mark.parametrize("rate_mbit", [1, 10, 30, 100])
def test_long_run_rate_equals_the_rate(rate_mbit: int) -> None:
    shaper = BandwidthShaper()
    flow = Flow("a", rate_mbit * MBIT)
    relay(shaper, [flow], until=10.0)
    assert_rate(flow.rate_between(0.0, 10.0), rate_mbit * MBIT, 0.01)
    # chunks are evenly spaced: no two leave closer than size / rate
    gaps = [b - a for a, b in zip(flow.departures, flow.departures[1:], strict=False)]
    assert min(gaps) == pytest.approx(CHUNK * 8 / (rate_mbit * MBIT))
    # and nothing was scheduled further ahead than the horizon plus one chunk
    assert max(flow.departures) <= 10.0 + DEFAULT_HORIZON_S + CHUNK * 8 / (rate_mbit * MBIT)


def test_long_run_rate_with_small_odd_chunks() -> None:
    shaper = BandwidthShaper(horizon_s=0.02)
    flow = Flow("a", 3 * MBIT, chunk=1337)
    relay(shaper, [flow], until=10.0, dt=0.0007)
    assert_rate(flow.rate_between(0.0, 10.0), 3 * MBIT, 0.01)


def test_rate_change_applies_from_the_next_chunk() -> None:
    shaper = BandwidthShaper()
    slow = Flow("a", 4 * MBIT, stop=5.0)
    fast = Flow("a", 12 * MBIT, start=5.0)
    relay(shaper, [slow, fast], until=10.0)
    assert_rate(slow.rate_between(0.0, 5.0), 4 * MBIT, 0.01)
    assert_rate(fast.rate_between(5.5, 10.0), 12 * MBIT, 0.01)


def test_two_jobs_without_proxy_rate_each_get_their_own() -> None:
    shaper = BandwidthShaper()
    a, b = Flow("a", 30 * MBIT), Flow("b", 10 * MBIT)
    relay(shaper, [a, b], until=10.0)
    assert_rate(a.rate_between(0.0, 10.0), 30 * MBIT, 0.01)
    assert_rate(b.rate_between(0.0, 10.0), 10 * MBIT, 0.01)


# proxy-wide rate: behaviour in a relay (rates measured after the first recompute periods)

WARM = 1.0  # measure from here: the first recompute_s run unscaled, by design


@pytest.mark.parametrize(
    ("proxy_mbit", "rates_mbit", "shares_mbit"),
    [
        # both ask more than an equal share: an equal share each, whatever their rates
        (20, [30, 15], [10, 10]),
        # one asks less: its rate; the other the rest
        (20, [30, 4], [16, 4]),
        # 100 Gbit/s next to 8 Mbit/s: in proportion to the rates, 8 would get 1.3 kbit/s
        (16, [100_000, 8], [8, 8]),
        (20, [10, 10, 10, 10], [5, 5, 5, 5]),
    ],
)
def test_proxy_rate_shared_max_min_fair(
    proxy_mbit: int, rates_mbit: list[int], shares_mbit: list[int]
) -> None:
    shaper = BandwidthShaper(proxy_rate_bps=proxy_mbit * MBIT)
    flows = [Flow(job, rate * MBIT) for job, rate in enumerate(rates_mbit)]
    relay(shaper, flows, until=WARM + 5.0)
    for flow, share in zip(flows, shares_mbit, strict=True):
        assert_rate(flow.rate_between(WARM, WARM + 5.0), share * MBIT, 0.02)
    total = sum(flow.bytes_between(WARM, WARM + 5.0) for flow in flows)
    assert total * 8 / 5.0 <= proxy_mbit * MBIT * 1.01
    assert shaper.level("up", WARM + 5.0) == pytest.approx(max(shares_mbit) * MBIT / 8)


def test_a_job_granted_more_than_the_proxy_bursts_at_most_one_period() -> None:
    # Its reads come one chunk a tick, each nanoseconds behind its own 100 Gbit/s pacer:
    # never backlogged, so only the bytes it asked for make the level hold it.
    shaper = BandwidthShaper(proxy_rate_bps=16 * MBIT)
    hog = Flow("hog", 100_000 * MBIT, period=0.0005)  # 262 Mbit/s offered
    relay(shaper, [hog], until=3.0)
    proxy_Bps = 16 * MBIT / 8  # noqa: N806 - bytes/s
    assert hog.bytes_between(0.0, 1.0) <= proxy_Bps * (1.0 + shaper.recompute_s) + CHUNK
    assert_rate(hog.rate_between(WARM, 3.0), 16 * MBIT, 0.02)


def test_proxy_rate_above_the_jobs_needs_changes_nothing() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    a = Flow("a", 10 * MBIT)
    relay(shaper, [a], until=10.0)
    assert_rate(a.rate_between(0.0, 10.0), 10 * MBIT, 0.01)
    assert shaper.level("up", 10.0) == math.inf
    # exactly the proxy rate: still no level
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    a, b = Flow("a", 10 * MBIT), Flow("b", 10 * MBIT)
    relay(shaper, [a, b], until=WARM + 5.0)
    assert_rate(a.rate_between(0.0, WARM + 5.0), 10 * MBIT, 0.01)
    assert_rate(b.rate_between(0.0, WARM + 5.0), 10 * MBIT, 0.01)
    assert shaper.level("up", WARM + 5.0) == math.inf


def test_one_job_above_the_proxy_rate_gets_the_proxy_rate() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    a = Flow("a", 30 * MBIT)
    relay(shaper, [a], until=WARM + 10.0)
    assert_rate(a.rate_between(WARM, WARM + 10.0), 20 * MBIT, 0.01)


def test_proxy_rate_is_per_direction() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    up_a, up_b = Flow("a", 30 * MBIT, "up"), Flow("b", 6 * MBIT, "up")
    down_a = Flow("a", 15 * MBIT, "down")
    relay(shaper, [up_a, up_b, down_a], until=WARM + 10.0)
    assert_rate(up_a.rate_between(WARM, WARM + 10.0), 14 * MBIT, 0.02)
    assert_rate(up_b.rate_between(WARM, WARM + 10.0), 6 * MBIT, 0.02)
    assert_rate(down_a.rate_between(0.0, WARM + 10.0), 15 * MBIT, 0.01)
    assert shaper.level("down", WARM + 10.0) == math.inf


def test_a_trickling_job_takes_no_share_it_does_not_use() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    hog = Flow("hog", 30 * MBIT)
    # policy rate 10 Mbit/s, but it offers only 2 Mbit/s
    trickle = Flow("trickle", 10 * MBIT, period=CHUNK * 8 / (2 * MBIT))
    relay(shaper, [hog, trickle], until=WARM + 10.0)
    assert_rate(trickle.rate_between(WARM, WARM + 10.0), 2 * MBIT, 0.02)
    assert_rate(hog.rate_between(WARM, WARM + 10.0), 18 * MBIT, 0.02)


def test_small_answers_under_a_huge_rate_take_no_share() -> None:
    # 100 Gbit/s granted; four connections answer 500 bytes each in the same loop tick (one
    # `now`) every 80 ms: 0.2 Mbit/s. The pacer is ahead of now by nanoseconds (under no
    # level) or 0.8 ms (under the hog's level): not a backlog, so no share is kept for it.
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    hog = Flow("hog", 30 * MBIT)
    answers = [Flow("answers", 100_000 * MBIT, chunk=500, period=0.08) for _ in range(4)]
    relay(shaper, [hog, *answers], until=WARM + 10.0)
    used = sum(flow.rate_between(WARM, WARM + 10.0) for flow in answers)
    assert_rate(used, 0.2 * MBIT, 0.02)
    assert_rate(hog.rate_between(WARM, WARM + 10.0), 19.8 * MBIT, 0.02)


def test_a_light_job_offering_more_than_its_share_gets_its_share() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    hog = Flow("hog", 30 * MBIT)
    # offers 12 Mbit/s of its 15: more than an equal share (10)
    light = Flow("light", 15 * MBIT, period=CHUNK * 8 / (12 * MBIT))
    relay(shaper, [hog, light], until=WARM + 10.0)
    assert_rate(hog.rate_between(WARM, WARM + 10.0), 10 * MBIT, 0.02)
    assert_rate(light.rate_between(WARM, WARM + 10.0), 10 * MBIT, 0.02)


def test_three_jobs_backlogged_and_light() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    a, b = Flow("a", 30 * MBIT), Flow("b", 5 * MBIT)
    trickle = Flow("t", 10 * MBIT, period=CHUNK * 8 / (2 * MBIT))
    relay(shaper, [a, b, trickle], until=WARM + 10.0)
    # the trickle uses 2, b its 5; a gets the other 13
    assert_rate(trickle.rate_between(WARM, WARM + 10.0), 2 * MBIT, 0.02)
    assert_rate(b.rate_between(WARM, WARM + 10.0), 5 * MBIT, 0.02)
    assert_rate(a.rate_between(WARM, WARM + 10.0), 13 * MBIT, 0.02)


def test_a_job_that_stops_sending_stops_counting_after_the_window() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    window, recompute = shaper.active_window_s, shaper.recompute_s
    assert (window, recompute) == (DEFAULT_ACTIVE_WINDOW_S, DEFAULT_ACTIVE_WINDOW_S / 2)
    a, b = Flow("a", 30 * MBIT), Flow("b", 15 * MBIT, stop=5.0)
    relay(shaper, [a, b], until=12.0)
    assert_rate(a.rate_between(WARM, 5.0), 10 * MBIT, 0.02)
    assert_rate(b.rate_between(WARM, 5.0), 10 * MBIT, 0.02)
    # b still counts within the window after its last request (what a has queued within the
    # horizon was paced at the old share)
    assert_rate(a.rate_between(5.0 + DEFAULT_HORIZON_S, 5.0 + window), 10 * MBIT, 0.05)
    # once it is out of the window, at the next recompute, a alone gets the proxy rate (its
    # own, 30, is more)
    after = 5.0 + window + recompute + DEFAULT_HORIZON_S
    assert_rate(a.rate_between(after, 12.0), 20 * MBIT, 0.01)


def test_a_newcomer_gets_its_share_and_the_others_make_room() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=20 * MBIT)
    a, b = Flow("a", 30 * MBIT), Flow("b", 15 * MBIT, start=3.0)
    relay(shaper, [a, b], until=13.0)
    assert_rate(a.rate_between(WARM, 3.0), 20 * MBIT, 0.01)
    assert_rate(a.rate_between(4.0, 13.0), 10 * MBIT, 0.02)
    assert_rate(b.rate_between(4.0, 13.0), 10 * MBIT, 0.02)


# fair_level: the max-min level of a list of demands


def test_fair_level_examples() -> None:
    assert fair_level([], 10.0) == math.inf
    assert fair_level([4.0, 6.0], 10.0) == math.inf  # they fit exactly
    assert fair_level([30.0, 15.0], 20.0) == 10.0
    assert fair_level([30.0, 4.0], 20.0) == 16.0
    assert fair_level([30.0, 5.0, 2.0], 20.0) == 13.0
    assert fair_level([1e10, 1e6], 2e6) == 1e6


@given(
    st.lists(st.floats(min_value=0.0, max_value=1e12), max_size=12),
    st.floats(min_value=1.0, max_value=1e12),
)
def test_fair_level_fills_the_capacity_and_never_below_an_equal_share(
    demands: list[float], capacity: float
) -> None:
    level = fair_level(demands, capacity)
    if sum(demands) <= capacity:
        assert level == math.inf
        return
    assert sum(min(d, level) for d in demands) == pytest.approx(capacity, rel=1e-9)
    assert level >= capacity / len(demands) * (1 - 1e-12)
    # nobody that asked less than the level is cut
    assert all(min(d, level) == d for d in demands if d < level)


# proxy-wide rate: the level, call by call (exact fake times)


def backlog(shaper: BandwidthShaper, job: str, now: float, rate_bps: int = 8000) -> float:
    """Two chunks at once: the second finds the pacer behind (the job is backlogged)."""
    shaper.departure(job, "up", 1000, rate_bps=rate_bps, now=now)
    return shaper.departure(job, "up", 1000, rate_bps=rate_bps, now=now)


def test_the_level_is_recomputed_when_a_job_becomes_backlogged() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)  # 1000 B/s
    assert shaper.recompute_s == 0.25
    backlog(shaper, "a", 0.0)
    assert shaper.level("up", 0.0) == math.inf  # a alone, at the proxy's rate
    backlog(shaper, "b", 0.0)
    # b's backlog is news: a and b, both at 1000 B/s, share 1000 B/s at once
    assert shaper.level("up", 0.0) == 500.0


def test_a_pacer_ahead_by_no_more_than_the_slack_is_not_a_backlog() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)  # 1000 B/s
    backlog(shaper, "a", 0.0)
    assert shaper.level("up", 0.0) == math.inf
    # b's two chunks leave 2 ms apart (1 byte at 500 B/s): exactly the slack, no news
    shaper.departure("b", "up", 1, rate_bps=4000, now=0.0)
    shaper.departure("b", "up", 1, rate_bps=4000, now=0.0)
    assert shaper.level("up", 0.0) == math.inf
    shaper.departure("b", "up", 1, rate_bps=4000, now=0.0)  # now 4 ms ahead: backlogged
    assert shaper.level("up", 0.0) == 500.0


def test_the_level_is_recomputed_every_recompute_s() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)  # 1000 B/s
    backlog(shaper, "a", 0.0)
    backlog(shaper, "b", 0.0)
    assert shaper.level("up", 0.0) == 500.0
    # b stops; a goes on (still backlogged, no news): cached until recompute_s
    backlog(shaper, "a", 0.2)
    assert shaper.level("up", 0.2499) == 500.0
    # b's last request is 0.5 s old at 0.5: b no longer counts
    backlog(shaper, "a", 0.51)
    assert shaper.level("up", 0.51) == math.inf


def test_a_light_job_counts_with_what_it_sent_not_its_rate() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)  # 1000 B/s
    shaper.level("up", 0.0)  # the first computation, with nobody
    backlog(shaper, "hog", 0.0, rate_bps=16_000)  # 2000 B/s, backlogged
    # 'light' may send 100_000 B/s but sends 25 bytes every 0.1 s, never behind
    for now in (0.0, 0.1, 0.2):
        shaper.departure("light", "up", 25, rate_bps=800_000, now=now)
    backlog(shaper, "hog", 0.25, rate_bps=16_000)
    # light: 75 bytes / 0.25 s = 300 B/s; the hog gets the other 700
    assert shaper.level("up", 0.25) == pytest.approx(1000 - 300)


def test_a_backlogged_job_gets_an_equal_share_however_much_the_light_ones_sent() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)  # 1000 B/s
    shaper.level("up", 0.0)
    backlog(shaper, "hog", 0.0, rate_bps=16_000)  # 2000 B/s, backlogged
    # a light job sent 6000 B/s, more than the proxy's rate (before any level held it)
    for now in (0.0, 0.1, 0.2):
        shaper.departure("light", "up", 500, rate_bps=80_000, now=now)
    shaper.departure("hog", "up", 10, rate_bps=16_000, now=0.25)
    assert shaper.level("up", 0.25) == 500.0
    # both are held to it from now on: the light one too
    first = shaper.departure("light", "up", 500, rate_bps=80_000, now=0.25)
    assert shaper.departure("light", "up", 500, rate_bps=80_000, now=0.25) - first == 1.0


def test_a_job_quiet_beyond_the_window_does_not_count_even_with_bytes_since_last_look() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)  # 1000 B/s
    shaper.level("up", 0.0)
    shaper.departure("light", "up", 900, rate_bps=800_000, now=0.1)  # then quiet
    backlog(shaper, "hog", 0.1, rate_bps=16_000)  # 2000 B/s
    # nobody looks at the level until 0.7: light's 900 bytes were sent 0.6 s ago
    backlog(shaper, "hog", 0.7, rate_bps=16_000)
    assert shaper.level("up", 0.7) == 1000.0


@pytest.mark.parametrize("phase", [0.0, 0.05, 0.1, 0.2, 0.249])
def test_a_stopped_job_stops_counting_within_window_plus_recompute(phase: float) -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)
    window, recompute = 0.5, 0.25
    # both backlogged, with the recomputations falling at `phase` + k * recompute
    now = phase
    shaper.level("up", now)
    while now < 2.0:
        backlog(shaper, "a", now)
        backlog(shaper, "b", now)
        now += 0.01
    stopped = now - 0.01  # b's last request
    assert shaper.level("up", stopped) == 500.0
    while now <= stopped + window + recompute + 0.01:
        backlog(shaper, "a", now)
        if now - stopped <= window:
            assert shaper.level("up", now) == 500.0, now  # b still counts
        now += 0.01
    assert shaper.level("up", now) == math.inf  # a alone fits the proxy rate


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["up", "down"]),
            st.sampled_from([8_000, 16_000, 80_000]),
            st.integers(min_value=1, max_value=5_000),
            st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.24, 0.25, 0.26, 0.5, 0.51, 1.0]),
        ),
        max_size=80,
    ),
    st.sampled_from([None, 8_000, 24_000]),
)
def test_departures_follow_the_formula_at_the_current_level(
    ops: list[tuple[str, str, int, int, float]], proxy_rate_bps: int | None
) -> None:
    shaper = BandwidthShaper(proxy_rate_bps=proxy_rate_bps, active_window_s=0.5)
    computed: dict[str, tuple[float, float]] = {}  # direction -> (level, when)
    last: dict[tuple[str, str], float] = {}
    behind_at: dict[tuple[str, str], float] = {}  # when each sender was last found behind
    asked: dict[str, int] = {}  # bytes of light senders since the level was computed
    now = 0.0
    for job, direction, rate_bps, size, dt in ops:
        now += dt
        key = (job, direction)
        became_backlogged = False
        if last.get(key, now) - now > PACE_SLACK_S:
            became_backlogged = now - behind_at.get(key, -math.inf) > shaper.active_window_s
            behind_at[key] = now
        over = False
        if proxy_rate_bps is not None and now - behind_at.get(key, -math.inf) > 0.5:
            asked[direction] = asked.get(direction, 0) + size
            over = asked[direction] > proxy_rate_bps / 8 * shaper.recompute_s
        got = shaper.departure(job, direction, size, rate_bps=rate_bps, now=now)
        level = shaper.level(direction, now)  # the one this departure used
        if proxy_rate_bps is None:
            assert level == math.inf
        else:
            # never below an equal share of the proxy among the senders of this direction
            senders = {k for k in last if k[1] == direction} | {key}
            assert level >= proxy_rate_bps / 8 / len(senders) * (1 - 1e-9)
        # the level changes only once recompute_s has passed since it was computed,
        # when a sender has just become backlogged, or when light senders asked for
        # more than the proxy carries in recompute_s
        previous = computed.get(direction)
        if (
            previous is not None
            and now - previous[1] < shaper.recompute_s
            and not became_backlogged
            and not over
        ):
            assert level == previous[0]
        else:
            computed[direction] = (level, now)
            asked[direction] = 0
        start = max(now, last.get((job, direction), now))
        assert got == pytest.approx(start + size / min(rate_bps / 8, level))
        last[(job, direction)] = got


# prune


def test_prune_forgets_quiet_senders_whose_pacer_is_past() -> None:
    shaper = BandwidthShaper(active_window_s=0.5)
    shaper.departure("a", "up", 1000, rate_bps=8000, now=0.0)  # departs at 1.0
    shaper.departure("b", "up", 10_000, rate_bps=8000, now=0.0)  # departs at 10.0
    shaper.departure("a", "down", 1000, rate_bps=8000, now=0.9)  # active at 1.2
    assert shaper.prune(0.5) == 0  # within the window
    assert shaper.prune(1.2) == 1  # ("a", "up"); ("b", "up") still ahead, ("a", "down") active
    assert set(shaper._senders) == {("b", "up"), ("a", "down")}
    assert shaper.prune(9.999) == 1  # ("a", "down")
    assert shaper.prune(10.0) == 1
    assert shaper._senders == {}
    # a pruned sender starts afresh, without memory (and without credit)
    assert shaper.departure("a", "up", 1000, rate_bps=8000, now=20.0) == 21.0


def test_pruned_senders_do_not_count() -> None:
    shaper = BandwidthShaper(proxy_rate_bps=8000, active_window_s=0.5)
    shaper.level("up", 0.0)
    backlog(shaper, "a", 0.0)
    backlog(shaper, "b", 0.0)
    backlog(shaper, "a", 0.25)
    assert shaper.level("up", 0.25) == 500.0
    assert shaper.prune(5.0) == 1  # b; a's pacer is still ahead (at half its rate)
    assert shaper.prune(20.0) == 1
    backlog(shaper, "a", 20.0)
    backlog(shaper, "a", 20.25)
    assert shaper.level("up", 20.25) == math.inf
