"""`SocketTransport` and `Reactor` over socket pairs, on asyncio's loop and on
uvloop: asyncio's transport semantics as the relay uses them (reads, EOF,
flow control both ways, write_eof, close, abort, errors), and the
edge-triggered cases: what arrived before the attach, a FIN behind data, a
read paused while data arrives, a socket that fills buffer after buffer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from egressd.proxy.transport import MAX_READS, Reactor, SocketTransport
from tests.support.proxy import until

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, body: Callable[[Reactor], Coroutine[Any, Any, None]]) -> None:
    """`body(reactor)` on `loop`, with a `Reactor` closed after it."""

    async def main() -> None:
        reactor = Reactor(asyncio.get_running_loop())
        try:
            await body(reactor)
        finally:
            reactor.close()

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


class Recorder(asyncio.BufferedProtocol):
    """Keeps what it reads and the calls it gets; reads `size` bytes at most."""

    def __init__(self, size: int = 65536, keep_open: bool = True) -> None:
        self.buf = bytearray(size)
        self.data = bytearray()
        self.calls: list[str] = []
        self.reads = 0
        self.keep_open = keep_open
        self.transport: SocketTransport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, SocketTransport)
        self.transport = transport
        self.calls.append("made")

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.reads += 1
        self.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.calls.append("eof")
        self.eof.set_result(None)
        return self.keep_open

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.set_result(exc)


def pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


@pytest.mark.parametrize("loop", LOOPS)
def test_what_arrived_before_the_attach_is_read_then_the_fin(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        ours, theirs = pair()
        theirs.sendall(b"early")
        theirs.shutdown(socket.SHUT_WR)
        proto = Recorder()
        transport = reactor.attach(ours, proto)
        assert proto.calls == ["made"]  # before attach returns
        await asyncio.wait_for(proto.eof, 5)
        assert bytes(proto.data) == b"early"
        # The other direction is still open after the peer's FIN.
        transport.write(b"answer")
        transport.close()
        assert await asyncio.wait_for(proto.lost, 5) is None
        assert theirs.recv(100) == b"answer" and theirs.recv(100) == b""
        assert ours.fileno() == -1  # closed by the transport, after connection_lost
        theirs.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_fin_behind_data_that_fills_reads_is_still_read(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        ours, theirs = pair()
        proto = Recorder(size=1000)
        reactor.attach(ours, proto)
        # More than MAX_READS reads' worth arrives with the FIN in one go: the
        # reads go on in later loop iterations and end at the FIN.
        payload = bytes(range(256)) * (MAX_READS * 1000 * 3 // 256)
        theirs.sendall(payload)
        theirs.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(proto.eof, 5)
        assert bytes(proto.data) == payload
        assert proto.reads > MAX_READS
        theirs.close()
        reactor.close()
        await asyncio.wait_for(proto.lost, 5)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_paused_transport_reads_what_came_meanwhile_when_resumed(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        ours, theirs = pair()
        proto = Recorder()
        transport = reactor.attach(ours, proto)
        transport.pause_reading()
        assert not transport.is_reading()
        theirs.sendall(b"while paused")
        await asyncio.sleep(0.05)
        assert proto.data == b""  # the edge came and went while paused
        transport.resume_reading()
        await until(lambda: bytes(proto.data) == b"while paused")
        theirs.sendall(b", then more")
        await until(lambda: bytes(proto.data) == b"while paused, then more")
        transport.abort()
        assert await asyncio.wait_for(proto.lost, 5) is None
        theirs.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_flow_control_and_write_eof_after_the_buffer(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        ours, theirs = pair()
        theirs.setblocking(False)
        proto = Recorder()
        transport = reactor.attach(ours, proto)
        transport.set_write_buffer_limits(high=64 * 1024)
        assert transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        block = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes
        view = memoryview(bytearray(block))
        transport.write(view)
        view[:] = b"\0" * len(view)  # the caller's buffer is reused: what was kept is a copy
        assert transport.get_write_buffer_size() > 64 * 1024
        assert proto.calls == ["made", "pause_writing"]
        transport.write_eof()
        got = bytearray()
        loop_ = asyncio.get_running_loop()
        while chunk := await loop_.sock_recv(theirs, 1 << 20):
            got += chunk
        assert bytes(got) == block
        assert proto.calls == ["made", "pause_writing", "resume_writing"]
        assert transport.get_write_buffer_size() == 0
        # Half-closed: the peer may still write, and we read it.
        theirs.sendall(b"late")
        await until(lambda: bytes(proto.data) == b"late")
        theirs.close()
        await asyncio.wait_for(proto.eof, 5)
        transport.close()
        assert await asyncio.wait_for(proto.lost, 5) is None

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_writes_the_buffer_first_and_abort_does_not(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        loop_ = asyncio.get_running_loop()
        block = b"z" * (4 << 20)
        for how in ("close", "abort"):
            ours, theirs = pair()
            theirs.setblocking(False)
            proto = Recorder()
            transport = reactor.attach(ours, proto)
            transport.write(block)
            assert transport.get_write_buffer_size() > 0
            getattr(transport, how)()
            assert transport.is_closing()
            transport.write(b"ignored")  # after close: dropped, as asyncio does
            got = bytearray()
            try:
                while chunk := await loop_.sock_recv(theirs, 1 << 20):
                    got += chunk
            except ConnectionResetError:
                pass
            assert await asyncio.wait_for(proto.lost, 5) is None
            if how == "close":
                assert bytes(got) == block
            else:
                assert len(got) < len(block)
            theirs.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reset_reaches_connection_lost_as_the_error(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        lst = socket.create_server(("127.0.0.1", 0))
        theirs = socket.create_connection(lst.getsockname())
        ours, _ = lst.accept()
        lst.close()
        ours.setblocking(False)
        proto = Recorder()
        reactor.attach(ours, proto)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        theirs.close()  # RST
        exc = await asyncio.wait_for(proto.lost, 5)
        assert isinstance(exc, ConnectionResetError)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_falsy_eof_received_closes_and_reactor_close_aborts(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        ours, theirs = pair()
        proto = Recorder(keep_open=False)
        reactor.attach(ours, proto)
        theirs.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(proto.lost, 5) is None
        assert proto.calls == ["made", "eof", "lost"]
        theirs.close()
        # Still open when the reactor closes: aborted, connection_lost next.
        ours2, theirs2 = pair()
        proto2 = Recorder()
        reactor.attach(ours2, proto2)
        reactor.close()
        assert reactor.closed
        assert await asyncio.wait_for(proto2.lost, 5) is None
        theirs2.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reused_descriptor_number_is_attached_again(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        numbers = set()
        for i in range(50):
            ours, theirs = pair()
            numbers.add(ours.fileno())
            proto = Recorder()
            transport = reactor.attach(ours, proto)
            theirs.sendall(b"%d" % i)
            await until(lambda: bytes(proto.data) == b"%d" % i)  # noqa: B023
            transport.close()
            await asyncio.wait_for(proto.lost, 5)
            theirs.close()
        assert len(numbers) < 50  # the numbers were reused

    run(loop, main)


class Broken(Recorder):
    def buffer_updated(self, nbytes: int) -> None:
        raise ValueError("a bug in the protocol")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failing_protocol_resets_its_connection_and_spares_the_others(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: reported.append(context)
        )
        lst = socket.create_server(("127.0.0.1", 0))
        theirs = socket.create_connection(lst.getsockname())
        ours, _ = lst.accept()
        lst.close()
        ours.setblocking(False)
        broken = Broken()
        reactor.attach(ours, broken)
        fine = [pair() for _ in range(3)]
        protos = [Recorder() for _ in fine]
        for (o, _t), proto in zip(fine, protos, strict=True):
            reactor.attach(o, proto)
        # All ready in one batch of the epoll set: the broken one among them.
        theirs.sendall(b"boom")
        for _o, t in fine:
            t.sendall(b"fine")
        exc = await asyncio.wait_for(broken.lost, 5)
        assert isinstance(exc, ValueError)
        assert [c["message"] for c in reported] == ["relay protocol callback failed"]
        with pytest.raises(ConnectionResetError):
            theirs.recv(10)
        await until(lambda: all(bytes(p.data) == b"fine" for p in protos))
        theirs.close()
        for _o, t in fine:
            t.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_write_after_write_eof_is_refused_as_asyncio_does(loop: str) -> None:
    async def main(reactor: Reactor) -> None:
        ours, theirs = pair()
        transport = reactor.attach(ours, Recorder())
        transport.write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"late")
        assert theirs.recv(10) == b""
        transport.abort()
        theirs.close()

    run(loop, main)
