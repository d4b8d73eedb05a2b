"""Each limit refusing with its reason through the real interceptor.

The world of `test_intercept` (client, proxy and inet namespaces of their
own, TPROXY, the interceptor in a subprocess), made with proxy limits:

* two egress addresses x source ports 20000-20005 = 12 source pairs per
  destination, 2 guaranteed per job with room for 1 newcomer, a 2 s reuse
  delay; at most 24 connections in the proxy; a proxy-wide rate of 16 Mbit/s;
* two jobs: CLIENT is JOB_ID, CLIENT2 is JOB2_ID, each with its own policy.

The inet's bulk server (port 9000 and 9002) answers ``PEER`` with the source
address it sees and holds the connection; every test uses destinations of
its own (addresses added to the inet namespace), so that ports cooling down
after one test do not change the next.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressd.metrics_text import metric_sum, parse
from tests.support.intercept_world import (
    BULK,
    CLIENT,
    CLIENT2,
    EGRESS,
    JOB2_ID,
    JOB_ID,
    ROOMY_LIMITS,
    World,
    _in_ns,
    make_world,
    ns_socket,
    source,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(120)]

EGRESS2 = "203.0.113.23"
FIRST_PORT, LAST_PORT = 20000, 20005
POOL = 2 * (LAST_PORT - FIRST_PORT + 1)
MIN_PER_JOB, NEWCOMERS = 2, 1
REUSE_DELAY_S = 2.0
PROXY_MAX_CONNECTIONS = 24
PROXY_RATE_BPS = 16_000_000
PROXY_LIMITS = {
    "max_connections": PROXY_MAX_CONNECTIONS,
    "bandwidth_bps": PROXY_RATE_BPS,
    "egress_addresses": [EGRESS, EGRESS2],
    "source_ports": f"{FIRST_PORT}-{LAST_PORT}",
    "min_ports_per_job": MIN_PER_JOB,
    "reserved_newcomers": NEWCOMERS,
    "port_reuse_delay_s": REUSE_DELAY_S,
}
BULK_RULES = [{"cidr": "203.0.113.96/28", "ports": [9000, 9002]}]
# Destinations in the bulk rule's /28, one (or more) per test.
DESTS = [f"203.0.113.{n}" for n in range(101, 112)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(
        tmp_path_factory.mktemp("limits"),
        limits=PROXY_LIMITS,
        extra_egress=(EGRESS2,),
        second_job=True,
    ) as w:
        for dest in DESTS:
            _in_ns(w.inet_ns, "ip", "addr", "add", f"{dest}/24", "dev", f"t{w.sfx}i0")
        yield w


@pytest.fixture
def lw(world: World) -> World:
    """The world with both jobs on roomy limits, and no connection left in the proxy."""
    for job in (JOB_ID, JOB2_ID):
        world.set_policy(job_id=job, egress=BULK_RULES, limits=dict(ROOMY_LIMITS))
    wait_admitted(world, 0)
    return world


def set_limits(w: World, job: str = JOB_ID, **limits: int) -> None:
    w.set_policy(job_id=job, egress=BULK_RULES, limits={**ROOMY_LIMITS, **limits})


# --- helpers --------------------------------------------------------------------------


def hold(
    w: World, dst: str, port: int = 9000, *, src: str = CLIENT
) -> tuple[socket.socket, str, int]:
    """A relayed connection that the bulk server holds open, and the source it saw.

    Raises ConnectionResetError when the proxy refuses it.
    """
    sock = ns_socket(w.client_ns)
    try:
        sock.settimeout(5.0)
        sock.bind((src, 0))
        sock.connect((dst, port))
        sock.sendall(b"PEER\n")
        line = b""
        while not line.endswith(b"\n"):
            data = sock.recv(100)
            if not data:
                raise ConnectionResetError("closed without an answer")
            line += data
    except BaseException:
        sock.close()
        raise
    ip, peer_port = line.decode().split()
    return sock, ip, int(peer_port)


def refused(w: World, dst: str, port: int = 9000, *, src: str = CLIENT) -> dict[str, Any]:
    """Connect; the proxy must reset; the connection's audit event."""
    return w.wait_event(event="connection", source=w.expect_reset(dst, port, b"PEER\n", src=src))


def metric(w: World, name: str, **labels: str) -> float:
    return metric_sum(parse(w.metrics()), name, **labels)


def wait_admitted(w: World, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := metric(w, "egressd_connections_admitted")) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{value} connections admitted, expected {count}")
        time.sleep(0.1)


@contextlib.contextmanager
def held(w: World, dst: str, n: int, **kw: Any) -> Iterator[list[tuple[socket.socket, str, int]]]:
    conns: list[tuple[socket.socket, str, int]] = []
    try:
        for _ in range(n):
            conns.append(hold(w, dst, **kw))
        yield conns
    finally:
        for sock, _, _ in conns:
            sock.close()


# --- source ports -----------------------------------------------------------------------


def test_upstream_binds_a_pooled_source(lw: World) -> None:
    dst = DESTS[0]
    with held(lw, dst, 4) as conns:
        sources = {(ip, port) for _, ip, port in conns}
        assert len(sources) == 4
        assert {ip for ip, _ in sources} == {EGRESS, EGRESS2}  # round-robin over both
        assert all(FIRST_PORT <= port <= LAST_PORT for _, port in sources)
        destination = f"{dst}:9000/tcp"
        assert (
            metric(lw, "egressd_source_ports_in_use", egress=EGRESS, destination=destination) == 2
        )
        assert (
            metric(lw, "egressd_source_ports_in_use", egress=EGRESS2, destination=destination) == 2
        )
        assert metric(lw, "egressd_job_source_ports", job_id=JOB_ID, destination=destination) == 4
    wait_admitted(lw, 0)
    assert metric(lw, "egressd_job_source_ports", job_id=JOB_ID, destination=destination) == 0


def test_port_budget_per_destination(lw: World) -> None:
    set_limits(lw, ports_per_destination=3)
    dst = DESTS[1]
    with held(lw, dst, 3):
        event = refused(lw, dst)
        assert (event["verdict"], event["reason"]) == ("deny", "port_budget_exhausted")
        # The budget is per destination: the same address on another port is another one.
        with held(lw, dst, 1, port=9002):
            pass
    assert (
        metric(lw, "egressd_limit_refusals_total", job_id=JOB_ID, reason="port_budget_exhausted")
        >= 1
    )


def test_pool_keeps_a_newcomers_minimum(lw: World) -> None:
    dst = DESTS[2]
    attacker = POOL - MIN_PER_JOB * NEWCOMERS  # what one job may take of the pool
    with held(lw, dst, attacker):
        event = refused(lw, dst)
        assert event["reason"] == "port_pool_exhausted"
        # The newcomer still gets its guaranteed minimum, and no more.
        with held(lw, dst, MIN_PER_JOB, src=CLIENT2):
            event = refused(lw, dst, src=CLIENT2)
            assert (event["job_id"], event["reason"]) == (JOB2_ID, "port_pool_exhausted")
    log = (lw.tmp / "proxy.err").read_text() + lw.audit_log.read_text()
    assert "EADDRINUSE" not in log and "Traceback" not in log


def test_released_ports_wait_out_time_wait(lw: World) -> None:
    dst = DESTS[3]
    with held(lw, dst, POOL - MIN_PER_JOB * NEWCOMERS):
        pass
    wait_admitted(lw, 0)
    # Every pair but the never-used reserve is cooling down toward this
    # destination: the job (holding none now) gets the reserve, then no more.
    with held(lw, dst, MIN_PER_JOB * NEWCOMERS) as conns:
        assert len(conns) == MIN_PER_JOB * NEWCOMERS
        assert refused(lw, dst)["reason"] == "port_pool_exhausted"
        # Another destination is not affected by this one's cooling ports.
        with held(lw, DESTS[4], 1):
            pass
        time.sleep(REUSE_DELAY_S + 0.5)
        with held(lw, dst, 1):
            pass


def test_ports_closed_by_the_server_come_back_at_once(lw: World) -> None:
    # The bulk server closes first after SEND: its side keeps the TIME_WAIT,
    # so the proxy's pair is free again at once (last in line): many more
    # connections than the pool has pairs, one after another, all succeed.
    dst = DESTS[10]
    for _ in range(2 * POOL):
        download(lw, 10, dst=dst)  # a refused connection would fail here
    deadline = time.monotonic() + 5
    while len(events := [e for e in lw.events("connection") if e["dst"] == dst]) < 2 * POOL:
        assert time.monotonic() < deadline, f"{len(events)} connection events"
        time.sleep(0.05)
    assert {e["verdict"] for e in events} == {"allow"}


def test_a_port_taken_on_the_host_is_skipped(lw: World) -> None:
    dst = DESTS[5]
    # The first pair the allocator hands out toward a new destination is
    # (EGRESS, FIRST_PORT): a connection that some other program on the proxy
    # host made from there to the same destination makes its connect fail
    # (EADDRNOTAVAIL, the 4-tuple is taken).
    blocker = ns_socket(lw.proxy_ns)
    with blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.settimeout(5)
        blocker.bind((EGRESS, FIRST_PORT))
        blocker.connect((dst, 9000))
        with held(lw, dst, 1) as conns:
            _, ip, port = conns[0]
            assert (ip, port) != (EGRESS, FIRST_PORT)
    events = [e for e in lw.events() if e.get("event") == "source_port_taken"]
    assert any(e["port"] == FIRST_PORT and e["egress"] == EGRESS for e in events)


# --- connection caps ----------------------------------------------------------------------


def test_job_connection_limit(lw: World) -> None:
    set_limits(lw, max_connections=3)
    dst = DESTS[6]
    with held(lw, dst, 3) as conns:
        event = refused(lw, dst)
        assert (event["verdict"], event["reason"]) == ("deny", "job_connection_limit")
        assert metric(lw, "egressd_job_connections", job_id=JOB_ID) == 3
        # The other job is not held back by this one's cap.
        with held(lw, dst, 1, src=CLIENT2):
            pass
        conns.pop()[0].close()
        wait_admitted(lw, 2)
        with held(lw, dst, 1):
            pass


def test_job_rate_limit(lw: World) -> None:
    rate = 4
    set_limits(lw, max_new_connections_per_s=rate)
    dst = DESTS[7]
    allowed = denied = 0
    started = time.monotonic()
    for _ in range(12):
        try:
            sock, _, _ = hold(lw, dst)
        except ConnectionResetError:
            denied += 1
        else:
            sock.close()
            allowed += 1
    elapsed = time.monotonic() - started
    # A full bucket (one second's worth) plus what refilled meanwhile.
    assert rate <= allowed <= rate + int(elapsed * rate) + 1, (allowed, elapsed)
    assert denied == 12 - allowed
    assert (
        metric(lw, "egressd_limit_refusals_total", job_id=JOB_ID, reason="job_rate_limit") >= denied
    )
    # A raised rate keeps the tokens earned so far: earn one at the old rate
    # so that the next test's first connection is not refused.
    time.sleep(1.0 / rate + 0.1)


def test_proxy_connection_limit(lw: World) -> None:
    per_dest = POOL - MIN_PER_JOB * NEWCOMERS
    with contextlib.ExitStack() as stack:
        left = PROXY_MAX_CONNECTIONS
        for dst in DESTS[8:10]:
            n = min(per_dest, left)
            stack.enter_context(held(lw, dst, n))
            left -= n
        stack.enter_context(held(lw, BULK, left))
        wait_admitted(lw, PROXY_MAX_CONNECTIONS)
        event = refused(lw, BULK, 9002, src=CLIENT2)
        assert (event["job_id"], event["reason"]) == (JOB2_ID, "proxy_connection_limit")


# --- bandwidth --------------------------------------------------------------------------


def download(w: World, size: int, *, src: str = CLIENT, port: int = 9000, dst: str = BULK) -> float:
    """Fetch `size` bytes from the bulk server; the seconds it took."""
    sock = ns_socket(w.client_ns)
    with sock:
        sock.settimeout(30)
        sock.bind((src, 0))
        sock.connect((dst, port))
        started = time.monotonic()
        sock.sendall(b"SEND %d\n" % size)
        got = 0
        while data := sock.recv(1 << 20):
            got += len(data)
        elapsed = time.monotonic() - started
    assert got == size
    return elapsed


def upload(w: World, size: int) -> float:
    sock = ns_socket(w.client_ns)
    with sock:
        sock.settimeout(30)
        sock.bind((CLIENT, 0))
        sock.connect((BULK, 9000))
        started = time.monotonic()
        sock.sendall(b"RECV\n")
        chunk = b"u" * 65536
        left = size
        while left > 0:
            sock.sendall(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(100):
            answer += data
        elapsed = time.monotonic() - started
    assert int(answer) == size
    return elapsed


def test_job_bandwidth_is_paced_both_ways(lw: World) -> None:
    rate_bps = 8_000_000  # 1 MB/s, half the proxy's rate: the job's own rate applies
    set_limits(lw, bandwidth_bps=rate_bps)
    size = 2_000_000
    down = size / download(lw, size) * 8
    up = size / upload(lw, size) * 8
    print(
        f"\npaced at {rate_bps / 1e6:.0f} Mbit/s: down {down / 1e6:.2f}, up {up / 1e6:.2f} Mbit/s"
    )
    for measured in (down, up):
        assert 0.75 * rate_bps <= measured <= 1.1 * rate_bps, measured
    assert metric(lw, "egressd_paced_chunks_total") > 0
    assert metric(lw, "egressd_job_bytes_total", job_id=JOB_ID, direction="down") >= size


def test_jobs_share_the_proxy_rate_max_min_fair(lw: World) -> None:
    # JOB2 is granted 100 Gbit/s (ROOMY_LIMITS), JOB 4 Mbit/s, on a 16 Mbit/s proxy: JOB,
    # below an equal share, gets its 4; JOB2 the other 12, after a burst of at most what
    # the proxy carries in one recompute period (0.25 s). (In proportion to the rates, JOB
    # would get 16 Mbit/s * 4 / 100,000: under a kilobit.)
    small, big = CLIENT, CLIENT2
    set_limits(lw, bandwidth_bps=4_000_000)
    sizes = {small: 2_000_000, big: 6_000_000}
    took: dict[str, float] = {}

    def run(src: str) -> None:
        took[src] = download(lw, sizes[src], src=src, port=9000 if src == CLIENT else 9002)

    threads = [threading.Thread(target=run, args=(src,)) for src in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    rates = {src: sizes[src] / took[src] * 8 for src in sizes}
    together = sum(sizes.values()) * 8 / max(took.values())
    print(
        f"\nshared proxy rate: {rates[small] / 1e6:.2f} and {rates[big] / 1e6:.2f} Mbit/s,"
        f" {together / 1e6:.2f} together"
    )
    assert together <= 1.1 * PROXY_RATE_BPS
    assert 0.75 * 4_000_000 <= rates[small] <= 1.1 * 4_000_000
    assert rates[big] >= 0.7 * 12_000_000


# --- timeouts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(
        tmp_path_factory.mktemp("timeouts"),
        limits={"idle_timeout_s": 1.0, "max_lifetime_s": 3.0},
    ) as w:
        w.set_policy(egress=BULK_RULES)
        yield w


def reset_after(sock: socket.socket, *, keepalive_every: float | None = None) -> float:
    """Seconds until the proxy resets `sock` (sending a byte every `keepalive_every` s)."""
    started = time.monotonic()
    sock.settimeout(keepalive_every or 10.0)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while time.monotonic() - started < 10.0:
            try:
                if sock.recv(100) == b"":
                    raise AssertionError("closed with a FIN, not reset")
            except TimeoutError:
                sock.sendall(b".")
        raise AssertionError("not reset within 10 s")
    return time.monotonic() - started


def test_idle_connection_is_ended(short_lived: World) -> None:
    sock, _, _ = hold(short_lived, BULK)
    with sock:
        me = source(sock)
        after = reset_after(sock)
    assert 0.8 <= after <= 2.5, after
    event = short_lived.wait_event(event="connection", source=me)
    assert (event["verdict"], event.get("end")) == ("allow", "idle_timeout")


def test_busy_connection_ends_at_its_lifetime(short_lived: World) -> None:
    sock, _, _ = hold(short_lived, BULK)
    with sock:
        me = source(sock)
        after = reset_after(sock, keepalive_every=0.3)
    assert 2.8 <= after <= 4.5, after
    event = short_lived.wait_event(event="connection", source=me)
    assert event.get("end") == "max_lifetime"
    assert event["bytes_up"] > len(b"PEER\n")
    assert "max_lifetime" in short_lived.metrics()


def test_timeouts_leave_no_trace_in_the_proxy(short_lived: World) -> None:
    assert "Traceback" not in Path(short_lived.tmp / "proxy.err").read_text()
