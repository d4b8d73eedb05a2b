"""`egressd control serve` as a real process on loopback: serve, SIGTERM, restart, read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from egressd.policy.jws import verify_policy
from egressd.policy.keys import trusted_from_jwks
from tests.support.control_process import JOB_ID, NODE1, ControlProcess, Paths, start

POLICY = {
    "v": 1,
    "account": "acme",
    "nodes": ["node1"],
    "egress": [{"host": "api.allowed.test", "ports": [443]}],
}
PROXY1 = {"underlay": "198.18.0.21", "egress": "203.0.113.21"}


def test_state_survives_restart(paths: Paths, spawn: list[ControlProcess]) -> None:
    first = start(spawn, paths)
    assert stat_mode(paths.token) == 0o600
    token = paths.token.read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}

    listening = [e for e in first.events() if e["event"] == "listening"]
    assert listening and listening[0]["host"] == "127.0.0.1"
    assert listening[0]["port"] == first.port

    assert requests.get(f"{first.base}/readyz", timeout=5).status_code == 200
    policy_url = f"{first.base}/v1/jobs/{JOB_ID}/policy"
    unknown = requests.put(policy_url, json=POLICY, headers=auth, timeout=5)
    assert unknown.status_code == 422, unknown.text  # node1 is not registered yet
    assert unknown.json()["field"] == "nodes[0]"
    node = requests.put(f"{first.base}/v1/nodes/node1", json=NODE1, headers=auth, timeout=5)
    assert node.status_code == 200, node.text
    put = requests.put(policy_url, json=POLICY, headers=auth, timeout=5)
    assert put.status_code == 200, put.text
    signed = put.json()
    proxy = requests.put(f"{first.base}/v1/proxies/proxy1", json=PROXY1, headers=auth, timeout=5)
    assert proxy.status_code == 200, proxy.text
    denied = requests.put(f"{first.base}/v1/nodes/node2", json=NODE1, timeout=5)
    assert denied.status_code == 401

    assert first.terminate() == 0
    assert not paths.port_file.exists()
    events = [e["event"] for e in first.events()]
    assert {"policy_signed", "node_registered", "proxy_registered", "stopped"} <= set(events)

    second = start(spawn, paths)
    assert paths.token.read_text().strip() == token  # the existing token is kept
    got = requests.get(f"{second.base}/v1/jobs/{JOB_ID}/policy", timeout=5)
    assert got.status_code == 200
    assert got.json() == signed
    keys = trusted_from_jwks(requests.get(f"{second.base}/v1/keys", timeout=5).json())
    assert str(verify_policy(got.json()["jws"], keys).policy.job_id) == JOB_ID
    assert requests.get(f"{second.base}/v1/nodes", timeout=5).json() == {
        "nodes": [{"name": "node1", **NODE1}]
    }
    assert requests.get(f"{second.base}/v1/proxies/proxy1", timeout=5).json() == {
        "name": "proxy1",
        **PROXY1,
    }
    assert second.terminate() == 0


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "not-an-address"],
        ["--listen", "127.0.0.1:99999"],
        ["--listen", "localhost:8080"],
        ["--policy-ttl", "5"],
    ],
)
def test_bad_options_exit_2_with_one_line(paths: Paths, argv: list[str]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "control",
            "serve",
            "--state-dir",
            str(paths.state),
            "--key",
            str(paths.keys / "signing.key"),
            "--admin-token-file",
            str(paths.token),
            *argv,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("egressd: error: ")
    assert not paths.state.exists()  # nothing was started


def test_missing_signing_key_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "control",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--key",
            str(tmp_path / "nope" / "signing.key"),
            "--admin-token-file",
            str(tmp_path / "token"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("egressd: error: missing: signing key")
