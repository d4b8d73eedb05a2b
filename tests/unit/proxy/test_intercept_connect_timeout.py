"""`connect_socket`'s own timeout (one timer on the connect's future)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from egressd.proxy.intercept import connect_socket


async def test_connect_socket_times_out_and_stops_watching_the_socket() -> None:
    # A full accept queue on loopback: the kernel drops the next SYN, the connect waits.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            held.append(filler)
        await asyncio.sleep(0.05)
        stuck = socket.socket()
        stuck.setblocking(False)
        held.append(stuck)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await connect_socket(stuck, address, 0.3)
        assert 0.25 <= time.monotonic() - started < 3.0
        loop = asyncio.get_running_loop()
        assert not loop.remove_writer(stuck.fileno())  # already removed
    finally:
        for sock in held:
            sock.close()
        listener.close()


async def test_connect_socket_within_its_timeout_connects() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await connect_socket(sock, listener.getsockname(), 0.2)
        await asyncio.sleep(0.3)  # past the timeout: the connected socket stays usable
        accepted, _ = listener.accept()
        assert accepted.getpeername() == sock.getsockname()
        accepted.close()
    finally:
        sock.close()
        listener.close()
