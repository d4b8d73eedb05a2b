"""`egressd sandbox run` as an operator uses it: output and exit code relayed
(docker run's codes: 125 egressd, 126 cannot invoke, 127 not found), clean-up
after Ctrl-C, SIGTERM and SIGHUP, an orphan reaped by the agent, one clear
line for bad input."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egressd.agent.client import AgentClient
from egressd.net import netns as kn
from egressd_harness.topology.fleet import Fleet
from tests.support.fleet import Job, metric_sum, metrics, sandbox_argv, sandbox_run


def _sandboxes(fleet: Fleet, node: str) -> list[str]:
    async def listing() -> list[str]:
        async with AgentClient(fleet.agent_socket(node)) as agent:
            return [s.sandbox_id for s in await agent.list()]

    return asyncio.run(listing())


def test_exit_code_stdout_and_stderr_are_the_commands(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    ipv6_before = metric_sum(metrics(fleet, "node1"), "egressd_tier1_packets_total", reason="ipv6")
    done = sandbox_run(
        fleet,
        job,
        tmp_path,
        [
            "python3",
            "-c",
            "import sys; print('to stdout'); sys.stderr.write('to stderr\\n'); sys.exit(7)",
        ],
    )
    # The sandbox has no IPv6 at all, so its netstack sends nothing tier 1 drops as ipv6.
    assert (
        metric_sum(metrics(fleet, "node1"), "egressd_tier1_packets_total", reason="ipv6")
        == ipv6_before
    )
    assert done.returncode == 7
    assert done.stdout == "to stdout\n"
    assert "to stderr" in done.stderr
    assert _sandboxes(fleet, "node1") == []


def test_ctrl_c_unregisters_and_removes_the_sandbox(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    before = set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))
    proc = subprocess.Popen(
        sandbox_argv(
            fleet,
            job,
            job.policy_file(tmp_path),
            ["python3", "-c", "import time; print('up', flush=True); time.sleep(300)"],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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
    assert proc.returncode == 130
    assert _sandboxes(fleet, "node1") == []
    deadline = time.monotonic() + 5
    while set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) - before == set()
    listing = subprocess.run(
        ["runsc", "--root", str(fleet.run_dir / "runsc"), "list", "-quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert listing.stdout.split() == []


def _one_line_error(done: subprocess.CompletedProcess[str], code: int = 125) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("egressd: error: sandbox run: "), lines[0]
    return lines[0].removeprefix("egressd: error: sandbox run: ")


def test_bad_input_is_one_line_and_exit_125(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    base = [sys.executable, "-m", "egressd", "sandbox", "run", "--run-dir", str(fleet.run_dir)]
    policy = str(job.policy_file(tmp_path))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=60, check=False
        )

    assert "command is required" in _one_line_error(run("--node", "node1", "--policy", policy))
    assert "run directory" in _one_line_error(
        run("--node", "node1", "--policy", policy, "--mount", f"{fleet.run_dir}:/x", "--", "true")
    )
    assert "required: --node" in _one_line_error(run("--policy", policy, "--", "true"))
    assert _one_line_error(run("--node", "node9", "--policy", policy, "--", "true")) == (
        "no node 'node9' (known: node1, node2); is the fleet up? "
        f"egressd topology up --run-dir {fleet.run_dir}"
    )
    garbage = tmp_path / "garbage.jws"
    garbage.write_text("not-a-jws\n")
    assert "malformed" in _one_line_error(
        run("--node", "node1", "--policy", str(garbage), "--", "true")
    )
    assert _sandboxes(fleet, "node1") == []


def _leftovers(fleet: Fleet, sandbox_id: str) -> list[str]:
    """What a sandbox may leave behind: its bundle, runsc's logs and state, its registration."""
    dirs = (fleet.run_dir / "sandboxes" / sandbox_id, fleet.run_dir / "logs" / "runsc" / sandbox_id)
    found = [str(p) for p in dirs if p.exists()]
    found += [str(p) for p in (fleet.run_dir / "runsc").glob(f"{sandbox_id}*")]
    found += [f"registered at node1: {s}" for s in _sandboxes(fleet, "node1") if s == sandbox_id]
    return found


def _new_netns(fleet: Fleet, before: set[str], timeout_s: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    prefix = f"{fleet.layout.prefix}sbx-"
    while (new := set(kn.list_netns(prefix)) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    return new


def test_the_commands_own_codes_pass_through(fleet: Fleet, tmp_path: Path) -> None:
    # As with docker run: the UDF's own 2 and 125 are its own, and say nothing on stderr.
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    for code in (2, 125):
        done = sandbox_run(fleet, job, tmp_path, ["python3", "-c", f"raise SystemExit({code})"])
        assert (done.returncode, done.stderr) == (code, "")


def test_command_not_found_is_127_and_not_executable_126(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    before = set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))
    line = _one_line_error(sandbox_run(fleet, job, tmp_path, ["no-such-program"]), 127)
    assert line.startswith(
        "command_not_found: no-such-program: not found in the sandbox's PATH ("
    ), line
    line = _one_line_error(sandbox_run(fleet, job, tmp_path, ["/udfs/no_such.py"]), 127)
    assert line == "command_not_found: /udfs/no_such.py: no such file in the sandbox"
    # A mounted file without x: found, cannot be executed.
    line = _one_line_error(sandbox_run(fleet, job, tmp_path, ["/udfs/probe.py"]), 126)
    assert line == "command_not_executable: /udfs/probe.py: cannot execute: permission denied"
    assert _sandboxes(fleet, "node1") == []
    assert _new_netns(fleet, before) == set()


def test_egressd_failures_are_125(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    other = Job(fleet, "node2", [{"host": "api.allowed.test"}]).sign()
    # The agent rejects a policy for another node.
    rejected = sandbox_run(fleet, job, tmp_path, ["true"], policy_file=other.policy_file(tmp_path))
    assert "job_not_bound_to_node" in _one_line_error(rejected)
    # --timeout: egressd killed it.
    cmd = sandbox_argv(fleet, job, job.policy_file(tmp_path), ["sleep", "60"], timeout_s=2)
    timed_out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert _one_line_error(timed_out).startswith("timeout: sandbox "), timed_out.stderr
    assert _sandboxes(fleet, "node1") == []


def test_a_fleet_that_is_not_up_is_one_line(tmp_path: Path, fleet: Fleet) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    empty = tmp_path / "nofleet"
    empty.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "sandbox",
            "run",
            "--run-dir",
            str(empty),
            "--node",
            "node1",
            "--policy",
            str(job.policy_file(tmp_path)),
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert _one_line_error(done) == (
        f"no node 'node1' (known: none); is the fleet up? egressd topology up --run-dir {empty}"
    )


def test_an_unreadable_mount_is_refused_before_launch(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "data.txt").write_text("secret\n")
    private.chmod(0o700)
    before = set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))
    done = sandbox_run(fleet, job, tmp_path, ["cat", "/data/data.txt"], mounts=[f"{private}:/data"])
    assert _one_line_error(done) == (
        f"mount_unreadable: --mount {private}:/data: the sandbox user (uid 65534) cannot read it "
        "(mode 0700, owner 0:0); e.g. chmod o+rX it"
    )
    assert _sandboxes(fleet, "node1") == []
    assert set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) == before
    # What the line suggests works.
    private.chmod(0o755)
    done = sandbox_run(fleet, job, tmp_path, ["cat", "/data/data.txt"], mounts=[f"{private}:/data"])
    assert (done.returncode, done.stdout) == (0, "secret\n"), done.stderr


def _start_sleeper(
    fleet: Fleet, job: Job, tmp_path: Path, sandbox_id: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        sandbox_argv(
            fleet,
            job,
            job.policy_file(tmp_path),
            ["python3", "-c", "import time; print('up', flush=True); time.sleep(300)"],
            extra=["--id", sandbox_id],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    assert _sandboxes(fleet, "node1") == [sandbox_id]
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_leave_nothing_behind(
    fleet: Fleet, tmp_path: Path, sig: signal.Signals
) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    before = set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))
    sandbox_id = f"e2e-{sig.name.lower()}"
    proc = _start_sleeper(fleet, job, tmp_path, sandbox_id)
    try:
        assert _leftovers(fleet, sandbox_id) != []  # the check below can see them
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines() == [
        f"egressd: error: sandbox run: stopped by {sig.name}; the sandbox was removed"
    ]
    assert _leftovers(fleet, sandbox_id) == []
    assert set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) - before == set()
    assert processes_mentioning(sandbox_id) == []


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


REAP_BOUND_S = 5.0


def test_the_agent_reaps_a_sandbox_whose_launcher_was_killed(fleet: Fleet, tmp_path: Path) -> None:
    job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
    before = set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))
    sandbox_id = "e2e-orphan"
    proc = _start_sleeper(fleet, job, tmp_path, sandbox_id)
    assert len(set(kn.list_netns(f"{fleet.layout.prefix}sbx-")) - before) == 1
    proc.kill()  # SIGKILL: no clean-up of its own
    proc.wait()
    killed_at = time.monotonic()
    deadline = killed_at + REAP_BOUND_S + 5
    while sandbox_id in _sandboxes(fleet, "node1") and time.monotonic() < deadline:
        time.sleep(0.1)
    reaped_after_s = time.monotonic() - killed_at
    print(f"reaped after {reaped_after_s:.2f} s")
    assert sandbox_id not in _sandboxes(fleet, "node1")
    assert reaped_after_s <= REAP_BOUND_S
    assert _new_netns(fleet, before) == set()
    # runsc died with its launcher (parent-death signal).
    deadline = time.monotonic() + 5
    while processes_mentioning(sandbox_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(sandbox_id) == []
    log = (fleet.run_dir / "logs" / "node1.log").read_text(errors="replace")
    assert any(
        '"sandbox_reaped"' in line and sandbox_id in line and "launcher_gone" in line
        for line in log.splitlines()
    )
