"""The relay's bulk path (issue 10) through real TCP sockets on loopback, on
asyncio's loop and on uvloop: an ungated side reads up to `RELAY_BUFFER` at
once and its scratch is written straight to the other socket (`_Side.send`).

Held here: 50 MB intact both ways (by hash) with exact byte counts in the
stats and the count callbacks; half-close both ways; a reset on either side
reaches the other; a slow reader bounds what the proxy holds; a paced
connection keeps its rate and reads `CHUNK`s; the read buffer is used whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from egressd.limits.pacing import BandwidthShaper
from egressd.policy.matcher import Decision, Verdict
from egressd.proxy.http_gate import HttpGate, RequestRecord
from egressd.proxy.http_rules import RequestTarget
from egressd.proxy.relay import (
    CHUNK,
    PACED_READ_MIN,
    RELAY_BUFFER,
    WRITE_HIGH_WATER,
    RelayStats,
    relay,
)
from tests.support.intercept_world import recv_all
from tests.support.relay_pair import Pair

LOOPS = ["asyncio", "uvloop"]
MB = 1_000_000


def run(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def pattern(nbytes: int, seed: int) -> bytes:
    """`nbytes` of data that a lost, repeated or reordered chunk would change."""
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    block += bytes(range(251))  # not a multiple of 64 KiB: chunks do not line up
    out = block * (nbytes // len(block) + 1)
    return out[:nbytes]


def reader(sock: socket.socket, out: dict[str, Any], key: str) -> threading.Thread:
    """Read `sock` to EOF in a thread: out[key] = (bytes, sha256) or the exception."""

    def body() -> None:
        h = hashlib.sha256()
        n = 0
        try:
            while chunk := sock.recv(1 << 20):
                out.setdefault(f"{key}_first", time.monotonic())
                out[f"{key}_last"] = time.monotonic()
                h.update(chunk)
                n += len(chunk)
            out[key] = (n, h.hexdigest())
        except OSError as exc:
            out[key] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def writer(sock: socket.socket, data: bytes, *, shut: bool = True) -> threading.Thread:
    def body() -> None:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


async def relayed(pair: Pair, **kw: Any) -> tuple[RelayStats, list[int], list[int]]:
    ups: list[int] = []
    downs: list[int] = []
    stats = await asyncio.wait_for(
        relay(
            pair.proxy_client,
            pair.proxy_upstream,
            count_up=ups.append,
            count_down=downs.append,
            **kw,
        ),
        60,
    )
    return stats, ups, downs


@pytest.mark.parametrize("loop", LOOPS)
def test_50_mb_both_ways_intact_and_counted_exactly(loop: str) -> None:
    size_down, size_up = 50 * MB, 50 * MB + 12_345
    down, up = pattern(size_down, 1), pattern(size_up, 2)
    pair = Pair()
    got: dict[str, Any] = {}

    async def main() -> tuple[RelayStats, list[int], list[int]]:
        threads = [
            writer(pair.server, down),
            writer(pair.client, up[100:]),
            reader(pair.client, got, "client"),
            reader(pair.server, got, "server"),
        ]
        result = await relayed(pair, first_up=up[:100])
        for t in threads:
            t.join(30)
        return result

    stats, ups, downs = run(loop, main)
    pair.close()
    assert got["client"] == (size_down, hashlib.sha256(down).hexdigest())
    assert got["server"] == (size_up, hashlib.sha256(up).hexdigest())
    assert (stats.bytes_up, stats.bytes_down) == (size_up, size_down)
    assert (sum(ups), sum(downs)) == (size_up, size_down)
    assert stats.error is None and stats.end is None and stats.paced_chunks == 0
    # The whole read buffer is used: fewer, bigger chunks than the gated size.
    assert max(downs) > CHUNK and max(downs) <= RELAY_BUFFER


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_each_way(loop: str) -> None:
    """The client's FIN reaches the server, which still answers; then the server's
    FIN reaches the client: a clean end, nothing lost."""
    pair = Pair()
    request, response = pattern(300_000, 3), pattern(3 * MB, 4)
    got: dict[str, Any] = {}

    def server() -> None:
        h = hashlib.sha256()
        n = 0
        while chunk := pair.server.recv(1 << 20):  # to the client's FIN
            h.update(chunk)
            n += len(chunk)
        got["request"] = (n, h.hexdigest())
        pair.server.sendall(response)  # after the FIN: the other direction goes on
        pair.server.shutdown(socket.SHUT_WR)

    async def main() -> RelayStats:
        threads = [
            threading.Thread(target=server, daemon=True),
            writer(pair.client, request),
            reader(pair.client, got, "response"),
        ]
        threads[0].start()
        stats, _, _ = await relayed(pair)
        for t in threads:
            t.join(30)
        return stats

    stats = run(loop, main)
    pair.close()
    assert got["request"] == (len(request), hashlib.sha256(request).hexdigest())
    assert got["response"] == (len(response), hashlib.sha256(response).hexdigest())
    assert stats.error is None
    assert (stats.bytes_up, stats.bytes_down) == (len(request), len(response))


def rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("who", ["server", "client"])
def test_a_reset_mid_transfer_reaches_the_other_side(loop: str, who: str) -> None:
    pair = Pair()
    got: dict[str, Any] = {}
    stop = threading.Event()

    def stream(sock: socket.socket) -> None:
        block = pattern(1 << 20, 5)
        try:
            while not stop.is_set():
                sock.sendall(block)
        except OSError:
            pass

    async def main() -> RelayStats:
        if who == "server":  # the server streams down, then resets
            source, victim = pair.server, pair.client
        else:  # the client streams up, then resets
            source, victim = pair.client, pair.server
        streaming = threading.Thread(target=stream, args=(source,), daemon=True)
        streaming.start()
        reading = reader(victim, got, "victim")
        task = asyncio.ensure_future(relayed(pair))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.to_thread(streaming.join, 10)  # the relay runs meanwhile
        assert not streaming.is_alive()
        rst(source)
        stats, _, _ = await task
        reading.join(10)
        return stats

    stats = run(loop, main)
    assert isinstance(got["victim"], ConnectionResetError)
    assert stats.error == ("upstream_error" if who == "server" else "client_error")
    (pair.client if who == "server" else pair.server).close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_reader_bounds_what_the_proxy_holds(loop: str) -> None:
    """The client does not read: the proxy takes no more than the kernel buffers
    in between, its write high-water mark and one read."""
    pair = Pair()
    pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    pair.proxy_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    kernel = pair.client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    kernel += pair.proxy_client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    sent = [0]
    stop = threading.Event()

    def stream() -> None:
        block = pattern(1 << 20, 6)
        pair.server.settimeout(0.2)
        while not stop.is_set():
            try:
                sent[0] += pair.server.send(block)
            except TimeoutError:
                continue
            except OSError:
                return

    async def main() -> RelayStats:
        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        stats = RelayStats()
        task = asyncio.ensure_future(relay(pair.proxy_client, pair.proxy_upstream, stats=stats))
        await asyncio.sleep(1.5)
        held = stats.bytes_down
        await asyncio.sleep(0.5)
        assert stats.bytes_down == held  # stalled, not trickling into a buffer
        stop.set()
        streaming.join(10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return stats

    stats = run(loop, main)
    pair.close()
    # The server had more to give: the proxy stopped reading it.
    assert sent[0] - stats.bytes_down > 1 * MB
    assert stats.bytes_down <= kernel + WRITE_HIGH_WATER + RELAY_BUFFER


class ShaperPacing:
    """The proxy's JobPacing shape over a real shaper (one job)."""

    def __init__(self, rate_bps: int) -> None:
        self.shaper = BandwidthShaper()
        self.horizon_s = self.shaper.horizon_s
        self.rate_bps = rate_bps
        self.burst_bytes = int(rate_bps / 8 * self.horizon_s)

    def departure(self, direction: str, size: int, now: float) -> float:
        return self.shaper.departure("job", direction, size, rate_bps=self.rate_bps, now=now)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_paced_download_keeps_its_rate_and_reads_chunks(loop: str) -> None:
    rate_Bps = 8 * MB  # noqa: N806 - bytes/s
    size = 4 * MB
    data = pattern(size, 7)
    pair = Pair()
    got: dict[str, Any] = {}

    async def main() -> tuple[RelayStats, list[int]]:
        threads = [writer(pair.server, data), reader(pair.client, got, "client")]
        pair.client.shutdown(socket.SHUT_WR)
        stats, _, downs = await relayed(pair, pacing=ShaperPacing(rate_Bps * 8))
        await asyncio.to_thread(threads[1].join, 30)
        return stats, downs

    stats, downs = run(loop, main)
    pair.close()
    assert got["client"] == (size, hashlib.sha256(data).hexdigest())
    assert stats.bytes_down == sum(downs) == size
    assert stats.paced_chunks > 0
    # EDT: after the first chunk, the rest leaves no faster than the rate (less the
    # slack with which a chunk counts as due), and not much slower.
    elapsed = got["client_last"] - got["client_first"]
    assert elapsed >= (size - downs[0]) / rate_Bps - 0.01
    assert elapsed < 3 * size / rate_Bps
    # The first chunk that waits for its departure may be a whole read buffer; from
    # then on the side reads CHUNKs, the grain of a paced job as it was.
    assert max(downs) <= RELAY_BUFFER
    assert sum(n > CHUNK for n in downs) <= 1


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_paced_download_flows_at_its_rate_from_the_first_byte(loop: str) -> None:
    # 16 KB/s: one horizon (50 ms) is 800 bytes, so reads are PACED_READ_MIN. A read of
    # the whole buffer would hold the first 48 KB for 3 s, and the one before the start
    # went out unpaced.
    rate_Bps = 16_000  # noqa: N806 - bytes/s
    size = 48_000
    data = pattern(size, 8)
    pair = Pair()
    got: dict[str, Any] = {}

    async def main() -> tuple[RelayStats, list[int], float]:
        threads = [writer(pair.server, data), reader(pair.client, got, "client")]
        pair.client.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        stats, _, downs = await relayed(pair, pacing=ShaperPacing(rate_Bps * 8))
        await asyncio.to_thread(threads[1].join, 30)
        return stats, downs, started

    stats, downs, started = run(loop, main)
    pair.close()
    assert got["client"] == (size, hashlib.sha256(data).hexdigest())
    assert stats.bytes_down == sum(downs) == size
    assert max(downs) <= PACED_READ_MIN
    assert got["client_first"] - started < 2 * PACED_READ_MIN / rate_Bps
    # every read waited for its departure, the first one's included
    assert got["client_last"] - started >= (size - PACED_READ_MIN) / rate_Bps - 0.01


@pytest.mark.parametrize("loop", LOOPS)
def test_a_paced_answer_and_fin_sent_before_the_start_arrive_in_order(loop: str) -> None:
    # The server has answered and closed before the relay starts: the answer and the
    # FIN are there at the first read; the answer waits for its departure, and the FIN
    # must follow it, not pass it.
    rate_Bps = 16_000  # noqa: N806 - bytes/s
    data = pattern(3_000, 9)
    pair = Pair()
    got: dict[str, Any] = {}

    async def main() -> RelayStats:
        writer(pair.server, data).join(5)
        thread = reader(pair.client, got, "client")
        pair.client.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.1)
        stats, _, _ = await relayed(pair, pacing=ShaperPacing(rate_Bps * 8))
        await asyncio.to_thread(thread.join, 10)
        return stats

    stats = run(loop, main)
    pair.close()
    assert got["client"] == (len(data), hashlib.sha256(data).hexdigest())
    assert stats.bytes_down == len(data)
    assert stats.error is None


def _recv_until(sock: socket.socket, end: bytes) -> bytes:
    got = b""
    while not got.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    parts, left = [], nbytes
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_gated_download_of_known_length_is_relayed_whole_and_the_gate_keeps_track(
    loop: str,
) -> None:
    # While the gate counts a Content-Length body, the server's side reads the whole
    # buffer and the gate gets only the count; after the body the next request on the
    # connection is decided and answered as usual.
    body = pattern(5 * MB, 10)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    small = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    request = b"GET /%s HTTP/1.1\r\nHost: a.test\r\n\r\n"
    pair = Pair()
    got: dict[str, Any] = {}
    records: list[RequestRecord] = []

    def server() -> None:
        for answer in (head + body, small):
            _recv_until(pair.server, b"\r\n\r\n")
            pair.server.sendall(answer)
        recv_all(pair.server)  # to the client's FIN
        pair.server.shutdown(socket.SHUT_WR)

    def client() -> None:
        pair.client.sendall(request % b"big")
        got["big"] = _recv_exactly(pair.client, len(head) + len(body))
        pair.client.sendall(request % b"small")
        got["small"] = _recv_exactly(pair.client, len(small))
        pair.client.shutdown(socket.SHUT_WR)
        got["rest"] = recv_all(pair.client)

    def allow(method: str, target: RequestTarget, upgrade: str | None) -> Decision:
        return Decision(Verdict.ALLOW, "allowed_host", None)

    async def main() -> tuple[RelayStats, list[int]]:
        threads = [threading.Thread(target=f, daemon=True) for f in (server, client)]
        for thread in threads:
            thread.start()
        stats, _, downs = await relayed(pair, gate=HttpGate(allow, records.append))
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
        return stats, downs

    stats, downs = run(loop, main)
    pair.close()
    assert got["big"] == head + body
    assert (got["small"], got["rest"]) == (small, b"")
    assert stats.bytes_down == len(head) + len(body) + len(small) and stats.error is None
    assert [(r.path, r.status, r.bytes_down) for r in records] == [
        ("/big", 200, len(head) + len(body)),
        ("/small", 200, len(small)),
    ]
    # the body was read a whole buffer at a time, not in CHUNKs
    assert max(downs) > CHUNK
