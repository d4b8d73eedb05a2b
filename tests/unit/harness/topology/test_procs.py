"""PID files name a process by PID and start time, not by its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from egressd_harness.topology import procs


def test_a_daemon_is_running_from_its_first_instant_and_not_after_it_exits(tmp_path: Path) -> None:
    # This command line never says egressd: identity is PID + start time.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        (tmp_path / "pids").mkdir()
        procs.pid_file(tmp_path, "x").write_text(f"{child.pid} {stat[19]}\n")
        assert procs.running_pid(tmp_path, "x") == child.pid
        # The same PID with another start time is somebody else.
        procs.pid_file(tmp_path, "x").write_text(f"{child.pid} {int(stat[19]) + 1}\n")
        assert procs.running_pid(tmp_path, "x") is None
        procs.pid_file(tmp_path, "x").write_text(f"{child.pid} {stat[19]}\n")
        assert procs.stop(tmp_path, "x", timeout_s=5) is True
        assert procs.running_pid(tmp_path, "x") is None
        assert not procs.pid_file(tmp_path, "x").exists()
    finally:
        child.kill()
        child.wait()


def test_a_garbled_or_missing_pid_file_is_not_running(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    assert procs.running_pid(tmp_path, "nope") is None
    procs.pid_file(tmp_path, "bad").write_text("garbage\n")
    assert procs.running_pid(tmp_path, "bad") is None
