"""The flood scenarios: windows, budgets, verdicts and assessment (hand-made observations)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import pytest

from egressd_harness.loadtest import assess as a
from egressd_harness.loadtest import floodio
from egressd_harness.loadtest import results as r
from egressd_harness.loadtest import scenarios as sc
from egressd_harness.loadtest import verdicts as v

PROXIES = ["proxy1", "proxy2"]


def test_flood_scenarios_windows_and_bounds() -> None:
    for name in sc.FLOODS:
        s = sc.build(name, 22)
        phases = [w.phase for w in s.windows]
        assert phases == ["baseline", "stress", "settle"] * 2
        assert sum(w.seconds for w in s.windows if w.phase == sc.STRESS) == pytest.approx(10.0)
        longest = sc.build(name, 44)
        assert sum(w.seconds for w in longest.windows if w.phase == sc.STRESS) <= sc.MAX_FLOOD_S
        for bad in (21.9, 44.1, float("nan")):
            with pytest.raises(sc.ScenarioError):
                sc.build(name, bad)


def test_flood_jobs_victims_on_both_nodes() -> None:
    s = sc.build("dns-flood", 22)
    attacker = s.job("attacker")
    assert (attacker.driver, attacker.user_class, attacker.node) == ("flood", "dns", "node1")
    assert attacker.abusive
    assert (s.job("victim_a").node, s.job("victim_b").node) == ("node1", "node2")
    assert all(
        s.job(v).user_class == "Victim" and not s.job(v).abusive for v in ("victim_a", "victim_b")
    )
    payload = attacker.policy("0f0e5d1c-0000-4000-8000-000000000001")
    # allowed names of the flood live under the wildcard the policy allows
    assert {"host": sc.WILDCARD, "ports": [443]} in payload["egress"]
    assert payload["limits"]["dns_queries_per_s"] == sc.FLOOD_DNS_PER_S
    assert sc.flood_rate_limit(s) == sc.FLOOD_DNS_PER_S
    assert sc.flood_rate_limit(sc.build("syn-flood", 22)) == sc.FLOOD_SYN_PER_S
    assert sc.build("syn-flood", 22).job("attacker").user_class == "syn"
    # the victims' own DNS (a query or two per request) is far from their limit
    victim = s.job("victim_a")
    rps = victim.users * float(victim.env["EGRESSD_LT_RPS"])
    assert victim.limits["dns_queries_per_s"] >= 10 * rps
    assert float(attacker.env["rate"]) >= 3600  # above the incident's rate


def test_tier1_budget() -> None:
    assert sc.tier1_budget(50, 10.0, 2) == 600  # 50/s x 10 s + a full 50-packet bucket per window
    assert sc.tier1_budget(50, 10.0, 2, burst_s=0) == 500


def _flood(**over: object) -> v.FloodObservation:
    base: dict[str, object] = dict(
        kind="dns",
        rate_limit=50,
        sent=50_000,
        flood_seconds=10.0,
        windows=2,
        tier1={"dns_rate_limit": 49_400, "redirected": 600},
        at_proxies={"proxy1": 300, "proxy2": 298},
        answered=598,
        proxy_refusals={},
    )
    base.update(over)
    return v.FloodObservation(**base)  # type: ignore[arg-type]


def test_flood_dying_at_tier1_passes() -> None:
    tier1, spared = v.flood_verdicts(_flood())
    assert tier1.name == "attacker_excess_at_tier1" and tier1.passed, tier1
    assert "dropped 49400 (dns_rate_limit" in tier1.measured and "budget 600" in tier1.threshold
    assert spared.name == "proxies_spared" and spared.passed, spared
    assert "598" in spared.measured and "answered" in spared.measured


@pytest.mark.parametrize(
    ("over", "verdict", "why"),
    [
        # the flood went through tier 1: nothing dropped with its reason
        ({"tier1": {"redirected": 50_000}}, 0, "tier 1 dropped 0"),
        # dropped, but far less than the excess
        ({"tier1": {"dns_rate_limit": 30_000}}, 0, "< 44460"),
        # counted by another reason only
        ({"tier1": {"udp_not_dns": 49_400}}, 0, "tier 1 dropped 0"),
        ({"tier1": None}, 0, "could not be read"),
        # a "flood" at its own rate tests nothing
        ({"sent": 700, "tier1": {"dns_rate_limit": 100}}, 0, "not a flood"),
        ({"tier1": {"dns_rate_limit": 60_000}}, 0, "> sent"),
        # the proxies saw more than the bucket lets through
        ({"at_proxies": {"proxy1": 2000, "proxy2": 3000}}, 1, "saw 5000 > 660"),
        ({"at_proxies": {"proxy1": 300, "proxy2": None}}, 1, "no tap count from proxy2"),
        ({"at_proxies": {}}, 1, "no tap count"),
    ],
)
def test_flood_verdicts_fail_for_their_reason(
    over: dict[str, object], verdict: int, why: str
) -> None:
    out = v.flood_verdicts(_flood(**over))
    assert not out[verdict].passed and why in out[verdict].detail, out[verdict]
    assert out[1 - verdict].passed or verdict == 0


def test_syn_flood_uses_its_own_reason() -> None:
    obs = _flood(kind="syn", tier1={"syn_rate_limit": 99_000}, sent=100_000, answered=None)
    tier1, spared = v.flood_verdicts(obs)
    assert tier1.passed and "syn_rate_limit" in tier1.measured
    assert "SYNs at the proxies" in spared.measured and "answered" not in spared.measured
    wrong = v.flood_verdicts(_flood(kind="syn", tier1={"dns_rate_limit": 99_000}, sent=100_000))[0]
    assert not wrong.passed


def _stats(
    name: str, requests: int, p99: float, failures: int = 0, p95: float | None = None
) -> r.RequestStats:
    p95 = 0.8 * p99 if p95 is None else p95
    percentiles = {50.0: 5.0, 95.0: p95, 98.0: max(p95, 0.9 * p99), 99.0: p99}
    return r.RequestStats(name, "GET", requests, failures, 5.0, 60.0, 10.0, percentiles)


def _observed(name: str) -> a.Observed:
    obs = a.Observed(proxies=PROXIES, job_ids={"attacker": "A", "victim_a": "B", "victim_b": "C"})
    obs.stats = {
        sc.BASELINE: {"victim_a": _stats("a", 200, 20.0), "victim_b": _stats("b", 200, 25.0)},
        sc.STRESS: {
            "victim_a": _stats("a", 200, 30.0),
            "victim_b": _stats("b", 200, 220.0, p95=191.0),
        },
    }
    obs.totals = {
        "victim_a": _stats("Aggregated", 420, 25.0),
        "victim_b": _stats("Aggregated", 420, 40.0),
    }
    kind = name.removesuffix("-flood")
    obs.summaries = {
        "attacker": {
            "kind": kind,
            "sent": 50_000,
            "answered": 598,
            "flood_seconds": 10.0,
            "spans": [[1.0, 6.0], [12.0, 17.0]],
        }
    }
    reason = v.FLOOD_REASONS[kind]
    obs.tier1_before = {"redirected": 10}
    obs.tier1_after = {"redirected": 610, reason: 49_400}
    obs.tap_before = {
        "proxy1": {"attacker_dns": 1, "attacker_syn": 1},
        "proxy2": {"attacker_dns": 0, "attacker_syn": 0},
    }
    obs.tap_after = {"proxy1": {f"attacker_{kind}": 301}, "proxy2": {f"attacker_{kind}": 298}}
    obs.alive = dict.fromkeys(PROXIES, True)
    obs.active_after = dict.fromkeys(PROXIES, 0.0)
    obs.log_components = [*PROXIES, "node1", "node2"]
    return obs


@pytest.mark.parametrize("name", sc.FLOODS)
def test_assess_flood_scenario(name: str) -> None:
    obs = _observed(name)
    out = {x.name: x for x in a.assess(sc.build(name, 22), obs)}
    assert list(out) == [
        "attacker_excess_at_tier1",
        "proxies_spared",
        "victim_a_no_failures",
        "victim_a_latency",
        "victim_b_no_failures",
        "victim_b_latency",
        "proxies_alive",
        "connections_released",
        "logs_clean",
    ]
    # victim_b's stress p95 (191 ms) is above 2 x its baseline p95 (20 ms) + 150 ms: the only
    # failure
    assert [x.name for x in out.values() if not x.passed] == ["victim_b_latency"]
    assert "p95 191 ms > 190 ms" in out["victim_b_latency"].detail
    assert "dropped 49400" in out["attacker_excess_at_tier1"].measured
    assert "at the proxies 598" in out["proxies_spared"].measured
    doc = json.loads(json.dumps(obs.to_dict()))
    assert doc["flood"]["tier1_delta"] == {"redirected": 600, v.FLOOD_REASONS[name[:3]]: 49_400}
    assert doc["flood"]["at_proxies"]["proxy1"][f"attacker_{name[:3]}"] == 300


def test_assess_flood_victim_failure_and_unreadable_counters() -> None:
    obs = _observed("dns-flood")
    obs.stats[sc.STRESS]["victim_a"] = _stats("a", 200, 30.0, failures=3)
    obs.tier1_after = None
    obs.tap_after = {"proxy1": None, "proxy2": {"attacker_dns": 10}}
    out = {x.name: x for x in a.assess(sc.build("dns-flood", 22), obs)}
    assert (
        not out["victim_a_no_failures"].passed and "3 failed" in out["victim_a_no_failures"].detail
    )
    assert not out["attacker_excess_at_tier1"].passed
    assert not out["proxies_spared"].passed and "proxy1" in out["proxies_spared"].detail


def test_tap_script_and_parse() -> None:
    script = floodio.tap_script(IPv4Address("100.96.1.7"))
    assert 'ip saddr 100.96.1.7 udp dport 53 counter name "attacker_dns"' in script
    assert "tcp flags & (syn | ack) == syn" in script and "policy accept" in script
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "counter": {
                    "family": "ip",
                    "name": "attacker_dns",
                    "table": "egd_loadtest",
                    "packets": 598,
                    "bytes": 1,
                }
            },
            {
                "counter": {
                    "family": "ip",
                    "name": "attacker_syn",
                    "table": "egd_loadtest",
                    "packets": 3,
                    "bytes": 1,
                }
            },
            {
                "counter": {
                    "family": "ip",
                    "name": "other",
                    "table": "egd_loadtest",
                    "packets": 9,
                    "bytes": 1,
                }
            },
        ]
    }
    assert floodio.parse_tap(json.dumps(listing)) == {"attacker_dns": 598, "attacker_syn": 3}
    with pytest.raises(ValueError):
        floodio.parse_tap("not json")


def test_agent_metric_must_agree_with_the_map() -> None:
    tier1, _ = v.flood_verdicts(_flood(tier1_metric={"dns_rate_limit": 49_400, "redirected": 600}))
    assert tier1.passed and "agent metric 49400" in tier1.measured
    tier1, _ = v.flood_verdicts(_flood(tier1_metric={"redirected": 50_000}))
    assert not tier1.passed and "metric shows 0 drops, its map 49400" in tier1.detail
    tier1, _ = v.flood_verdicts(_flood(tier1_metric=None))  # an agent without the metric
    assert tier1.passed and "agent metric n/a" in tier1.measured


def test_tier1_metric_delta_from_the_agents_scrapes() -> None:
    def scrape(drops: int) -> r.Scrape:
        return r.parse_metrics(
            "# TYPE egressd_tier1_sandbox_packets counter\n"
            f'egressd_tier1_sandbox_packets_total{{sandbox_id="lt-a",job_id="A",verdict="drop",'
            f'reason="dns_rate_limit"}} {drops}\n'
            'egressd_tier1_sandbox_packets_total{sandbox_id="lt-v",job_id="B",verdict="drop",'
            'reason="dns_rate_limit"} 7\n'
        )

    obs = _observed("dns-flood")
    obs.attacker_sandbox = "lt-a"
    assert obs.tier1_metric_delta() is None  # not scraped
    obs.agent_before, obs.agent_after = scrape(3), scrape(49_403)
    assert obs.tier1_metric_delta() == {"dns_rate_limit": 49_400}
    out = {x.name: x for x in a.assess(sc.build("dns-flood", 22), obs)}
    assert (
        out["attacker_excess_at_tier1"].passed
        and "agent metric 49400" in out["attacker_excess_at_tier1"].measured
    )
    obs.agent_after = r.parse_metrics("# TYPE egressd_other counter\negressd_other_total 1\n")
    assert obs.tier1_metric_delta() is None  # an agent that does not export it
