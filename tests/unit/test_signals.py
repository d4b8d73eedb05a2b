"""A forked child's SIGTERM must not stop the daemon that forked it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import uvloop

from egressd.signals import install_stop_handlers


async def _child_then_self() -> tuple[bool, bool]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    uninstall = install_stop_handlers(loop, stop.set)
    try:
        pid = os.fork()
        if pid == 0:  # the child: what pyroute2's netns helpers are
            time.sleep(1)  # noqa: ASYNC251 - in the forked child, which runs no loop
            os._exit(0)
        await asyncio.sleep(0.1)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)  # noqa: ASYNC222 - the child was just killed: no wait
        await asyncio.sleep(0.2)
        by_child = stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 2.0)
        return by_child, stop.is_set()
    finally:
        uninstall()


def test_child_sigterm_does_not_stop_parent_but_own_sigterm_does() -> None:
    by_child, by_self = uvloop.run(_child_then_self())
    assert by_child is False
    assert by_self is True
