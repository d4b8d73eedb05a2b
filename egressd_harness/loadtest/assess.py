"""From what a run observed to its verdicts (pure).

The runner fills an `Observed` (parsed CSVs and summaries per phase and role,
proxy metrics before and after, gauge maxima sampled during the stress phase,
liveness, log problems); `assess` picks the verdicts of the scenario and
computes them with `egressd_harness.loadtest.verdicts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from egressd_harness.loadtest import results as r
from egressd_harness.loadtest import verdicts as v
from egressd_harness.loadtest.scenarios import (
    BASELINE,
    FLOODS,
    STRESS,
    Scenario,
    flood_rate_limit,
    share,
)

# A proxy "carried" the hog if it relayed at least this share of the hog's bytes.
BUSY_FRACTION = 0.05
HOG_SKIP_S = 3

M_REFUSALS = "egressd_limit_refusals_total"
M_JOB_CONNECTIONS = "egressd_job_connections"
M_JOB_SOURCE_PORTS = "egressd_job_source_ports"
M_SOURCE_PORTS = "egressd_source_ports_in_use"
M_JOB_BYTES = "egressd_job_bytes_total"
M_ACTIVE = "egressd_connections_active"
M_TIER1_SANDBOX = "egressd_tier1_sandbox_packets_total"
SAMPLED_GAUGES = (M_JOB_CONNECTIONS, M_JOB_SOURCE_PORTS, M_SOURCE_PORTS, M_ACTIVE)


@dataclass
class Observed:
    proxies: Sequence[str]
    job_ids: Mapping[str, str]  # role -> job id
    # phase -> role -> the job's locust stats row for the requests it started in that phase
    stats: dict[str, dict[str, r.RequestStats | None]] = field(default_factory=dict)
    totals: dict[str, r.RequestStats | None] = field(default_factory=dict)  # role -> Aggregated row
    failures: dict[str, list[r.Failure]] = field(default_factory=dict)  # role -> failures CSV
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> summary JSON
    schedule_t0: float = 0.0  # Unix time at which the scenario's windows start
    gauges: r.GaugeMax = field(default_factory=lambda: r.GaugeMax(SAMPLED_GAUGES))
    before: dict[str, r.Scrape] = field(default_factory=dict)  # proxy -> samples at start
    after: dict[str, r.Scrape] = field(default_factory=dict)  # proxy -> after the load
    alive: dict[str, bool] = field(default_factory=dict)
    active_after: dict[str, float | None] = field(default_factory=dict)
    released_wait_s: float = 0.0
    log_components: list[str] = field(default_factory=list)
    log_problems: list[r.LogProblem] = field(default_factory=list)
    audit_denials: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> reason -> n
    # daemon -> CPU seconds per second of the load (1.0 = one core)
    cpu: dict[str, float] = field(default_factory=dict)
    # The flood scenarios: the attacker's address, the SYN flood's target, its
    # veth's tier-1 counters (reason -> packets) and the proxies' taps
    # (proxy -> counter -> packets) before and after the load; None: unreadable.
    attacker_ip: str = ""
    flood_target: str = ""
    tier1_before: dict[str, int] | None = None
    tier1_after: dict[str, int] | None = None
    tap_before: dict[str, dict[str, int] | None] = field(default_factory=dict)
    tap_after: dict[str, dict[str, int] | None] = field(default_factory=dict)
    # The attacker's node agent's /metrics: its per-sandbox tier-1 counters
    # (`egressd_tier1_sandbox_packets_total{sandbox_id,...,reason}`), what an operator sees.
    attacker_sandbox: str = ""
    agent_before: r.Scrape | None = None
    agent_after: r.Scrape | None = None

    def stat(self, phase: str, role: str) -> r.RequestStats | None:
        return self.stats.get(phase, {}).get(role)

    def refusals(self, role: str) -> dict[str, dict[str, float]] | None:
        """Per proxy, the job's limit refusals by reason during the run (None: no metric)."""
        job = self.job_ids[role]
        if not any(
            r.metric_present(self.after.get(p, r.Scrape()), M_REFUSALS) for p in self.proxies
        ):
            return None
        out = {}
        for proxy in self.proxies:
            before = r.by_label(self.before.get(proxy, []), M_REFUSALS, "reason", job_id=job)
            after = r.by_label(self.after.get(proxy, []), M_REFUSALS, "reason", job_id=job)
            out[proxy] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "proxies": list(self.proxies),
            "job_ids": dict(self.job_ids),
            "stats": {
                ph: {role: s.to_dict() if s else None for role, s in per.items()}
                for ph, per in self.stats.items()
            },
            "totals": {role: s.to_dict() if s else None for role, s in self.totals.items()},
            "failures": {role: [f.to_dict() for f in fs] for role, fs in self.failures.items()},
            "summaries": self.summaries,
            "schedule_t0": self.schedule_t0,
            "gauges": self.gauges.to_dict(),
            "limit_refusals": {role: self.refusals(role) for role in self.job_ids},
            "alive": dict(self.alive),
            "active_after": dict(self.active_after),
            "log_problems": [p.to_dict() for p in self.log_problems],
            "audit_denials": self.audit_denials,
            "daemon_cpu_cores": self.cpu,
            "flood": {
                "attacker_ip": self.attacker_ip,
                "target": self.flood_target,
                "tier1_delta": self.tier1_delta(),
                "at_proxies": self.tap_delta(),
                "tier1_metric_delta": self.tier1_metric_delta(),
                "tier1_before": self.tier1_before,
                "tier1_after": self.tier1_after,
            },
        }

    def tier1_delta(self) -> dict[str, int] | None:
        """The attacker's tier-1 counters' growth over the load, by reason."""
        if self.tier1_before is None or self.tier1_after is None:
            return None
        return {
            k: v - self.tier1_before.get(k, 0)
            for k, v in sorted(self.tier1_after.items())
            if v - self.tier1_before.get(k, 0)
        }

    def tier1_metric_delta(self) -> dict[str, int] | None:
        """The growth of the agent's per-sandbox tier-1 counter of the attacker, by
        reason; None when the agent was not scraped or does not export it."""
        if self.agent_before is None or self.agent_after is None:
            return None
        if not r.metric_present(self.agent_after, M_TIER1_SANDBOX):
            return None
        sid = self.attacker_sandbox
        before = r.by_label(self.agent_before, M_TIER1_SANDBOX, "reason", sandbox_id=sid)
        after = r.by_label(self.agent_after, M_TIER1_SANDBOX, "reason", sandbox_id=sid)
        return {
            k: int(n - before.get(k, 0)) for k, n in sorted(after.items()) if n - before.get(k, 0)
        }

    def tap_delta(self, counter: str | None = None) -> dict[str, Any]:
        """Per proxy, the tap's growth over the load (one counter, or all)."""
        out: dict[str, Any] = {}
        for proxy in self.proxies:
            before, after = self.tap_before.get(proxy), self.tap_after.get(proxy)
            if before is None or after is None:
                out[proxy] = None
                continue
            delta = {k: v - before.get(k, 0) for k, v in after.items()}
            out[proxy] = delta.get(counter) if counter else delta
        return out


def stress_spans(scenario: Scenario, t0: float) -> list[tuple[float, float]]:
    """The stress windows as absolute [start, end) Unix times."""
    return [(t0 + w.start, t0 + w.end) for w in scenario.windows if w.phase == STRESS]


def held_per_window(
    series: Sequence[Sequence[float]], spans: Sequence[tuple[float, float]]
) -> list[int]:
    """The most connections the attacker held in each stress window (client side)."""
    return [int(max((n for t, n in series if a <= t < b), default=0)) for a, b in spans]


def _attack(scenario: Scenario, obs: Observed) -> list[v.Verdict]:
    job = scenario.job("attacker")
    job_id = obs.job_ids["attacker"]
    n = len(obs.proxies)
    summary = obs.summaries.get("attacker", {}).get("attacker", {})
    outcomes = {
        k: int(val)
        for k, val in summary.items()
        if isinstance(val, int | float) and k != "held_max"
    }
    refusals = obs.refusals("attacker") or {}
    attack = v.AttackObservation(
        proxies=list(obs.proxies),
        ports_per_destination=int(job.limits["ports_per_destination"]),
        connection_share=share(int(job.limits["max_connections"]), n),
        held_max=int(summary.get("held_max", 0)),
        held_per_window=held_per_window(
            summary.get("held_series", []), stress_spans(scenario, obs.schedule_t0)
        ),
        attempts=int(summary.get("attempts", 0)),
        outcomes=outcomes,
        source_ports_max={
            p: obs.gauges.max(p, M_JOB_SOURCE_PORTS, job_id=job_id) for p in obs.proxies
        },
        connections_max={
            p: obs.gauges.max(p, M_JOB_CONNECTIONS, job_id=job_id) for p in obs.proxies
        },
        refusals=refusals,
        audit_denials=obs.audit_denials.get("attacker", {}),
    )
    return v.attacker_verdicts(attack)


def _neighbour(
    role: str, obs: Observed, phases: Sequence[str], flood: bool = False
) -> list[v.Verdict]:
    refusals = obs.refusals(role)
    total = None if refusals is None else sum(sum(per.values()) for per in refusals.values())
    out = [
        v.failures_verdict(
            role, {ph: obs.stat(ph, role) for ph in phases}, total, obs.totals.get(role)
        )
    ]
    if len(phases) > 1:
        judge = v.flood_latency_verdict if flood else v.latency_verdict
        out.append(judge(role, obs.stat(BASELINE, role), obs.stat(STRESS, role)))
    return out


def _flood(scenario: Scenario, obs: Observed) -> list[v.Verdict]:
    summary = obs.summaries.get("attacker", {})
    kind = scenario.job("attacker").user_class
    refusals = obs.refusals("attacker")
    total_refusals: dict[str, float] = {}
    for per in (refusals or {}).values():
        for reason, n in per.items():
            if n:
                total_refusals[reason] = total_refusals.get(reason, 0.0) + n
    flood = v.FloodObservation(
        kind=kind,
        rate_limit=flood_rate_limit(scenario),
        sent=int(summary.get("sent", 0)),
        flood_seconds=float(summary.get("flood_seconds", 0.0)),
        windows=len(summary.get("spans", [])),
        tier1=obs.tier1_delta(),
        tier1_metric=obs.tier1_metric_delta(),
        at_proxies=obs.tap_delta(f"attacker_{kind}"),
        answered=int(summary["answered"]) if kind == "dns" and "answered" in summary else None,
        proxy_refusals=total_refusals,
    )
    return v.flood_verdicts(flood)


def hog_busy(obs: Observed) -> tuple[list[str], bool]:
    """The proxies that carried the hog's downloads; False when the proxies
    do not export per-job bytes (then every proxy is assumed busy)."""
    job_id = obs.job_ids["hog"]
    if not any(r.metric_present(obs.after.get(p, r.Scrape()), M_JOB_BYTES) for p in obs.proxies):
        return list(obs.proxies), False
    down = {
        p: r.counter_delta(
            obs.before.get(p, []),
            obs.after.get(p, r.Scrape()),
            M_JOB_BYTES,
            job_id=job_id,
            direction="down",
        )
        for p in obs.proxies
    }
    total = sum(down.values())
    return [p for p in obs.proxies if total > 0 and down[p] >= BUSY_FRACTION * total], True


def _hog(scenario: Scenario, obs: Observed) -> v.Verdict:
    summary = obs.summaries.get("hog", {}).get("hog", {})
    seconds = r.summary_seconds(summary.get("bytes_per_second", {}))
    rate, span = r.client_rate(seconds, stress_spans(scenario, obs.schedule_t0), skip_s=HOG_SKIP_S)
    busy, measured = hog_busy(obs)
    expected = v.expected_hog_rate(
        int(scenario.job("hog").limits["bandwidth_bps"]), len(obs.proxies), len(busy)
    )
    verdict = v.hog_verdict(rate, span, expected, busy)
    if not measured:
        detail = "; ".join(
            x for x in (verdict.detail, f"no {M_JOB_BYTES}: assumed every proxy busy") if x
        )
        verdict = v.Verdict(
            verdict.name, verdict.passed, verdict.measured, verdict.threshold, detail
        )
    return verdict


def assess(scenario: Scenario, obs: Observed) -> list[v.Verdict]:
    out: list[v.Verdict] = []
    if scenario.name in FLOODS:
        out += _flood(scenario, obs)
        for job in scenario.jobs:
            if not job.abusive:
                out += _neighbour(job.role, obs, (BASELINE, STRESS), flood=True)
    elif scenario.name == "port-exhaustion":
        out += _attack(scenario, obs)
        out += _neighbour("victim", obs, (BASELINE, STRESS))
    elif scenario.name == "bandwidth":
        out.append(_hog(scenario, obs))
        out += _neighbour("steady", obs, (BASELINE, STRESS))
    else:
        out += _neighbour("steady", obs, (STRESS,))
        job = scenario.job("steady")
        expected = job.users * float(job.env.get("EGRESSD_LT_RPS", "0"))
        seconds = sum(w.seconds for w in scenario.windows if w.phase == STRESS)
        out.append(v.throughput_verdict("steady", obs.stat(STRESS, "steady"), seconds, expected))
    out.append(v.alive_verdict(obs.alive))
    out.append(v.released_verdict(obs.active_after, obs.released_wait_s))
    out.append(v.logs_verdict(obs.log_problems, obs.log_components))
    return out
