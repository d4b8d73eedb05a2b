"""`Connector`: upstream connects waited for on one epoll set per loop."""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import time
from collections.abc import AsyncIterator

import pytest

from egressd.proxy.connector import Connector


@pytest.fixture
async def connector() -> AsyncIterator[Connector]:
    made = Connector(asyncio.get_running_loop())
    yield made
    made.close()


def nonblocking() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def armed(connector: Connector, sock: socket.socket) -> bool:
    """Whether `sock` is still registered in the connector's set (a second ADD fails)."""
    try:
        connector._epoll.register(sock.fileno(), select.EPOLLOUT)
    except FileExistsError:
        return True
    connector._epoll.unregister(sock.fileno())
    return False


@pytest.fixture
async def full_queue() -> AsyncIterator[tuple[tuple[str, int], list[socket.socket]]]:
    """A loopback listener whose accept queue is full: the kernel drops the next SYN, so a
    connect to it waits. Yields its address and a list whose sockets are closed after."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    held = [nonblocking() for _ in range(2)]
    try:
        for filler in held:
            filler.connect_ex(address)
        await asyncio.sleep(0.05)
        yield address, held
    finally:
        for sock in held:
            sock.close()
        listener.close()


async def test_connects_and_fails_with_the_errno(connector: Connector) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        sock = nonblocking()
        await connector.connect(sock, listener.getsockname(), 5.0)
        accepted, _ = listener.accept()
        assert accepted.getpeername() == sock.getsockname()
        accepted.close()
        sock.close()
        port = listener.getsockname()[1]
    finally:
        listener.close()
    refused = nonblocking()
    with pytest.raises(OSError) as caught:
        await asyncio.wait_for(connector.connect(refused, ("127.0.0.1", port)), 5)
    assert caught.value.errno == errno.ECONNREFUSED
    refused.close()
    assert connector._waiting == {}


async def test_many_at_once_each_woken_for_its_own_socket(connector: Connector) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    closed = socket.create_server(("127.0.0.1", 0))
    refused_at = closed.getsockname()
    closed.close()
    socks = [nonblocking() for _ in range(200)]
    try:
        targets = [refused_at if i % 4 == 0 else listener.getsockname() for i in range(200)]
        results = await asyncio.gather(
            *(connector.connect(s, t, 5.0) for s, t in zip(socks, targets, strict=True)),
            return_exceptions=True,
        )
        for i, (sock, result) in enumerate(zip(socks, results, strict=True)):
            if i % 4 == 0:
                assert isinstance(result, OSError) and result.errno == errno.ECONNREFUSED
            else:
                assert result is None
                assert sock.getpeername() == listener.getsockname()
        assert connector._waiting == {}
    finally:
        for sock in socks:
            sock.close()
        listener.close()


async def test_a_timeout_unregisters_so_a_reused_descriptor_is_not_woken(
    connector: Connector, full_queue: tuple[tuple[str, int], list[socket.socket]]
) -> None:
    address, held = full_queue
    stuck = nonblocking()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await connector.connect(stuck, address, 0.3)
    assert 0.25 <= time.monotonic() - started < 3.0
    assert connector._waiting == {}
    assert not armed(connector, stuck)
    fd = stuck.fileno()
    stuck.close()
    # The next socket gets the same descriptor number, and connects normally.
    again = nonblocking()
    other = socket.create_server(("127.0.0.1", 0))
    held += [other, again]
    assert again.fileno() == fd
    await connector.connect(again, other.getsockname(), 2.0)
    assert again.getpeername() == other.getsockname()


async def test_a_connected_socket_stays_usable_past_the_timeout(connector: Connector) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    sock = nonblocking()
    try:
        await connector.connect(sock, listener.getsockname(), 0.2)
        await asyncio.sleep(0.3)
        accepted, _ = listener.accept()
        assert accepted.getpeername() == sock.getsockname()
        accepted.close()
    finally:
        sock.close()
        listener.close()


async def test_a_cancelled_connect_unregisters(
    connector: Connector, full_queue: tuple[tuple[str, int], list[socket.socket]]
) -> None:
    address, held = full_queue
    stuck = nonblocking()
    held.append(stuck)
    task = asyncio.get_running_loop().create_task(connector.connect(stuck, address))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert connector._waiting == {}
    assert not armed(connector, stuck)


async def test_close_fails_what_still_waits(
    full_queue: tuple[tuple[str, int], list[socket.socket]],
) -> None:
    address, held = full_queue
    connector = Connector(asyncio.get_running_loop())
    stuck = nonblocking()
    held.append(stuck)
    task = asyncio.get_running_loop().create_task(connector.connect(stuck, address))
    await asyncio.sleep(0.05)
    connector.close()
    with pytest.raises(ConnectionAbortedError):
        await task
    connector.close()  # twice is harmless
