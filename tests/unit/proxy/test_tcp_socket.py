"""`TcpSocket`: the kernel's view of each socket matches the attributes it states."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket

import uvloop

from egressd.proxy import tcp_socket
from egressd.proxy.tcp_socket import TcpSocket


def kernel_nonblocking(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


def test_attributes_are_what_the_kernel_says() -> None:
    with TcpSocket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        assert (sock.family, sock.type) == (family, kind) == (socket.AF_INET, socket.SOCK_STREAM)
        assert isinstance(sock.family, socket.AddressFamily)
        assert isinstance(sock.type, socket.SocketKind)
        assert sock.gettimeout() == 0.0 and kernel_nonblocking(sock)


def test_setblocking_still_switches_both_ways() -> None:
    with TcpSocket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert not kernel_nonblocking(sock)
        sock.setblocking(False)
        assert kernel_nonblocking(sock) and sock.gettimeout() == 0.0
        sock.setblocking(False)  # already: nothing to change
        assert kernel_nonblocking(sock)
        sock.setblocking(True)
        assert not kernel_nonblocking(sock) and sock.gettimeout() is None
        sock.settimeout(2.0)  # Python's timeout mode: the descriptor is non-blocking
        sock.setblocking(False)
        assert kernel_nonblocking(sock) and sock.gettimeout() == 0.0


def test_accept_gives_a_blocking_tcp_socket_with_the_peer() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        with socket.create_connection(listener.getsockname()) as client:
            accepted, addr = tcp_socket.accept(listener)
            with accepted:
                assert type(accepted) is TcpSocket
                assert addr == client.getsockname() == accepted.getpeername()
                assert not kernel_nonblocking(accepted) and accepted.gettimeout() is None


def test_uvloop_transports_carry_bytes_both_ways() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            upstream = TcpSocket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            upstream.connect_ex(listener.getsockname())
            await asyncio.sleep(0.05)
            accepted, _ = tcp_socket.accept(listener)
            accepted.setblocking(False)
            got: asyncio.Queue[bytes] = asyncio.Queue()

            class Echo(asyncio.Protocol):
                def data_received(self, data: bytes) -> None:
                    got.put_nowait(data)

            up, _ = await loop.create_connection(Echo, sock=upstream)
            down, _ = await loop.connect_accepted_socket(Echo, sock=accepted)
            up.write(b"ping")
            down.write(b"pong")
            first, second = await got.get(), await got.get()
            up.close()
            down.close()
            return b"".join(sorted((first, second)))

    assert uvloop.run(main()) == b"pingpong"
