"""`egressd policy check` and `egressd policy schema` as the user runs them (no control plane)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from egressd.policy.jws import sign_payload
from egressd.policy.keys import generate_signing_key

REPO = Path(__file__).resolve().parents[3]
POLICY = {
    "v": 1,
    "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
    "account": "acme",
    "nodes": ["node1"],
    "egress": [{"host": "api.allowed.test", "ports": [443, 80]}],
}


def egressd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_clean_policy_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(POLICY))
    done = egressd("policy", "check", "--no-control", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1] == f"{path}: ok"


def test_problems_exit_1_one_line_each(tmp_path: Path) -> None:
    bad = {
        **POLICY,
        "exp": 1000,
        "mode": "audit",
        "egress": [{"host": "*.test"}, {"host": "a.allowed.test", "ports": [0, 70000]}],
    }
    done = egressd("policy", "check", "--no-control", "-", stdin=json.dumps(bad))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "mode: must be one of enforce, report",
        "exp: expired 1970-01-01T00:16:40Z, 56 years ago",
        (
            "egress[0].host: '*.test': a wildcard needs at least 2 labels after '*.' "
            "(it would cover a whole top-level domain)"
        ),
        "egress[1].ports[0]: must be in 1..65535, got 0",
        "egress[1].ports[1]: must be in 1..65535, got 70000",
    ]
    assert done.stderr.splitlines()[-1] == "-: 5 problems"


def test_a_jws_is_checked_with_its_timestamps(tmp_path: Path) -> None:
    now = int(time.time())
    token = sign_payload(
        {**POLICY, "iat": now - 9000, "nbf": now - 9000, "exp": now - 7200}, generate_signing_key()
    )
    path = tmp_path / "p.jws"
    path.write_text(token + "\n")
    done = egressd("policy", "check", "--no-control", str(path))
    assert done.returncode == 1
    assert done.stdout.startswith("exp: expired ")
    assert done.stdout.rstrip().endswith(", 2 h ago")
    assert "note: signature: not verified here" in done.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = egressd("policy", "check", str(tmp_path / "missing.json"))
    assert done.returncode == 2
    assert (
        done.stderr.strip() == f"egressd: error: policy {tmp_path / 'missing.json'}: no such file"
    )
    path = tmp_path / "p.json"
    path.write_text(json.dumps(POLICY))
    # nothing listens on port 9 of loopback: an explicit control plane must answer
    done = egressd("policy", "check", "--control", "http://127.0.0.1:9", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith("egressd: error: control plane http://127.0.0.1:9: ")
    assert len(done.stderr.splitlines()) == 1
    done = egressd("policy", "check", "--control", "http://x", "--no-control", str(path))
    assert done.returncode == 2


def test_no_local_fleet_is_a_note(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(POLICY))
    done = egressd("policy", "check", "--prefix", "egd-nofleet-", str(path))
    assert done.returncode == 0, done.stderr
    assert "note: nodes not checked: " in done.stderr


def test_schema_verb_prints_the_committed_schema() -> None:
    done = egressd("policy", "schema")
    assert done.returncode == 0
    assert done.stdout == (REPO / "egressd" / "policy" / "schema.json").read_text()
