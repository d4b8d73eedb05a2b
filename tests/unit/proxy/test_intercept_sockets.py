"""Relayed sockets are bounded against peers that vanish."""

from __future__ import annotations

import socket

from egressd.proxy.intercept import KEEPALIVE_IDLE_S, USER_TIMEOUT_MS, bound_dead_peers


def test_relayed_sockets_give_up_on_dead_peers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        bound_dead_peers(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS
