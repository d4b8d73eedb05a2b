"""Credentials the sandbox never sees, end to end (issue 12): plain `requests`
in a gVisor sandbox against the real fleet, whose proxies hold the secret
(`egressd_harness.topology.proxy_secrets`) and the sandbox does not."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from egressd_harness.topology import proxy_secrets
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import Job, proxy_events, sandbox_run

E2E_UDFS = Path(__file__).resolve().parent / "udfs"
API = "api.allowed.test"
EU = "eu.data.allowed.test"
PLACEHOLDER = f"egressd:{proxy_secrets.TEST_SECRET}"


def test_credential_injected_never_in_the_sandbox_and_not_sent_elsewhere(
    fleet: Fleet, tmp_path: Path
) -> None:
    secret_dir = proxy_secrets.secrets_dir(fleet.run_dir)
    value = (secret_dir / proxy_secrets.TEST_SECRET).read_text().strip()
    job = Job(
        fleet,
        "node1",
        [
            {
                "host": API,
                "ports": [80],
                "http": {
                    "allow": [{"methods": ["GET"], "paths": ["/echo-headers", "/data"]}],
                    "credentials": [
                        {
                            "header": "Authorization",
                            "secret": proxy_secrets.TEST_SECRET,
                            "format": "Bearer {}",
                            "placeholder": PLACEHOLDER,
                        }
                    ],
                },
            },
            {"host": EU, "ports": [80]},
        ],
    ).sign()
    salt = secrets.token_hex(8)
    cfg = {
        "api": f"http://{API}",
        "other": f"http://{EU}",
        "placeholder": PLACEHOLDER,
        "salt": salt,
        "digest": hashlib.sha256((salt + value).encode()).hexdigest(),
        "length": len(value),
        "absent": [str(secret_dir), str(fleet.run_dir)],
    }
    done = sandbox_run(
        fleet,
        job,
        tmp_path,
        ["python3", "/e2e/credentials.py", json.dumps(cfg)],
        mounts=[f"{E2E_UDFS}:/e2e"],
        timeout_s=180,
    )
    assert done.returncode == 0, f"sandbox exited {done.returncode}: {done.stderr[-2000:]}"
    assert value not in done.stdout and value not in done.stderr
    got = {r["id"]: r for r in map(json.loads, done.stdout.splitlines()) if "id" in r}
    if os.environ.get("EGRESSD_E2E_SHOW"):
        for r in got.values():
            print(json.dumps(r)[:400])

    # The UDF never had it: not in its environment, argv or any file it can read.
    scan = got["scan"]
    assert scan["found"] == [] and scan["files"] > 10, scan
    assert all(scan["absent"].values()), scan
    # The API got it on every request, whatever the UDF sent.
    expected = hashlib.sha256(f"Bearer {value}".encode()).hexdigest()
    for step in ("api-bare", "api-placeholder", "api-own"):
        assert (got[step]["status"], got[step].get("auth_sha256")) == (200, expected), got[step]
    # The placeholder, or the value echoed back, to another allowed host: refused.
    assert got["other-ok"]["status"] == 200, got["other-ok"]
    for step in ("other-placeholder", "other-query", "other-value-header", "other-value-body"):
        assert (got[step]["status"], got[step]["error"]) == (403, "credential_exfiltration"), got[
            step
        ]

    def events(count: int) -> list[dict[str, object]]:
        deadline = time.monotonic() + 8.0
        while True:
            found = sorted(
                proxy_events(fleet, job.job_id, "http_request"), key=lambda e: str(e["time"])
            )
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    found = events(8)
    api = [e for e in found if e["host"] == API]
    assert [(e["status"], e.get("injected")) for e in api] == [(200, ["Authorization"])] * 3
    refused = [e for e in found if e["reason"] == "credential_exfiltration"]
    where = sorted((e["method"], e["credential"]["kind"], e["credential"]["in"]) for e in refused)  # type: ignore[index]
    assert where == [
        ("GET", "placeholder", "head"),
        ("GET", "placeholder", "head"),
        ("GET", "value", "head"),
        ("POST", "value", "body"),
    ]
    assert all(
        e["level"] == "warning" and e["credential"]["secret"] == proxy_secrets.TEST_SECRET  # type: ignore[index]
        for e in refused
    )
    # Nothing the proxies logged holds the value.
    for proxy in fleet.layout.proxies:
        log = fleet.run_dir / "logs" / f"{proxy.name}.log"
        assert value not in log.read_text(errors="replace")
