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

TIMEOUT = 0.2


async def peek(
    pieces: Sequence[bytes], known: PeekedHeads | None, *, close: bool = False
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
        peeked = await peek_client(ours, timeout_s=TIMEOUT, known=known)
        sender.cancel()
    return peeked


HEAD = b"GET /x HTTP/1.1\r\nHost: api.allowed.test:8080\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("pieces", "close", "kept"),
    [
        ([HEAD], False, True),
        ([b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"], False, True),
        ([b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc"], False, True),
        ([HEAD[:20], HEAD[20:]], False, False),  # two reads
        ([HEAD[:20]], False, False),  # incomplete at the deadline
        ([HEAD[:20], b""], True, False),  # then FIN
        ([b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"], False, False),
        ([b"GET / HTTP/1.1\r\nHost: a.test\n\r\n"], False, False),
        ([b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HTTP_HEAD + b"\r\n\r\n"], False, False),
        ([b"SSH-2.0-OpenSSH_9.6\r\n"], False, False),
        ([tls_hellos.client_hello("a.test")], False, False),
        ([], True, False),
    ],
)
async def test_known_heads_peek_as_read(pieces: list[bytes], close: bool, kept: bool) -> None:
    alone = await peek(pieces, None, close=close)
    known = PeekedHeads()
    first = await peek(pieces, known, close=close)
    assert first == alone
    assert (len(known._entries) == 1) is kept
    again = await peek(pieces, known, close=close)
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
