"""`egressd audit` and `egressd policy check` against a real fleet (issue 14, items 2 and 5).

A UDF in a real gVisor sandbox tries what its policy denies at tier 1 (a port,
the metadata address) and at tier 2 (a name no rule allows, an address no rule
allows) and one allowed request; `egressd audit --job J --verdict deny` then
lists exactly that job's denials with their reasons, from the node agent's and
the proxies' logs. `egressd policy check` asks the fleet's control plane (in
its namespace) which nodes exist, and the control plane refuses the same
policy with 422.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egressd.layout import METADATA
from egressd_harness.topology.fleet import Fleet, FleetError
from tests.support.fleet import Job, probe

pytestmark = pytest.mark.root
API_IP = "203.0.113.10"
RAW_IP = "203.0.113.77"


def egressd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def audit_json(fleet: Fleet, *args: str) -> list[dict[str, object]]:
    done = egressd("audit", "--run-dir", str(fleet.run_dir), "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_audit_lists_a_jobs_tier1_and_tier2_denials_with_reasons(
    fleet: Fleet, tmp_path: Path
) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test", "ports": [443]}]).sign()
    other = Job(fleet, "node1", [{"host": "api.allowed.test", "ports": [443]}]).sign()
    targets = [
        "https://api.allowed.test/data",  # allowed
        "https://evil.test/",  # tier 2, DNS: no rule names it
        f"tcp://{RAW_IP}:443",  # tier 2, connection: no rule allows the address
        f"tcp://{API_IP}:22",  # tier 1: a port no rule lists
        f"tcp://{METADATA}:443",  # tier 1: the metadata address
    ]
    results = probe(fleet, job, tmp_path, targets)
    assert results["https://api.allowed.test/data"]["ok"] is True, results
    probe(fleet, other, tmp_path, ["https://evil.test/"])  # another job's denial

    want = {
        ("node1", "tier1_denial", "port_not_allowed", f"{API_IP}:22"),
        ("node1", "tier1_denial", "denied_range", f"{METADATA}:443"),
        ("proxy", "dns", "no_matching_rule", "evil.test"),
        ("proxy", "connection", "no_matching_rule", f"{RAW_IP}:443"),
    }

    def seen(rows: list[dict[str, object]]) -> set[tuple[str, str, str, str]]:
        out = set()
        for r in rows:
            where = "proxy" if str(r["log"]).startswith("proxy") else str(r["log"])
            target = str(r["qname"]) if r["event"] == "dns" else f"{r['dst']}:{r['port']}"
            out.add((where, str(r["event"]), str(r["reason"]), target))
        return out

    deadline = time.monotonic() + 15  # connection events are logged when they close
    while True:
        denials = audit_json(fleet, "--job", job.job_id, "--verdict", "deny")
        if want <= seen(denials) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert want <= seen(denials), denials
    assert all(r["job_id"] == job.job_id for r in denials)
    assert all(r["verdict"] == "deny" for r in denials)
    assert not [r for r in denials if r["reason"] == "allowed_host"]

    # without --verdict the allowed request is there too; a job prefix works
    everything = audit_json(fleet, "--job", job.job_id[:8])
    assert any(
        r["reason"] == "allowed_host"
        and r["event"] == "connection"
        and r["host"] == "api.allowed.test"
        for r in everything
    )
    assert all(r["job_id"] == job.job_id for r in everything)

    # the table, as an operator reads it
    done = egressd(
        "audit", "--run-dir", str(fleet.run_dir), "--job", job.job_id, "--verdict", "deny"
    )
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    print("\n" + done.stdout)
    assert rows[0].split()[:3] == ["TIME", "(UTC)", "WHERE"]
    assert max(len(r) for r in rows) <= 100
    tier1 = [r for r in rows if "node1:tier1" in r]
    assert any("port_not_allowed" in r and r.endswith(f"{API_IP}:22") for r in tier1), rows
    assert any("denied_range" in r and r.endswith(f"{METADATA}:443") for r in tier1), rows
    assert any(":dns" in r and "no_matching_rule" in r and "evil.test A" in r for r in rows), rows
    assert all(job.job_id[:8] in r for r in rows[1:])


def test_policy_check_asks_the_fleets_control_plane(fleet: Fleet, tmp_path: Path) -> None:
    payload = {
        "v": 1,
        "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
        "account": "e2e",
        "nodes": ["node1", "node9"],
        "egress": [{"host": "api.allowed.test"}],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(payload))
    done = egressd("policy", "check", "--prefix", fleet.layout.prefix, str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "nodes[1]: no node 'node9' at the control plane (known: node1, node2)"
    ]
    with pytest.raises(FleetError) as info:  # the control plane agrees: 422, nothing stored
        fleet.sign_policy(payload)
    assert "422" in info.value.detail and "nodes[1]" in info.value.detail

    path.write_text(json.dumps({**payload, "nodes": ["node1", "node2"]}))
    done = egressd("policy", "check", "--prefix", fleet.layout.prefix, str(path))
    assert done.returncode == 0, done.stdout + done.stderr
