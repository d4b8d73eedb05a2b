"""`peek_client` with `PeekedHeads`: a first read that was a whole request head
before gives what reading it again would give (the same `Peeked`: protocol,
Host, target port, errors, data), and only such reads are kept: no TLS, no
incomplete, malformed or oversized head, no FIN."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest

from egressd.proxy.intercept import Peeked, PeekedHeads, peek_client
from egressd.proxy.sniff import MAX_HTTP_HEAD
from tests.support import tls_hellos

# A peek that must end at its deadline gets a short one; a peek that the
# client's bytes or FIN end gets a long one, so that a loop stalled on a busy
# CI machine cannot turn it into a timeout (it did, once in 4,161 tests).
DEADLINE = 0.2
ENDED_BY_CLIENT = 10.0


async def peek(
    pieces: Sequence[bytes],
    known: PeekedHeads | None,
    *,
    close: bool = False,
    timeout_s: float = ENDED_BY_CLIENT,
) -> Peeked:
    """The first of `pieces` is there at the first read, the others come later;
    `close`: then a FIN."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    with ours, theirs:
        if pieces:
            await loop.sock_sendall(theirs, pieces[0])
            await asyncio.sleep(0.01)

        async def send() -> None:
            await asyncio.sleep(0.02)
            for piece in pieces[1:]:
                await loop.sock_sendall(theirs, piece)
            if close:
                theirs.shutdown(socket.SHUT_WR)

        sender = asyncio.create_task(send())
        peeked = await peek_client(ours, timeout_s=timeout_s, known=known)
        sender.cancel()
    return peeked


HEAD = b"GET /x HTTP/1.1\r\nHost: api.allowed.test:8080\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("pieces", "close", "kept", "timeout_s"),
    [
        ([HEAD], False, True, ENDED_BY_CLIENT),
        (
            [b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"],
            False,
            True,
            ENDED_BY_CLIENT,
        ),
        (
            [b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc"],
            False,
            True,
            ENDED_BY_CLIENT,
        ),
        ([HEAD[:20], HEAD[20:]], False, False, ENDED_BY_CLIENT),  # two reads
        ([HEAD[:20]], False, False, DEADLINE),  # incomplete at the deadline
        ([HEAD[:20], b""], True, False, ENDED_BY_CLIENT),  # then FIN
        (
            [b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"],
            False,
            False,
            ENDED_BY_CLIENT,
        ),
        ([b"GET / HTTP/1.1\r\nHost: a.test\n\r\n"], False, False, ENDED_BY_CLIENT),
        (
            [b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HTTP_HEAD + b"\r\n\r\n"],
            False,
            False,
            ENDED_BY_CLIENT,
        ),
        ([b"SSH-2.0-OpenSSH_9.6\r\n"], False, False, ENDED_BY_CLIENT),
        ([tls_hellos.client_hello("a.test")], False, False, ENDED_BY_CLIENT),
        ([], True, False, ENDED_BY_CLIENT),
    ],
)
async def test_known_heads_peek_as_read(
    pieces: list[bytes], close: bool, kept: bool, timeout_s: float
) -> None:
    alone = await peek(pieces, None, close=close, timeout_s=timeout_s)
    known = PeekedHeads()
    first = await peek(pieces, known, close=close, timeout_s=timeout_s)
    assert first == alone
    assert (len(known._entries) == 1) is kept
    again = await peek(pieces, known, close=close, timeout_s=timeout_s)
    assert again == alone
    if kept:
        assert known.get(alone.data) is not None


async def test_a_longer_read_is_not_taken_for_a_known_head() -> None:
    known = PeekedHeads()
    await peek([HEAD], known)
    more = await peek([HEAD + b"GET / HTTP/1.1\r\n"], known)
    assert more.data == HEAD + b"GET / HTTP/1.1\r\n" and more.http_host == "api.allowed.test"
    other = await peek([HEAD.replace(b"api.allowed", b"evil")], known)
    assert other.http_host == "evil.test"


def test_known_heads_are_bounded() -> None:
    known = PeekedHeads()
    for i in range(known.LIMIT + 3):
        data = f"GET /{i} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode()
        known.keep(Peeked(data, "http", http_host="a.test"))
    assert 0 < len(known._entries) <= known.LIMIT
