"""`peek_client` over a socket pair: what it reads, and what tier 2 gets from it.

No namespaces: the reading loop (deadline, EOF, bounds, reassembly across
segments) is the same whatever the socket; tests/integration/test_intercept*.py
run it behind TPROXY.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence

import pytest

from egressd.proxy.intercept import Peeked, peek_client
from egressd.proxy.sniff import MAX_CLIENT_HELLO, MAX_HTTP_HEAD
from tests.support import tls_hellos

# A peek that must end at its deadline gets a short one; a peek that the
# client's bytes or FIN end gets a long one, so that a loop stalled on a busy
# CI machine cannot turn it into a timeout.
DEADLINE = 0.3
ENDED_BY_CLIENT = 10.0


def ended_at_the_deadline(elapsed: float) -> bool:
    return DEADLINE - 0.05 < elapsed < DEADLINE + 2.0


async def peek(
    pieces: Sequence[bytes | float], *, close: bool = False, timeout_s: float = ENDED_BY_CLIENT
) -> tuple[Peeked, float]:
    """Send `pieces` (bytes, or a pause in seconds) from one end; peek at the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()

    async def send() -> None:
        for piece in pieces:
            if isinstance(piece, float):
                await asyncio.sleep(piece)
            else:
                await loop.sock_sendall(theirs, piece)
        if close:
            theirs.shutdown(socket.SHUT_WR)

    with ours, theirs:
        sender = asyncio.create_task(send())
        started = time.monotonic()
        peeked = await peek_client(ours, timeout_s=timeout_s)
        elapsed = time.monotonic() - started
        sender.cancel()
    return peeked, elapsed


async def test_complete_hello_in_many_segments() -> None:
    hello = tls_hellos.client_hello("evil.test", total=20_000, record_size=300)
    pieces = [hello[i : i + 997] for i in range(0, len(hello), 997)]
    peeked, elapsed = await peek(pieces)
    assert (peeked.protocol, peeked.sni, peeked.sniff_error) == ("tls", "evil.test", None)
    assert peeked.data == hello and elapsed < ENDED_BY_CLIENT


async def test_slow_hello_is_incomplete_not_nameless() -> None:
    hello = tls_hellos.client_hello("evil.test")
    peeked, elapsed = await peek([hello[:100], DEADLINE * 2, hello[100:]], timeout_s=DEADLINE)
    assert (peeked.protocol, peeked.sni, peeked.sniff_error) == (
        "tls",
        None,
        "client_hello_incomplete",
    )
    assert ended_at_the_deadline(elapsed)


@pytest.mark.parametrize(
    ("first", "error"),
    [(b"\x16", "client_hello_incomplete"), (b"GE", "http_head_incomplete")],
)
async def test_a_byte_or_two_then_silence(first: bytes, error: str) -> None:
    peeked, _ = await peek([first, DEADLINE * 2], timeout_s=DEADLINE)
    assert peeked.sniff_error == error


async def test_eof_mid_hello() -> None:
    peeked, elapsed = await peek([tls_hellos.client_hello("a.test")[:50]], close=True)
    assert (peeked.sniff_error, peeked.eof) == ("client_hello_incomplete", True)
    assert elapsed < ENDED_BY_CLIENT


async def test_hello_over_the_bound_reads_no_further() -> None:
    hello = tls_hellos.client_hello("evil.test", total=MAX_CLIENT_HELLO + 1)
    peeked, _ = await peek([hello])
    assert peeked.sniff_error == "client_hello_too_large"
    assert len(peeked.data) <= MAX_CLIENT_HELLO


async def test_ech_and_no_sni() -> None:
    peeked, _ = await peek([tls_hellos.client_hello("front.test", ech=True)])
    assert (peeked.sni, peeked.ech) == ("front.test", True)
    peeked, _ = await peek([tls_hellos.client_hello(None)])
    assert (peeked.protocol, peeked.sni, peeked.sniff_error) == ("tls", None, None)


async def test_http_heads() -> None:
    peeked, _ = await peek([b"CONNECT evil.test:443 HTTP/1.1\r\n", 0.05, b"\r\n"])
    assert (peeked.protocol, peeked.http_host, peeked.target_port) == ("http", "evil.test", 443)
    peeked, _ = await peek(
        [b"GET / HTTP/1.1\r\nHost: a.test\r\n", DEADLINE * 2, b"\r\n"], timeout_s=DEADLINE
    )
    assert peeked.sniff_error == "http_head_incomplete"
    peeked, _ = await peek([b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HTTP_HEAD])
    assert peeked.sniff_error == "http_head_too_large" and len(peeked.data) == MAX_HTTP_HEAD
    peeked, _ = await peek([b"GET / HTTP/1.0\r\n\r\n"])
    assert (peeked.protocol, peeked.http_host, peeked.sniff_error) == ("http", None, None)


async def test_nothing_readable_leaves_the_protocol_open() -> None:
    peeked, elapsed = await peek([], timeout_s=DEADLINE)
    assert (peeked.protocol, peeked.data, peeked.sniff_error) == (None, b"", None)
    assert ended_at_the_deadline(elapsed)
    peeked, elapsed = await peek([b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"])
    assert (peeked.protocol, peeked.sniff_error) == (None, None) and elapsed < ENDED_BY_CLIENT
    peeked, _ = await peek([b"\x00\x00\x00\x08\x04\xd2\x16\x2f"])
    assert (peeked.protocol, peeked.sniff_error) == (None, None)
