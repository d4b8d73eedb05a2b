"""Live policies through a real control plane process and a real proxy process.

The fleet of `test_proxy_dataplane` (tests/support/proxy_fleet.py; fixtures in conftest.py:
namespaces, the control plane, the inet HTTP server, the proxy process) plus a minimal node
agent (`MINI_AGENT`) per test for one job, so that a plain socket from the sandbox
address in node1 is relayed by the proxy. A large file on the inet server,
downloaded under a low bandwidth limit, is "an open download".

Checked: the proxy subscribes to the watch; an open relayed connection is
reset within 1 s of a DELETE (audit ``end: policy_revoked``) and of a
replacement that no longer allows it (``policy_changed``); a replacement
that adds a destination allows a new connection at once; with the control
plane stopped, open connections go on, the held policy still admits new
ones until its ``exp``, then the open one is reset (``policy_expired``) and
new ones are refused; after a restart the proxy resyncs.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from egressd.net import netns as kn
from tests.support.proxy_fleet import (
    REPO,
    SANDBOX,
    SITE,
    SITE_80,
    Fleet,
    ProxyProcess,
    agent_for,
    control,
    policy,
    start_control,
    stop_process,
    try_connect,
    watch_up,
)
from tests.support.waits import wait_for


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    return proxy_fleet


BIG = "big.bin"
BIG_BYTES = 200 * 1024 * 1024
RESET_WITHIN_S = 1.0
OTHER = {"host": "other.allowed.test", "ports": [443]}


@pytest.fixture(scope="module")
def big_file(fleet: Fleet) -> str:
    path = fleet.root / "www" / BIG
    with path.open("wb") as fh:
        fh.truncate(BIG_BYTES)
    return BIG


class Download:
    """GET the big file from the sandbox address; a thread reads until the end or a reset."""

    def __init__(self, fleet: Fleet, path: str = BIG) -> None:
        self.sock = kn.netns_socket(fleet.node_ns)
        self.sock.settimeout(10)
        self.sock.bind((SANDBOX, 0))
        self.sock.connect((SITE, 80))
        self.sock.sendall(f"GET /{path} HTTP/1.0\r\nHost: {SITE}\r\n\r\n".encode())
        self.received = 0
        self.ended_at: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += len(chunk)
            self.error = "eof"
        except ConnectionResetError:
            self.error = "reset"
        except OSError as exc:
            self.error = repr(exc)
        self.ended_at = time.monotonic()

    def wait_flowing(self, nbytes: int = 100_000) -> None:
        wait_for(lambda: self.received >= nbytes or self.ended_at is not None, 10, "bytes")
        assert self.ended_at is None, f"download ended early: {self.error}"

    def wait_end(self, timeout: float) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connection_events(proxy_: ProxyProcess, job: uuid.UUID) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in proxy_.log().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "connection" and e.get("job_id") == str(job)]


def ended_with(proxy_: ProxyProcess, job: uuid.UUID, end: str) -> dict[str, Any]:
    def found() -> bool:
        return any(e.get("end") == end for e in connection_events(proxy_, job))

    wait_for(found, 5, f"a connection event with end {end}")
    return next(e for e in connection_events(proxy_, job) if e.get("end") == end)


def test_the_watch_answers_changes_and_resyncs(fleet: Fleet) -> None:
    status, first = control(fleet, "GET", "/v1/watch")
    assert status == 200 and first["resync"] is True
    job = uuid.uuid4()
    assert control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, SITE_80))[0] == 200
    status, answer = control(fleet, "GET", f"/v1/watch?since={first['revision']}&timeout=1")
    assert status == 200
    assert {"rev": first["revision"] + 1, "kind": "job", "key": str(job), "op": "put"} in answer[
        "changes"
    ]
    ahead = answer["revision"] + 100  # a state restored from an older backup: re-list
    assert control(fleet, "GET", f"/v1/watch?since={ahead}")[1]["resync"] is True
    assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204


def test_an_open_download_is_reset_within_a_second_of_a_delete(
    fleet: Fleet, proxy: ProxyProcess, big_file: str
) -> None:
    job = uuid.uuid4()
    assert control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, SITE_80))[0] == 200
    wait_for(lambda: watch_up(proxy), 10, "the proxy's watch")
    with agent_for(fleet, job):
        download = Download(fleet)
        try:
            download.wait_flowing()
            deleted = time.monotonic()
            assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204
            download.wait_end(5)
            assert download.error == "reset", download.error
            assert download.ended_at is not None
            assert download.ended_at - deleted <= RESET_WITHIN_S
            event = ended_with(proxy, job, "policy_revoked")
            assert (event["verdict"], event["reason"]) == ("allow", "allowed_cidr")
            assert event["bytes_down"] > 0
            assert not try_connect(fleet)  # and new connections are refused
        finally:
            download.close()


def test_a_replacement_resets_what_it_no_longer_allows_and_allows_what_it_adds(
    fleet: Fleet, proxy: ProxyProcess, big_file: str
) -> None:
    job = uuid.uuid4()
    first = control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, SITE_80))[1]
    wait_for(lambda: watch_up(proxy), 10, "the proxy's watch")
    with agent_for(fleet, job):
        download = Download(fleet)
        try:
            download.wait_flowing()
            replaced_at = time.monotonic()
            status, second = control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, OTHER))
            assert status == 200 and second["digest"] != first["digest"]
            download.wait_end(5)
            assert download.error == "reset", download.error
            assert download.ended_at is not None
            assert download.ended_at - replaced_at <= RESET_WITHIN_S
            ended_with(proxy, job, "policy_changed")
            assert not try_connect(fleet)
        finally:
            download.close()

        # A replacement that adds the site back: a new connection is allowed at once.
        added_at = time.monotonic()
        assert (
            control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, OTHER, SITE_80))[0] == 200
        )
        wait_for(lambda: try_connect(fleet), 3, "a connection allowed by the replacement")
        assert time.monotonic() - added_at <= 2 * RESET_WITHIN_S + 0.5
        assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204


def restart_control(fleet: Fleet, *extra: str) -> None:
    stop_process(fleet.control)
    start_control(fleet, *extra, log=f"control-{time.monotonic_ns()}.log")


def test_control_plane_down_then_expiry_then_back(
    fleet: Fleet, proxy: ProxyProcess, big_file: str
) -> None:
    """TTL 60 s (the minimum): the test waits for one policy's exp with the control plane down."""
    restart_control(fleet, "--policy-ttl", "60")
    job = uuid.uuid4()
    status, signed = control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, SITE_80))
    assert status == 200
    exp = signed["exp"]
    wait_for(lambda: watch_up(proxy), 10, "the proxy's watch")
    _, before = control(fleet, "GET", "/v1/watch")
    try:
        with agent_for(fleet, job):
            download = Download(fleet)
            try:
                download.wait_flowing()
                stop_process(fleet.control)
                wait_for(
                    lambda: not watch_up(proxy), 10, "the proxy noticing the control plane is down"
                )
                received = download.received
                time.sleep(1.0)
                assert download.ended_at is None and download.received > received  # goes on
                assert try_connect(fleet)  # the held policy admits new connections until exp
                # Wait for exp: the open download is reset with policy_expired.
                download.wait_end(max(0.0, exp - time.time()) + 5)
                assert download.error == "reset", download.error
                assert download.ended_at is not None
                assert time.time() - exp < 5  # reset at exp (plus the join's slack)
                ended_with(proxy, job, "policy_expired")
                assert not try_connect(fleet)  # expired: refused
            finally:
                download.close()

            restart_control(fleet)
            wait_for(lambda: watch_up(proxy), 15, "the proxy resubscribing")
            metrics = proxy.metrics()
            assert metrics[("egressd_watch_answers_total", (("result", "resync"),))] >= 2
            # Back: the control plane re-signs on GET, the job works again.
            wait_for(lambda: try_connect(fleet), 10, "the job allowed again after the restart")
    finally:
        if fleet.control is None or fleet.control.poll() is not None:
            restart_control(fleet)
        control(fleet, "DELETE", f"/v1/jobs/{job}/policy")
    _, after = control(fleet, "GET", "/v1/watch")
    assert after["revision"] >= before["revision"]  # the revision survived the restarts


def test_revision_survives_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    job = uuid.uuid4()
    assert control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, SITE_80))[0] == 200
    revision = control(fleet, "GET", "/v1/watch")[1]["revision"]
    restart_control(fleet)
    answer = control(fleet, "GET", f"/v1/watch?since={revision - 1}")[1]
    assert answer["revision"] == revision and answer["resync"] is True
    assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204
    assert control(fleet, "GET", f"/v1/watch?since={revision}")[1]["changes"] == [
        {"rev": revision + 1, "kind": "job", "key": str(job), "op": "delete"}
    ]


def job_cli(
    fleet: Fleet, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "job",
            *args,
            "--netns",
            fleet.ctl,
            "--run-dir",
            str(fleet.root / "no-run-dir"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=str(REPO),
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_the_job_cli_puts_gets_lists_and_deletes(fleet: Fleet, tmp_path: Path) -> None:
    job = uuid.uuid4()
    file = tmp_path / "policy.json"
    file.write_text(json.dumps(policy(job, SITE_80)))
    token_file = tmp_path / "token"
    token_file.write_text(fleet.admin_token + "\n")

    no_token = job_cli(fleet, "put", str(file))
    assert no_token.returncode == 2 and "EGRESSD_ADMIN_TOKEN" in no_token.stderr
    wrong = job_cli(fleet, "put", str(file), env={"EGRESSD_ADMIN_TOKEN": "nope"})
    assert wrong.returncode == 1 and "unauthorized" in wrong.stderr

    put = job_cli(fleet, "put", str(file), "--token-file", str(token_file))
    assert put.returncode == 0, put.stderr
    jws = put.stdout.strip()
    status, held = control(fleet, "GET", f"/v1/jobs/{job}/policy")
    assert status == 200 and held["jws"] == jws

    got = job_cli(fleet, "get", str(job), "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["jws"] == jws
    listed = job_cli(fleet, "list", "--json")
    assert listed.returncode == 0
    row = next(j for j in json.loads(listed.stdout)["jobs"] if j["job_id"] == str(job))
    assert row["digest"] == held["digest"] and row["nodes"] == ["node1"]

    bad = dict(policy(job, SITE_80), nodes=["node9"])
    file.write_text(json.dumps(bad))
    refused = job_cli(fleet, "put", str(file), env={"EGRESSD_ADMIN_TOKEN": fleet.admin_token})
    assert refused.returncode == 1 and "unknown_node" in refused.stderr

    gone = job_cli(fleet, "delete", str(job), env={"EGRESSD_ADMIN_TOKEN": fleet.admin_token})
    assert gone.returncode == 0, gone.stderr
    assert control(fleet, "GET", f"/v1/jobs/{job}/policy")[0] == 404
    again = job_cli(fleet, "get", str(job))
    assert again.returncode == 1 and "holds no policy" in again.stderr
