"""The short fairness scenario (issue 4), run as an operator runs it.

`egressd loadtest port-exhaustion` brings its own fleet up and down (prefix
`egd-ltt-`, its own run directory): job A tries to hold every connection it
can toward api.allowed.test, job B makes ordinary requests to the same
destination, in alternating windows with and without A. Every verdict must
pass: A held at its port budget and refused with limit reasons, B without a
failure and its p99 within 2x of its own baseline, proxies alive, logs clean,
connections released. The full scenarios are in loadtests/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from egressd.net import netns as kn

PREFIX = "egd-ltt-"
DURATION_S = 40  # 3 cycles: baseline 6.2 s, stress 6.2 s, settle 1 s


def test_port_exhaustion_scenario_passes_every_verdict(tmp_path: Path) -> None:
    out = tmp_path / "port-exhaustion.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "loadtest",
            "port-exhaustion",
            "--duration",
            str(DURATION_S),
            "--prefix",
            PREFIX,
            "--run-dir",
            str(tmp_path / "fleet"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=DURATION_S + 100,
        check=False,
    )
    table = done.stdout + done.stderr[-3000:]
    assert out.exists(), table
    doc = json.loads(out.read_text())
    verdicts = {v["name"]: v for v in doc["verdicts"]}
    assert set(verdicts) == {
        "attacker_within_budget",
        "attacker_held_at_budget",
        "victim_no_failures",
        "victim_p99",
        "proxies_alive",
        "connections_released",
        "logs_clean",
    }, table
    failed = {name: (v["measured"], v["detail"]) for name, v in verdicts.items() if not v["passed"]}
    assert not failed, table
    assert done.returncode == 0, table
    # What the verdicts rest on was really measured.
    observed = doc["observed"]
    assert observed["totals"]["victim"]["requests"] > 100
    assert sum(observed["audit_denials"]["attacker"].values()) > 0
    assert kn.list_netns(PREFIX) == ()
    assert not any(p.name.startswith(PREFIX) for p in Path("/etc/netns").glob("*"))
    # The plots beside the JSON, drawn from what the victim measured per second.
    for png in (tmp_path / f"port-exhaustion-{kind}.png" for kind in ("latency", "throughput")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"PNG: {png}" in done.stdout, table
    per_second = sum(r["n"] for r in observed["summaries"]["victim"]["latency_per_second"])
    assert per_second == observed["totals"]["victim"]["requests"]
