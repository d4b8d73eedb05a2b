"""The relay's start-up (issue 10, per-connection cost) through real TCP sockets
on loopback, on asyncio's loop and on uvloop; the relay waits for its end
unshielded.

Held here: a short ``Connection: close`` exchange relays the peeked head first
and counts exactly; a relay cancelled while its transports are being made, or
once running, resets both peers and says "cancelled"; the relay leaves no task
or callback behind; the expiry timer armed at the start ends a quiet relay at
its first timeout.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from egressd.limits.timeouts import Timeouts
from egressd.proxy.relay import RelayStats, relay
from tests.support.relay_pair import Pair

LOOPS = ["asyncio", "uvloop"]
HEAD = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def run(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def assert_reset(sock: socket.socket) -> None:
    with pytest.raises(ConnectionResetError):
        read_all(sock)


@pytest.mark.parametrize("loop", LOOPS)
def test_short_exchange_relays_the_peeked_head_first(loop: str) -> None:
    pair = Pair(timeout=5)
    body = b"x" * 10

    async def main() -> RelayStats:
        pair.client.sendall(body)  # read after the head that was "peeked"
        pair.client.shutdown(socket.SHUT_WR)
        pair.server.sendall(RESPONSE)
        pair.server.shutdown(socket.SHUT_WR)
        ups: list[int] = []
        downs: list[int] = []
        stats = await relay(
            pair.proxy_client,
            pair.proxy_upstream,
            first_up=HEAD,
            count_up=ups.append,
            count_down=downs.append,
        )
        assert (sum(ups), sum(downs)) == (len(HEAD) + len(body), len(RESPONSE))
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return stats

    stats = run(loop, main)
    assert read_all(pair.server) == HEAD + body
    assert read_all(pair.client) == RESPONSE
    assert (stats.bytes_up, stats.bytes_down, stats.error) == (len(HEAD) + 10, len(RESPONSE), None)
    assert pair.proxy_client.fileno() == -1 and pair.proxy_upstream.fileno() == -1
    pair.close()


def assert_ended(sock: socket.socket) -> None:
    """The peer sees the end: a reset, or (see below) a FIN."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_cancelled_relay_says_so_and_ends_both_peers(loop: str, steps: int) -> None:
    """`steps` loop turns before the cancel: while the transports are made (1),
    as the relay starts (2) and while it runs (10). Running, both peers get a
    reset. Cancelled while uvloop makes the transports, the peers may get a FIN
    (as before the transports were made in one round trip: the makers close
    their transports as a cancelled task's would)."""
    pair = Pair(timeout=5)

    async def main() -> RelayStats:
        stats = RelayStats()
        task = asyncio.ensure_future(
            relay(pair.proxy_client, pair.proxy_upstream, first_up=HEAD, stats=stats)
        )
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):  # the transports' closes run
            await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return stats

    stats = run(loop, main)
    assert stats.error == "cancelled"
    if steps == 10 or loop == "asyncio":
        assert_reset(pair.client)
        with pytest.raises(ConnectionResetError):  # after the head, maybe
            while pair.server.recv(65536):
                pass
    else:
        assert_ended(pair.client)
        assert_ended(pair.server)
    pair.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("timeouts", "reason"),
    [(Timeouts(idle_s=0.05), "idle_timeout"), (Timeouts(lifetime_s=0.05), "max_lifetime")],
)
def test_quiet_relay_ends_at_its_first_timeout(loop: str, timeouts: Timeouts, reason: str) -> None:
    """The expiry timer armed at the start (`_Pipe.watch_expiry`) fires at the
    earlier timeout, not before: both peers get a reset."""
    pair = Pair(timeout=5)

    async def main() -> tuple[RelayStats, float]:
        clock = asyncio.get_running_loop()
        t0 = clock.time()
        stats = await relay(
            pair.proxy_client, pair.proxy_upstream, first_up=HEAD, timeouts=timeouts
        )
        return stats, clock.time() - t0

    stats, took = run(loop, main)
    assert (stats.end, stats.time_wait, stats.bytes_up) == (reason, False, len(HEAD))
    assert 0.04 <= took < 2.0
    assert_reset(pair.client)
    assert pair.server.recv(len(HEAD), socket.MSG_WAITALL) == HEAD
    assert_reset(pair.server)
    pair.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_short_exchange_with_timeouts_ends_cleanly_and_stays_so(loop: str) -> None:
    """A relay that ends before its timeouts ends cleanly, and its expiry timer
    does not mark it timed out afterwards (the loop runs past the idle timeout)."""
    pair = Pair(timeout=5)
    pair.server.sendall(RESPONSE)
    pair.server.shutdown(socket.SHUT_WR)
    pair.client.shutdown(socket.SHUT_WR)

    async def main() -> RelayStats:
        stats = await relay(
            pair.proxy_client, pair.proxy_upstream, first_up=HEAD, timeouts=Timeouts(idle_s=0.1)
        )
        assert (stats.end, stats.error) == (None, None)
        await asyncio.sleep(0.3)
        return stats

    stats = run(loop, main)
    assert (stats.end, stats.error, stats.bytes_down) == (None, None, len(RESPONSE))
    assert read_all(pair.client) == RESPONSE
    assert read_all(pair.server) == HEAD
    pair.close()
