"""Live policies through the whole fleet, node agents included (issue 11, "Done when").

UDFs run in real gVisor sandboxes; the fleet's agents have a control plane
(`discovery.control_url`), so they check registrations against it and
follow its watch, like the proxies:

* a replacement that adds a host (on a port the first policy did not have)
  lets a running sandbox reach it within a second or two: the agent opened
  the port at tier 1, the proxies' DNS and tier 2 allow the name;
* a policy the control plane does not hold (signed locally with the fleet's
  own key), or holds with other content, is refused at registration:
  `sandbox run` exits 125 with one line that says to use `egressd job put`;
* the control plane stopped mid-run: an open download goes on on the held
  policy, an unknown job is refused (proxy: no policy to fetch; agent:
  registration refused), the download is reset at the policy's `exp`
  (`end: policy_expired`), and after a restart proxies and agents resubscribe
  and resync, and the job runs again.

(A delete and a replacement that no longer allows a host resetting an open
download, and the propagation benchmark: test_live_policy.py.)
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egressd.geneve.codec import JobOption, encode
from egressd.layout import GENEVE_PORT
from egressd.net import netns as kn
from egressd.policy import jws, keys
from egressd_harness.topology import procs
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import (
    API,
    E2E_UDFS,
    ROOMY_LIMITS,
    SLOW_BPS,
    Job,
    LimitedJob,
    job_cli,
    log_time,
    metric_sum,
    metrics,
    sandbox_argv,
    sandbox_run,
    wait_events,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(420)]

ADDED = "eu.data.allowed.test"
SHORT_TTL_S = 60  # the control plane's minimum --policy-ttl


def _lines(proc: subprocess.Popen[str]) -> Iterator[dict[str, object]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def _finish(proc: subprocess.Popen[str]) -> str:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def _member_log(fleet: Fleet, name: str) -> list[dict[str, object]]:
    out = []
    path = fleet.run_dir / "logs" / f"{name}.log"
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def _wait_log(
    fleet: Fleet, name: str, pred: Callable[[dict[str, object]], bool], timeout_s: float = 10.0
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in _member_log(fleet, name) if pred(e)]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such event in {name}'s log")
        time.sleep(0.1)


# --- a replacement that adds a host ---------------------------------------------------------


def test_a_replacement_that_adds_a_host_allows_it_in_a_running_sandbox(
    fleet: Fleet, tmp_path: Path
) -> None:
    job = LimitedJob(fleet, "node1", [{"host": API, "ports": [443]}]).sign()
    url = f"http://{ADDED}/data"
    cmd = sandbox_argv(
        fleet,
        job,
        job.policy_file(tmp_path),
        ["python3", "/e2e/retry_get.py", url, "200", "0.2", "2"],
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
                "egress": [{"host": API, "ports": [443]}, {"host": ADDED, "ports": [80]}],
                "limits": ROOMY_LIMITS,
            }
        )
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before: list[dict[str, object]] = []
    after: list[dict[str, object]] = []
    put_at = None
    try:
        for line in _lines(proc):
            if line.get("ready"):
                continue
            if put_at is None:
                before.append(line)
                if len(before) == 3:  # denied three times: now replace the policy
                    put_at = time.time()
                    put = job_cli(fleet, "put", str(replacement))
                    assert put.returncode == 0, put.stderr
            else:
                after.append(line)
    finally:
        err = _finish(proc)
    assert proc.returncode == 0, err
    assert before and not any(a["ok"] for a in before), before
    assert after and after[-1]["ok"], after
    assert put_at is not None
    allowed_after = float(after[-1]["t"]) - put_at  # type: ignore[arg-type]
    print(
        f"\n{ADDED}:80 allowed {1000 * allowed_after:.0f} ms after `job put` "
        f"({len(after) - 1} attempts denied in between)"
    )
    assert allowed_after <= 3.0
    # The agent reprogrammed tier 1 (port 80 added) with the new digest.
    updated = _wait_log(
        fleet,
        "node1",
        lambda e: e.get("event") == "job_policy_updated" and e.get("job_id") == job.job_id,
    )
    assert "80" in updated["tcp_ports"]  # type: ignore[operator]
    allowed = wait_events(
        fleet,
        job.job_id,
        "connection",
        lambda e: e.get("host") == ADDED and e.get("verdict") == "allow",
    )
    assert allowed, "no proxy allowed the added host"
    assert job_cli(fleet, "delete", job.job_id).returncode == 0


# --- registration refused -------------------------------------------------------------------


def _local(fleet: Fleet, job_id: str, egress: list[dict[str, object]]) -> str:
    """A policy signed with the fleet's own key, never given to the control plane."""
    now = int(time.time())
    key = keys.load_signing_key(fleet.signing_key)
    return jws.sign_payload(
        {
            "v": 1,
            "job_id": job_id,
            "account": "e2e",
            "nodes": ["node1"],
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "egress": egress,
        },
        key,
    )


@pytest.mark.parametrize("held", [False, True], ids=["unknown-job", "other-content"])
def test_a_locally_signed_policy_is_refused_at_registration_with_one_line(
    fleet: Fleet, tmp_path: Path, held: bool
) -> None:
    job = Job(fleet, "node1", [{"host": API, "ports": [443]}])
    if held:
        job.sign()  # the control plane holds another policy for the job
    policy = tmp_path / "local.jws"
    policy.write_text(_local(fleet, job.job_id, [{"host": "evil.test", "ports": [443]}]) + "\n")
    done = sandbox_run(
        fleet, job, tmp_path, ["python3", "-c", "print('ran')"], policy_file=policy, timeout_s=60
    )
    assert done.returncode == 125, (done.returncode, done.stdout, done.stderr)
    assert "ran" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    reason = "policy_superseded" if held else "policy_not_held"
    assert reason in lines[0] and "egressd job put" in lines[0], lines[0]
    if held:
        assert job_cli(fleet, "delete", job.job_id).returncode == 0


# --- the control plane down, a policy expiring, the control plane back ----------------------


def _control_spec(fleet: Fleet, *extra: str) -> procs.DaemonSpec:
    control = next(c for c in fleet.components() if c.name == "control")
    return procs.DaemonSpec(control.name, control.netns, (*control.argv, *extra))


def _restart_control(fleet: Fleet, *extra: str) -> None:
    procs.stop(fleet.run_dir, "control")
    procs.start(_control_spec(fleet, *extra), fleet.run_dir)
    control = next(c for c in fleet.components() if c.name == "control")
    fleet._wait_ready(control)


def _answers(fleet: Fleet, member: str, metric: str, result: str) -> float:
    return metric_sum(metrics(fleet, member), metric, result=result)


def _send_unknown_job(fleet: Fleet) -> None:
    """One GENEVE datagram for a job nobody knows, from node1 to proxy1 (as a node sends)."""
    from scapy.layers.inet import IP, TCP

    node, proxy = fleet.layout.node("node1"), fleet.layout.proxy("proxy1")
    inner = bytes(
        IP(src="100.96.1.201", dst="203.0.113.10") / TCP(sport=40123, dport=443, flags="S")
    )
    datagram = encode(fleet.layout.vni, JobOption(uuid.uuid4().bytes, b"\0" * 8), inner)
    with contextlib.closing(
        kn.netns_socket(fleet.ns(node.netns), socket.AF_INET, socket.SOCK_DGRAM)
    ) as sock:
        sock.bind((str(node.underlay), 0))
        sock.sendto(datagram, (str(proxy.underlay), GENEVE_PORT))


RESYNCED_BY = (
    ("proxy1", "egressd_watch_answers_total"),
    ("node1", "egressd_agent_watch_answers_total"),
)


def _resyncs(fleet: Fleet) -> dict[str, float]:
    return {member: _answers(fleet, member, metric, "resync") for member, metric in RESYNCED_BY}


def _wait_resynced(fleet: Fleet, before: dict[str, float], timeout_s: float = 20.0) -> None:
    """Both a proxy and an agent resubscribed to the (restarted) control plane and resynced."""
    deadline = time.monotonic() + timeout_s
    for member, value in before.items():
        while _resyncs(fleet)[member] <= value:
            assert time.monotonic() < deadline, f"{member} did not resync"
            time.sleep(0.2)


def _dropped(fleet: Fleet, reason: str) -> float:
    return metric_sum(metrics(fleet, "proxy1"), "egressd_geneve_rx_dropped_total", reason=reason)


def test_control_plane_down_then_expiry_then_back(fleet: Fleet, tmp_path: Path) -> None:
    resyncs = _resyncs(fleet)
    _restart_control(fleet, "--policy-ttl", str(SHORT_TTL_S))
    proc = None
    try:
        _wait_resynced(fleet, resyncs)
        job = LimitedJob(fleet, "node1", [{"host": API, "ports": [80]}])
        job.limits = {**ROOMY_LIMITS, "bandwidth_bps": SLOW_BPS}
        job.sign()
        exp = int(json.loads(keys.b64url_decode(job.jws.split(".")[1]))["exp"])
        assert exp - time.time() <= SHORT_TTL_S + 1
        cmd = sandbox_argv(
            fleet,
            job,
            job.policy_file(tmp_path),
            ["python3", "/e2e/slow_download.py", API, f"/bytes/{200 * 1024 * 1024}"],
            mounts=[f"{E2E_UDFS}:/e2e"],
            timeout_s=180,
        )
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("event") == "flowing", first
        resyncs = _resyncs(fleet)

        # Down, mid-download.
        assert procs.stop(fleet.run_dir, "control")
        stopped_at = time.time()
        # An unknown job: the proxy cannot fetch a policy and drops it ...
        unreachable = _dropped(fleet, "control_unreachable")
        _send_unknown_job(fleet)
        deadline = time.monotonic() + 5
        while _dropped(fleet, "control_unreachable") <= unreachable and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dropped(fleet, "control_unreachable") > unreachable
        # ... and an agent refuses to register a sandbox it cannot check.
        other = tmp_path / "other.jws"
        other.write_text(_local(fleet, str(uuid.uuid4()), [{"host": API, "ports": [443]}]) + "\n")
        refused = sandbox_run(fleet, job, tmp_path, ["true"], policy_file=other, timeout_s=60)
        assert refused.returncode == 125, refused.stderr
        assert "control_unreachable" in refused.stderr, refused.stderr

        # The held policy is enforced until its exp: the download goes on, then is reset.
        ended = json.loads(proc.stdout.readline() or "{}")
        assert ended.get("event") == "ended" and ended["outcome"] == "reset", ended
        assert float(ended["t"]) >= exp - 1, (ended["t"], exp, stopped_at)
        print(
            f"\nthe control plane was down for {ended['t'] - stopped_at:.1f} s; the download "
            f"was reset {ended['t'] - exp:+.2f} s from the policy's exp"
        )
        assert float(ended["t"]) - exp <= 5.0
        assert proc.wait(timeout=60) == 0
        events = wait_events(
            fleet, job.job_id, "connection", lambda e: e.get("end") == "policy_expired"
        )
        assert len(events) == 1, events
        assert log_time(events[0]) >= exp - 1
        # The agent kept the sandbox on its held policy through the outage (it withdraws
        # an expired one only at exp + the JWS leeway; this one had ended by then).
        assert not [
            e
            for e in _member_log(fleet, "node1")
            if e.get("event") == "job_policy_withdrawn" and e.get("job_id") == job.job_id
        ]

        # Back (normal TTL): proxies and agents resubscribe and resync, the job runs again.
        _restart_control(fleet)
        _wait_resynced(fleet, resyncs)
        again = job_cli(fleet, "get", job.job_id)
        assert again.returncode == 0, again.stderr
        (tmp_path / "again.jws").write_text(again.stdout)
        done = sandbox_run(
            fleet,
            job,
            tmp_path,
            ["python3", "/e2e/retry_get.py", f"http://{API}/data", "3", "0.5", "3"],
            mounts=[f"{E2E_UDFS}:/e2e"],
            policy_file=tmp_path / "again.jws",
            timeout_s=90,
        )
        assert done.returncode == 0, done.stderr
        results = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"i"')]
        assert results and results[-1]["ok"], done.stdout
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _restart_control(fleet)
    assert job_cli(fleet, "delete", job.job_id).returncode == 0
