"""Stopping the processes a test started, and removing the namespaces and mounts they leave.

Teardown code: it runs in fixtures' `finally` blocks after a test may have failed half-way,
so it never raises for a process that already exited or a namespace that is already gone, and
a process that ignores SIGTERM is killed rather than left running into the next test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from egressd.net import netns

#: After SIGKILL a process exits at once; this only bounds a wait on one stuck in the kernel.
KILL_WAIT_S = 10.0
MNT_DETACH = 2

Process = subprocess.Popen[Any]


def stop_process(proc: Process | None, timeout_s: float) -> int | None:
    """SIGTERM `proc` and reap it: its exit status, or None if it had to be killed (or is
    None)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return _reap(proc, timeout_s)


def stop_processes(procs: Iterable[Process | None], timeout_s: float) -> None:
    """SIGTERM every live process at once, then reap each; one still running `timeout_s` after
    that SIGTERM is killed (stubborn processes cost one timeout together, not one each)."""
    live = [proc for proc in procs if proc is not None]
    for proc in live:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in live:
        _reap(proc, max(0.0, deadline - time.monotonic()))


def _reap(proc: Process, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=KILL_WAIT_S)
        return None


def delete_namespaces(namespaces: Iterable[str], *, leftovers: Iterable[str] = ()) -> None:
    """Delete every namespace whose name starts with one of `leftovers` (the sandboxes an agent
    made and a failed test left), then `namespaces` in reverse order of creation."""
    for prefix in leftovers:
        for ns in netns.list_netns(prefix):
            with contextlib.suppress(netns.NetError):
                netns.delete_netns(ns)
    for ns in reversed(list(namespaces)):
        with contextlib.suppress(netns.NetError):
            netns.delete_netns(ns)


def is_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split(" ")[4] == str(path) for line in fh)


def detach_mounts(paths: Iterable[Path]) -> None:
    """Lazily unmount each of `paths` that is a mount point (a daemon's private bpffs that a
    killed daemon did not unmount)."""
    for path in paths:
        if is_mount(path):
            ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(path), MNT_DETACH)


def tear_down_node(
    procs: Iterable[Process | None],
    *,
    timeout_s: float,
    namespaces: Iterable[str],
    leftovers: Iterable[str] = (),
    mounts: Iterable[Path] = (),
) -> None:
    """A node agent's test bed, in the order that works: the processes (an agent removes its
    sandboxes and unmounts its bpffs on SIGTERM), then what a failed or killed one left."""
    stop_processes(procs, timeout_s)
    delete_namespaces(namespaces, leftovers=leftovers)
    detach_mounts(mounts)
