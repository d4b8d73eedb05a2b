"""The demo's two backends without a fleet: the compose `demo` role end to end over faked
control plane, job API, node metrics and log volume (its table, its healthcheck file), and
the namespaces backend's sandbox command line, metrics and logs."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from egressd.layout import ADMIN_PORT, default_layout
from egressd_harness.demo import compose, core, netns
from egressd_harness.deploy import entry, health, jobs
from egressd_harness.deploy.__main__ import main as deploy_main
from egressd_harness.topology.fleet import ComponentStatus, Fleet
from egressd_harness.topology.probe import ProbeError, Reply
from tests.support.demo_fleet import FakeFleet


class Stop(Exception):
    """Ends `--then-idle`'s idling."""


@pytest.fixture
def faked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeFleet, list[Any]]]:
    """The compose fleet as `entry` and `jobs` reach it, answered by a FakeFleet."""
    fleet = FakeFleet()
    calls: list[Any] = []
    by_id: dict[str, core.Job] = {}

    def control(method: str, path: str, body: dict[str, Any]) -> dict[str, str]:
        calls.append((method, path))
        # The job whose policy this is: the demo's jobs differ in their hosts.
        (job,) = [j for j in compose.demo_jobs() if core.payload(j, body["job_id"]) == body]
        by_id[body["job_id"]] = job
        return {"jws": fleet.sign(body)}

    def run_udf(
        url: str, token: str, jws: str, udf: str, args: list[str], timeout: float
    ) -> dict[str, Any]:
        calls.append((url, token, udf, timeout))
        done = fleet.run_probe(by_id[jws.removeprefix("jws.")], jws, args)
        (tmp_path / "proxy-21.log").write_text("\n".join(fleet.lines) + "\n")
        return {"exit_code": done.exit_code, "stdout": done.stdout, "stderr": done.stderr}

    def http_get(url: str) -> tuple[int, bytes]:
        calls.append(url)
        return 200, (fleet.node_metrics("node1") or "").encode()

    monkeypatch.setattr(entry, "admin_token", lambda: "t0ken")
    monkeypatch.setattr(entry, "control", control)
    monkeypatch.setattr(health, "http_get", http_get)
    monkeypatch.setenv("EGRESSD_LOG_DIR", str(tmp_path))
    entry.env.cache_clear()
    monkeypatch.setattr(health, "DEMO_RESULT", tmp_path / "demo.result")
    monkeypatch.setattr(jobs, "run_udf", run_udf)
    monkeypatch.setattr(compose.ComposeBackend, "settle_s", 0.0)
    yield fleet, calls
    entry.env.cache_clear()


def test_the_compose_demo_role_prints_ten_verdicts_as_expected(
    faked: tuple[FakeFleet, list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, calls = faked
    assert deploy_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "10 of 10 verdicts as expected"
    assert "UNEXPECTED" not in out and "deny:fleet_range (tier 1)" in out
    assert [node for node, _, _ in fleet.runs] == ["node1", "node1"]  # compose has one node
    assert ("http://198.18.0.11:8070", "t0ken", "probe.py", 120) in calls
    assert f"http://198.18.0.11:{ADMIN_PORT}/metrics" in calls
    assert [c for c in calls if isinstance(c, tuple) and c[0] == "PUT"] == [
        ("PUT", f"/v1/jobs/{p['job_id']}/policy") for p in fleet.signed
    ]


def test_a_failed_sandbox_is_reported_and_recorded_for_the_healthcheck(
    faked: tuple[FakeFleet, list[Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet, _ = faked
    fleet.exit_code = 2

    def idle(_s: float) -> None:
        raise Stop

    monkeypatch.setattr(time, "sleep", idle)
    with pytest.raises(Stop):
        deploy_main(["demo", "--then-idle"])
    assert (
        capsys.readouterr().out == "demo failed: SandboxFailed: sandbox for job A exited 2: err\n"
    )
    assert health.DEMO_RESULT.read_text() == "1\n"
    assert deploy_main(["health", "demo"]) == 1


def test_a_passing_demo_makes_its_container_healthy(
    faked: tuple[FakeFleet, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert deploy_main(["health", "demo"]) == 1  # no result yet

    def idle(_s: float) -> None:
        raise Stop

    monkeypatch.setattr(time, "sleep", idle)
    with pytest.raises(Stop):
        deploy_main(["demo", "--then-idle"])
    assert health.DEMO_RESULT.read_text() == "0\n"
    assert deploy_main(["health", "demo"]) == 0


def test_compose_reads_every_proxy_log_in_the_volume(tmp_path: Path) -> None:
    (tmp_path / "proxy-22.log").write_text("b\n")
    (tmp_path / "proxy-21.log").write_text("a\n")
    (tmp_path / "node1.log").write_text("not a proxy\n")
    backend = compose.ComposeBackend("http://x", "t", log_dir=tmp_path)
    assert list(backend.audit_lines()) == ["a", "b"]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    (tmp_path / "config").mkdir()
    return Fleet(default_layout(tmp_path, "egd-t-"))


def test_netns_runs_the_probe_with_sandbox_run_on_the_job_s_node(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Sequence[str]] = []

    def run(argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 4, stdout="{}\n", stderr="boom")

    monkeypatch.setattr(subprocess, "run", run)
    job = core.jobs(fleet.layout)[1]
    done = netns.NetnsBackend(fleet).run_probe(job, "a.b.c", ["--timeout", "3", "tcp://x:1"])
    assert done == core.ProbeRun(4, "{}\n", "boom")
    policy = fleet.run_dir / "config" / "demo-job-B.jws"
    assert policy.read_text() == "a.b.c\n"
    (argv,) = seen
    assert argv[2:] == [
        "egressd", "sandbox", "run", "--run-dir", str(fleet.run_dir), "--node", "node2",
        "--policy", str(policy), "--mount", f"{netns.UDFS}:/udfs", "--timeout", "120",
        "--", "python3", "/udfs/probe.py", "--timeout", "3", "tcp://x:1",
    ]  # fmt: skip
    assert (netns.UDFS / "probe.py").is_file()


def test_netns_reads_the_node_metrics_inside_the_node_s_namespace(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str, str, int, str]] = []

    def request(ns: str, method: str, host: str, port: int, path: str) -> Reply:
        asked.append((ns, method, host, port, path))
        return Reply(200, b"page")

    monkeypatch.setattr(netns, "http_request", request)
    assert netns.NetnsBackend(fleet).node_metrics("node2") == "page"
    assert asked == [("egd-t-node2", "GET", "198.18.0.12", ADMIN_PORT, "/metrics")]

    def down(*_a: object) -> Reply:
        raise ProbeError("http_failed", "refused")

    monkeypatch.setattr(netns, "http_request", down)
    assert netns.NetnsBackend(fleet).node_metrics("node2") is None


def test_netns_reads_the_proxies_logs_in_the_run_directory(fleet: Fleet) -> None:
    logs = fleet.run_dir / "logs"
    logs.mkdir()
    (logs / "proxy2.log").write_text("two\n")
    (logs / "node1.log").write_text("not a proxy\n")
    assert list(netns.NetnsBackend(fleet).audit_lines()) == ["two"]


class RecordingFleet(Fleet):
    def __init__(self, run_dir: Path) -> None:
        super().__init__(default_layout(run_dir, "egd-t-"))
        self.calls: list[str] = []

    def up(self) -> list[ComponentStatus]:
        self.calls.append("up")
        return []

    def down(self) -> list[str]:
        self.calls.append("down")
        return []


def test_netns_brings_the_fleet_up_runs_the_core_then_down_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = RecordingFleet(tmp_path)
    row = core.Row("A", "t", "allow (proxy:connection)", "allow:x (proxy connection)", True)

    def run(backend: netns.NetnsBackend, demo_jobs: list[core.Job]) -> list[core.Row]:
        fleet.calls.append(f"run {[j.node for j in demo_jobs]}")
        assert backend.fleet is fleet
        return [row]

    monkeypatch.setattr(core, "run", run)
    assert netns.run_demo(fleet) == 0
    assert fleet.calls == ["up", "run ['node1', 'node2']", "down"]
    assert capsys.readouterr().out.splitlines()[-1] == "1 of 1 verdicts as expected"


def test_netns_takes_the_fleet_down_when_the_demo_fails_unless_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*_a: object) -> list[core.Row]:
        raise core.SandboxFailed("sandbox for job A exited 1: no runsc")

    monkeypatch.setattr(core, "run", run)
    fleet = RecordingFleet(tmp_path)
    with pytest.raises(core.SandboxFailed, match="job A exited 1: no runsc"):
        netns.run_demo(fleet)
    assert fleet.calls == ["up", "down"]
    kept = RecordingFleet(tmp_path)
    with pytest.raises(core.SandboxFailed):
        netns.run_demo(kept, keep=True)
    assert kept.calls == ["up"]
