"""Tier-1 denials through a real agent (`egressd agent serve`, see test_agent.py).

A sandbox's connect() to a port its policy does not allow is refused at once
(tier 1's RST), and the agent's log gets one ``tier1_denial`` JSON line per
reported denial with the job, the sandbox and the destination; a flood yields
a bounded number of lines whose ``suppressed`` counts add up to every denial.
Its own agent (module-scoped `fleet`).
"""

from __future__ import annotations

import errno
import json
import socket
import time
from typing import Any

import pytest

from egressd.agent.tier1_maps import EVENT_BUCKET
from tests.support.agent_fleet import DEST, JOB_ID, Fleet, metric
from tests.support.root import AGENT_NEEDS
from tests.support.tier1 import in_netns
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*AGENT_NEEDS)


@pytest.fixture(scope="module")
def fleet(agent_fleet: Fleet) -> Fleet:
    return agent_fleet


ABORT = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER 0


def _denials(fleet: Fleet, sandbox_id: str) -> list[dict[str, Any]]:
    assert fleet.agent_log is not None
    out = []
    for line in fleet.agent_log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "tier1_denial" and rec.get("sandbox_id") == sandbox_id:
            out.append(rec)
    return out


def _connect(ns: str, port: int, timeout: float = 3.0) -> tuple[int, float]:
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        start = time.monotonic()
        try:
            sock.connect((DEST, port))
            code = 0
        except TimeoutError:
            code = errno.ETIMEDOUT
        except OSError as exc:
            code = exc.errno or -1
        return code, time.monotonic() - start


def test_denied_connect_is_refused_and_logged_with_its_job(fleet: Fleet) -> None:
    info = fleet.register("sbx-denied", fleet.policy())
    try:
        code, took = _connect(info.netns, 22)
        assert code == errno.ECONNREFUSED, errno.errorcode.get(code, code)
        assert took < 0.1
        got = wait_for(lambda: _denials(fleet, "sbx-denied"), 5, "a tier1_denial line")
        assert len(got) == 1, got
        rec = got[0]
        assert {
            k: rec[k]
            for k in (
                "job_id",
                "sandbox_id",
                "node",
                "source",
                "dst",
                "port",
                "proto",
                "verdict",
                "reason",
                "action",
                "suppressed",
            )
        } == {
            "job_id": JOB_ID,
            "sandbox_id": "sbx-denied",
            "node": "node1",
            "source": str(info.ip),
            "dst": DEST,
            "port": 22,
            "proto": "tcp",
            "verdict": "deny",
            "reason": "port_not_allowed",
            "action": "rst",
            "suppressed": 0,
        }
        assert rec["level"] == "warning"
        assert rec["time"].endswith("Z")
        # The per-sandbox counter carries the job too.
        text = fleet.metrics()
        assert (
            metric(
                text,
                "egressd_tier1_sandbox_packets_total",
                sandbox_id="sbx-denied",
                job_id=JOB_ID,
                verdict="drop",
                reason="port_not_allowed",
            )
            == 1
        )
    finally:
        fleet.unregister("sbx-denied")


def test_a_flood_is_logged_in_a_bounded_number_of_lines(fleet: Fleet) -> None:
    info = fleet.register("sbx-flood-ev", fleet.policy())
    n = 300
    try:
        with in_netns(info.netns):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
        start = time.monotonic()
        try:
            for sock in socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
                sock.setblocking(False)
                sock.connect_ex((DEST, 22))
            elapsed = time.monotonic() - start
            # Every one refused (none left pending to retransmit).
            deadline = time.monotonic() + 2
            while any(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in socks):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            for sock in socks:
                sock.close()
        wait_for(
            lambda: len(_denials(fleet, "sbx-flood-ev")) >= EVENT_BUCKET.burst,
            5,
            "the flood's first lines",
        )
        time.sleep(1.5 / EVENT_BUCKET.rate_per_s)
        flood = _denials(fleet, "sbx-flood-ev")
        bound = EVENT_BUCKET.burst + EVENT_BUCKET.rate_per_s * (time.monotonic() - start) + 1
        assert len(flood) <= bound < n / 2, (len(flood), elapsed)
        # One more denial carries what the rate limit held back.
        assert _connect(info.netns, 23)[0] == errno.ECONNREFUSED
        wait_for(
            lambda: _denials(fleet, "sbx-flood-ev")[-1]["port"] == 23, 5, "the line after the flood"
        )
        lines = _denials(fleet, "sbx-flood-ev")
        assert lines[-1]["suppressed"] > 0
        assert sum(1 + rec["suppressed"] for rec in lines) == n + 1
        assert {rec["job_id"] for rec in lines} == {JOB_ID}
    finally:
        fleet.unregister("sbx-flood-ev")
