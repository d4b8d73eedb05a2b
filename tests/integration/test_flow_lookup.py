"""Tier 2's px_flows lookup (`kernel_maps.FlowReader`, through a worker's `PinnedFlows`) on a
real LRU hash map of px_flows' shape (bpftool map create, pinned in a bpffs the test mounts):
present, absent and unknown-node flows give what the one-off path (`bpf.map_lookup` +
`kernel_maps.unpack_flow`) gives, in every address form; a closed reader fails as a closed fd
does (logged, None); the decoded values kept stay bounded. The whole proxy's path
(`ProxyKernel.flow`, `KernelDatapath.lookup`) is in test_proxy_kernel_prog."""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from egressd.ebpf import syscall as bpf
from egressd.ebpf.build import mount_bpffs, umount_bpffs
from egressd.proxy import kernel_maps as km
from egressd.proxy.context import FlowInfo
from egressd.proxy.workers import PinnedFlows
from tests.support.tier1 import sh

pytestmark = pytest.mark.root("bpftool")

A = ipaddress.IPv4Address
SITE = A("203.0.113.10")
DIGEST = bytes(range(8))
NODES = {A("198.18.0.11"): "node1", A("198.18.0.12"): "node2"}
GONE = A("198.18.0.99")  # a node the registry no longer knows
JOBS = [uuid.UUID(int=i + 1) for i in range(6)]
# (sandbox, sport) -> (job, node): every job on both nodes, and one flow of the gone node.
FLOWS = {
    (A(f"100.96.1.{2 + i}"), 40000 + i): (JOBS[i % len(JOBS)], node)
    for i, node in enumerate([*NODES] * 6 + [GONE])
}


@pytest.fixture
def flows_pin(tmp_path: Path) -> Iterator[Path]:
    """A px_flows of the loader's shape, filled with FLOWS as px_ingress records them."""
    fs = tmp_path / "bpffs"
    fs.mkdir()
    mount_bpffs(fs)
    try:
        pin = fs / "px_flows"
        spec = km.MAP_SIZES["px_flows"]
        sh(
            "bpftool", "map", "create", str(pin), "type", "lru_hash",
            "key", str(spec.key_size), "value", str(spec.value_size),
            "entries", "1024", "name", "px_flows",
        )  # fmt: skip
        fd = bpf.obj_get(pin)
        try:
            for (src, sport), (job, node) in FLOWS.items():
                key = km.pack_flow_key(int(src), sport, int(SITE), 443, 6)
                bpf.map_update(fd, key, km.pack_flow(job, DIGEST, node))
        finally:
            os.close(fd)
        yield pin
    finally:
        umount_bpffs(fs)


def one_off(pin: Path, src: A, sport: int, dport: int, proto: int) -> FlowInfo | None:
    """The lookup as it was before `FlowReader`: fresh buffers, decoded every time."""
    fd = bpf.obj_get(pin, bpf.BPF_F_RDONLY)
    try:
        key = km.pack_flow_key(int(src), sport, int(SITE), dport, proto)
        raw = bpf.map_lookup(fd, key, km.MAP_SIZES["px_flows"].value_size)
    finally:
        os.close(fd)
    if raw is None:
        return None
    found = km.unpack_flow(raw)
    name = NODES.get(found.node)
    return None if name is None else FlowInfo(found.job_id, found.digest, name)


def test_pinned_flows_answer_as_the_one_off_lookup(flows_pin: Path) -> None:
    flows = PinnedFlows(flows_pin, NODES.get)
    try:
        present = 0
        for (src, sport), (job, node) in FLOWS.items():
            want = one_off(flows_pin, src, sport, 443, 6)
            assert want == (FlowInfo(job, DIGEST, NODES[node]) if node in NODES else None)
            present += want is not None
            for s, d in ((src, SITE), (str(src), str(SITE)), (int(src), int(SITE))):
                assert flows.lookup(s, sport, d, 443, 6) == want
            # Absent: another port, protocol or destination port.
            assert flows.lookup(src, sport + 1000, SITE, 443, 6) is None
            assert flows.lookup(src, sport, SITE, 443, 17) is None
            assert flows.lookup(src, sport, SITE, 80, 6) is None
            assert one_off(flows_pin, src, sport, 80, 6) is None
        assert present == len(FLOWS) - 1
    finally:
        flows.close()


def test_a_closed_pinned_flows_logs_and_finds_nothing(flows_pin: Path) -> None:
    flows = PinnedFlows(flows_pin, NODES.get)
    (src, sport), _ = next(iter(FLOWS.items()))
    assert flows.lookup(src, sport, SITE, 443, 6) is not None
    flows.close()
    with capture_logs() as logs:
        assert flows.lookup(src, sport, SITE, 443, 6) is None
    assert [(e["event"], e["reason"], e["detail"]) for e in logs] == [
        ("flow_lookup_failed", "map_failed", os.strerror(9))  # EBADF
    ]


def test_a_reader_keeps_at_most_its_bound_over_a_real_map(flows_pin: Path) -> None:
    fd = bpf.obj_get(flows_pin, bpf.BPF_F_RDONLY)
    try:
        reader = km.FlowReader(fd, max_values=4)
        for (src, sport), (job, node) in FLOWS.items():
            raw = reader.read(int(src), sport, int(SITE), 443, 6)
            assert raw is not None
            assert reader.flow(raw) == km.KernelFlow(job, DIGEST, node)
            assert len(reader) <= 4
        assert reader.read(int(SITE), 443, int(SITE), 443, 6) is None
    finally:
        os.close(fd)
