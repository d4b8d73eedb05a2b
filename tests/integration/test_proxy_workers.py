"""`egressd proxy serve` with ``"datapath": "kernel", "workers": 2``: a supervisor and two
worker processes on the real kernel data path (the fleet, node simulator and mini agent of
test_proxy_dataplane, a fresh prefix for this module). Through the real processes:

* every connection of a job lands on its `worker_for` worker: the audit events carry the
  worker, and two jobs of different workers land on two different worker processes;
* a job's ``max_connections`` is exact across many connections (all on one worker); the
  supervisor's `/metrics` sums the workers' pages (refusals, held connections);
* a job's DNS queries, over UDP (spread by the kernel's hash, handed over by the workers)
  and TCP (selected by bpf/reuseport.c), are all answered by its worker;
* a worker killed with SIGKILL is restarted on the same sockets (counted, logged) and the
  job it serves gets through again;
* SIGTERM stops the workers and leaves no process, pin, program or bpffs mount behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dns.message
import pytest

from egressd.layout import CONTROL_ADDR, RESOLVER
from egressd.net import netns as kn
from egressd.policy.jws import policy_digest
from egressd.proxy.reuseport import worker_for
from egressd.proxy.workers import pack_steered
from tests.support.proxy_fleet import (
    SANDBOX,
    SITE,
    Fleet,
    ProxyProcess,
    agent_for,
    http,
    sandbox_get,
)
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS, "clang", "bpftool")

WORKERS = 2
MAX_CONNECTIONS = 4
HELD_PORT = 21000  # the held connections' source ports, one each
HELD = 10
UDP_QUERIES = 12


def job_for_worker(index: int) -> uuid.UUID:
    i = 0
    while True:
        job = uuid.uuid5(uuid.NAMESPACE_URL, f"egressd-workers-test-{i}")
        if worker_for(job, WORKERS) == index:
            return job
        i += 1


JOBS = {index: job_for_worker(index) for index in range(WORKERS)}


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    for job in JOBS.values():
        proxy_fleet.put(
            f"/v1/jobs/{job}/policy",
            {
                "v": 1,
                "account": "acme",
                "nodes": ["node1"],
                "egress": [{"cidr": f"{SITE}/32", "ports": [80]}],
                "limits": {"max_connections": MAX_CONNECTIONS},
            },
        )
    return proxy_fleet


def digest_of(fleet: Fleet, job: uuid.UUID) -> bytes:
    _, body = http(fleet.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{job}/policy")
    return policy_digest(json.loads(body)["jws"])


@pytest.fixture
def proxy(fleet: Fleet) -> Iterator[ProxyProcess]:
    p = ProxyProcess(
        fleet,
        datapath="kernel",
        workers=WORKERS,
        state_dir=str(fleet.root / f"kstate-{fleet.prefix}"),
    )
    try:
        p.wait_ready()
        yield p
    finally:
        p.kill()
        for pid in worker_pids(p).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    out = []
    for line in proxy.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """{worker: pid} of the latest start of each worker."""
    out = {}
    for e in events(proxy):
        if e.get("event") == "proxy_worker_started":
            out[e["worker"]] = e["pid"]
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def connections(proxy: ProxyProcess, job: uuid.UUID) -> list[dict[str, Any]]:
    return [
        e for e in events(proxy) if e.get("event") == "connection" and e.get("job_id") == str(job)
    ]


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    return proxy.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def get_ok(fleet: Fleet) -> bool:
    try:
        answer = sandbox_get(fleet, "/hello.txt", timeout=5)
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.0 200")


def test_jobs_land_on_their_workers_and_limits_stay_exact(
    fleet: Fleet, proxy: ProxyProcess
) -> None:
    pids = worker_pids(proxy)
    assert sorted(pids) == list(range(WORKERS)) and len(set(pids.values())) == WORKERS
    assert all(alive(pid) for pid in pids.values())
    assert metric(proxy, "egressd_proxy_workers") == WORKERS
    seen_workers: dict[int, set[int]] = {}
    for index, job in JOBS.items():
        with agent_for(fleet, job, digest=digest_of(fleet, job)):
            wait_for(lambda: get_ok(fleet), 15, f"job {job}'s first answer")
            for _ in range(4):
                assert get_ok(fleet)
            wait_for(lambda job=job: len(connections(proxy, job)) >= 5, 5, "audit events")
            seen_workers[index] = {e["worker"] for e in connections(proxy, job)}
    # Each job on its worker, the two jobs on two processes.
    assert seen_workers == {index: {index} for index in JOBS}

    # One job's max_connections, exact over many connections held at once.
    job = JOBS[1]
    before = metric(
        proxy, "egressd_limit_refusals_total", job_id=str(job), reason="job_connection_limit"
    )
    with agent_for(fleet, job, digest=digest_of(fleet, job)):
        wait_for(lambda: get_ok(fleet), 15, "the job's first answer")
        held: list[socket.socket] = []
        try:
            for i in range(HELD):
                sock = kn.netns_socket(fleet.node_ns)
                held.append(sock)
                sock.settimeout(5)
                # Ports below the ephemeral range: an ephemeral one may name a connection
                # the proxy still holds in TIME_WAIT, whose SYN would be answered by a reset.
                sock.bind((SANDBOX, HELD_PORT + i))
                sock.connect((SITE, 80))  # accepted by the proxy; no request: it stays open
                time.sleep(0.05)

            def refused() -> float:
                return (
                    metric(
                        proxy,
                        "egressd_limit_refusals_total",
                        job_id=str(job),
                        reason="job_connection_limit",
                    )
                    - before
                )

            wait_for(lambda: refused() == HELD - MAX_CONNECTIONS, 10, "the refusals")
            assert metric(proxy, "egressd_job_connections", job_id=str(job)) == MAX_CONNECTIONS
            time.sleep(0.5)
            assert refused() == HELD - MAX_CONNECTIONS  # and no more
        finally:
            for sock in held:
                sock.close()
    denied = [e for e in connections(proxy, job) if e["reason"] == "job_connection_limit"]
    assert len(denied) >= HELD - MAX_CONNECTIONS and {e["worker"] for e in denied} == {1}
    selection = proxy.metrics()
    assert selection[("egressd_worker_selection_total", (("outcome", "selected"),))] >= 10
    assert selection[("egressd_worker_selection_total", (("outcome", "no_worker"),))] == 0
    assert not [e for e in events(proxy) if e.get("reason") == "wrong_worker"]


def dns_events(proxy: ProxyProcess, job: uuid.UUID) -> list[dict[str, Any]]:
    return [e for e in events(proxy) if e.get("event") == "dns" and e.get("job_id") == str(job)]


def ask(fleet: Fleet, *, tcp: bool) -> int:
    """One A query for api.allowed.test from the sandbox to the resolver address, from a
    fresh source port; the answer's rcode."""
    query = dns.message.make_query("api.allowed.test", "A")
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with contextlib.closing(kn.netns_socket(fleet.node_ns, socket.AF_INET, kind)) as sock:
        sock.settimeout(5)
        sock.bind((SANDBOX, 0))
        if tcp:
            sock.connect((str(RESOLVER), 53))
            wire = query.to_wire()
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
            answer = dns.message.from_wire(sock.recv(size, socket.MSG_WAITALL))
        else:
            sock.sendto(query.to_wire(), (str(RESOLVER), 53))
            answer = dns.message.from_wire(sock.recv(4096))
    assert answer.id == query.id
    return int(answer.rcode())


def test_a_jobs_dns_queries_reach_its_worker(fleet: Fleet, proxy: ProxyProcess) -> None:
    """UDP (spread by the kernel's hash, handed over to the job's worker) and TCP (selected by
    bpf/reuseport.c): every query of a job is answered by its worker."""
    for index, job in JOBS.items():
        with agent_for(fleet, job, digest=digest_of(fleet, job)):
            kn.run_in_netns(
                fleet.node_ns,
                ["ip", "route", "add", f"{RESOLVER}/32", "dev", "sbx0", "src", SANDBOX],
            )
            # The policies name no host: the name is refused, by the job's worker.
            wait_for(lambda: ask(fleet, tcp=False) == 3, 15, "the first DNS answer")
            rcodes = [ask(fleet, tcp=False) for _ in range(UDP_QUERIES)]
            rcodes += [ask(fleet, tcp=True) for _ in range(2)]
            assert rcodes == [3] * (UDP_QUERIES + 2)  # NXDOMAIN, the refusal rcode
            wait_for(
                lambda job=job: len(dns_events(proxy, job)) >= UDP_QUERIES + 3, 10, "dns events"
            )
        found = dns_events(proxy, job)
        assert {(e["worker"], e["reason"]) for e in found} == {(index, "no_matching_rule")}
    m = proxy.metrics()
    sent = m.get(("egressd_dns_steered_total", (("result", "sent"),)), 0.0)
    assert sent >= 1  # some queries came to the other worker first (the kernel's hash)
    assert m[("egressd_dns_steered_total", (("result", "received"),))] == sent
    assert m[("egressd_dns_steered_total", (("result", "failed"),))] == 0
    assert not [e for e in events(proxy) if e.get("reason") == "wrong_worker"]


def test_a_killed_worker_is_restarted_and_serves_again(fleet: Fleet, proxy: ProxyProcess) -> None:
    index, job = 0, JOBS[0]
    old = worker_pids(proxy)[index]
    other = worker_pids(proxy)[1]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: worker_pids(proxy)[index] != old, 10, "the worker's restart")
    exited = [e for e in events(proxy) if e.get("event") == "proxy_worker_exited"]
    assert [(e["worker"], e["pid"], e["returncode"]) for e in exited] == [(0, old, -9)]
    assert worker_pids(proxy)[1] == other and alive(other)
    proxy.wait_ready()
    assert metric(proxy, "egressd_proxy_worker_restarts_total", worker="0") == 1
    with agent_for(fleet, job, digest=digest_of(fleet, job)):
        wait_for(lambda: get_ok(fleet), 15, "the restarted worker's answer")
        # The audit event comes when the relay ends: the client's FIN needs the agent.
        wait_for(lambda: connections(proxy, job), 10, "the audit event")
    new = worker_pids(proxy)[index]
    assert {e["worker"] for e in connections(proxy, job)} == {index}
    assert alive(new)


def test_sigterm_stops_the_workers_and_leaves_nothing(fleet: Fleet, proxy: ProxyProcess) -> None:
    state = fleet.root / f"kstate-{fleet.prefix}"
    pids = worker_pids(proxy)
    (loaded,) = [e for e in events(proxy) if e.get("event") == "kernel_datapath_loaded"]
    (started,) = [e for e in events(proxy) if e.get("event") == "proxy_workers_started"]
    ids = set(loaded["programs"].values())
    ids |= {i for progs in started["programs"].values() for i in progs.values()}
    assert len(ids) == 4 and ids <= _prog_ids()  # px_ingress, px_egress, 2 x rp_select
    assert proxy.terminate() == 0, proxy.log()[-4000:]
    for pid in pids.values():
        wait_for(lambda pid=pid: not alive(pid), 5, f"worker {pid} to exit")
    names = [e.get("event") for e in events(proxy)]
    assert "stop_step_failed" not in names and names[-1] == "stopped"
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        assert str(state) not in fh.read()
    assert not (state / "workers").exists()
    wait_for(lambda: not (_prog_ids() & ids), 5, "the programs to be freed")


def _prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {p["id"] for p in json.loads(out)}


def test_a_forged_dns_hand_over_is_dropped_and_counted(fleet: Fleet, proxy: ProxyProcess) -> None:
    """A datagram on a worker's hand-over socket that no worker sent (a peer with no flow, a
    victim's address, garbage) is dropped and counted; the worker lives on and the run
    directory with the sockets is the supervisor's user's only."""
    run = fleet.root / f"kstate-{fleet.prefix}" / "workers"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    pids = worker_pids(proxy)
    query = dns.message.make_query("api.allowed.test", "A").to_wire()
    forged = [
        pack_steered(query, ipaddress.IPv4Address(SANDBOX), 40999, RESOLVER),  # no such flow
        pack_steered(query, ipaddress.IPv4Address("192.0.2.77"), 53, RESOLVER),  # a victim
        b"\x00" * 5,
    ]
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
        for index in range(WORKERS):
            for data in forged:
                sock.sendto(data, str(run / f"dns-{index}.sock"))

    def dropped() -> tuple[float, float]:
        return (
            metric(proxy, "egressd_dns_steered_total", result="rejected"),
            metric(proxy, "egressd_dns_steered_total", result="malformed"),
        )

    wait_for(lambda: dropped() == (2 * WORKERS, WORKERS), 10, "the forged datagrams counted")
    assert metric(proxy, "egressd_dns_steered_total", result="received") == 0
    assert not dns_events(proxy, JOBS[0]) and not dns_events(proxy, JOBS[1])
    assert worker_pids(proxy) == pids and all(alive(pid) for pid in pids.values())
    proxy.wait_ready()
