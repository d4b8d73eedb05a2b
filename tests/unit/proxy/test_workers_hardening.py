"""The proxy workers' review (docs/decisions.md, "The wiring, as built"): the UDP DNS hand-over
refuses what it cannot verify, the run directory is private, `/metrics` survives a bad worker
page, and a hung worker is killed and restarted while a not-ready one is left alone."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from egressd.metrics_text import parse, series
from egressd.proxy import workers as wk
from egressd.proxy.config import config_from_mapping
from egressd.proxy.reuseport import worker_for
from egressd.proxy.workers import (
    CONFIG_FILE,
    DnsSteering,
    WorkerPool,
    merge_pages,
    pack_steered,
    prepare_run_dir,
    split_limit,
    unresponsive,
)

IP = ipaddress.IPv4Address
SRC, SPORT, DST = IP("100.96.1.5"), 40000, IP("100.100.100.53")
JOBS = [uuid.uuid5(uuid.NAMESPACE_URL, f"j{i}") for i in range(8)]
MINE = next(j for j in JOBS if worker_for(j, 2) == 1)
THEIRS = next(j for j in JOBS if worker_for(j, 2) == 0)


def steered(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("egressd_dns_steered_total", {"result": result})
    return value or 0.0


# --- the UDP DNS hand-over's receiving side ------------------------------------------------------


async def hand_over(
    tmp_path: Path, flows: dict[tuple[IP, int, IP], uuid.UUID], datagrams: list[bytes]
) -> tuple[list[tuple[bytes, Any]], CollectorRegistry]:
    """Worker 1 of 2 receives `datagrams` on its real ``dns-1.sock``; `flows` is px_flows."""
    registry = CollectorRegistry()
    steering = DnsSteering(tmp_path, 1, 2, lambda s, p, d: flows.get((s, p, d)), registry)
    delivered: list[tuple[bytes, Any]] = []

    def deliver(query: bytes, peer: Any) -> None:
        delivered.append((query, peer))
        if query == b"boom":
            raise RuntimeError("a bug in the responder")

    steering.start(deliver)
    try:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for data in datagrams:
            sender.sendto(data, str(steering.path(1)))
        sender.close()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if sum(steered(registry, r) for r in ("received", "malformed", "rejected")) >= len(
                datagrams
            ):
                break
    finally:
        steering.close()
    return delivered, registry


async def test_a_forged_hand_over_never_makes_an_answer(tmp_path: Path) -> None:
    # Its peer has no flow (an address no query came from), or the flow is another worker's
    # job: never delivered (the answer would leave a transparent socket from DST).
    flows = {(SRC, SPORT, DST): THEIRS}
    forged = [
        pack_steered(b"\x12\x34q", IP("192.0.2.9"), 53, DST),
        pack_steered(b"\x12\x34q", SRC, SPORT, DST),
    ]
    delivered, registry = await hand_over(tmp_path, flows, forged)
    assert delivered == []
    assert steered(registry, "rejected") == 2
    assert steered(registry, "received") == 0


async def test_a_malformed_hand_over_is_dropped_and_counted(tmp_path: Path) -> None:
    flows = {(SRC, SPORT, DST): MINE, (SRC, 0, DST): MINE}
    bad = [b"", b"\x01" * 9, pack_steered(b"\x12\x34q", SRC, 0, DST)]
    delivered, registry = await hand_over(
        tmp_path, flows, [*bad, pack_steered(b"ok", SRC, SPORT, DST)]
    )
    assert [q for q, _ in delivered] == [b"ok"]  # the reader kept going after the bad ones
    assert steered(registry, "malformed") == 3


async def test_a_query_of_this_workers_flow_is_delivered_even_after_a_failing_one(
    tmp_path: Path,
) -> None:
    flows = {(SRC, SPORT, DST): MINE}
    datagrams = [pack_steered(q, SRC, SPORT, DST) for q in (b"boom", b"\x12\x34q")]
    delivered, registry = await hand_over(tmp_path, flows, datagrams)
    assert [q for q, _ in delivered] == [b"boom", b"\x12\x34q"]
    peer = delivered[1][1]
    assert (peer.src, peer.sport, peer.dst, peer.proto) == (SRC, SPORT, DST, 17)
    assert steered(registry, "received") == 2


async def test_the_hand_over_socket_is_the_supervisors_users_only(tmp_path: Path) -> None:
    steering = DnsSteering(tmp_path, 0, 2, lambda s, p, d: None, CollectorRegistry())
    steering.start(lambda q, p: None)
    try:
        assert stat.S_IMODE(steering.path(0).stat().st_mode) == 0o600
    finally:
        steering.close()


def test_the_run_directory_is_private_even_when_it_existed(tmp_path: Path) -> None:
    run = tmp_path / "workers"
    run.mkdir(mode=0o777)
    os.chmod(run, 0o777)
    (run / "dns-3.sock").write_bytes(b"")
    prepare_run_dir(run, {"workers": 2})
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert sorted(p.name for p in run.iterdir()) == [CONFIG_FILE]
    fresh = tmp_path / "a" / "workers"
    prepare_run_dir(fresh, {})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


# --- the proxy-wide limits' split ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 256])
@pytest.mark.parametrize("value", [1, 2, 5, 100, 1001, 65535, 10**11])
def test_the_shares_add_up_to_the_limit_and_none_is_zero(value: int, n: int) -> None:
    shares = [split_limit(value, n, i) for i in range(n)]
    assert min(shares) >= 1  # 0 would be "no limit" for bandwidth: never from a value
    assert max(shares) - min(shares) <= 1
    # Exact when every worker can have one; below that, one each is the least there is.
    assert sum(shares) == max(value, n)
    assert [split_limit(0, n, i) for i in range(n)] == [0] * n  # none stays none


# --- /metrics with a bad worker page -------------------------------------------------------------


def page(n: float, kind: str = "counter") -> str:
    r = CollectorRegistry()
    if kind == "counter":
        Counter("egressd_x", "x", registry=r).inc(n)
    else:
        Gauge("egressd_x", "x", registry=r).set(n)
    return generate_latest(r).decode()


@pytest.mark.parametrize(
    "bad",
    [
        'egressd_x_total{a="1" 3\n',  # a line the parser refuses
        "# TYPE egressd_y counter\negressd_y_total abc\n",  # not a number
        page(1) + "garbage here\n",  # good lines, then a bad one: none of it counts
        "# TYPE egressd_x gauge\negressd_x 100\n",  # a counter elsewhere: not summed in
    ],
)
def test_a_malformed_worker_page_leaves_the_rest_of_metrics(bad: str) -> None:
    bad_pages: list[int] = []
    merged = merge_pages(page(2), [page(3), bad, page(4)], lambda: bad_pages.append(1))
    assert series(parse(merged.decode()))[("egressd_x_total", ())] == 9.0
    conflict = bad.startswith("# TYPE egressd_x gauge")
    assert bad_pages == ([] if conflict else [1])


# --- a hung worker, a worker not ready -----------------------------------------------------------


class _Pool(WorkerPool):
    """A pool whose 'workers' are plain sleeping processes (no sockets, no selectors)."""

    def _argv(self, worker: Any) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


def pool(tmp_path: Path) -> _Pool:
    config = config_from_mapping(
        {
            "name": "p",
            "underlay": "198.18.0.21",
            "egress": "203.0.113.21",
            "datapath": "kernel",
            "workers": 2,
            "state_dir": str(tmp_path / "state"),
        }
    )
    p = _Pool(
        config,
        flows_pin=tmp_path / "none",
        listen_host="127.0.0.1",
        metrics=CollectorRegistry(),
        run_dir=tmp_path / "run",
    )
    p.run_dir.mkdir()
    p.workers = [wk._Worker(0, ())]
    return p


def test_unresponsive_counts_from_the_start_or_the_last_answer() -> None:
    limit = wk.UNRESPONSIVE_S
    assert not unresponsive(100.0 + limit, 100.0, None)
    assert unresponsive(100.1 + limit, 100.0, None)
    assert not unresponsive(100.1 + limit, 100.0, 101.0)
    assert unresponsive(101.1 + limit, 100.0, 101.0)


async def test_a_worker_that_answers_nothing_is_killed_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wk, "UNRESPONSIVE_S", 0.6)
    p = pool(tmp_path)
    p.start()
    try:
        first = p.workers[0].proc
        assert first is not None
        for _ in range(60):
            await asyncio.sleep(0.1)
            if p.workers[0].proc is not first:
                break
        assert p.workers[0].proc is not first
        assert first.poll() == -9  # SIGKILLed, then a new process
        assert p.workers[0].proc is not None and p.workers[0].proc.poll() is None
        restarts = p._restarts.labels("0")._value.get()
        assert restarts == 1
    finally:
        await p.close()
    assert all(w.proc is not None and w.proc.poll() is not None for w in p.workers)


async def test_a_worker_that_answers_not_ready_lives_and_readiness_follows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wk, "UNRESPONSIVE_S", 0.6)
    monkeypatch.setattr(wk, "RECHECK_S", 0.1)
    p = pool(tmp_path)
    status = {"code": 503}

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(p.socket_path(0))).start()
    p.start()
    try:
        first = p.workers[0].proc

        async def wait_ready(want: bool) -> None:
            for _ in range(40):
                await asyncio.sleep(0.1)
                if p.workers[0].ready == want:
                    return

        await asyncio.sleep(1.5)  # > UNRESPONSIVE_S: it answered 503 all along
        assert p.workers[0].proc is first and first is not None and first.poll() is None
        assert p.not_ready() == [0]
        status["code"] = 200
        await wait_ready(True)
        assert p.not_ready() == []
        status["code"] = 503  # a ready worker is asked again, and is no longer counted ready
        await wait_ready(False)
        assert p.not_ready() == [0]
    finally:
        await p.close()
        await runner.cleanup()


def test_a_worker_whose_supervisor_is_gone_before_its_prctl_exits() -> None:
    # The preexec step, run in a child whose 'supervisor' (the pid it is given) is, or is not,
    # its parent: with another, it exits at once instead of living on with no parent-death
    # signal to come.
    def run(offset: int) -> subprocess.CompletedProcess[bytes]:
        code = (
            "import os, sys; from egressd.proxy.workers import _set_pdeathsig; "
            f"_set_pdeathsig(os.getppid() + {offset}); sys.exit(7)"
        )
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)

    assert run(0).returncode == 7
    gone = run(100000)
    assert (gone.returncode, gone.stderr) == (1, b"")


async def test_a_worker_that_misses_a_scrape_keeps_its_last_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Summed counters must not step back because a busy worker missed one scrape.
    p = pool(tmp_path)
    answers: list[object] = [(200, b"# TYPE x counter\nx_total 5.0\n"), TimeoutError()]

    async def get(index: int, path: str, timeout: float) -> tuple[int, bytes]:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    monkeypatch.setattr(p, "_get", get)
    first = await p.pages()
    assert await p.pages() == first == ["# TYPE x counter\nx_total 5.0\n"]
