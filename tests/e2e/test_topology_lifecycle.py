"""`topology up` is idempotent, `status` reports health, and `down` leaves
nothing behind: no namespace, link, TUN, eBPF program, nft table, bpffs
mount, runsc container or process, also with a sandbox still running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from egressd.layout import default_layout
from egressd.net import netns as kn
from egressd_harness.topology import procs
from egressd_harness.topology.fleet import Fleet

from .fleet_helpers import Job, sandbox_argv

PREFIX = "egd-e2l-"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _bpf_prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    )
    return {p["id"] for p in json.loads(out.stdout) if p.get("name") == "tier1_ingress"}


def _fleet_prog_ids(run_dir: Path) -> set[int]:
    """The tier-1 programs pinned by this fleet's agents (other fleets may run beside it)."""
    ids = set()
    for pin in run_dir.glob("agents/*/bpffs/prog"):
        out = subprocess.run(
            ["bpftool", "-j", "prog", "show", "pinned", str(pin)],
            capture_output=True,
            text=True,
            check=True,
        )
        ids.add(json.loads(out.stdout)["id"])
    return ids


def _mounts_under(path: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(path))
    ]


def test_up_status_down_leaves_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    run_dir = tmp_path_factory.mktemp("lifecycle")
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    fleet = Fleet(default_layout(run_dir, PREFIX))
    sandbox: subprocess.Popen[str] | None = None
    fleet_progs: set[int] = set()
    try:
        up = _cli("topology", "up", "--run-dir", str(run_dir), "--prefix", PREFIX)
        assert up.returncode == 0, up.stderr
        again = _cli("topology", "up", "--run-dir", str(run_dir), "--prefix", PREFIX)
        assert again.returncode == 0, again.stderr
        pids = {c.name: procs.running_pid(run_dir, c.name) for c in fleet.components()}
        assert all(pids.values()), pids
        status = _cli("topology", "status", "--run-dir", str(run_dir), "--prefix", PREFIX, "--json")
        assert status.returncode == 0, status.stdout
        assert all(item["ready"] for item in json.loads(status.stdout))
        # The second `up` started nothing new.
        assert {c.name: procs.running_pid(run_dir, c.name) for c in fleet.components()} == pids

        job = Job(fleet, "node1", [{"host": "api.allowed.test"}]).sign()
        policy = job.policy_file(run_dir)
        sandbox = subprocess.Popen(
            sandbox_argv(
                fleet,
                job,
                policy,
                ["python3", "-c", "import time; print('up', flush=True); time.sleep(120)"],
                extra=["--id", f"life-{uuid.uuid4().hex[:8]}"],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert sandbox.stdout is not None
        assert sandbox.stdout.readline().strip() == "up"
        assert kn.list_netns(f"{PREFIX}sbx-"), "the running sandbox has a namespace"
        fleet_progs = _fleet_prog_ids(run_dir)
        assert len(fleet_progs) == len(fleet.layout.nodes), "tier 1 is loaded on every node"
    finally:
        down = _cli("topology", "down", "--run-dir", str(run_dir), "--prefix", PREFIX)
        if sandbox is not None:
            try:
                sandbox.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sandbox.kill()
                sandbox.wait()
    assert down.returncode == 0, down.stderr
    assert kn.list_netns(PREFIX) == ()
    for component in fleet.components():
        assert procs.running_pid(run_dir, component.name) is None, component.name
    assert fleet_progs & _bpf_prog_ids() == set(), "tier-1 programs outlived the fleet"
    assert _mounts_under(run_dir) == []
    runsc = subprocess.run(
        ["runsc", "--root", str(run_dir / "runsc"), "list", "-quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert runsc.stdout.split() == []
    time.sleep(0.2)
    assert (
        subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == links_before
    )
    status = _cli("topology", "status", "--run-dir", str(run_dir), "--prefix", PREFIX)
    assert status.returncode == 1  # nothing is running any more
