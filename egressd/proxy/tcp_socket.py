"""`TcpSocket`: the proxy's IPv4 TCP sockets (accepted and upstream), cheaper to hand to uvloop.

`socket.socket` turns the kernel's family and type into enums on every read of
``.family`` and ``.type`` (~0.5-1 µs each); uvloop reads them four times while it
makes a connection's two transports, and `socket.accept` twice more. Here they
are plain class attributes: every socket of this class is ``AF_INET`` and
``SOCK_STREAM`` (Python keeps ``SOCK_NONBLOCK`` out of ``.type`` either way).
uvloop's ``create_connection(sock=...)`` also calls ``setblocking(False)`` on a
socket that is non-blocking from its creation: an ``ioctl`` that changes nothing,
skipped here.
"""

from __future__ import annotations

import socket


class TcpSocket(socket.socket):
    __slots__ = ()

    family = socket.AddressFamily.AF_INET
    type = socket.SocketKind.SOCK_STREAM

    def setblocking(self, flag: bool) -> None:
        # `gettimeout()` is 0.0 exactly when Python made the descriptor non-blocking.
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)


def accept(listener: socket.socket) -> tuple[TcpSocket, tuple[str, int]]:
    """`listener.accept()` for an IPv4 TCP listener, the accepted socket a `TcpSocket`
    (blocking, as `socket.accept` leaves it)."""
    fd, addr = listener._accept()  # type: ignore[attr-defined]
    return TcpSocket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd), addr
