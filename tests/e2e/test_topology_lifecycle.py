"""`topology up` is idempotent, `status` reports health, and `down` leaves
nothing behind: no namespace, link, TUN, eBPF program, nft table, bpffs
mount, runsc container or process, also with a sandbox still running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from egressd.layout import default_layout
from egressd.net import netns as kn
from egressd_harness.topology import procs
from egressd_harness.topology.fleet import DEFAULT_DATAPATH, Fleet
from tests.support.fleet import Job, sandbox_argv

PREFIX = "egd-e2l-"
# The fleet's data path (agents and proxies), as for the rest of the suite (tests/e2e/conftest.py).
DATAPATH = os.environ.get("EGRESSD_E2E_DATAPATH", DEFAULT_DATAPATH)
# Programs the agents load: tier 1, and bpf/node.c's with the kernel data path (names cut at 15).
AGENT_PROGS = {"tier1_ingress", "node_encap", "node_underlay_i"}
# ... and the proxies' (bpf/proxy.c) with the kernel data path.
FLEET_PROGS = AGENT_PROGS | {"px_ingress", "px_egress"}


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
    return {p["id"] for p in json.loads(out.stdout) if p.get("name") in FLEET_PROGS}


def _map_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True)
    return {m["id"] for m in json.loads(out.stdout or "[]")}


def _fleet_prog_ids(run_dir: Path) -> set[int]:
    """The programs pinned by this fleet's agents and proxies (other fleets may run beside
    it)."""
    ids = set()
    pins = [
        *run_dir.glob("agents/*/bpffs/prog"),
        *run_dir.glob("agents/*/bpffs-node/progs/*"),
        *run_dir.glob("proxies/*/bpffs/progs/*"),
    ]
    for pin in pins:
        out = subprocess.run(
            ["bpftool", "-j", "prog", "show", "pinned", str(pin)],
            capture_output=True,
            text=True,
            check=True,
        )
        ids.add(json.loads(out.stdout)["id"])
    return ids


def _prog_map_ids(prog_ids: set[int]) -> set[int]:
    ids: set[int] = set()
    for prog in prog_ids:
        out = subprocess.run(
            ["bpftool", "-j", "prog", "show", "id", str(prog)],
            capture_output=True,
            text=True,
            check=True,
        )
        ids.update(json.loads(out.stdout).get("map_ids", []))
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
    fleet = Fleet(default_layout(run_dir, PREFIX), datapath=DATAPATH)
    sandbox: subprocess.Popen[str] | None = None
    fleet_progs: set[int] = set()
    fleet_maps: set[int] = set()
    try:
        up_args = ("topology", "up", "--run-dir", str(run_dir), "--prefix", PREFIX)
        up = _cli(*up_args, "--datapath", DATAPATH)
        assert up.returncode == 0, up.stderr
        again = _cli(*up_args, "--datapath", DATAPATH)
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
        fleet_maps = _prog_map_ids(fleet_progs)
        per_node = 3 if DATAPATH == "kernel" else 1  # tier 1 (+ node_encap, underlay)
        per_proxy = 2 if DATAPATH == "kernel" else 0  # px_ingress, px_egress
        assert len(fleet_progs) == per_node * len(fleet.layout.nodes) + per_proxy * len(
            fleet.layout.proxies
        ), "programs on every node and proxy"
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
    assert fleet_progs & _bpf_prog_ids() == set(), "eBPF programs outlived the fleet"
    # A map is freed from a workqueue after its last reference: give it a moment.
    for _ in range(20):
        if not fleet_maps & _map_ids():
            break
        time.sleep(0.1)
    assert fleet_maps & _map_ids() == set(), "eBPF maps outlived the fleet"
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
