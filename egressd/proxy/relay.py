"""Relay bytes both ways between two connected TCP sockets, with half-close.

The hot path of the proxy, so it is built on asyncio protocols (callbacks, no
coroutine per chunk): each side reads into the read buffer (`RELAY_BUFFER`,
256 KiB, shared by the loop's relays) and passes the bytes to the other side.
A plain socket's transport is a `egressd.proxy.transport.SocketTransport` on the
loop's `Reactor` (one edge-triggered epoll set; not uvloop's transports, which
cost a connection ~30 µs more), a TLS endpoint's a `TlsTransport` over one.
An ungated side that was never paced reads up to the whole buffer and writes
it straight to the other socket with one ``send`` when that socket's
transport holds nothing (`_Side.send`: no copy in user space); only what the
socket does not take is copied into the transport. A gated or paced side
reads `CHUNK` (64 KiB) at a time and copies each chunk (the gate and the pacing queue keep theirs); but while the gate counts a
response body of known length (`Gate.counting_body`) the server's side reads
and writes as an ungated one, the gate told only how many bytes passed. Flow control is the
transports': when a side's write buffer passes its high-water mark, the other
side stops reading until it drains, so a slow reader never makes the proxy
buffer more than about one high-water mark and one read per direction.
(Issue 10's bulk profile: the proxy's CPU in a download is ~87% the kernel's
send path, the relay's Python ~13%; docs/decisions.md, "Bulk relay".)

Half-close: when one side sends FIN, the other side gets ``shutdown(SHUT_WR)``
once what was already relayed has been written, and the relay carries on in the
other direction. The relay ends when both sides have sent FIN and all data is
written, or when either side fails: an error (a reset, a broken pipe) on one
side resets the other (SO_LINGER 0), so the client sees what the server did.

Pacing (`Pacing`, see `egressd.limits.pacing`): each chunk read gets a
departure time from the job's EDT pacer for its direction. A chunk due now
is written at once; a later one waits in its side's queue, written by a
timer at its departure time (in order: a side's departures never decrease).
While the last queued chunk's departure lies beyond the horizon, the side
stops reading (TCP backpressure toward the sender); a FIN read behind queued
chunks is passed on after them. Nothing is dropped. A read takes no more than
the job's rate sends in one horizon (`Pacing.burst_bytes`, at least
`PACED_READ_MIN`), the first included, so that a slow job's
peer gets its bytes at the rate from the first one, not a whole buffer held
until its departure.

Timeouts (`egressd.limits.timeouts`): with `timeouts`, a timer ends a relay
that moved no byte for ``idle_s`` or lived ``lifetime_s``: both sides are
reset and `RelayStats.end` says which.

Gating (`Gate`, see `egressd.proxy.http_gate`): with `gate`, what the client
sends goes to the gate instead of upstream, and only the bytes it releases
are forwarded (paced and counted like any chunk); what the server sends is
forwarded as always and shown to the gate too. The gate may hold the client
(not read while a request is being decided or waits for the response before
it), and may end the connection with a final response to the client, written
after everything already relayed downstream, after which both sides close.
A client's FIN is passed on once the gate has released everything it holds.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from egressd.limits import timeouts as expiry
from egressd.limits.pacing import PACE_SLACK_S
from egressd.proxy.transport import Reactor, arm_reset

#: The read buffer (the scratch): what an ungated side that was never paced reads at once.
RELAY_BUFFER = 256 * 1024
#: What a gated or paced side reads at once: the gate parses, a paced chunk is a burst.
CHUNK = 64 * 1024
#: The least a paced side reads at once, however slow its job (`Pacing.burst_bytes`).
PACED_READ_MIN = 4 * 1024
#: Per-direction write buffer high-water mark before the other side is paused.
WRITE_HIGH_WATER = 256 * 1024

UP = "up"
DOWN = "down"

#: Reasons a side is not reading (bits of `_Side.blocks`).
_STARTING = 1  # the pipe has not started yet
_PEER_FULL = 2  # the other side's write buffer is above its high-water mark
_PACED = 4  # queued chunks reach beyond the pacing horizon
_GATED = 8  # the gate holds the client (a decision, an earlier response, the end)


class Gate(Protocol):
    """Decides a gated connection's client bytes (`egressd.proxy.http_gate.HttpGate`)."""

    tunnel: bool
    final: bytes | None
    wake: Callable[[], None] | None

    @property
    def hold(self) -> bool: ...

    @property
    def ended(self) -> bool: ...

    @property
    def counting_body(self) -> bool:
        """The server's bytes are a response body of known length: only their count matters."""
        ...

    def from_client(self, data: bytes) -> None: ...

    def client_eof(self) -> None: ...

    def from_upstream(self, data: bytes) -> None: ...

    def upstream_eof(self) -> None: ...

    def take_up(self) -> list[bytes]: ...

    def holds_data(self) -> bool: ...


class Endpoint(Protocol):
    """A side that is not a plain TCP socket (`egressd.proxy.tls_intercept.TlsLink`):
    it makes its own transport for the relay's protocol, over its socket's on
    the relay's `Reactor`."""

    async def attach(
        self, factory: Callable[[], asyncio.BaseProtocol], reactor: Reactor
    ) -> asyncio.BaseProtocol:
        """Connect `factory()`'s protocol to a transport; the protocol."""
        ...

    def reset(self) -> None:
        """Reset the connection (the relay ended before `attach` returned)."""
        ...


class Pacing(Protocol):
    """One connection's view of its job's EDT pacers (`egressd.limits.pacing`)."""

    horizon_s: float
    #: What the job's rate sends in one horizon: the most a read of its connection takes
    #: (at least `PACED_READ_MIN`), so that a chunk read is not held much beyond the horizon.
    burst_bytes: int

    def departure(self, direction: str, size: int, now: float) -> float:
        """When a chunk of `size` bytes going `direction` may be written."""
        ...


def reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP RST (SO_LINGER on, timeout 0)."""
    arm_reset(sock)
    sock.close()


def reset_transport(transport: asyncio.BaseTransport | None) -> None:
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        arm_reset(sock)
    transport.abort()  # type: ignore[attr-defined]


@dataclass(slots=True)
class RelayStats:
    bytes_up: int = 0
    bytes_down: int = 0
    #: None for a clean end (both sides sent FIN); else "client_error",
    #: "upstream_error" (a reset, a broken pipe) or "cancelled".
    error: str | None = None
    #: Set when a timeout ended the relay: "idle_timeout" or "max_lifetime".
    end: str | None = None
    #: Chunks that waited for their departure time (pacing).
    paced_chunks: int = 0
    #: The upstream socket was left in TIME_WAIT: the proxy sent its FIN
    #: before the server's, and the relay was not reset afterwards.
    time_wait: bool = False


class _Side(asyncio.BufferedProtocol):
    """One socket of the pair: reads into a fixed buffer, writes to its peer."""

    __slots__ = (
        "_buffer",
        "_count",
        "_view",
        "blocks",
        "closing",
        "direction",
        "eof",
        "eof_sent",
        "lost",
        "paced",
        "peer",
        "pipe",
        "queue",
        "timer",
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
        # Paced chunks waiting for their departure; made on first use (an
        # empty deque costs ~600 bytes, times two per idle connection).
        self.queue: collections.deque[tuple[float, bytes]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.blocks = _STARTING
        self.eof = False
        self.eof_sent = False  # this side's FIN was passed on to the peer
        self.lost = False
        self.closing = False  # a gate's final response is queued: end after it
        self.paced = False  # a chunk of this side waited for its departure: read CHUNKs

    # asyncio.BaseProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # Until both sides exist (`_Pipe.start`): the relay's transports
        # (`SocketTransport`, and `TlsTransport` over one) read nothing meanwhile.
        tr.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pipe.side_lost(self, exc)

    def block(self, reason: int) -> None:
        transport = self.transport
        if not self.blocks and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.blocks |= reason

    def unblock(self, reason: int) -> None:
        if not self.blocks & reason:
            return
        self.blocks &= ~reason
        transport = self.transport
        if not self.blocks and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.block(_PEER_FULL)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.unblock(_PEER_FULL)

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        # A side the gate only counts (`buffer_updated`) reads the whole scratch.
        view = self._view
        gate = self.pipe.gate
        whole = not self.paced and (gate is None or (self.direction == DOWN and gate.counting_body))
        size = len(view) if whole else CHUNK
        pacing = self.pipe.pacing
        # A slow job's read is what it may send in about one horizon: a read of the
        # whole buffer at 1 KB/s would be held (and the peer left without a byte)
        # for minutes, its departure fixed when it was read.
        if pacing is not None and pacing.burst_bytes < size:
            size = max(PACED_READ_MIN, pacing.burst_bytes)
        return view if size == len(view) else view[:size]

    def buffer_updated(self, nbytes: int) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return
        gate = self.pipe.gate
        if gate is None:
            # Ungated: the scratch itself is written (`forward` copies what it keeps).
            self.forward(self._view[:nbytes])
            return
        if self.direction == UP:
            # One copy (the buffer is reused), immutable: the gate keeps it.
            data = bytes(self._view[:nbytes])
            self.pipe.last_activity = self.pipe.loop.time()
            gate.from_client(data)
        else:
            # Inside a response body of known length the gate only counts, so the
            # scratch itself is passed (`forward` copies what it keeps). Issue 10: a
            # 100 MiB download's proxy CPU per MB 0.95-1.14 -> 0.48-0.57 ms, its rate
            # 720-905 -> 1,219-1,370 MB/s. Else one copy, which the gate may keep.
            view = self._view[:nbytes]
            down = view if gate.counting_body else bytes(view)
            self.forward(down)
            gate.from_upstream(down)  # type: ignore[arg-type]
        self.pipe.drain_gate()

    def forward(self, data: bytes | memoryview) -> None:
        """Write `data` to the peer now, or queue it (a copy) for its departure time."""
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return
        nbytes = len(data)
        pipe = self.pipe
        now = pipe.loop.time()
        pipe.last_activity = now
        pacing = pipe.pacing
        if pacing is not None:
            due = pacing.departure(self.direction, nbytes, now)
            if due - now > PACE_SLACK_S or self.queue:
                self.enqueue(due, bytes(data), now, pacing.horizon_s)
                return
        peer.send(data)
        self.counted(nbytes)

    def send(self, data: bytes | memoryview) -> None:
        """Write `data` (maybe a view of the scratch) to this side now. Both
        transports take a view: a `SocketTransport` sends it at once when it holds
        nothing (no copy in user space) and copies only what the socket does not
        take; a TLS endpoint's encrypts it at once."""
        transport = self.transport
        assert transport is not None
        transport.write(data)

    def finish(self, data: bytes) -> None:
        """Write a gate's final response to the peer after what is queued, then
        end the connection: the peer (the client) is closed once it is written,
        this side (upstream) is reset."""
        self.block(_GATED)
        if self.peer is not None:
            self.peer.block(_GATED)
        self.closing = True
        if self.queue:
            self.queue.append((self.queue[-1][0], data))
            return
        self.finished(data)

    def finished(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)
            self.counted(len(data))
            peer.transport.close()  # a FIN once the response is written
        self.pipe.stats.time_wait = False
        reset_transport(self.transport)

    # pacing

    def enqueue(self, due: float, data: bytes, now: float, horizon_s: float) -> None:
        queue = self.queue
        if queue is None:
            queue = self.queue = collections.deque()
        queue.append((due, data))
        self.paced = True
        self.pipe.stats.paced_chunks += 1
        if self.timer is None:
            self.timer = self.pipe.loop.call_at(queue[0][0], self.flush)
        if due - now > horizon_s:
            self.block(_PACED)

    def flush(self) -> None:
        """Write the queued chunks that are due; re-arm for the next one."""
        self.timer = None
        peer = self.peer
        queue = self.queue
        if queue is None:
            return
        if self.lost or peer is None or peer.transport is None or peer.transport.is_closing():
            queue.clear()
            return
        loop = self.pipe.loop
        now = loop.time()
        while queue and queue[0][0] <= now + PACE_SLACK_S:
            _, data = queue.popleft()
            if self.closing and not queue:
                self.finished(data)  # the gate's final response
                return
            peer.transport.write(data)
            self.counted(len(data))
        pacing = self.pipe.pacing
        horizon_s = 0.0 if pacing is None else pacing.horizon_s
        if queue:
            self.timer = loop.call_at(queue[0][0], self.flush)
            if queue[-1][0] - now <= horizon_s:
                self.unblock(_PACED)
        else:
            self.unblock(_PACED)
            if self.eof and not self.eof_sent:
                self.pipe.side_eof(self)

    def counted(self, nbytes: int) -> None:
        # Into the pipe's stats directly (one call a chunk, this one).
        if self.direction == UP:
            self.pipe.stats.bytes_up += nbytes
        else:
            self.pipe.stats.bytes_down += nbytes
        if self._count is not None:
            self._count(nbytes)

    def eof_received(self) -> bool:
        self.eof = True
        gate = self.pipe.gate
        if gate is not None:
            if self.direction == UP:
                gate.client_eof()
            else:
                gate.upstream_eof()
            self.pipe.drain_gate()
            if self.closing or (self.direction == UP and self.pipe.gate is not None):
                return True  # `drain_gate` passes the client's FIN on when due
        if not self.queue:
            self.pipe.side_eof(self)
        # else: `flush` passes the FIN on after the queued chunks
        return True  # keep the transport open: the other direction goes on


class _Pipe:
    __slots__ = (
        "client",
        "done",
        "expiry_timer",
        "gate",
        "last_activity",
        "loop",
        "pacing",
        "started",
        "stats",
        "timeouts",
        "upstream",
    )

    def __init__(
        self,
        stats: RelayStats,
        *,
        pacing: Pacing | None = None,
        timeouts: expiry.Timeouts | None = None,
        gate: Gate | None = None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.stats = stats
        self.gate = gate
        self.loop = loop
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.client: _Side | None = None
        self.upstream: _Side | None = None
        self.pacing = pacing
        self.timeouts = timeouts
        self.started = self.last_activity = self.loop.time()
        self.expiry_timer: asyncio.TimerHandle | None = None

    def watch_expiry(self) -> None:
        """Check the timeouts now, and arm the timer for the next check."""
        self.expiry_timer = None
        if self.timeouts is None or self.done.done():
            return
        state = expiry.check(
            self.timeouts,
            started=self.started,
            last_activity=self.last_activity,
            now=self.loop.time(),
        )
        if state.reason is not None:
            self.stats.end = state.reason
            self.abort()
            return
        self.expiry_timer = self.loop.call_at(state.next_check, self.watch_expiry)

    def stop_watching(self) -> None:
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
            self.expiry_timer = None

    def drain_gate(self) -> None:
        """Forward what the gate released, apply its hold, end or un-gate."""
        gate, client, upstream = self.gate, self.client, self.upstream
        if gate is None or client is None or upstream is None or self.done.done():
            return
        for chunk in gate.take_up():
            client.forward(chunk)
        if gate.final is not None:
            if not upstream.closing:
                upstream.finish(gate.final)
            return
        if gate.tunnel:
            self.gate = None  # a tunnel now: blind both ways
            client.unblock(_GATED)
        elif gate.hold:
            client.block(_GATED)
        else:
            client.unblock(_GATED)
        held = self.gate is not None and gate.holds_data()
        if client.eof and not client.eof_sent and not held and not client.queue:
            self.side_eof(client)
        if self.gate is not None and gate.ended and upstream.eof and not upstream.queue:
            # No request will go up again and the server is done: the client,
            # which is no longer read, gets the rest and a FIN, then the end.
            self.close()

    def start(self, first_up: bytes) -> None:
        client, upstream = self.client, self.upstream
        assert client is not None and upstream is not None
        assert client.transport is not None and upstream.transport is not None
        client.peer, upstream.peer = upstream, client
        if client.lost or upstream.lost:
            for side in (client, upstream):
                if not side.lost:
                    reset_transport(side.transport)
            return
        gate = self.gate
        if gate is not None:
            gate.wake = self.drain_gate
            if first_up:
                gate.from_client(first_up)
            self.drain_gate()
        elif first_up:
            upstream.transport.write(first_up)
        if self.timeouts is not None:
            self.watch_expiry()
        # Nothing was read before now (the transports were paused from
        # `connection_made`): what came meanwhile, a FIN included, is read from here.
        client.unblock(_STARTING)
        upstream.unblock(_STARTING)

    def side_eof(self, side: _Side) -> None:
        side.eof_sent = True
        peer = side.peer
        transport = None if peer is None else peer.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()  # after the buffered data is written
            if side is self.client and peer is not None and not peer.eof:
                self.stats.time_wait = True  # the proxy closes first toward the server
        # Both FINs passed on, not merely read: a FIN read behind paced chunks is
        # still waiting for them, and closing now would drop them.
        client, upstream = self.client, self.upstream
        if client is not None and upstream is not None and client.eof_sent and upstream.eof_sent:
            self.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None and self.stats.error is None:
            self.stats.error = "client_error" if side is self.client else "upstream_error"
        peer = side.peer
        if peer is not None and not peer.lost:
            if exc is not None:
                reset_transport(peer.transport)
            elif peer.transport is not None:
                peer.transport.close()
        client, upstream = self.client, self.upstream
        if (
            (client is None or client.lost)
            and (upstream is None or upstream.lost)
            and not self.done.done()
        ):
            if self.expiry_timer is not None:
                self.stop_watching()
            self.done.set_result(None)

    def unlink(self, gate: Gate | None) -> None:
        """Drop the references that make cycles (pipe and sides, the sides
        and their transports, the gate's wake-up), once both sides are lost:
        the connection's objects are then freed by reference counting when the
        relay returns, not by the cyclic collector later (its gen-1 and gen-2
        passes were ~20% of a short connection's CPU, issue 10)."""
        client, upstream = self.client, self.upstream
        if client is not None:
            client.peer = client.transport = None
        if upstream is not None:
            upstream.peer = upstream.transport = None
        self.client = self.upstream = None
        self.gate = None
        if gate is not None:
            gate.wake = None

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        self.stats.time_wait = False  # a reset leaves no TIME_WAIT
        for side in (self.client, self.upstream):
            if side is not None:
                reset_transport(side.transport)


async def relay(
    client: socket.socket | Endpoint,
    upstream: socket.socket | Endpoint,
    *,
    first_up: bytes = b"",
    count_up: Callable[[int], None] | None = None,
    count_down: Callable[[int], None] | None = None,
    scratch: bytearray | None = None,
    stats: RelayStats | None = None,
    pacing: Pacing | None = None,
    timeouts: expiry.Timeouts | None = None,
    gate: Gate | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    reactor: Reactor | None = None,
) -> RelayStats:
    """Relay between connected `client` and `upstream` until both are done.

    Either may be an `Endpoint` instead of a TCP socket (an intercepted TLS
    connection, `tls_intercept.TlsLink`): its transport is its own, the relay's
    protocol and semantics the same.

    `first_up` (bytes already read from the client, e.g. while sniffing) is
    sent upstream first. `count_up`/`count_down` are called with each chunk's
    size (for metrics). The sockets are owned by the relay from here on and are
    closed when it returns; when it is cancelled, both are reset. `stats`, if
    given, is updated as bytes flow (so a caller sees the counts even when the
    relay is cancelled) and returned. `pacing`, `timeouts` and `gate`: see the module
    doc (with a gate, `first_up` goes to the gate first and is counted when released).

    `scratch` is the read buffer (`RELAY_BUFFER` by default). Relays on one event loop
    may share one: a read fills it and `buffer_updated` writes or copies the bytes
    out before the loop runs anything else (every transport calls
    ``get_buffer``, reads, ``buffer_updated`` in one go), so thousands of idle
    connections cost no read buffers.

    `reactor`: the loop's epoll set for the relay's sockets (`egressd.proxy.transport`;
    the proxy keeps one per loop); without one, the relay makes its own and
    closes it when it returns.
    """
    # `loop`: the running loop, when the caller has it (on Python 3.11 each
    # `asyncio.get_running_loop` is a ``getpid`` system call).
    loop = loop if loop is not None else asyncio.get_running_loop()
    if scratch is None:
        scratch = bytearray(RELAY_BUFFER)
    stats = stats if stats is not None else RelayStats()
    pipe = _Pipe(stats, pacing=pacing, timeouts=timeouts, gate=gate, loop=loop)
    if gate is None:
        stats.bytes_up += len(first_up)
        if count_up is not None and first_up:
            count_up(len(first_up))
    own_reactor: Reactor | None = None
    if reactor is None:
        reactor = own_reactor = Reactor(loop)
    # Each side's protocol counts what it reads: the upstream socket's, bytes
    # going DOWN to the client; the client socket's, bytes going UP.
    try:
        if isinstance(upstream, socket.socket):
            side = _Side(pipe, DOWN, count_down, scratch)
            reactor.attach(upstream, side)
            pipe.upstream = side
        else:
            attached = await upstream.attach(
                lambda: _Side(pipe, DOWN, count_down, scratch), reactor
            )
            pipe.upstream = cast(_Side, attached)
        if isinstance(client, socket.socket):
            side = _Side(pipe, UP, count_up, scratch)
            reactor.attach(client, side)
            pipe.client = side
        else:
            attached = await client.attach(lambda: _Side(pipe, UP, count_up, scratch), reactor)
            pipe.client = cast(_Side, attached)
        pipe.start(first_up)
        # Unshielded: a cancel cancels `done` too, after which nothing of the
        # pipe's waits on it (`side_lost`, `drain_gate`, `watch_expiry` see it done).
        await pipe.done
        pipe.unlink(gate)
    except BaseException as exc:
        cancelled = isinstance(exc, asyncio.CancelledError)
        if stats.error is None:
            if cancelled:
                stats.error = "cancelled"
            else:
                stats.error = "upstream_error" if pipe.upstream is None else "client_error"
        pipe.stop_watching()
        pipe.abort()
        # A socket whose transport exists belongs to it (and is closed by it).
        for end, made in ((upstream, pipe.upstream), (client, pipe.client)):
            if made is not None:
                continue
            if isinstance(end, socket.socket):
                reset(end)
            else:
                end.reset()
        if not isinstance(exc, OSError):
            raise
    finally:
        if own_reactor is not None:
            own_reactor.close()
    return stats
