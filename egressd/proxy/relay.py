"""Relay bytes both ways between two connected TCP sockets, with half-close.

The hot path of the proxy, so it is built on asyncio protocols (callbacks, no
coroutine per chunk): each side reads into a 64 KiB buffer and writes a copy
straight into the other side's transport. Flow control is the transports':
when a side's write buffer passes its high-water mark, the other side stops
reading until it drains, so a slow reader never makes the proxy buffer more
than about one high-water mark per direction.

Half-close: when one side sends FIN, the other side gets ``shutdown(SHUT_WR)``
once what was already relayed has been written, and the relay carries on in the
other direction. The relay ends when both sides have sent FIN and all data is
written, or when either side fails: an error (a reset, a broken pipe) on one
side resets the other (SO_LINGER 0), so the client sees what the server did.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

RELAY_BUFFER = 64 * 1024
#: Per-direction write buffer high-water mark before the other side is paused.
WRITE_HIGH_WATER = 256 * 1024

UP = "up"
DOWN = "down"

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP RST (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _reset_transport(transport: asyncio.BaseTransport | None) -> None:
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


@dataclass(slots=True)
class RelayStats:
    bytes_up: int = 0
    bytes_down: int = 0
    #: None for a clean end (both sides sent FIN); else "client_error",
    #: "upstream_error" (a reset, a broken pipe) or "cancelled".
    error: str | None = None


class _Side(asyncio.BufferedProtocol):
    """One socket of the pair: reads into a fixed buffer, writes to its peer."""

    __slots__ = (
        "_buffer",
        "_count",
        "_view",
        "direction",
        "eof",
        "lost",
        "peer",
        "pending",
        "pipe",
        "transport",
    )

    def __init__(
        self,
        pipe: _Pipe,
        direction: str,
        count: Callable[[int], None] | None,
        buffer: bytearray,
    ) -> None:
        self.pipe = pipe
        self.direction = direction  # of the bytes this side reads
        self._count = count
        self._buffer = buffer
        self._view = memoryview(buffer)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # read before the pipe started
        self.eof = False
        self.lost = False

    # asyncio.BaseProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # Until both sides exist (`_Pipe.start`). asyncio honours this; uvloop
        # starts reading after connection_made anyway, hence `pending`.
        self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pipe.side_lost(self, exc)

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._buffer[:nbytes]  # a copy: the buffer is reused
        peer = self.peer
        if peer is None:
            self.pending.append(bytes(data))
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if peer.transport is None or peer.transport.is_closing():
            return
        peer.transport.write(data)
        self.counted(nbytes)

    def counted(self, nbytes: int) -> None:
        self.pipe.counted(self.direction, nbytes)
        if self._count is not None:
            self._count(nbytes)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self.pipe.side_eof(self)
        return True  # keep the transport open: the other direction goes on


class _Pipe:
    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client: _Side | None = None
        self.upstream: _Side | None = None

    def counted(self, direction: str, nbytes: int) -> None:
        if direction == UP:
            self.stats.bytes_up += nbytes
        else:
            self.stats.bytes_down += nbytes

    def start(self, first_up: bytes) -> None:
        client, upstream = self.client, self.upstream
        assert client is not None and upstream is not None
        assert client.transport is not None and upstream.transport is not None
        client.peer, upstream.peer = upstream, client
        if client.lost or upstream.lost:
            for side in (client, upstream):
                if not side.lost:
                    _reset_transport(side.transport)
            return
        if first_up:
            upstream.transport.write(first_up)
        for side in (client, upstream):
            for chunk in side.pending:
                side.peer.transport.write(chunk)  # type: ignore[union-attr]
                side.counted(len(chunk))
            side.pending.clear()
        for side in (client, upstream):
            if side.eof:
                self.side_eof(side)
            elif not side.transport.is_closing():  # type: ignore[union-attr]
                side.transport.resume_reading()  # type: ignore[union-attr]

    def side_eof(self, side: _Side) -> None:
        peer = side.peer
        transport = None if peer is None else peer.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()  # after the buffered data is written
        client, upstream = self.client, self.upstream
        if client is not None and upstream is not None and client.eof and upstream.eof:
            self.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None and self.stats.error is None:
            self.stats.error = "client_error" if side is self.client else "upstream_error"
        peer = side.peer
        if peer is not None and not peer.lost:
            if exc is not None:
                _reset_transport(peer.transport)
            elif peer.transport is not None:
                peer.transport.close()
        if self._all_lost() and not self.done.done():
            self.done.set_result(None)

    def _all_lost(self) -> bool:
        return all(s is None or s.lost for s in (self.client, self.upstream))

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None:
                _reset_transport(side.transport)


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    *,
    first_up: bytes = b"",
    count_up: Callable[[int], None] | None = None,
    count_down: Callable[[int], None] | None = None,
    scratch: bytearray | None = None,
    stats: RelayStats | None = None,
) -> RelayStats:
    """Relay between connected `client` and `upstream` until both are done.

    `first_up` (bytes already read from the client, e.g. while sniffing) is
    sent upstream first. `count_up`/`count_down` are called with each chunk's
    size (for metrics). The sockets are owned by the relay from here on and are
    closed when it returns; when it is cancelled, both are reset. `stats`, if
    given, is updated as bytes flow (so a caller sees the counts even when the
    relay is cancelled) and returned.

    `scratch` is the read buffer (64 KiB by default). Relays on one event loop
    may share one: a read fills it and `buffer_updated` copies the bytes out
    before the loop runs anything else (asyncio and uvloop both call
    ``get_buffer``, read, ``buffer_updated`` in one go), so thousands of idle
    connections cost no read buffers.
    """
    loop = asyncio.get_running_loop()
    if scratch is None:
        scratch = bytearray(RELAY_BUFFER)
    stats = stats if stats is not None else RelayStats()
    pipe = _Pipe(stats)
    stats.bytes_up += len(first_up)
    if count_up is not None and first_up:
        count_up(len(first_up))
    # Each side's protocol counts what it reads: the upstream socket's, bytes
    # going DOWN to the client; the client socket's, bytes going UP.
    try:
        _, pipe.upstream = await loop.create_connection(
            lambda: _Side(pipe, DOWN, count_down, scratch), sock=upstream
        )
        _, pipe.client = await loop.connect_accepted_socket(
            lambda: _Side(pipe, UP, count_up, scratch), sock=client
        )
        pipe.start(first_up)
        await asyncio.shield(pipe.done)
    except BaseException as exc:
        cancelled = isinstance(exc, asyncio.CancelledError)
        if stats.error is None:
            if cancelled:
                stats.error = "cancelled"
            else:
                stats.error = "upstream_error" if pipe.upstream is None else "client_error"
        pipe.abort()
        # A socket whose transport exists belongs to it (and is closed by it).
        if pipe.upstream is None:
            reset(upstream)
        if pipe.client is None:
            reset(client)
        if not isinstance(exc, OSError):
            raise
    return stats
