"""Scenarios: jobs, limits, windows and the schedule the locustfile reads."""

from __future__ import annotations

import itertools

import pytest

from egressd_harness.loadtest import scenarios as sc


def test_port_exhaustion_has_an_attacker_and_a_victim_on_different_nodes() -> None:
    s = sc.build("port-exhaustion", 45)
    attacker, victim = s.job("attacker"), s.job("victim")
    assert attacker.abusive and not victim.abusive
    assert s.abusive is attacker and s.well_behaved is victim
    assert attacker.user_class == "PortExhaustionAttacker" and victim.user_class == "Victim"
    assert attacker.node != victim.node
    # The attacker tries to hold far more than its budget, at a bounded rate.
    budget = sc.attack_budget_per_proxy(attacker.limits, 2) * 2
    assert int(attacker.env["EGRESSD_LT_ATTACK_TARGET"]) > 2 * budget
    assert int(attacker.env["EGRESSD_LT_ATTACK_RATE"]) <= 100
    with pytest.raises(KeyError):
        s.job("hog")


def test_policy_payload() -> None:
    job = sc.build("bandwidth", 30).job("hog")
    payload = job.policy("0f0e5d1c-0000-4000-8000-000000000001")
    assert payload["nodes"] == [job.node]
    assert payload["egress"] == [{"host": sc.SITE, "ports": [sc.HTTP_PORT]}]
    assert payload["limits"]["bandwidth_bps"] == 64_000_000
    assert set(payload["limits"]) == {
        "max_connections",
        "max_new_connections_per_s",
        "ports_per_destination",
        "bandwidth_bps",
        "dns_queries_per_s",
    }
    # A well-behaved job's DNS (a query or two per request) is far below its limit.
    assert payload["limits"]["dns_queries_per_s"] >= 500


def test_share_and_budget() -> None:
    assert sc.share(128, 2) == 64 and sc.share(5, 2) == 3 and sc.share(7, 1) == 7
    with pytest.raises(ValueError):
        sc.share(1, 0)
    limits = {"ports_per_destination": 24, "max_connections": 128}
    assert sc.attack_budget_per_proxy(limits, 2) == 24
    assert sc.attack_budget_per_proxy({**limits, "max_connections": 30}, 2) == 15


@pytest.mark.parametrize(
    ("duration", "target", "cycles"),
    [(30, 10, 1), (45, 10, 2), (60, 10, 2), (300, 10, 14), (40, 5, 3), (300, 5, 27), (5, 5, 1)],
)
def test_windows_alternate_and_cover_the_duration(
    duration: float, target: float, cycles: int
) -> None:
    windows = sc.alternating(duration, target)
    assert len(windows) == 3 * cycles
    assert [w.phase for w in windows] == [sc.BASELINE, sc.STRESS, sc.SETTLE] * cycles
    assert windows[0].start == 0 and windows[-1].end == pytest.approx(duration, abs=0.01)
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    lengths = [w.seconds for w in windows if w.phase != sc.SETTLE]
    assert max(lengths) - min(lengths) < 0.01
    assert all(w.seconds == sc.SETTLE_S for w in windows if w.phase == sc.SETTLE)


def test_steady_is_one_window() -> None:
    s = sc.build("steady", 20)
    assert [(w.start, w.end, w.phase) for w in s.windows] == [(0.0, 20, sc.STRESS)]
    assert s.phases == (sc.STRESS,) and s.abusive is None


def test_schedule_round_trip() -> None:
    s = sc.build("bandwidth", 30)
    text = s.schedule(1000.0)
    assert text == "1000.000:baseline,1014.500:stress,1029.000:settle,1030.000:end"
    assert len(sc.build("port-exhaustion", 40).windows) == 9
    schedule = sc.parse_schedule(text)
    assert sc.phase_at(schedule, 999.9) == sc.WARMUP
    assert sc.phase_at(schedule, 1000.0) == sc.BASELINE
    assert sc.phase_at(schedule, 1020.0) == sc.STRESS
    assert sc.phase_at(schedule, 1029.5) == sc.SETTLE
    assert sc.phase_at(schedule, 1030.0) == sc.END


@pytest.mark.parametrize(
    "text", ["", "1:baseline", "2:baseline,1:end", "x:baseline,2:end", "1baseline,2:end"]
)
def test_bad_schedules(text: str) -> None:
    with pytest.raises(ValueError):
        sc.parse_schedule(text)


@pytest.mark.parametrize(
    ("name", "duration"),
    [
        ("nope", 60),
        ("port-exhaustion", 29),
        ("bandwidth", 3601),
        ("steady", 9),
        ("steady", float("nan")),
        ("steady", float("inf")),
    ],
)
def test_bad_durations_and_names(name: str, duration: float) -> None:
    with pytest.raises(sc.ScenarioError):
        sc.build(name, duration)


def test_to_dict() -> None:
    doc = sc.build("bandwidth", 40).to_dict()
    assert doc["name"] == "bandwidth" and len(doc["jobs"]) == 2 and len(doc["windows"]) == 3
