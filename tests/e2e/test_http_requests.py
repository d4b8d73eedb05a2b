"""Per-request decisions on plain HTTP, end to end (issue 12): plain `requests`
in a gVisor sandbox, a keep-alive Session, against the real fleet."""

from __future__ import annotations

import time
from pathlib import Path

from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import Job, run_steps, wait_events

EU = "eu.data.allowed.test"
US = "us.data.allowed.test"
API = "api.allowed.test"


def test_keep_alive_host_switch_and_http_rules(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(
        fleet,
        "node1",
        [
            {"host": EU, "ports": [80]},
            {
                "host": API,
                "ports": [80],
                "http": {
                    "allow": [
                        {"methods": ["GET"], "paths": ["/data", "/echo-headers"]},
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
            {"id": "eu", "method": "GET", "url": f"http://{EU}/data"},
            # Same Session, same connection (the pool is keyed by the URL's host), another Host.
            {"id": "switch", "method": "GET", "url": f"http://{EU}/data", "headers": {"Host": US}},
            {"id": "api-get", "method": "GET", "url": f"http://{API}/data?x=1"},
            {
                "id": "api-post",
                "method": "POST",
                "url": f"http://{API}/upload",
                "data": "exfiltrated",
            },
            {"id": "api-path", "method": "GET", "url": f"http://{API}/bytes/10"},
            {"id": "api-again", "method": "GET", "url": f"http://{API}/echo-headers"},
        ],
    )
    assert got["eu"]["status"] == 200 and got["eu"]["json"]["site"] == EU, got["eu"]  # type: ignore[index]
    assert got["switch"]["status"] == 403, got["switch"]
    assert got["switch"]["json"]["error"] == "host_not_allowed", got["switch"]  # type: ignore[index]
    assert got["api-get"]["status"] == 200 and got["api-get"]["json"]["site"] == API  # type: ignore[index]
    assert (got["api-post"]["status"], got["api-post"]["json"]["error"]) == (  # type: ignore[index]
        403,
        "method_not_allowed",
    )
    assert (got["api-path"]["status"], got["api-path"]["json"]["error"]) == (  # type: ignore[index]
        403,
        "path_not_allowed",
    )
    assert got["api-again"]["status"] == 200, got["api-again"]

    def by_host(host: str, count: int) -> list[dict[str, object]]:
        # Connections may go through different proxies: in time order.
        deadline = time.monotonic() + 8.0
        while True:
            found = wait_events(
                fleet, job.job_id, "http_request", lambda e: e.get("host") == host, timeout_s=0.5
            )
            if len(found) >= count or time.monotonic() > deadline:
                return sorted(found, key=lambda e: str(e["time"]))
            time.sleep(0.2)

    eu = by_host(EU, 1)
    us = by_host(US, 1)
    assert [(e["method"], e["path"], e["status"], e["verdict"]) for e in eu] == [
        ("GET", "/data", 200, "allow")
    ]
    assert [(e["status"], e["verdict"], e["reason"]) for e in us] == [
        (403, "deny", "host_not_allowed")
    ]
    # The switch came on the very connection the first request used.
    assert eu[0]["source"] == us[0]["source"]
    api = by_host(API, 4)
    assert [(e["method"], e["path"], e["status"], e["reason"]) for e in api] == [
        ("GET", "/data", 200, "allowed_request"),
        ("POST", "/upload", 403, "method_not_allowed"),
        ("GET", "/bytes/10", 403, "path_not_allowed"),
        ("GET", "/echo-headers", 200, "allowed_request"),
    ]
