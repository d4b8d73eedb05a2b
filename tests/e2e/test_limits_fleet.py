"""Limits through the whole fleet: a gVisor sandbox, the node agent, both proxies.

A job's `max_connections` and `bandwidth_bps` are fleet-wide: with the two
proxies of the topology registered, each proxy enforces half
(`egressd.limits.fleet_share`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import (
    API,
    API_IP,
    ROOMY_LIMITS,
    LimitedJob,
    conn_events,
    metric_sum,
    metrics,
    run_checks,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PROXIES = ("proxy1", "proxy2")


def limited_job(fleet: Fleet, **limits: int) -> LimitedJob:
    job = LimitedJob(fleet, "node1", [{"host": API, "ports": [443, 80]}])
    job.limits = {**ROOMY_LIMITS, **limits}
    return job.sign()


def test_job_connection_cap_across_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    cap, n = 4, 12  # 2 per proxy
    job = limited_job(fleet, max_connections=cap)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "many", "kind": "concurrent", "host": API, "port": 80, "n": n, "timeout": 30},
        ],
    )["many"]
    # The proxy's kernel accepts every connect; the proxy resets those beyond
    # the job's share at once (some before the client saw its connect end).
    assert 1 <= got["ok"] <= cap, got
    assert got["n_errors"] == n - got["ok"], got
    events = conn_events(fleet, job, dst=API_IP, port=80, count=n, timeout_s=15)
    refused = [e for e in events if e["reason"] == "job_connection_limit"]
    assert len(refused) == n - got["ok"], events
    assert all(e["verdict"] == "deny" for e in refused)
    refusals = sum(
        metric_sum(
            metrics(fleet, p),
            "egressd_limit_refusals_total",
            job_id=job.job_id,
            reason="job_connection_limit",
        )
        for p in PROXIES
    )
    assert refusals == len(refused)


def test_job_bandwidth_across_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    rate_bps = 16_000_000  # fleet-wide: one connection goes through one proxy, 8 Mbit/s
    size = 3_000_000
    job = limited_job(fleet, bandwidth_bps=rate_bps)
    got = run_checks(
        fleet,
        job,
        tmp_path,
        [
            {"id": "dl", "kind": "download", "url": f"https://{API}/bytes/{size}", "timeout": 60},
        ],
    )["dl"]
    assert got["bytes"] == size, got
    measured = size * 8 / float(got["seconds"])
    share = rate_bps / len(PROXIES)
    print(f"\none connection of a {rate_bps / 1e6:.0f} Mbit/s job: {measured / 1e6:.2f} Mbit/s")
    assert 0.7 * share <= measured <= 1.1 * share, measured
    paced = sum(metric_sum(metrics(fleet, p), "egressd_paced_chunks_total") for p in PROXIES)
    assert paced > 0
