"""Stop signals for daemons, safe against forked helper processes.

`loop.add_signal_handler` routes signals through the loop's wakeup fd. A
child that the daemon forks without exec (pyroute2 does, to work inside a
network namespace) inherits that fd and the C-level handler; when the parent
later sends the child SIGTERM, the child writes the signal number into the
shared fd and the parent's loop runs its SIGTERM handler: the daemon stops
itself. A plain `signal.signal` handler that checks the PID cannot be fooled
that way: the child's write trips no flag in the parent, and a handler run in
the child sees another PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_handlers(
    loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None]
) -> Callable[[], None]:
    """Call `on_stop` in `loop` on SIGTERM/SIGINT to this process; returns an uninstaller."""
    owner = os.getpid()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            return
        loop.call_soon_threadsafe(on_stop)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)

    def uninstall() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return uninstall


class Stopped(BaseException):
    """SIGTERM to a one-shot command: unwind through every finally (clean-up), like Ctrl-C."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM to this process raises `Stopped` (not to forked helpers)."""
    owner = os.getpid()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        if os.getpid() == owner:  # pyroute2 forks helpers that inherit handlers
            raise Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
