"""Connect non-blocking TCP sockets, every wait of one event loop on one epoll set.

`loop.sock_connect` (and ``add_writer``) make uvloop create and destroy a poll
handle for each socket: a test registration, ``FIONBIO``, start, stop and close
cost the proxy seven to eight system calls per upstream connection, most of them
``epoll_ctl``, three failing with ENOENT (strace of the bench's connection-rate
run). A `Connector` registers a connecting socket in its own epoll set with
``EPOLLOUT | EPOLLONESHOT`` (one ``epoll_ctl``); the set's descriptor is one
reader of the loop, so one wake-up of the loop serves every connect that
finished meanwhile.

A registration that fired is disarmed and stays in the set until the socket is
closed (the kernel drops it with the file); one that did not (a timeout, a
cancel, the connect failing at once) is removed before the call returns, so a
later socket with the same descriptor number is never woken by an old event.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket

_CONNECTING = (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR)
_WAIT_FOR = select.EPOLLOUT | select.EPOLLONESHOT
_FAILED = select.EPOLLERR | select.EPOLLHUP


def _timed_out(done: asyncio.Future[int]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


class Connector:
    """Connects sockets on `loop`; `close` when done (the epoll set is a descriptor)."""

    __slots__ = ("_epoll", "_loop", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        # A connect's future gets its socket's epoll events.
        self._waiting: dict[int, asyncio.Future[int]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        for done in self._waiting.values():
            if not done.done():
                done.set_exception(ConnectionAbortedError(errno.ECONNABORTED, "connector closed"))
        self._waiting.clear()

    async def connect(
        self, sock: socket.socket, address: tuple[str, int], timeout_s: float | None = None
    ) -> None:
        """Connect the non-blocking `sock` to a numeric IPv4 `address`, as
        `loop.sock_connect` does: OSError (with its errno) when it fails,
        TimeoutError when `timeout_s` passes first."""
        err = sock.connect_ex(address)
        if err == 0:
            return
        if err not in _CONNECTING:
            raise OSError(err, f"Connect call failed {address}")
        fd = sock.fileno()
        done: asyncio.Future[int] = self._loop.create_future()
        self._epoll.register(fd, _WAIT_FOR)
        self._waiting[fd] = done
        timer = None if timeout_s is None else self._loop.call_later(timeout_s, _timed_out, done)
        try:
            events = await done
        except BaseException:
            if self._waiting.pop(fd, None) is not None and not self._epoll.closed:
                self._epoll.unregister(fd)  # still armed: not fired
            raise
        finally:
            if timer is not None:
                timer.cancel()
        # Writable without an error or a hang-up is connected: the error is
        # asked for (one system call) only when the kernel reports one.
        if events & _FAILED:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                raise OSError(err, f"Connect call failed {address}")

    def _ready(self) -> None:
        for fd, events in self._epoll.poll(0):
            done = self._waiting.pop(fd, None)
            if done is not None and not done.done():
                done.set_result(events)
