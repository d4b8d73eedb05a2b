"""Verdicts, the table and the JSON document."""

from __future__ import annotations

import json

import pytest

from egressd_harness.loadtest import verdicts as v
from egressd_harness.loadtest.results import LogProblem, RequestStats


def _stats(requests: int = 100, failures: int = 0, p99: float | None = 20.0) -> RequestStats:
    return RequestStats("x", "GET", requests, failures, 10.0, 50.0, 10.0, {50.0: 10.0, 99.0: p99})


def _attack(**over: object) -> v.AttackObservation:
    base: dict[str, object] = dict(
        proxies=["proxy1", "proxy2"],
        ports_per_destination=24,
        connection_share=64,
        held_max=48,
        held_per_window=[48, 48],
        attempts=1000,
        outcomes={"held": 48, "reset": 952},
        source_ports_max={"proxy1": 24, "proxy2": 24},
        connections_max={"proxy1": 25, "proxy2": 24},
        refusals={"proxy1": {"port_budget_exhausted": 300.0}, "proxy2": {"job_rate_limit": 200.0}},
        audit_denials={"port_budget_exhausted": 300, "job_rate_limit": 200},
    )
    base.update(over)
    return v.AttackObservation(**base)  # type: ignore[arg-type]


def test_attacker_at_its_budget_passes() -> None:
    within, held = v.attacker_verdicts(_attack())
    assert within.passed and held.passed
    assert "job_rate_limit 200, port_budget_exhausted 300" in held.measured
    assert _attack().budget_total == 48


@pytest.mark.parametrize(
    ("over", "which"),
    [
        ({"source_ports_max": {"proxy1": 25, "proxy2": 24}}, 0),  # over the port budget
        ({"connections_max": {"proxy1": 65, "proxy2": 1}}, 0),  # over its connection share
        ({"source_ports_max": {"proxy1": None, "proxy2": 24}}, 0),  # the proxy exports nothing
        ({"held_max": 49}, 0),  # the client held more than the fleet's budget
        ({"held_max": 40}, 1),  # never pressed against the limit
        (
            {"refusals": {}, "audit_denials": {}},
            1,
        ),  # nothing refused it: not the limit that held it
        ({"refusals": {"proxy1": {"made_up": 3.0}}}, 1),
    ],
)
def test_attacker_failures(over: dict[str, object], which: int) -> None:
    results = v.attacker_verdicts(_attack(**over))
    assert not results[which].passed and results[which].detail
    assert results[1 - which].passed


def test_audit_denials_alone_count_as_refusals() -> None:
    _, held = v.attacker_verdicts(_attack(refusals={}))
    assert held.passed


def test_failures_verdict() -> None:
    ok = v.failures_verdict("victim", {"baseline": _stats(), "stress": _stats()}, 0.0, _stats(300))
    assert ok.passed and ok.name == "victim_no_failures"
    assert not v.failures_verdict("victim", {"stress": _stats(failures=1)}, 0.0).passed
    assert not v.failures_verdict("victim", {"stress": _stats(requests=0)}, None).passed
    assert not v.failures_verdict("victim", {"stress": None}, None).passed
    assert not v.failures_verdict("victim", {"stress": _stats()}, 2.0).passed
    assert not v.failures_verdict("victim", {"stress": _stats()}, 0.0, _stats(failures=1)).passed
    assert "n/a" not in v.failures_verdict("victim", {"stress": _stats()}, None).measured


def test_latency_verdict() -> None:
    assert v.latency_verdict("victim", _stats(p99=20.0), _stats(p99=40.0)).passed
    worse = v.latency_verdict("victim", _stats(p99=20.0), _stats(p99=41.0))
    assert not worse.passed and "2.05x" in worse.measured
    assert not v.latency_verdict("victim", _stats(p99=None), _stats()).passed
    assert not v.latency_verdict("victim", None, _stats()).passed


def test_throughput_verdict() -> None:
    assert v.throughput_verdict("steady", _stats(requests=380), 10.0, 40.0).passed
    assert not v.throughput_verdict("steady", _stats(requests=350), 10.0, 40.0).passed
    assert not v.throughput_verdict("steady", None, 10.0, 40.0).passed


def test_hog_rate() -> None:
    expected = v.expected_hog_rate(64_000_000, 2, 2)
    assert expected == 8_000_000
    assert v.expected_hog_rate(64_000_001, 2, 1) == 32_000_001 / 8  # the share rounds up
    assert v.hog_verdict(7_300_000, 20, expected, ["proxy1", "proxy2"]).passed
    assert not v.hog_verdict(7_100_000, 20, expected, ["proxy1"]).passed
    assert not v.hog_verdict(8_900_000, 20, expected, ["proxy1"]).passed
    assert not v.hog_verdict(8_000_000, 0, expected, []).passed


def test_fleet_verdicts() -> None:
    assert v.alive_verdict({"proxy1": True, "proxy2": True}).passed
    assert not v.alive_verdict({"proxy1": True, "proxy2": False}).passed
    assert not v.alive_verdict({}).passed
    problem = LogProblem("proxy1", 3, "connection_task_failed", "{...}")
    assert v.logs_verdict([], ["proxy1"]).passed
    bad = v.logs_verdict([problem, problem], ["proxy1"])
    assert not bad.passed and "proxy1:connection_task_failed x2" in bad.measured
    assert v.released_verdict({"proxy1": 0, "proxy2": 0.0}, 0.5).passed
    assert not v.released_verdict({"proxy1": 0, "proxy2": 2.0}, 15.0).passed
    assert not v.released_verdict({"proxy1": None}, 15.0).passed


def test_table_and_json() -> None:
    items = [v.Verdict("a", True, "1", "<= 2"), v.Verdict("b", False, "3", "<= 2", "too many")]
    table = v.render_table("port-exhaustion", items)
    assert "PASS" in table and "FAIL" in table and "b: too many" in table
    assert table.splitlines()[-1] == "1 of 2 verdicts pass"
    assert not v.passed(items) and v.passed(items[:1]) and not v.passed([])
    doc = v.to_json({"name": "x"}, items, {"k": 1}, {"m": 2})
    assert doc["schema"] == v.SCHEMA and doc["passed"] is False
    assert json.loads(json.dumps(doc))["verdicts"][1]["detail"] == "too many"


def test_the_table_fits_100_columns() -> None:
    long = ", ".join(f"proxy{i} 24 of 24 ports toward 203.0.113.10:80" for i in range(6))
    items = [
        v.Verdict("attacker_held_at_budget", True, long, "at most 24 per proxy " * 8),
        v.Verdict("victim_p99", False, "p99 88 ms in stress", "<= 2 x baseline", "too slow " * 20),
    ]
    table = v.render_table("port-exhaustion", items)
    assert max(len(line) for line in table.splitlines()) <= 100, table
    assert "proxy5 24 of 24 ports" in table.replace("\n" + " " * 16, " ")
    assert table.splitlines()[-1] == "1 of 2 verdicts pass"
