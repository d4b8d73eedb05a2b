"""From an observed run to its verdicts (no fleet: hand-made observations)."""

from __future__ import annotations

from egressd_harness.loadtest import assess as a
from egressd_harness.loadtest import results as r
from egressd_harness.loadtest.scenarios import BASELINE, STRESS, build

PROXIES = ["proxy1", "proxy2"]


def _scrape(lines: list[str]) -> r.Scrape:
    head = [
        "# TYPE egressd_limit_refusals_total counter",
        "# TYPE egressd_job_connections gauge",
        "# TYPE egressd_job_source_ports gauge",
        "# TYPE egressd_job_bytes_total counter",
        "# TYPE egressd_connections_active gauge",
    ]
    return r.parse_metrics("\n".join(head + lines) + "\n")


def _stats(name: str, requests: int, p99: float, failures: int = 0) -> r.RequestStats:
    return r.RequestStats(name, "GET", requests, failures, 5.0, 60.0, 10.0, {50.0: 5.0, 99.0: p99})


def _fleet_ok(obs: a.Observed) -> None:
    obs.alive = dict.fromkeys(PROXIES, True)
    obs.active_after = dict.fromkeys(PROXIES, 0.0)
    obs.log_components = [*PROXIES, "node1", "node2"]


def test_port_exhaustion_verdicts() -> None:
    scenario = build(
        "port-exhaustion", 30
    )  # baseline [0, 7), stress [7, 14), settle, ... stress [22, 29)
    obs = a.Observed(proxies=PROXIES, job_ids={"attacker": "A", "victim": "B"}, schedule_t0=1000.0)
    obs.stats = {
        BASELINE: {"victim": _stats("v [baseline]", 150, 20.0)},
        STRESS: {"victim": _stats("v [stress]", 150, 30.0)},
    }
    obs.totals = {"victim": _stats("Aggregated", 320, 25.0)}
    obs.summaries = {
        "attacker": {
            "attacker": {
                "held_max": 48,
                "attempts": 900,
                "held": 48,
                "reset": 852,
                "held_series": [
                    [1001.0, 0],
                    [1008.0, 30],
                    [1010.0, 48],
                    [1014.5, 0],
                    [1023.0, 47],
                    [1031.0, 0],
                ],
            }
        }
    }
    for p in PROXIES:
        obs.before[p] = _scrape([])
        obs.after[p] = _scrape(
            ['egressd_limit_refusals_total{job_id="A",reason="port_budget_exhausted"} 400']
        )
        obs.gauges.update(
            p,
            _scrape(
                [
                    'egressd_job_source_ports{job_id="A",destination="203.0.113.10:80/tcp"} 24',
                    'egressd_job_connections{job_id="A"} 24',
                    'egressd_job_connections{job_id="B"} 2',
                ]
            ),
        )
    _fleet_ok(obs)
    verdicts = a.assess(scenario, obs)
    assert [x.name for x in verdicts] == [
        "attacker_within_budget",
        "attacker_held_at_budget",
        "victim_no_failures",
        "victim_p99",
        "proxies_alive",
        "connections_released",
        "logs_clean",
    ]
    assert all(x.passed for x in verdicts), [x for x in verdicts if not x.passed]
    held = verdicts[1]
    assert (
        "in each of 2 stress windows at least 47" in held.measured
        and "port_budget_exhausted 800" in held.measured
    )
    assert obs.refusals("victim") == {"proxy1": {}, "proxy2": {}}
    doc = obs.to_dict()
    assert doc["limit_refusals"]["attacker"]["proxy1"] == {"port_budget_exhausted": 400.0}


def test_without_the_limit_metrics_the_attacker_verdicts_fail() -> None:
    scenario = build("port-exhaustion", 30)
    obs = a.Observed(proxies=PROXIES, job_ids={"attacker": "A", "victim": "B"})
    obs.summaries = {"attacker": {"attacker": {"held_max": 200, "attempts": 200, "held": 200}}}
    for p in PROXIES:
        obs.before[p] = obs.after[p] = r.parse_metrics("egressd_connections_active 0\n")
        obs.gauges.update(p, obs.after[p])
    verdicts = {x.name: x for x in a.assess(scenario, obs)}
    assert not verdicts["attacker_within_budget"].passed
    assert "no egressd_job_source_ports" in verdicts["attacker_within_budget"].detail
    assert not verdicts["attacker_held_at_budget"].passed
    assert obs.refusals("victim") is None


def test_hog_rate_uses_the_proxies_that_carried_it() -> None:
    scenario = build("bandwidth", 30)  # baseline [0, 14.5), stress [14.5, 29), settle [29, 30)
    obs = a.Observed(proxies=PROXIES, job_ids={"hog": "H", "steady": "S"}, schedule_t0=1000.0)
    # 4 MB/s: one proxy's share of 64 Mbit/s.
    obs.summaries = {
        "hog": {"hog": {"bytes_per_second": {str(t): 4_000_000 for t in range(1015, 1030)}}}
    }
    obs.before = {p: _scrape([]) for p in PROXIES}
    obs.after = {
        "proxy1": _scrape(['egressd_job_bytes_total{job_id="H",direction="down"} 6e7']),
        "proxy2": _scrape(
            [
                'egressd_job_bytes_total{job_id="H",direction="down"} 1e5',
                'egressd_job_bytes_total{job_id="H",direction="up"} 1e9',
            ]
        ),
    }
    assert a.hog_busy(obs) == (["proxy1"], True)
    obs.stats = {
        BASELINE: {"steady": _stats("s [baseline]", 75, 10.0)},
        STRESS: {"steady": _stats("s [stress]", 75, 15.0)},
    }
    _fleet_ok(obs)
    verdicts = {x.name: x for x in a.assess(scenario, obs)}
    assert verdicts["hog_rate"].passed, verdicts["hog_rate"]
    assert "over 11 s" in verdicts["hog_rate"].measured
    assert verdicts["steady_p99"].passed and verdicts["steady_no_failures"].passed


def test_hog_without_job_bytes_assumes_every_proxy() -> None:
    scenario = build("bandwidth", 30)
    obs = a.Observed(proxies=PROXIES, job_ids={"hog": "H", "steady": "S"}, schedule_t0=1000.0)
    obs.summaries = {
        "hog": {"hog": {"bytes_per_second": {str(t): 8_000_000 for t in range(1015, 1030)}}}
    }
    assert a.hog_busy(obs) == (PROXIES, False)
    verdicts = {x.name: x for x in a.assess(scenario, obs)}
    assert verdicts["hog_rate"].passed and "assumed every proxy" in verdicts["hog_rate"].detail


def test_steady_scenario_verdicts() -> None:
    scenario = build("steady", 20)
    obs = a.Observed(proxies=PROXIES, job_ids={"steady": "S"})
    obs.stats = {STRESS: {"steady": _stats("s [stress]", 780, 15.0)}}
    _fleet_ok(obs)
    names = [x.name for x in a.assess(scenario, obs)]
    assert names == [
        "steady_no_failures",
        "steady_throughput",
        "proxies_alive",
        "connections_released",
        "logs_clean",
    ]
    assert all(x.passed for x in a.assess(scenario, obs))


def test_held_per_window() -> None:
    series = [[10.0, 5], [12.0, 9], [20.0, 3], [25.0, 7], [31.0, 50]]
    assert a.held_per_window(series, [(10.0, 20.0), (20.0, 30.0), (40.0, 50.0)]) == [9, 7, 0]
