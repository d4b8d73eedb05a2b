"""One lifecycle for every daemon: start onto an exit stack, unwind it on stop.

A daemon (agent, proxy, control plane) subclasses `Lifecycle` and writes
`_start()`: each step that acquires something pushes its undo on `self._stack`
right after (or, for objects whose undo is safe on a half-done start, right
before) acquiring it. `start()` unwinds what was done if a step fails, and
`stop()` unwinds everything, in reverse order. An undo that raises does not
skip the others (`contextlib.AsyncExitStack` runs every callback and raises
the last error when it is done; `UndoStack` logs each one), so a failing
clean-up step leaves no device, table, socket or process behind that a later
step would have removed.

`serve_until_stopped` is the one way a daemon runs: stop handlers from
`egressd.signals` (never `loop.add_signal_handler`, see there), start, wait
for SIGTERM/SIGINT or the caller's event, stop (`run_until_stopped` is the
same without installing the handlers, for a caller that has them already).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Protocol, TypeVar

import structlog

from egressd.signals import install_stop_handlers

log = structlog.get_logger("egressd.lifecycle")

P = ParamSpec("P")
T = TypeVar("T")


class Daemon(Protocol):
    async def start(self) -> object: ...

    async def stop(self) -> None: ...


def _step(undo: Callable[..., Any]) -> str:
    return str(getattr(undo, "__qualname__", None) or repr(undo))


class UndoStack(contextlib.AsyncExitStack):
    """An `AsyncExitStack` that logs each undo that raises (`stop_step_failed`).

    The stack runs every undo whatever the others raise, but re-raises only
    the last error and drops the earlier ones (their `__context__` is not
    set for callbacks); the log keeps all of them.
    """

    def callback(
        self, callback: Callable[P, T], /, *args: P.args, **kwds: P.kwargs
    ) -> Callable[P, T]:
        def logged() -> None:
            try:
                callback(*args, **kwds)
            except Exception as exc:
                log.error("stop_step_failed", step=_step(callback), error=repr(exc), exc_info=exc)
                raise

        super().callback(logged)
        return callback

    def push_async_callback(
        self, callback: Callable[P, Awaitable[T]], /, *args: P.args, **kwds: P.kwargs
    ) -> Callable[P, Awaitable[T]]:
        async def logged() -> None:
            try:
                await callback(*args, **kwds)
            except Exception as exc:
                log.error("stop_step_failed", step=_step(callback), error=repr(exc), exc_info=exc)
                raise

        super().push_async_callback(logged)
        return callback


class Lifecycle:
    """Start/stop around one `UndoStack` (see the module docstring)."""

    def __init__(self) -> None:
        self._stack = UndoStack()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Undo everything `start` did, in reverse; safe at any point, and twice."""
        await self._stack.aclose()


async def serve_until_stopped(
    daemon: Daemon,
    stop: asyncio.Event | None = None,
    *,
    stopping: Callable[[], None] = lambda: None,
    started: Callable[[], None] = lambda: None,
) -> None:
    """Start `daemon`, serve until `stop` is set or SIGTERM/SIGINT arrives, then stop it.

    The signal handlers are `egressd.signals`' and are restored when this returns.
    """
    stop = stop if stop is not None else asyncio.Event()
    uninstall = install_stop_handlers(asyncio.get_running_loop(), stop.set)
    try:
        await run_until_stopped(daemon, stop, stopping=stopping, started=started)
    finally:
        uninstall()


async def run_until_stopped(
    daemon: Daemon,
    stop: asyncio.Event,
    *,
    stopping: Callable[[], None] = lambda: None,
    started: Callable[[], None] = lambda: None,
) -> None:
    """Start `daemon`, wait for `stop`, stop it (also when the start or the wait fails).

    For a caller that installed the stop handlers itself (`serve_until_stopped`
    does). `started` runs once the start succeeded; `stopping` runs once the stop
    is asked for (the daemon's log line), before the unwinding.
    """
    try:
        await daemon.start()
        started()
        await stop.wait()
        stopping()
    finally:
        await daemon.stop()
