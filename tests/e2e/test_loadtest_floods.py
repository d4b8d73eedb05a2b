"""The short flood scenarios (issue 15), run as an operator runs them.

`egressd loadtest dns-flood` and `egressd loadtest syn-flood` each bring their
own fleet up and down (prefixes `egd-ltd-`, `egd-lts-`, their own run
directories): an attacker registered on node1 like a sandbox floods the
resolver with DNS queries (denied names and random names under an allowed
wildcard), or sends raw SYNs to an allowed destination as an escaped sandbox
could, in two 5 s windows (10 s of flood, ~5,000 queries/s or ~10,000 SYNs/s);
victim A on node1 and victim B on node2 make ordinary requests (a DNS query
through the proxy and a new connection each) all along. Every verdict must
pass: the attacker's excess dropped by tier 1 on its node (its veth's
`dns_rate_limit` / `syn_rate_limit` counter, and the same in the agent's
`egressd_tier1_sandbox_packets_total`), the proxies seeing no more of
its packets than its token bucket admits, both victims without a failure, their stress p95
within 2x their own baseline p95 + 150 ms and at most 2% of their stress requests slower than 2x
their baseline p99 + 250 ms (`flood_latency_verdict`), proxies alive, logs clean. ~45 s each.

Both bring a fleet up: run under the e2e lock (`flock /tmp/egressd-e2e.lock`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from egressd.net import netns as kn
from egressd_harness.loadtest.scenarios import FLOOD_RATE, tier1_budget

DURATION_S = 22  # 2 cycles: baseline 5 s, stress 5 s, settle 1 s
VERDICTS = {
    "attacker_excess_at_tier1",
    "proxies_spared",
    "victim_a_no_failures",
    "victim_a_latency",
    "victim_b_no_failures",
    "victim_b_latency",
    "proxies_alive",
    "connections_released",
    "logs_clean",
}


@pytest.mark.parametrize(
    ("scenario", "prefix", "reason", "tap"),
    [
        ("dns-flood", "egd-ltd-", "dns_rate_limit", "attacker_dns"),
        ("syn-flood", "egd-lts-", "syn_rate_limit", "attacker_syn"),
    ],
)
def test_flood_dies_on_its_node(
    tmp_path: Path, scenario: str, prefix: str, reason: str, tap: str
) -> None:
    out = tmp_path / f"{scenario}.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "loadtest",
            scenario,
            "--duration",
            str(DURATION_S),
            "--prefix",
            prefix,
            "--run-dir",
            str(tmp_path / "fleet"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=DURATION_S + 120,
        check=False,
    )
    table = done.stdout + done.stderr[-3000:]
    assert out.exists(), table
    doc = json.loads(out.read_text())
    verdicts = {v["name"]: v for v in doc["verdicts"]}
    assert set(verdicts) == VERDICTS, table
    failed = {name: (v["measured"], v["detail"]) for name, v in verdicts.items() if not v["passed"]}
    assert not failed, table
    assert done.returncode == 0, table
    # What the verdicts rest on was really measured.
    observed = doc["observed"]
    flood = observed["summaries"]["attacker"]
    assert 9.0 <= flood["flood_seconds"] <= 11.0, flood
    rate = FLOOD_RATE[scenario]
    assert flood["sent"] > 0.5 * rate * flood["flood_seconds"], flood  # a real flood
    dropped = observed["flood"]["tier1_delta"][reason]
    budget = tier1_budget(50, flood["flood_seconds"], 2)
    assert 0.9 * (flood["sent"] - budget) <= dropped <= flood["sent"]
    # the operator sees the same drops in the agent's per-sandbox metric
    assert observed["flood"]["tier1_metric_delta"][reason] == dropped
    at_proxies = sum(per[tap] for per in observed["flood"]["at_proxies"].values())
    # the bucket's rate got through (the path worked); the rest did not
    assert 0.5 * budget <= at_proxies <= 1.1 * budget, observed["flood"]
    if scenario == "dns-flood":
        assert flood["answered"] >= 0.5 * budget and flood["answered"] <= at_proxies
        assert {"NXDOMAIN", "NOERROR"} <= set(flood["rcodes"])  # denied and allowed names
    for victim in ("victim_a", "victim_b"):
        assert observed["totals"][victim]["requests"] > 150
        assert observed["totals"][victim]["failures"] == 0
    assert kn.list_netns(prefix) == ()
    assert not any(p.name.startswith(prefix) for p in Path("/etc/netns").glob("*"))
