"""The relay's TCP transports: one edge-triggered epoll set per event loop.

uvloop makes a libuv handle per transport: a stream handle, its poll
registration, a ``getsockname`` and a ``getpeername`` each, reading started and
stopped through ``epoll_ctl``, a close that takes a loop iteration (issue 10's
profile: two transports ~14 µs each of a ~440 µs connection, six address
system calls). A `Reactor` registers each socket once in its own epoll set,
``EPOLLIN | EPOLLET`` (one ``epoll_ctl``); the set's descriptor is one reader of
the loop, so one wake-up serves every socket that became ready meanwhile.
Pausing and resuming reading costs no system call: readiness is kept as a flag
(`SocketTransport._readable`) and acted on when reading resumes. ``EPOLLOUT`` is
asked for only while a write is pending (rare: the relay's writes usually go
out whole).

`SocketTransport` implements what `egressd.proxy.relay` uses of
`asyncio.Transport` with asyncio's semantics, for a `asyncio.BufferedProtocol`:
``connection_made`` when attached; reads with ``get_buffer``/``buffer_updated``;
``eof_received`` once (a falsy answer closes); ``pause_writing``/``resume_writing``
around the write buffer's high and low marks; ``write_eof`` once the buffer is
written; ``close`` once it is written, ``abort`` at once; ``connection_lost``
always from a later loop callback, and the socket closed after it. An error of
the socket (a reset, a broken pipe) aborts the transport and reaches
``connection_lost`` as the exception.

Edge-triggered reading: Linux reports a socket each time data (or a FIN)
arrives, so a read that returns less than it asked for has emptied the socket
of data; one that filled the buffer is followed by more reads, at most
`MAX_READS` a wake-up, then one loop iteration later (other sockets' turn). A
FIN or an error that came with the data (reported as ``EPOLLRDHUP``,
``EPOLLHUP``, ``EPOLLERR``) stays to be read after it: once one was reported,
reading goes on to the end or the error, not to the first short read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
import socket
import struct
from typing import Any, cast

_BASE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_WRITE = _BASE | select.EPOLLOUT
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
#: The peer's FIN or an error is pending: a short read has not emptied the socket.
_ENDING = select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
#: Reads of one socket in one wake-up before the others get a turn.
MAX_READS = 16
_RETRY = (BlockingIOError, InterruptedError)
#: SO_LINGER on, timeout 0: closing the socket sends a TCP RST.
_LINGER_RESET = struct.pack("ii", 1, 0)


def arm_reset(sock: socket.socket) -> None:
    """Make closing `sock` send a TCP RST (SO_LINGER on, timeout 0), not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


class Reactor:
    """The epoll set of one event loop's relay sockets; `close` when done."""

    __slots__ = ("_epoll", "_fileno", "_loop", "_transports")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._fileno = self._epoll.fileno()
        self._transports: dict[int, SocketTransport] = {}
        loop.add_reader(self._fileno, self._ready)

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def attach(self, sock: socket.socket, protocol: asyncio.BufferedProtocol) -> SocketTransport:
        """`sock` (connected, non-blocking) served to `protocol` from now on:
        ``connection_made`` is called before this returns."""
        transport = SocketTransport(self, sock, protocol)
        fd = transport.fd
        self._epoll.register(fd, _BASE)
        self._transports[fd] = transport
        protocol.connection_made(transport)
        return transport

    def close(self) -> None:
        """Stop watching; transports still open are aborted."""
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._fileno)
        for transport in list(self._transports.values()):
            transport.abort()
        self._epoll.close()

    def _want_write(self, fd: int, write: bool) -> None:
        if not self._epoll.closed:
            self._epoll.modify(fd, _WRITE if write else _BASE)

    def _forget(self, fd: int) -> None:
        # The socket is closed right after: the kernel drops its registration
        # with the file, so no ``epoll_ctl`` here. Events of this batch for a
        # number reused meanwhile cannot be: sockets are closed only from a
        # loop callback of their own, never while a batch is dispatched.
        self._transports.pop(fd, None)

    def _ready(self) -> None:
        transports = self._transports
        for fd, events in self._epoll.poll(0):
            transport = transports.get(fd)
            if transport is not None:
                # One protocol's error must not lose the batch's other events:
                # edge-triggered, they would not be reported again.
                try:
                    transport._on_events(events)
                except Exception as exc:  # noqa: BLE001 - reported, and the connection ends
                    transport._failed(exc)


class SocketTransport(asyncio.Transport):
    """One TCP (or other stream) socket of a `Reactor`; see the module doc."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closing",
        "_ending",
        "_eof",
        "_eof_pending",
        "_high",
        "_lost",
        "_low",
        "_protocol",
        "_reactor",
        "_read_scheduled",
        "_readable",
        "_reading_paused",
        "_sock",
        "_writing_paused",
        "fd",
    )

    def __init__(
        self, reactor: Reactor, sock: socket.socket, protocol: asyncio.BufferedProtocol
    ) -> None:
        # No super().__init__: the extra-info dict it makes is not used.
        self._reactor = reactor
        self._sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self._protocol: asyncio.BufferedProtocol | None = protocol
        self._buffer: collections.deque[bytes | memoryview] = collections.deque()
        self._buffered = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._writing_paused = False
        self._reading_paused = False
        self._readable = False
        self._read_scheduled = False
        self._eof = False  # the peer's FIN was read
        self._eof_pending = False  # write_eof asked; done once the buffer is written
        self._ending = False  # a FIN or an error was reported: read on to it
        self._closing = False
        self._lost = False  # connection_lost is scheduled or done

    # --- asyncio.BaseTransport / ReadTransport / WriteTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock if name == "socket" else default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._lose(None)

    def abort(self) -> None:
        self._lose(None)

    def is_reading(self) -> bool:
        return not (self._reading_paused or self._closing or self._eof)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._readable and not self._read_scheduled and not self._closing and not self._eof:
            self._read_scheduled = True
            self._reactor._loop.call_soon(self._scheduled_read)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` now; what the socket does not take is kept (a copy of a
        view: the caller's buffer is reused) and sent when it can be."""
        if self._eof_pending:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or self._lost or not data:
            return  # as asyncio's transports: dropped once closing
        if not self._buffer:
            sock = self._sock
            assert sock is not None
            try:
                sent = sock.send(data)
            except _RETRY:
                sent = 0
            except OSError as exc:
                self._lose(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._reactor._want_write(self.fd, True)
        self._buffer.append(bytes(data) if not isinstance(data, bytes) else data)
        self._buffered += len(data)
        if not self._writing_paused and self._buffered > self._high:
            self._writing_paused = True
            assert self._protocol is not None
            self._protocol.pause_writing()

    def write_eof(self) -> None:
        if self._closing or self._eof_pending or self._lost:
            return
        self._eof_pending = True
        if not self._buffer:
            self._shutdown()

    # --- events

    def _on_events(self, events: int) -> None:
        if events & _WRITABLE and self._buffer:
            self._write_ready()
        if events & _READABLE and not self._lost:
            self._readable = True
            if events & _ENDING:
                self._ending = True
            if not (self._reading_paused or self._closing or self._eof or self._read_scheduled):
                self._read()

    def _scheduled_read(self) -> None:
        self._read_scheduled = False
        if self._readable and not (self._reading_paused or self._closing or self._eof):
            try:
                self._read()
            except Exception as exc:  # noqa: BLE001 - reported, and the connection ends
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A protocol callback raised (a bug, not the network): say so, and end the
        connection with a reset rather than leave it half-served."""
        self._reactor._loop.call_exception_handler(
            {"message": "relay protocol callback failed", "exception": exc, "transport": self}
        )
        if self._sock is not None and not self._lost:
            arm_reset(self._sock)
        self._lose(exc)

    def _read(self) -> None:
        sock, protocol = self._sock, self._protocol
        assert sock is not None and protocol is not None
        for _ in range(MAX_READS):
            buf = cast(memoryview, protocol.get_buffer(-1))
            try:
                nbytes = sock.recv_into(buf)
            except _RETRY:
                self._readable = False
                return
            except OSError as exc:
                self._lose(exc)
                return
            if not nbytes:
                self._readable = False
                self._eof = True
                if not protocol.eof_received():
                    self.close()
                return
            protocol.buffer_updated(nbytes)
            if nbytes < len(buf) and not self._ending:
                self._readable = False  # a short read emptied the socket
                return
            if self._reading_paused or self._closing or self._lost:
                return
        self._read_scheduled = True
        self._reactor._loop.call_soon(self._scheduled_read)

    def _write_ready(self) -> None:
        sock, buffer = self._sock, self._buffer
        assert sock is not None
        while buffer:
            data = buffer[0]
            try:
                sent = sock.send(data)
            except _RETRY:
                return
            except OSError as exc:
                self._lose(exc)
                return
            self._buffered -= sent
            if sent < len(data):
                # Sent in part: try the rest, so that the socket is known full
                # (EAGAIN) and its next room reported before this waits for it.
                buffer[0] = memoryview(data)[sent:]
                continue
            buffer.popleft()
        self._reactor._want_write(self.fd, False)
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            assert self._protocol is not None
            self._protocol.resume_writing()
        if self._closing:
            self._lose(None)
        elif self._eof_pending:
            self._shutdown()

    def _shutdown(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        """End now: nothing more is read or written; ``connection_lost(exc)``
        from a later loop callback, then the socket is closed."""
        if self._lost:
            return
        self._lost = self._closing = True
        self._buffer.clear()
        self._buffered = 0
        self._reactor._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        protocol, sock = self._protocol, self._sock
        self._protocol = self._sock = None  # no cycle left with the protocol
        self._reactor._forget(self.fd)
        try:
            if protocol is not None:
                protocol.connection_lost(exc)
        finally:
            if sock is not None:
                sock.close()
