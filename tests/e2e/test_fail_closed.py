"""Tier 2 fails closed on a ClientHello it cannot read, through the whole fleet.

A UDF in a runsc sandbox (as nobody, plain sockets: `udfs/client_hello_probe.py`)
resolves the allowed api.allowed.test through the proxy's DNS, then sends a
real ClientHello naming the denied evil.test to that address: slowly (a pause
past the proxy's 1 s peek deadline) and padded past 16 KiB. Before issue 15,
both were allowed under the learned name; now the slow one is reset as
``client_hello_incomplete`` (with no name in the audit event) and the padded
one is decided by its SNI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from egressd.proxy.intercept import DEFAULT_PEEK_TIMEOUT_S
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import API, API_IP, E2E_UDFS, api_job, sandbox_run, wait_events

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PAUSE_S = DEFAULT_PEEK_TIMEOUT_S + 1.5


def test_slow_and_padded_hello_naming_a_denied_host(fleet: Fleet, tmp_path: Path) -> None:
    job = api_job(fleet)
    done = sandbox_run(
        fleet,
        job,
        tmp_path,
        ["python3", "/e2e/client_hello_probe.py", API, "evil.test", str(PAUSE_S)],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = {r["id"]: r for r in map(json.loads, done.stdout.splitlines()) if isinstance(r, dict)}
    assert set(got) == {"slow", "padded"}, done.stdout
    for r in got.values():
        assert r["address"] == API_IP, r  # what the proxy's DNS answered the job
        assert r["outcome"] == "reset", r  # never a ServerHello from api.allowed.test's server

    def event_of(source: object) -> dict[str, Any]:
        found = wait_events(
            fleet, job.job_id, "connection", lambda e: e.get("source") == source, timeout_s=10
        )
        assert len(found) == 1, found
        return found[0]

    slow = event_of(got["slow"]["source"])
    assert (slow["verdict"], slow["reason"], slow["host"]) == (
        "deny",
        "client_hello_incomplete",
        None,
    ), slow
    assert (slow["dst"], slow["port"], slow["bytes_up"]) == (API_IP, 443, 0), slow
    assert float(slow["duration_ms"]) >= DEFAULT_PEEK_TIMEOUT_S * 1000 * 0.9, slow

    padded = event_of(got["padded"]["source"])
    assert (padded["verdict"], padded["reason"], padded["host"]) == (
        "deny",
        "no_matching_rule",
        "evil.test",
    ), padded
