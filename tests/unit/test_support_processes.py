"""tests/support/processes.py: the teardown that every agent and proxy test bed runs must
reap what it started even when a process ignores SIGTERM or is already gone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.support.processes import stop_process, stop_processes

IGNORES_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def start(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"  # its signal handler is in place
    proc.stdout.close()
    return proc


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    proc = start(IGNORES_TERM)
    began = time.monotonic()
    assert stop_process(proc, 0.5) is None
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 10


def test_sigterm_goes_to_every_process_before_any_wait() -> None:
    """Three stubborn processes cost one timeout, not three."""
    procs = [start(IGNORES_TERM) for _ in range(3)]
    polite = start("import time; print('ready', flush=True); time.sleep(60)")
    began = time.monotonic()
    stop_processes([*procs, None, polite], 1.0)
    assert time.monotonic() - began < 2.5
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 3
    assert polite.returncode == -signal.SIGTERM


def test_an_exited_process_gives_its_status() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=30)
    assert stop_process(proc, 1.0) == 3
    assert stop_process(None, 1.0) is None
    stop_processes([proc, None], 1.0)  # nothing left to signal: no error
