"""Tier-1 denials are immediate and attributed, end to end (issue 14, items 1 and 2).

A UDF in a real gVisor sandbox connects to destinations tier 1 denies: a port
its policy does not allow, the metadata address, another node's sandbox range,
the control plane. Tier 1 answers each SYN with a RST, gVisor's netstack turns
it into ECONNREFUSED, and the UDF sees it within milliseconds, with a plain
socket and with `requests`, instead of waiting out its connect timeout. The
node agent's log then holds one ``tier1_denial`` line per denial, with the
job, the sandbox and the destination.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from egressd.layout import CONTROL_ADDR, CONTROL_PORT, METADATA
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import Job, sandbox_run

E2E_UDFS = Path(__file__).resolve().parent / "udfs"
UDF = "/e2e/denied_connect.py"
API_IP = "203.0.113.10"
REFUSED_WITHIN_MS = 100.0
# Long enough that a silent drop could never pass for a refusal.
CONNECT_TIMEOUT_S = 5.0

pytestmark = pytest.mark.root


def _agent_denials(fleet: Fleet, node: str, job_id: str) -> list[dict[str, object]]:
    path = fleet.run_dir / "logs" / f"{node}.log"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(rec, dict)
            and rec.get("event") == "tier1_denial"
            and rec.get("job_id") == job_id
        ):
            out.append(rec)
    return out


def test_tier1_denials_are_refused_at_once_and_logged_with_the_job(
    fleet: Fleet, tmp_path: Path
) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test", "ports": [443, 80]}]).sign()
    other_sandbox = fleet.layout.node("node2").sandbox_cidr.network_address + 2
    # check id -> (the check, then the denial tier 1 logs: destination, port, reason)
    denied: dict[str, tuple[dict[str, object], str, int, str]] = {
        "port_22": ({"kind": "socket", "host": API_IP, "port": 22}, API_IP, 22, "port_not_allowed"),
        "port_8443_requests": (
            {"kind": "requests", "url": f"http://{API_IP}:8443/"},
            API_IP,
            8443,
            "port_not_allowed",
        ),
        "metadata_requests": (
            {"kind": "requests", "url": f"http://{METADATA}/latest/meta-data/"},
            str(METADATA),
            80,
            "denied_range",
        ),
        "other_node_sandbox": (
            {"kind": "socket", "host": str(other_sandbox), "port": 443},
            str(other_sandbox),
            443,
            "fleet_range",
        ),
        "control_plane": (
            {"kind": "socket", "host": str(CONTROL_ADDR), "port": CONTROL_PORT},
            str(CONTROL_ADDR),
            CONTROL_PORT,
            "fleet_range",
        ),
    }
    targets = [
        {"id": key, "timeout": CONNECT_TIMEOUT_S, **spec} for key, (spec, *_rest) in denied.items()
    ]
    # The allowed port still connects: tier 1 refuses only what it denies.
    targets.append(
        {
            "id": "allowed",
            "kind": "socket",
            "host": API_IP,
            "port": 443,
            "timeout": CONNECT_TIMEOUT_S,
        }
    )
    done = sandbox_run(
        fleet,
        job,
        tmp_path,
        ["python3", UDF, json.dumps(targets)],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = {r["id"]: r for r in map(json.loads, done.stdout.splitlines()) if "id" in r}
    print(
        "\ntier-1 refusals seen by the UDF (ms):",
        {k: (v["outcome"], v["ms"]) for k, v in got.items()},
    )

    assert got["allowed"]["outcome"] == "connected", got["allowed"]
    for key in denied:
        result = got[key]
        assert result["outcome"] == "refused", (key, result)
        assert result["ms"] < REFUSED_WITHIN_MS, (key, result)
        if denied[key][0]["kind"] == "socket":
            assert result["errno"] == "ECONNREFUSED", (key, result)

    want = {(dst, port, reason) for _, dst, port, reason in denied.values()}
    deadline = time.monotonic() + 10
    while True:
        lines = _agent_denials(fleet, "node1", job.job_id)
        seen = {(r["dst"], r["port"], r["reason"]) for r in lines}
        if want <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert want <= seen, lines
    for rec in lines:
        assert rec["node"] == "node1"
        assert rec["verdict"] == "deny"
        assert rec["action"] == "rst"
        assert rec["proto"] == "tcp"
        assert str(rec["sandbox_id"])
        assert rec["suppressed"] == 0
    # One line per denial: a refused connect() is never retried by the kernel.
    assert len(lines) == len(denied), lines
