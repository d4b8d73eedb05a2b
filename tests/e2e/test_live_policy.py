"""Live policies through the whole fleet: a UDF in a real gVisor sandbox downloads
slowly through the proxies; `egressd job delete` (the CLI, from the host
namespace) resets that open download within a second, and the proxy's audit
event for it ends with ``policy_revoked``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import (
    API,
    E2E_UDFS,
    ROOMY_LIMITS,
    SLOW_BPS,
    LimitedJob,
    job_cli,
    log_time,
    sandbox_argv,
    wait_events,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

RESET_WITHIN_S = 1.0


def control_deleted_at(fleet: Fleet, job_id: str) -> float:
    for line in (fleet.run_dir / "logs" / "control.log").read_text().splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if item.get("event") == "policy_deleted" and item.get("job_id") == job_id:
                return log_time(item)
    raise AssertionError("no policy_deleted event in the control plane's log")


def test_job_delete_resets_an_open_download_in_a_sandbox(fleet: Fleet, tmp_path: Path) -> None:
    job = LimitedJob(fleet, "node1", [{"host": API, "ports": [80]}])
    job.limits = {**ROOMY_LIMITS, "bandwidth_bps": SLOW_BPS}
    job.sign()
    listed = job_cli(fleet, "list")
    assert listed.returncode == 0, listed.stderr
    assert job.job_id in listed.stdout
    got = job_cli(fleet, "get", job.job_id)
    assert got.returncode == 0 and got.stdout.strip() == job.jws, got.stderr

    cmd = sandbox_argv(
        fleet,
        job,
        job.policy_file(tmp_path),
        ["python3", "/e2e/slow_download.py", API, f"/bytes/{200 * 1024 * 1024}"],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=120,
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("event") == "flowing", (first, proc.stderr.read() if proc.poll() else "")
        cli_started = time.time()
        deleted = job_cli(fleet, "delete", job.job_id)
        cli_done = time.time()
        assert deleted.returncode == 0, deleted.stderr
        ended = json.loads(proc.stdout.readline())
        assert ended["event"] == "ended" and ended["outcome"] == "reset", ended
        # When the sandbox saw the reset (its clock is the host's), against the
        # control plane's own log of the delete.
        deleted_at = control_deleted_at(fleet, job.job_id)
        assert cli_started <= deleted_at <= cli_done
        print(
            f"\nsandbox saw the reset {1000 * (ended['t'] - deleted_at):.0f} ms after the "
            f"control plane deleted the job (the CLI took {1000 * (cli_done - cli_started):.0f} ms)"
        )
        assert ended["t"] - deleted_at <= RESET_WITHIN_S
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = wait_events(
        fleet, job.job_id, "connection", lambda e: e.get("end") == "policy_revoked"
    )
    assert len(events) == 1, events
    assert events[0]["verdict"] == "allow" and events[0]["port"] == 80
    assert int(events[0]["bytes_down"]) > 65536
    assert log_time(events[0]) - deleted_at <= RESET_WITHIN_S
    again = job_cli(fleet, "get", job.job_id)
    assert again.returncode == 1 and "holds no policy" in again.stderr


def test_policy_propagation_benchmark_p99_under_a_second(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "policy_propagation.json"
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[2] / "benchmarks" / "policy_propagation.py"),
            "--run-dir",
            str(fleet.run_dir),
            "--prefix",
            fleet.layout.prefix,
            "--changes",
            "100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    print("\n" + done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["missed"] == 0
    assert result["all_proxies"]["n"] == 100 * len(fleet.layout.proxies)
    assert result["all_agents"]["n"] == 100 * len(fleet.layout.nodes)
    assert result["all"]["p99_ms"] <= 1000.0, result["all"]
    assert result["all_agents"]["p99_ms"] <= 1000.0, result["all_agents"]


def test_job_put_replacement_resets_what_it_no_longer_allows(fleet: Fleet, tmp_path: Path) -> None:
    job = LimitedJob(fleet, "node1", [{"host": API, "ports": [80]}])
    job.limits = {**ROOMY_LIMITS, "bandwidth_bps": SLOW_BPS}
    job.sign()
    cmd = sandbox_argv(
        fleet,
        job,
        job.policy_file(tmp_path),
        ["python3", "/e2e/slow_download.py", API, f"/bytes/{200 * 1024 * 1024}"],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=120,
    )
    replacement = tmp_path / "replacement.json"
    replacement.write_text(
        json.dumps(
            {
                "v": 1,
                "job_id": job.job_id,
                "account": "e2e",
                "nodes": ["node1"],
                "egress": [{"host": "other.allowed.test", "ports": [80]}],
                "limits": {**ROOMY_LIMITS, "bandwidth_bps": SLOW_BPS},
            }
        )
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("event") == "flowing", first
        put = job_cli(fleet, "put", str(replacement))
        assert put.returncode == 0, put.stderr
        jws = put.stdout.strip()
        assert jws.count(".") == 2 and jws != job.jws
        ended = json.loads(proc.stdout.readline())
        assert ended["event"] == "ended" and ended["outcome"] == "reset", ended
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = wait_events(
        fleet, job.job_id, "connection", lambda e: e.get("end") == "policy_changed"
    )
    assert len(events) == 1, events
    signed_at = None
    for line in (fleet.run_dir / "logs" / "control.log").read_text().splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if (
                item.get("event") == "policy_signed"
                and item.get("job_id") == job.job_id
                and item.get("replaced")
            ):
                signed_at = log_time(item)
    assert signed_at is not None
    print(
        f"\nreplacement reset the download {1000 * (ended['t'] - signed_at):.0f} ms after signing"
    )
    assert ended["t"] - signed_at <= RESET_WITHIN_S
    assert job_cli(fleet, "delete", job.job_id).returncode == 0
