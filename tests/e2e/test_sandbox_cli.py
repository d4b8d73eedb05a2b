"""`egressd sandbox run` as an operator uses it: output and exit code relayed,
clean-up after Ctrl-C, one clear line for bad input."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from egressd.agent.client import AgentClient
from egressd.net import netns as kn
from egressd.topology.fleet import Fleet

from .fleet_helpers import Job, metric_sum, metrics, sandbox_argv, sandbox_run


def _sandboxes(fleet: Fleet, node: str) -> list[str]:
    async def listing() -> list[str]:
        async with AgentClient(fleet.agent_socket(node)) as agent:
            return [s.sandbox_id for s in await agent.list()]

    return asyncio.run(listing())


def test_exit_code_stdout_and_stderr_are_the_commands(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    ipv6_before = metric_sum(metrics(fleet, "node1"), "egressd_tier1_packets_total", reason="ipv6")
    done = sandbox_run(fleet, job, tmp_path, [
        "python3", "-c", "import sys; print('to stdout'); sys.stderr.write('to stderr\\n'); sys.exit(7)",
    ])
    # The sandbox has no IPv6 at all, so its netstack sends nothing tier 1 drops as ipv6.
    assert metric_sum(metrics(fleet, "node1"), "egressd_tier1_packets_total", reason="ipv6") == ipv6_before
    assert done.returncode == 7
    assert done.stdout == "to stdout\n"
    assert "to stderr" in done.stderr
    assert _sandboxes(fleet, "node1") == []


def test_ctrl_c_unregisters_and_removes_the_sandbox(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    before = set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))
    proc = subprocess.Popen(
        sandbox_argv(fleet, job, job.policy_file(tmp_path),
                     ["python3", "-c", "import time; print('up', flush=True); time.sleep(300)"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        assert len(_sandboxes(fleet, "node1")) == 1
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _sandboxes(fleet, "node1") == []
    deadline = time.monotonic() + 5
    while set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) - before == set()
    listing = subprocess.run(["runsc", "--root", str(fleet.run_dir / "runsc"), "list", "-quiet"],
                             capture_output=True, text=True, check=False)
    assert listing.stdout.split() == []


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    base = [sys.executable, "-m", "egressd", "sandbox", "run", "--run-dir", str(fleet.run_dir)]
    policy = str(job.policy_file(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, check=False)

    assert "command is required" in _one_line_error(run("--node", "node1", "--policy", policy))
    assert "run directory" in _one_line_error(
        run("--node", "node1", "--policy", policy, "--mount", f"{fleet.run_dir}:/x", "--", "true"))
    assert "agent_unreachable" in _one_line_error(run("--node", "node9", "--policy", policy, "--", "true"))
    garbage = tmp_path / "garbage.jws"
    garbage.write_text("not-a-jws\n")
    assert "malformed" in _one_line_error(run("--node", "node1", "--policy", str(garbage), "--", "true"))
    assert _sandboxes(fleet, "node1") == []
