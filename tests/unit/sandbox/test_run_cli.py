"""`sandbox run`'s pure parts: exit codes, one-line messages, runsc's launch errors,
the stderr hold-back, the mount readability rule, and its signal handling."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import stat
from pathlib import Path

import pytest

from egressd.agent.client import AgentClientError, AgentUnreachable
from egressd.layout import DEFAULT_RUN_DIR
from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import sandbox_can_read
from egressd.sandbox.cli import (
    EXIT_CANNOT_INVOKE,
    EXIT_EGRESSD,
    EXIT_NOT_FOUND,
    exit_code,
    no_node_message,
    stoppable,
    stopped_message,
    unreadable_mount_message,
)
from egressd.sandbox.runsc import RUNSC_FATAL_PREFIX, _Sink, classify_launch_error, finish

RUNSC = "running container: starting container: starting root container: starting sandbox: "


# --- exit codes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SandboxError("command_not_found", "x"), EXIT_NOT_FOUND),
        (SandboxError("command_not_executable", "x"), EXIT_CANNOT_INVOKE),
        (SandboxError("launch_failed", "x"), EXIT_EGRESSD),
        (SandboxError("timeout", "x"), EXIT_EGRESSD),
        (SandboxError("bad_mount", "x"), EXIT_EGRESSD),
        (SandboxError("mount_unreadable", "x"), EXIT_EGRESSD),
        (SandboxError("no_node", "x"), EXIT_EGRESSD),
        (AgentClientError("expired", "x", kind="policy_rejected", status=400), EXIT_EGRESSD),
        (AgentUnreachable("socket"), EXIT_EGRESSD),
        (OSError(2, "No such file"), EXIT_EGRESSD),
    ],
)
def test_exit_code_is_dockers(exc: BaseException, code: int) -> None:
    assert exit_code(exc) == code


def test_codes_are_dockers() -> None:
    assert (EXIT_EGRESSD, EXIT_CANNOT_INVOKE, EXIT_NOT_FOUND) == (125, 126, 127)


# --- messages ---------------------------------------------------------------------------


def test_no_node_message_names_the_known_nodes_and_the_fix() -> None:
    assert no_node_message("node9", ["node2", "node1"], DEFAULT_RUN_DIR) == (
        "no node 'node9' (known: node1, node2); is the fleet up? egressd topology up"
    )


def test_no_node_message_when_nothing_is_up_and_another_run_dir() -> None:
    msg = no_node_message("node1", ["node1"], Path("/tmp/fleet"))
    assert (
        msg == "no node 'node1' (known: none); is the fleet up? "
        "egressd topology up --run-dir /tmp/fleet"
    )


def test_unreadable_mount_message() -> None:
    msg = unreadable_mount_message("/data:/d", stat.S_IFDIR | 0o700, 0, 0)
    assert msg == (
        "--mount /data:/d: the sandbox user (uid 65534) cannot read it "
        "(mode 0700, owner 0:0); e.g. chmod o+rX it"
    )


def test_stopped_message() -> None:
    assert stopped_message(signal.SIGTERM, None) == "stopped by SIGTERM; the sandbox was removed"
    assert (
        stopped_message(signal.SIGHUP, "agent_unreachable: x")
        == "stopped by SIGHUP; clean-up: agent_unreachable: x"
    )


# --- runsc's launch errors --------------------------------------------------------------


def test_not_in_path_is_127() -> None:
    exc = classify_launch_error(
        RUNSC
        + 'error finding executable "nosuch" in PATH [/venv/bin /usr/bin /bin]: '
        + "no such file or directory"
    )
    assert exc.reason == "command_not_found"
    assert exc.detail == "nosuch: not found in the sandbox's PATH (/venv/bin:/usr/bin:/bin)"
    assert exit_code(exc) == 127


def test_missing_file_is_127() -> None:
    exc = classify_launch_error(
        RUNSC + "creating process: failed to load /no/such: no such file or directory"
    )
    assert (exc.reason, exc.detail) == (
        "command_not_found",
        "/no/such: no such file in the sandbox",
    )


def test_not_executable_is_126() -> None:
    exc = classify_launch_error(
        RUNSC + "creating process: failed to load /usr/lib/os-release: permission denied"
    )
    assert exc.reason == "command_not_executable"
    assert exc.detail == "/usr/lib/os-release: cannot execute: permission denied"
    assert exit_code(exc) == 126


def test_other_launch_errors_stay_egressds() -> None:
    exc = classify_launch_error(
        "running container: creating container: cannot create sandbox: EPERM"
    )
    assert exc.reason == "launch_failed"
    assert exit_code(exc) == 125


# --- the stderr hold-back ---------------------------------------------------------------


def test_sink_passes_ordinary_output_at_once() -> None:
    out = io.BytesIO()
    sink = _Sink(out, hold=RUNSC_FATAL_PREFIX)
    sink.feed(b"hello\n")
    assert out.getvalue() == b"hello\n"


def test_sink_drops_runscs_fatal_line_when_it_is_the_error() -> None:
    out = io.BytesIO()
    sink = _Sink(out, hold=RUNSC_FATAL_PREFIX)
    line = RUNSC + "creating process: failed to load /x: permission denied"
    sink.feed(line.encode() + b"\n")
    assert out.getvalue() == b""
    assert sink.drop(line)
    sink.release()
    assert out.getvalue() == b""


def test_sink_never_loses_a_udfs_lookalike_line() -> None:
    out = io.BytesIO()
    sink = _Sink(out, hold=RUNSC_FATAL_PREFIX)
    sink.feed(b"running container: mine\n")
    sink.feed(b"more\n")  # a later chunk releases the held one first, in order
    assert out.getvalue() == b"running container: mine\nmore\n"
    sink.feed(b"running container: last\n")
    assert not sink.drop("some other error")
    sink.release()
    assert out.getvalue().endswith(b"more\nrunning container: last\n")


def test_sink_keeps_reading_after_the_caller_went_away() -> None:
    out = io.BytesIO()
    out.close()
    sink = _Sink(out)
    sink.feed(b"x")
    sink.feed(b"y")
    assert sink.broken


# --- the mount readability rule ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "ok"),
    [
        (stat.S_IFDIR | 0o755, 0, 0, True),
        (stat.S_IFDIR | 0o700, 0, 0, False),
        (stat.S_IFDIR | 0o744, 0, 0, False),  # r without x: cannot be entered
        (stat.S_IFDIR | 0o711, 0, 0, False),  # x without r: cannot be listed
        (stat.S_IFDIR | 0o700, 65534, 0, True),
        (stat.S_IFDIR | 0o750, 0, 65534, True),
        (stat.S_IFDIR | 0o057, 65534, 0, False),  # owner bits win, as in the kernel
        (stat.S_IFREG | 0o644, 0, 0, True),
        (stat.S_IFREG | 0o600, 0, 0, False),
        (stat.S_IFREG | 0o004, 0, 0, True),
    ],
)
def test_sandbox_can_read(mode: int, uid: int, gid: int, ok: bool) -> None:
    assert sandbox_can_read(mode, uid, gid) is ok


# --- signals and clean-up -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
async def test_a_stop_signal_cancels_and_the_cleanup_runs(sig: signal.Signals) -> None:
    received: list[int] = []
    cleaned: list[str] = []
    started = asyncio.Event()

    async def work() -> int:
        try:
            started.set()
            await asyncio.sleep(30)
            return 0
        finally:
            await finish(asyncio.sleep(0.05))
            cleaned.append("done")

    before = signal.getsignal(sig)
    task = asyncio.ensure_future(stoppable(work(), received))
    await started.wait()
    os.kill(os.getpid(), sig)
    os.kill(os.getpid(), sig)  # a second one during the clean-up changes nothing
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert received == [sig]
    assert cleaned == ["done"]
    assert signal.getsignal(sig) == before


async def test_finish_completes_despite_cancellation() -> None:
    steps: list[int] = []

    async def cleanup() -> None:
        for n in range(3):
            await asyncio.sleep(0.02)
            steps.append(n)

    async def caller() -> None:
        await finish(cleanup())

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == [0, 1, 2]
