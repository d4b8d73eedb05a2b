"""`egressd policy check --control URL` against a real `egressd control serve` process:
the control plane's nodes decide which names are unknown, and the control plane itself
refuses (422) the policy that check flagged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.control_process import JOB_ID, NODE1, ControlProcess, Paths, start

POLICY = {
    "v": 1,
    "job_id": JOB_ID,
    "account": "acme",
    "nodes": ["node1", "node9"],
    "egress": [{"host": "api.allowed.test", "ports": [443]}],
}


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", "policy", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_names_the_unknown_node_and_the_control_plane_refuses_it(
    paths: Paths,
    spawn: list[ControlProcess],
    tmp_path: Path,
) -> None:
    control = start(spawn, paths)
    auth = {"Authorization": f"Bearer {paths.token.read_text().strip()}"}
    assert (
        requests.put(
            f"{control.base}/v1/nodes/node1", json=NODE1, headers=auth, timeout=5
        ).status_code
        == 200
    )
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))

    done = check("--control", control.base, str(policy))
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        "nodes[1]: no node 'node9' at the control plane (known: node1)"
    ]

    body = {k: v for k, v in POLICY.items() if k != "job_id"}
    put = requests.put(
        f"{control.base}/v1/jobs/{JOB_ID}/policy", json=body, headers=auth, timeout=5
    )
    assert put.status_code == 422
    assert put.json()["field"] == "nodes[1]"
    assert put.json()["known_nodes"] == ["node1"]

    # fixed: both agree it is fine, and the control plane signs it
    policy.write_text(json.dumps({**POLICY, "nodes": ["node1"]}))
    done = check("--control", control.base, str(policy))
    assert done.returncode == 0, done.stdout + done.stderr
    put = requests.put(
        f"{control.base}/v1/jobs/{JOB_ID}/policy",
        json={**body, "nodes": ["node1"]},
        headers=auth,
        timeout=5,
    )
    assert put.status_code == 200, put.text

    # the signed token checks clean too (timestamps from the control plane)
    token = tmp_path / "policy.jws"
    token.write_text(put.json()["jws"])
    done = check("--control", control.base, str(token))
    assert done.returncode == 0, done.stdout + done.stderr
