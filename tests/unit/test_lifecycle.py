"""egressd.lifecycle: start onto an exit stack, unwind it whatever fails (pure, with fakes)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from structlog.testing import capture_logs

from egressd.lifecycle import Lifecycle, run_until_stopped, serve_until_stopped


class Boom(Exception):
    pass


class Fake(Lifecycle):
    """Acquires `steps` in order; `fail_start` makes that step fail, `fail_undo` its undo."""

    def __init__(
        self,
        steps: list[str],
        *,
        fail_start: str | None = None,
        fail_undo: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.steps = steps
        self.fail_start = fail_start
        self.fail_undo = fail_undo
        self.journal: list[str] = []

    async def _start(self) -> None:
        for step in self.steps:
            if step == self.fail_start:
                raise Boom(f"start {step}")
            self.journal.append(f"+{step}")
            self._stack.push_async_callback(self._undo, step)

    async def _undo(self, step: str) -> None:
        self.journal.append(f"-{step}")
        if step in self.fail_undo:
            raise Boom(f"undo {step}")


def test_stop_unwinds_in_reverse_and_only_once() -> None:
    daemon = Fake(["a", "b", "c"])

    async def go() -> None:
        await daemon.start()
        await daemon.stop()
        await daemon.stop()

    asyncio.run(go())
    assert daemon.journal == ["+a", "+b", "+c", "-c", "-b", "-a"]


def test_a_failing_undo_does_not_skip_the_others() -> None:
    daemon = Fake(["a", "b", "c", "d"], fail_undo=frozenset({"c", "b"}))

    async def go() -> None:
        await daemon.start()
        await daemon.stop()

    with capture_logs() as logs, pytest.raises(Boom, match="undo b"):
        asyncio.run(go())
    assert daemon.journal == ["+a", "+b", "+c", "+d", "-d", "-c", "-b", "-a"]
    # The stack re-raises only the last error: each one is logged.
    failed = [(e["step"], e["error"]) for e in logs if e["event"] == "stop_step_failed"]
    assert failed == [("Fake._undo", "Boom('undo c')"), ("Fake._undo", "Boom('undo b')")]


def test_a_failed_start_unwinds_what_was_done() -> None:
    daemon = Fake(["a", "b", "c"], fail_start="c")
    with pytest.raises(Boom, match="start c"):
        asyncio.run(daemon.start())
    assert daemon.journal == ["+a", "+b", "-b", "-a"]


class Recorder:
    def __init__(self, fail_start: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_start = fail_start

    async def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise Boom("start")

    async def stop(self) -> None:
        self.calls.append("stop")


def test_run_until_stopped_stops_after_the_event_and_after_a_failed_start() -> None:
    async def go(daemon: Recorder) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await run_until_stopped(daemon, stop, stopping=lambda: daemon.calls.append("stopping"))

    ok = Recorder()
    asyncio.run(go(ok))
    assert ok.calls == ["start", "stopping", "stop"]
    failed = Recorder(fail_start=True)
    with pytest.raises(Boom):
        asyncio.run(go(failed))
    assert failed.calls == ["start", "stop"]


def test_serve_until_stopped_stops_on_sigterm_and_restores_the_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    daemon = Recorder()

    async def go() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serve_until_stopped(daemon), 5.0)

    asyncio.run(go())
    assert daemon.calls == ["start", "stop"]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_started_runs_once_the_start_succeeded_and_not_after_a_failed_one() -> None:
    async def go(daemon: Recorder) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await run_until_stopped(
            daemon,
            stop,
            stopping=lambda: daemon.calls.append("stopping"),
            started=lambda: daemon.calls.append("started"),
        )

    ok = Recorder()
    asyncio.run(go(ok))
    assert ok.calls == ["start", "started", "stopping", "stop"]
    failed = Recorder(fail_start=True)
    with pytest.raises(Boom):
        asyncio.run(go(failed))
    assert failed.calls == ["start", "stop"]
