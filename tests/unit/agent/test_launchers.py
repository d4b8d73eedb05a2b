"""The agent's record of who launched each sandbox: SO_PEERCRED and pidfds of real
processes (no namespaces, no root needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from egressd.agent.launchers import Launchers, peer_pid


def test_peer_pid_is_the_kernels_word() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_pid(a) == os.getpid()
    assert peer_pid(None) is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert peer_pid(tcp) is None


def _wait_gone(launchers: Launchers, timeout_s: float = 5.0) -> list[tuple[str, int]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone := launchers.gone():
            return gone
        time.sleep(0.01)
    return []


def test_a_dead_launcher_is_reported_once_forgotten_never_again() -> None:
    launchers = Launchers()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fd = launchers.open(child.pid)
        assert fd is not None
        launchers.watch("sbx-1", child.pid, fd)
        mine = launchers.open(os.getpid())
        launchers.watch("sbx-2", os.getpid(), mine)
        assert launchers.gone() == []
        assert launchers.pid("sbx-1") == child.pid
        child.kill()
        child.wait()
        assert _wait_gone(launchers) == [("sbx-1", child.pid)]
        launchers.forget("sbx-1")
        assert launchers.gone() == []
        assert len(launchers) == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        launchers.close()
    assert len(launchers) == 0


def test_a_zombie_counts_as_gone() -> None:
    # The launcher's parent may not have reaped it yet: exited is exited.
    launchers = Launchers()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        launchers.watch("sbx-z", child.pid, launchers.open(child.pid))
        assert _wait_gone(launchers) == [("sbx-z", child.pid)]
    finally:
        child.wait()
        launchers.close()


def test_nobody_to_watch() -> None:
    launchers = Launchers()
    assert launchers.open(None) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert launchers.open(child.pid) is None  # reaped: ESRCH, not some other process
    launchers.watch("sbx-x", None, None)
    assert len(launchers) == 0
    assert launchers.gone() == []


def test_watching_again_replaces_and_closes_the_old_pidfd() -> None:
    launchers = Launchers()
    first = launchers.open(os.getpid())
    assert first is not None
    launchers.watch("sbx-1", os.getpid(), first)
    second = launchers.open(os.getpid())
    launchers.watch("sbx-1", os.getpid(), second)
    try:
        os.fstat(first)
        closed = False
    except OSError:
        closed = True
    launchers.close()
    assert closed or first == second
