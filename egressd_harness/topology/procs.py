"""Background daemons of the local fleet: start in a namespace, PID files, logs, stop.

Each daemon is `nsenter --net=/run/netns/NS -- python -m egressd ...` (nsenter
execs, so the PID we record is the daemon's own), in a session of its own so a
Ctrl-C at the terminal that ran `topology up` does not reach it. Its stdout and
stderr go to `RUN/logs/<name>.log` (JSON lines: its logs and audit events),
one file per run: each start moves the previous run's log to `<name>.log.1`
(and `.1` to `.2` ..., keeping `LOG_KEEP` earlier runs), so runs never mix
and old ones do not pile up. Rotation is per run, not by size: a run's log is
whole in one file for `egressd audit` and the tests, and the local fleet lives
for minutes to hours (a long-lived deployment logs to stdout, which its
container runtime rotates). Its PID is in
`RUN/pids/<name>.pid`, followed by the process's start time (field 22 of
/proc/PID/stat), so a recycled PID is never taken for the daemon. The
command line is no test of identity: while nsenter execs python it reads
empty for a moment, and a live daemon would pass for dead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from egressd.errors import EgressdError
from egressd.net import netns as kn


class ProcessError(EgressdError):
    """A fleet daemon that would not start or stop."""


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    name: str
    netns: str
    argv: tuple[str, ...]


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / "pids" / f"{name}.pid"


def log_file(run_dir: Path, name: str) -> Path:
    return run_dir / "logs" / f"{name}.log"


LOG_KEEP = 5


def rotate_log(path: Path, keep: int = LOG_KEEP) -> None:
    """Make room for a new run's log: `path` -> `path.1` -> ... -> `path.<keep>`; the
    oldest is dropped. A missing or empty log is left alone (nothing to keep)."""
    try:
        if path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    if keep > 0:
        path.replace(path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def _read_pid(path: Path) -> tuple[int, int] | None:
    try:
        pid, start = path.read_text().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, from /proc (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_alive(pid: int) -> bool:
    # A zombie still answers kill(0); /proc tells the truth.
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def running_pid(run_dir: Path, name: str) -> int | None:
    """The daemon's PID if the process its PID file names still runs."""
    recorded = _read_pid(pid_file(run_dir, name))
    if recorded is None:
        return None
    pid, start = recorded
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X") or stat[1] != start:
        return None
    return pid


def start(spec: DaemonSpec, run_dir: Path) -> int:
    """Start the daemon unless it already runs (idempotent); returns its PID."""
    if (pid := running_pid(run_dir, spec.name)) is not None:
        return pid
    log = log_file(run_dir, spec.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    rotate_log(log)
    pid_file(run_dir, spec.name).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            proc = kn.popen_in_netns(
                spec.netns,
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except kn.NetError as exc:
            raise ProcessError("start_failed", f"{spec.name}: {exc.detail}") from exc
    stat = _stat(proc.pid)
    start = stat[1] if stat is not None else 0
    pid_file(run_dir, spec.name).write_text(f"{proc.pid} {start}\n")
    return proc.pid


def exited_early(run_dir: Path, name: str) -> bool:
    return running_pid(run_dir, name) is None


def stop(run_dir: Path, name: str, *, timeout_s: float = 10.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if a process was stopped."""
    path = pid_file(run_dir, name)
    pid = running_pid(run_dir, name)
    if pid is None:
        path.unlink(missing_ok=True)
        return False
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_alive(pid):
        _reap(pid)
        time.sleep(0.05)
    if _is_alive(pid):
        _signal(pid, signal.SIGKILL)
        while _is_alive(pid):
            _reap(pid)
            time.sleep(0.02)
    path.unlink(missing_ok=True)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    # Daemons started by this process are our children: reap them so they do
    # not linger as zombies (elsewhere this is a harmless ECHILD).
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def tail(run_dir: Path, name: str, lines: int = 20) -> Sequence[str]:
    try:
        text = log_file(run_dir, name).read_text(errors="replace")
    except OSError:
        return ()
    return text.splitlines()[-lines:]
