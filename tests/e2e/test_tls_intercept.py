"""TLS interception end to end (issue 12): plain `requests` in a gVisor sandbox,
HTTPS with default certificate verification, against the real fleet.

The sandbox trusts the fleet's interception CA (its bundle has the control
plane's published certificate); the proxies verify the internet's servers
against the test CA. The internet's :8443 serves a certificate nobody trusts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from egressd.layout import CONTROL_ADDR, CONTROL_PORT, CTL_NS
from egressd_harness.topology import interception
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.probe import http_request
from tests.support.fleet import (
    E2E_UDFS,
    Job,
    metric_sum,
    metrics,
    run_steps,
    sandbox_run,
    wait_events,
)

API = "api.allowed.test"
UNTRUSTED_PORT = 8443
H2_PORT = 9443


def test_intercepted_https_requests(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(
        fleet,
        "node1",
        [
            {
                "host": API,
                "ports": [443, UNTRUSTED_PORT],
                "tls": "intercept",
                "http": {
                    "allow": [
                        {"methods": ["GET", "HEAD"], "paths": ["/data", "/echo-headers"]},
                    ]
                },
            },
        ],
    ).sign()
    got = run_steps(
        fleet,
        job,
        tmp_path,
        [
            {"id": "get", "method": "GET", "url": f"https://{API}/data?x=1"},
            {"id": "again", "method": "GET", "url": f"https://{API}/echo-headers"},
            {"id": "post", "method": "POST", "url": f"https://{API}/upload", "data": "exfiltrated"},
            {"id": "path", "method": "GET", "url": f"https://{API}/bytes/10"},
            {"id": "untrusted", "method": "GET", "url": f"https://{API}:{UNTRUSTED_PORT}/data"},
        ],
    )
    assert got["get"]["status"] == 200, got["get"]
    assert got["get"]["json"]["site"] == API and got["get"]["json"]["scheme"] == "https"  # type: ignore[index]
    # The server saw the proxy's own connection (from its egress address).
    assert str(got["get"]["json"]["client"]).startswith("203.0.113.2"), got["get"]  # type: ignore[index]
    assert got["again"]["status"] == 200, got["again"]
    assert (got["post"]["status"], got["post"]["json"]["error"]) == (  # type: ignore[index]
        403,
        "method_not_allowed",
    ), got["post"]
    assert (got["path"]["status"], got["path"]["json"]["error"]) == (  # type: ignore[index]
        403,
        "path_not_allowed",
    ), got["path"]
    assert "error" in got["untrusted"] and "status" not in got["untrusted"], got["untrusted"]

    deadline = time.monotonic() + 8.0
    while True:
        found = wait_events(
            fleet, job.job_id, "http_request", lambda e: e.get("host") == API, timeout_s=0.5
        )
        if len(found) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found.sort(key=lambda e: str(e["time"]))
    assert [(e["method"], e["path"], e["status"], e["verdict"], e["reason"]) for e in found] == [
        ("GET", "/data", 200, "allow", "allowed_request"),
        ("GET", "/echo-headers", 200, "allow", "allowed_request"),
        ("POST", "/upload", 403, "deny", "method_not_allowed"),
        ("GET", "/bytes/10", 403, "deny", "path_not_allowed"),
    ]
    assert all(e["port"] == 443 for e in found)
    refused = wait_events(
        fleet, job.job_id, "connection", lambda e: e.get("reason") == "upstream_tls_unverified"
    )
    assert refused and refused[0]["verdict"] == "deny" and refused[0]["port"] == UNTRUSTED_PORT
    assert refused[0]["host"] == API
    counted = sum(
        metric_sum(
            metrics(fleet, p.name),
            "egressd_connections_total",
            reason="upstream_tls_unverified",
            verdict="deny",
        )
        for p in fleet.layout.proxies
    )
    assert counted >= 1


def test_interception_ca_published_is_the_one_sandboxes_trust(fleet: Fleet) -> None:
    reply = http_request(
        fleet.ns(CTL_NS), "GET", str(CONTROL_ADDR), CONTROL_PORT, "/v1/interception-ca.pem"
    )
    assert reply.status == 200
    assert reply.body == interception.public_cert(fleet.run_dir).read_bytes()
    assert b"PRIVATE" not in reply.body
    test_ca = (fleet.run_dir / "ca" / "ca.pem").read_bytes()
    assert reply.body != test_ca


def test_http2_through_interception(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(
        fleet,
        "node1",
        [
            {
                "host": API,
                "ports": [H2_PORT],
                "tls": "intercept",
                "http": {
                    "allow": [
                        {"methods": ["GET"], "paths": ["/data", "/bytes/*"]},
                    ]
                },
            },
        ],
    ).sign()
    steps = [
        {"id": "get", "method": "GET", "path": "/data?x=1"},
        {"id": "big", "method": "GET", "path": "/bytes/300000"},
        {"id": "post", "method": "POST", "path": "/data", "body": "exfiltrated"},
    ]
    done = sandbox_run(
        fleet,
        job,
        tmp_path,
        ["python3", "/e2e/h2_session.py", API, str(H2_PORT), json.dumps(steps)],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=120,
    )
    assert done.returncode == 0, f"sandbox exited {done.returncode}: {done.stderr[-2000:]}"
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines[0] == {"alpn": "h2"}, done.stdout
    by_id = {line["id"]: line for line in lines if "id" in line}
    assert by_id["get"]["status"] == 200, by_id
    assert by_id["get"]["json"]["protocol"] == "h2" and by_id["get"]["json"]["site"] == API
    assert str(by_id["get"]["json"]["client"]).startswith("203.0.113.2")  # the proxy's
    assert (by_id["big"]["status"], by_id["big"]["length"]) == (200, 300_000)
    assert by_id["post"]["status"] == 403, by_id
    assert by_id["post"]["json"]["error"] == "method_not_allowed"
    assert lines[-1] == {"goaway": True}

    deadline = time.monotonic() + 8.0
    while True:
        found = wait_events(
            fleet, job.job_id, "http_request", lambda e: e.get("port") == H2_PORT, timeout_s=0.5
        )
        if len(found) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted((e["method"], e["path"], e["status"], e["reason"]) for e in found) == sorted(
        [
            ("GET", "/data", 200, "allowed_request"),
            ("GET", "/bytes/300000", 200, "allowed_request"),
            ("POST", "/data", 403, "method_not_allowed"),
        ]
    )
