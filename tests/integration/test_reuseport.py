"""bpf/reuseport.c, loaded by `ReuseportSelector`, on real sockets: 2-4 SO_REUSEPORT listeners
in a namespace of the test's own, the proxy's px_flows stood in for by a map of the same
shape (created with bpftool from bpf/px_flows.h's declaration, pinned in a bpffs the test
mounts: the selector reuses it as it reuses the proxy's), entries written for several jobs,
and many connections from several source addresses. Every connection of a job must land on
the listener `worker_for` names; a connection without a flow entry, or whose worker has no
socket, is refused and counted; `close` leaves no pin or mount.

No TPROXY or GENEVE: a plain connect() to 127.0.0.1 meets the same listener lookup (see
test_tproxy_connections_are_selected_too for the TPROXY one, where the packet starts at its
IPv4 header).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import select
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import egressd
from egressd.ebpf import syscall as bpf
from egressd.ebpf.build import mount_bpffs, umount_bpffs
from egressd.proxy import kernel_maps as km
from egressd.proxy import reuseport as rp
from tests.support.tier1 import Namespaces, in_netns, sh

pytestmark = pytest.mark.root("ip", "nft", "clang", "bpftool")

ROOT = Path(egressd.__file__).resolve().parents[1]
HEADER = (ROOT / "bpf" / "px_flows.h").read_text()
LISTEN = ipaddress.IPv4Address("127.0.0.1")
DIGEST = bytes(range(8))
NODE = ipaddress.IPv4Address("198.18.0.11")
CONNECTIONS_PER_SOURCE = 5


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split(" ")[4] == str(path) for line in fh)


def tproxy_namespaces(spaces: Namespaces, proxy_name: str, client_name: str) -> tuple[str, str]:
    """A proxy namespace that delivers marked packets locally (TPROXY's policy route) and a
    client namespace routed to SITE through it over one veth."""
    proxy_ns = spaces.create(proxy_name)
    client_ns = spaces.create(client_name)
    sh("ip", "-n", proxy_ns, "link", "add", "c0", "type", "veth", "peer", "name", "c1")
    sh("ip", "-n", proxy_ns, "link", "set", "c1", "netns", client_ns)
    sh("ip", "-n", proxy_ns, "addr", "add", f"{GATEWAY}/24", "dev", "c0")
    sh("ip", "-n", client_ns, "addr", "add", f"{SANDBOX}/24", "dev", "c1")
    sh("ip", "-n", proxy_ns, "link", "set", "c0", "up")
    sh("ip", "-n", client_ns, "link", "set", "c1", "up")
    sh("ip", "-n", client_ns, "route", "add", f"{SITE}/32", "via", GATEWAY)
    for key in ("all", "default", "c0"):
        sh("ip", "netns", "exec", proxy_ns, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
    sh("ip", "netns", "exec", proxy_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    sh("ip", "-n", proxy_ns, "rule", "add", "fwmark", "1", "lookup", "100")
    sh("ip", "-n", proxy_ns, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    return proxy_ns, client_ns


def create_flow_map(pin: Path, *, value_size: int = 32) -> None:
    """A px_flows as bpf/px_flows.h declares it (what the proxy's loader pins)."""
    match = re.search(r"__uint\(max_entries, (\d+)\);\s*__type\(key, struct px_flow_key\)", HEADER)
    assert match is not None
    spec = km.MAP_SIZES["px_flows"]
    sh(
        "bpftool", "map", "create", str(pin), "type", "lru_hash",
        "key", str(spec.key_size), "value", str(value_size),
        "entries", match.group(1), "name", "px_flows",
    )  # fmt: skip


@dataclass
class Bed:
    ns: str
    selector: rp.ReuseportSelector
    flows_fd: int
    socks: list[socket.socket] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.socks[0].getsockname()[1]
        return port

    def record(self, job: uuid.UUID, src: str, sport: int) -> None:
        """What px_ingress would record for this connection's SYN."""
        key = km.pack_flow_key(int(ipaddress.IPv4Address(src)), sport, int(LISTEN), self.port, 6)
        bpf.map_update(self.flows_fd, key, km.pack_flow(job, DIGEST, NODE))

    def connect(self, src: str, job: uuid.UUID | None) -> tuple[socket.socket, int]:
        """A connected client from `src` (in the namespace), its flow recorded first when
        `job` is given; refused connections raise ConnectionRefusedError."""
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            client.settimeout(5)
            client.bind((src, 0))
            sport: int = client.getsockname()[1]
            if job is not None:
                self.record(job, src, sport)
            client.connect((str(LISTEN), self.port))
        except BaseException:
            client.close()
            raise
        return client, sport

    def accepted(self) -> dict[tuple[str, int], int]:
        """{client (address, port): index of the listener that accepted it}, draining every
        backlog."""
        out: dict[tuple[str, int], int] = {}
        for sock in self.socks:
            sock.setblocking(False)
        while True:
            ready, _, _ = select.select(self.socks, [], [], 0.2)
            if not ready:
                return out
            for sock in ready:
                with contextlib.suppress(BlockingIOError):
                    conn, peer = sock.accept()
                    conn.close()
                    assert peer not in out
                    out[peer] = self.socks.index(sock)


@pytest.fixture(params=[2, 3, 4], ids=lambda n: f"{n}workers")
def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bed]:
    workers: int = request.param
    spaces = Namespaces()
    proxy_fs = tmp_path / "proxy-bpffs"
    proxy_fs.mkdir()
    selector = rp.ReuseportSelector(
        state_dir=tmp_path / "state", workers=workers, flows_pin=proxy_fs / "px_flows"
    )
    flows_fd = -1
    socks: list[socket.socket] = []
    try:
        ns = spaces.create("rp")
        mount_bpffs(proxy_fs)
        create_flow_map(proxy_fs / "px_flows")
        flows_fd = bpf.obj_get(proxy_fs / "px_flows")
        selector.load()
        with in_netns(ns):
            socks = selector.listen(str(LISTEN), 0, transparent=False)
        yield Bed(ns, selector, flows_fd, socks)
    finally:
        for sock in socks:
            sock.close()
        if flows_fd >= 0:
            os.close(flows_fd)
        selector.close()
        umount_bpffs(proxy_fs)
        spaces.cleanup()
    assert not _mounted(selector.pin_dir)
    assert not selector.pin_dir.exists()


def jobs_covering(workers: int) -> list[uuid.UUID]:
    """Deterministic job ids, at least two per worker."""
    jobs: list[uuid.UUID] = []
    per_worker: dict[int, int] = defaultdict(int)
    i = 0
    while min(per_worker[w] for w in range(workers)) < 2:
        job = uuid.uuid5(uuid.NAMESPACE_URL, f"egressd-test-job-{i}")
        i += 1
        if per_worker[rp.worker_for(job, workers)] < 3:
            per_worker[rp.worker_for(job, workers)] += 1
            jobs.append(job)
    return jobs


def test_every_connection_of_a_job_lands_on_its_worker(bed: Bed) -> None:
    n = bed.selector.workers
    assert bed.selector.worker_cookies() == {
        i: rp.socket_cookie(sock) for i, sock in enumerate(bed.socks)
    }
    jobs = jobs_covering(n)
    # Each job from two sandbox addresses of its own (127.0.0.0/8 is all local here).
    sources = {job: [f"127.0.{j + 1}.{k + 2}" for k in range(2)] for j, job in enumerate(jobs)}
    job_of: dict[tuple[str, int], uuid.UUID] = {}
    clients: list[socket.socket] = []
    try:
        with in_netns(bed.ns):
            for _ in range(CONNECTIONS_PER_SOURCE):
                for job in jobs:
                    for src in sources[job]:
                        client, sport = bed.connect(src, job)
                        clients.append(client)
                        job_of[(src, sport)] = job
            landed = bed.accepted()
    finally:
        for client in clients:
            client.close()

    assert set(landed) == set(job_of)
    workers_of_job: dict[uuid.UUID, set[int]] = defaultdict(set)
    for peer, index in landed.items():
        workers_of_job[job_of[peer]].add(index)
    for job, used in workers_of_job.items():
        assert used == {rp.worker_for(job, n)}, job
    assert {index for used in workers_of_job.values() for index in used} == set(range(n))
    stats = bed.selector.stats()
    assert stats[rp.Stat.selected] == len(job_of) == len(jobs) * 2 * CONNECTIONS_PER_SOURCE
    assert sum(stats[s] for s in rp.Stat if s is not rp.Stat.selected) == 0


def test_a_connection_without_a_flow_is_refused_and_counted(bed: Bed) -> None:
    job = jobs_covering(bed.selector.workers)[0]
    with in_netns(bed.ns):
        for i in range(3):
            with pytest.raises(ConnectionRefusedError):
                bed.connect(f"127.9.0.{i + 2}", None)
        # The same source is served once its flow is recorded: no source-based fallback.
        client, sport = bed.connect("127.9.0.2", job)
        landed = bed.accepted()
        client.close()
    assert landed == {("127.9.0.2", sport): rp.worker_for(job, bed.selector.workers)}
    stats = bed.selector.stats()
    assert stats[rp.Stat.unknown_flow] == 3
    assert stats[rp.Stat.selected] == 1


def test_a_job_whose_worker_has_no_socket_is_refused_not_moved(bed: Bed) -> None:
    n = bed.selector.workers
    jobs = jobs_covering(n)
    gone = n - 1
    orphan = next(job for job in jobs if rp.worker_for(job, n) == gone)
    kept = next(job for job in jobs if rp.worker_for(job, n) != gone)
    bed.socks.pop(gone).close()  # the kernel empties its slot in rp_workers
    assert gone not in bed.selector.worker_cookies()
    with in_netns(bed.ns):
        with pytest.raises(ConnectionRefusedError):
            bed.connect("127.8.0.2", orphan)
        client, sport = bed.connect("127.8.0.3", kept)
        landed = bed.accepted()
        client.close()
    assert landed == {("127.8.0.3", sport): rp.worker_for(kept, n)}
    stats = bed.selector.stats()
    assert stats[rp.Stat.no_worker] == 1
    assert stats[rp.Stat.selected] == 1


def test_a_flow_map_of_another_shape_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    proxy_fs = tmp_path / "proxy-bpffs"
    proxy_fs.mkdir()
    selector = rp.ReuseportSelector(
        state_dir=tmp_path / "state", workers=2, flows_pin=proxy_fs / "px_flows"
    )
    mount_bpffs(proxy_fs)
    try:
        # libbpf adopts a pinned map whatever its shape: the selector's check refuses it.
        create_flow_map(proxy_fs / "px_flows", value_size=24)
        with pytest.raises(rp.ReuseportError) as err:
            selector.load()
        assert err.value.reason == "abi_mismatch"
        assert "px_flows" in err.value.detail
        assert not selector.loaded
        assert not _mounted(selector.pin_dir)
        with pytest.raises(rp.ReuseportError) as missing:
            rp.ReuseportSelector(
                state_dir=tmp_path / "state2", workers=2, flows_pin=proxy_fs / "absent"
            ).load()
        assert missing.value.reason == "load_failed"
    finally:
        selector.close()
        umount_bpffs(proxy_fs)


# --- through nftables TPROXY, as on a proxy host ------------------------------------------

SANDBOX = "10.77.0.2"
GATEWAY = "10.77.0.1"
SITE = "203.0.113.10"  # inside the test's namespaces only


@dataclass
class TproxyBed:
    proxy_ns: str
    client_ns: str
    bed: Bed


@pytest.fixture
def tproxy_bed(tmp_path: Path) -> Iterator[TproxyBed]:
    """A client namespace routing SITE to the proxy namespace over a veth; there nftables
    TPROXYs TCP to SITE:443 to the workers' transparent listeners on 127.0.0.1."""
    spaces = Namespaces()
    proxy_fs = tmp_path / "proxy-bpffs"
    proxy_fs.mkdir()
    selector = rp.ReuseportSelector(
        state_dir=tmp_path / "state", workers=2, flows_pin=proxy_fs / "px_flows"
    )
    flows_fd = -1
    socks: list[socket.socket] = []
    try:
        proxy_ns, client_ns = tproxy_namespaces(spaces, "rpp", "rpc")
        mount_bpffs(proxy_fs)
        create_flow_map(proxy_fs / "px_flows")
        flows_fd = bpf.obj_get(proxy_fs / "px_flows")
        selector.load()
        with in_netns(proxy_ns):
            socks = selector.listen(str(LISTEN), 0, transparent=True)
        port = socks[0].getsockname()[1]
        rules = tmp_path / "rules.nft"
        rules.write_text(
            "table inet rptest {\n"
            "  chain prerouting {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f'    iifname "c0" meta l4proto tcp tproxy ip to {LISTEN}:{port} '
            "meta mark set 1 accept\n"
            "  }\n"
            "}\n"
        )
        sh("ip", "netns", "exec", proxy_ns, "nft", "-f", str(rules))
        yield TproxyBed(proxy_ns, client_ns, Bed(proxy_ns, selector, flows_fd, socks))
    finally:
        for sock in socks:
            sock.close()
        if flows_fd >= 0:
            os.close(flows_fd)
        selector.close()
        umount_bpffs(proxy_fs)
        spaces.cleanup()


def test_tproxy_connections_are_selected_too(tproxy_bed: TproxyBed) -> None:
    """On TPROXY's listener lookup the packet starts at its IPv4 header, not at TCP's: the
    program reads both at the network header's offset, and selects exactly as before."""
    bed = tproxy_bed.bed
    jobs = jobs_covering(2)
    job_of: dict[tuple[str, int], uuid.UUID] = {}
    clients: list[socket.socket] = []
    try:
        with in_netns(tproxy_bed.client_ns):
            for _ in range(3):
                for job in jobs:
                    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    clients.append(client)
                    client.settimeout(5)
                    client.bind((SANDBOX, 0))
                    sport = client.getsockname()[1]
                    key = km.pack_flow_key(int(ipaddress.IPv4Address(SANDBOX)), sport,
                                           int(ipaddress.IPv4Address(SITE)), 443, 6)  # fmt: skip
                    bpf.map_update(bed.flows_fd, key, km.pack_flow(job, DIGEST, NODE))
                    client.connect((SITE, 443))
                    job_of[(SANDBOX, sport)] = job
            # No flow: the SYN finds no listener, is not TPROXYed and dies in routing.
            stray = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(stray)
            stray.settimeout(1.5)
            stray.bind((SANDBOX, 0))
            with pytest.raises(OSError):
                stray.connect((SITE, 443))
        with in_netns(tproxy_bed.proxy_ns):
            landed = bed.accepted()
    finally:
        for client in clients:
            client.close()
    assert set(landed) == set(job_of)
    for peer, index in landed.items():
        assert index == rp.worker_for(job_of[peer], 2), peer
    assert {landed[peer] for peer in landed} == {0, 1}
    stats = bed.selector.stats()
    assert stats[rp.Stat.selected] == len(job_of)
    assert stats[rp.Stat.unknown_flow] >= 1  # the SYN and any retransmission
    assert stats[rp.Stat.malformed] == 0


# --- UDP (the DNS listeners): a group of its own, through TPROXY -----------------------------

DNS_PORT = 53


@pytest.fixture
def udp_bed(tmp_path: Path) -> Iterator[TproxyBed]:
    """As `tproxy_bed`, for UDP: a client namespace sends datagrams to SITE:53; nftables
    TPROXYs them to the workers' UDP sockets on 127.0.0.1 (a selector instance of its own:
    a UDP group is not the TCP port's group)."""
    spaces = Namespaces()
    proxy_fs = tmp_path / "proxy-bpffs"
    proxy_fs.mkdir()
    selector = rp.ReuseportSelector(
        state_dir=tmp_path / "state",
        workers=2,
        flows_pin=proxy_fs / "px_flows",
        pin_name="reuseport-udp",
    )
    flows_fd = -1
    socks: list[socket.socket] = []
    try:
        proxy_ns, client_ns = tproxy_namespaces(spaces, "rpu", "rpv")
        mount_bpffs(proxy_fs)
        create_flow_map(proxy_fs / "px_flows")
        flows_fd = bpf.obj_get(proxy_fs / "px_flows")
        selector.load()
        assert selector.pin_dir == tmp_path / "state" / "reuseport-udp"
        with in_netns(proxy_ns):
            socks = selector.listen(str(LISTEN), 0, transparent=True, kind=socket.SOCK_DGRAM)
        port = socks[0].getsockname()[1]
        rules = tmp_path / "rules.nft"
        rules.write_text(
            "table inet rptest {\n"
            "  chain prerouting {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f'    iifname "c0" meta l4proto udp tproxy ip to {LISTEN}:{port} '
            "meta mark set 1 accept\n"
            "  }\n"
            "}\n"
        )
        sh("ip", "netns", "exec", proxy_ns, "nft", "-f", str(rules))
        yield TproxyBed(proxy_ns, client_ns, Bed(proxy_ns, selector, flows_fd, socks))
    finally:
        for sock in socks:
            sock.close()
        if flows_fd >= 0:
            os.close(flows_fd)
        selector.close()
        umount_bpffs(proxy_fs)
        spaces.cleanup()


def received(socks: list[socket.socket]) -> dict[tuple[str, int], set[int]]:
    """{sender: indexes of the sockets that got its datagrams}, draining every socket."""
    out: dict[tuple[str, int], set[int]] = defaultdict(set)
    for sock in socks:
        sock.setblocking(False)
    while True:
        ready, _, _ = select.select(socks, [], [], 0.3)
        if not ready:
            return dict(out)
        for sock in ready:
            with contextlib.suppress(BlockingIOError):
                _, peer = sock.recvfrom(512)
                out[peer].add(socks.index(sock))


def send_datagrams(
    bed: Bed, jobs: list[uuid.UUID], src: str, dst: str, port: int
) -> tuple[dict[tuple[str, int], uuid.UUID], tuple[str, int]]:
    """From `src` to dst:port: 3 datagrams from each of 4 source ports per job, their flows
    recorded first, and one from a port without a flow; ({sender: job}, the stray sender)."""
    job_of: dict[tuple[str, int], uuid.UUID] = {}
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            for job in jobs:
                client = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                client.bind((src, 0))
                sport = client.getsockname()[1]
                key = km.pack_flow_key(int(ipaddress.IPv4Address(src)), sport,
                                       int(ipaddress.IPv4Address(dst)), port, 17)  # fmt: skip
                bpf.map_update(bed.flows_fd, key, km.pack_flow(job, DIGEST, NODE))
                job_of[(src, sport)] = job
                for _ in range(3):
                    client.sendto(b"query", (dst, port))
        stray = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        stray.bind((src, 0))
        stray.sendto(b"query", (dst, port))
        return job_of, (src, stray.getsockname()[1])


def test_udp_datagrams_reach_their_jobs_worker_on_plain_delivery(udp_bed: TproxyBed) -> None:
    """A UDP group: delivered to 127.0.0.1 (the socket lookup has the packet), every datagram
    of a job reaches the socket `worker_for` names, one without a flow none."""
    bed = udp_bed.bed
    with in_netns(udp_bed.proxy_ns):
        job_of, stray = send_datagrams(bed, jobs_covering(2), "127.0.0.9", str(LISTEN), bed.port)
        landed = received(bed.socks)
    assert stray not in landed
    assert set(landed) == set(job_of)
    for peer, indexes in landed.items():
        assert indexes == {rp.worker_for(job_of[peer], 2)}, peer
    assert set().union(*landed.values()) == {0, 1}
    stats = bed.selector.stats()
    assert stats[rp.Stat.selected] == 3 * len(job_of)
    assert stats[rp.Stat.unknown_flow] == 1
    assert stats[rp.Stat.malformed] == 0


def test_tproxy_udp_is_spread_by_the_kernels_hash_not_the_program(udp_bed: TproxyBed) -> None:
    """The kernel fact the proxy's DNS steering rests on (docs/decisions.md, "Proxy
    workers"): nftables' UDP TPROXY looks the socket up without the packet
    (nf_tproxy_get_sock_v4 -> udp4_lib_lookup(..., skb=NULL)), and reuseport_select_sock
    runs no program without one: the group's hash picks the socket, flow or not. If a
    kernel ever runs the program here, this fails and the steering can go."""
    bed = udp_bed.bed
    with in_netns(udp_bed.client_ns):
        job_of, stray = send_datagrams(bed, jobs_covering(2), SANDBOX, SITE, DNS_PORT)
    with in_netns(udp_bed.proxy_ns):
        landed = received(bed.socks)
    assert stray in landed  # no flow, yet delivered: the program did not run
    assert set(landed) == {*job_of, stray}
    assert all(len(indexes) == 1 for indexes in landed.values())  # the hash is per 4-tuple
    assert sum(bed.selector.stats().values()) == 0
