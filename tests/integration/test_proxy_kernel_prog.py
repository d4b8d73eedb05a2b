"""bpf/proxy.c's px_ingress, loaded by `ProxyKernel` and programmed by `KernelDatapath`,
run on crafted frames with BPF_PROG_TEST_RUN: every drop reason, the slow path, the fast
path's decapsulation, mark and flow entry; and `close` leaving no pin, mount or filter.

Each test has its own network namespace (``egd-t<hex>pk``, an underlay veth and a veth
standing in for the TUN, which is only needed to attach to), removed in the finalizer.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from egressd.ebpf import syscall as bpf
from egressd.geneve.codec import JobOption, encode
from egressd.policy.jws import VerifiedPolicy
from egressd.proxy import kernel_maps as km
from egressd.proxy.kernel import KernelDatapath, ProxyKernel
from egressd.proxy.registry import NodeEntry
from tests.support.bpf_test_run import TC_ACT_OK, TC_ACT_SHOT, Run, run_prog
from tests.support.proxy import JOB, NODE1, NODE2, OTHER_JOB, verified
from tests.support.tier1 import Namespaces, in_netns, sh
from tests.support.waits import wait_for

pytestmark = pytest.mark.root("ip", "tc", "clang", "bpftool")

PROXY = ipaddress.IPv4Address("198.18.0.21")
NODE = str(NODE1.underlay)
SANDBOX = "100.96.1.5"
SITE = "203.0.113.10"
UNKNOWN_JOB = uuid.UUID("9f9f9f9f-3333-4a9a-9f55-1f0c5ac1d3e2")
POLICY = verified(JOB, ("node1",))
OTHER = verified(OTHER_JOB, ("node2",))  # bound to node2 only


@dataclass
class Bed:
    ns: str
    kernel: ProxyKernel
    datapath: KernelDatapath
    prog_fd: int

    def run(self, frame: bytes) -> Run:
        return run_prog(self.prog_fd, frame)

    def stats(self) -> dict[km.Stat, int]:
        return self.kernel.stats()


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    spaces = Namespaces()
    kernel: ProxyKernel | None = None
    prog_fd = -1
    try:
        ns = spaces.create("pk")
        sh("ip", "-n", ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
        sh("ip", "-n", ns, "link", "add", "t0", "type", "veth", "peer", "name", "t1")
        for dev in ("u0", "u1", "t0", "t1"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "addr", "add", f"{PROXY}/24", "dev", "u0")
        kernel = ProxyKernel(
            state_dir=tmp_path / "kstate",
            underlay_ifname="u0",
            tun_ifname="t0",
            underlay=PROXY,
            port=6081,
            vni=1,
        )
        with in_netns(ns):
            kernel.load()
        policies: dict[uuid.UUID, VerifiedPolicy] = {JOB: POLICY, OTHER_JOB: OTHER}
        nodes: list[NodeEntry] = [NODE1, NODE2]
        datapath = KernelDatapath(kernel, nodes=lambda: nodes, cached=policies.get)
        datapath.sync()  # what `start` does first: the registry's nodes are in the maps
        prog_fd = bpf.obj_get(kernel.pin_dir / "progs" / "px_ingress")
        yield Bed(ns, kernel, datapath, prog_fd)
    finally:
        if prog_fd >= 0:
            os.close(prog_fd)
        if kernel is not None:
            with in_netns(ns):
                kernel.close()
        spaces.cleanup()


def option(job: uuid.UUID = JOB, digest: bytes | None = None) -> JobOption:
    if digest is None:
        digest = OTHER.digest if job == OTHER_JOB else POLICY.digest
    return JobOption(job.bytes, digest)


def syn(sport: int = 41000, *, src: str = SANDBOX, **ip: Any) -> bytes:
    return bytes(IP(src=src, dst=SITE, ttl=64, **ip) / TCP(sport=sport, dport=443, flags="S"))


def frame(payload: bytes, *, src: str = NODE, dport: int = 6081, **ip: Any) -> bytes:
    """An Ethernet frame with a UDP datagram from `src` to the proxy carrying `payload`."""
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=src, dst=str(PROXY), **ip)
        / UDP(sport=49999, dport=dport)
        / payload
    )


def geneve(inner: bytes, *, job: uuid.UUID = JOB, vni: int = 1) -> bytes:
    return encode(vni, option(job), inner)


def raw_geneve(options: bytes, inner: bytes, *, proto: int = 0x0800, first: int = -1) -> bytes:
    """A GENEVE header with `options` as given (for shapes `encode` refuses to build)."""
    b0 = len(options) // 4 if first < 0 else first
    return bytes([b0, 0]) + proto.to_bytes(2, "big") + b"\x00\x00\x01\x00" + options + inner


JOB_OPT = b"\xff\x01\x81\x06" + JOB.bytes + POLICY.digest


def program(bed: Bed, *jobs: uuid.UUID) -> None:
    """What the slow path does once it accepted a datagram of each job."""
    for job in jobs:
        policy = POLICY if job == JOB else OTHER
        bed.datapath.accepted(
            job, policy.digest, NODE1.underlay, (int(ipaddress.IPv4Address(SANDBOX)), 1, 1, 1, 6)
        )


def bad_outer_checksum() -> bytes:
    raw = bytearray(frame(geneve(syn())))
    raw[14 + 10] ^= 0xFF
    return bytes(raw)


def bad_inner_checksum() -> bytes:
    inner = bytearray(syn())
    inner[10] ^= 0xFF
    return frame(geneve(bytes(inner)))


DROPS: dict[str, bytes] = {
    "unknown_node": frame(geneve(syn()), src="198.18.0.99"),
    "truncated": frame(b"\x00\x01\x02"),
    "bad_version": frame(bytes([0x47]) + geneve(syn())[1:]),
    "options_past_end": frame(raw_geneve(b"", b"", first=10)),
    "bad_option_length": frame(raw_geneve(b"\xff\x01\x81\x05" + b"\x00" * 20, syn())),
    "unknown_critical_option": frame(raw_geneve(JOB_OPT + b"\x01\x02\x83\x00", syn())),
    "missing_job_option": frame(raw_geneve(b"\x01\x02\x03\x00", syn())),
    "duplicate_job_option": frame(raw_geneve(JOB_OPT + JOB_OPT, syn())),
    "unsupported_protocol": frame(raw_geneve(JOB_OPT, syn(), proto=0x86DD)),
    "inner_not_ipv4": frame(raw_geneve(JOB_OPT, b"\x60" + syn()[1:])),
    "inner_truncated": frame(raw_geneve(JOB_OPT, syn()[:10])),
    "inner_bad_checksum": bad_inner_checksum(),
    "bad_vni": frame(geneve(syn(), vni=2)),
    "source_outside_node_cidr": frame(geneve(syn(src="100.96.2.5"))),
    "proto_not_allowed": frame(geneve(bytes(IP(src=SANDBOX, dst=SITE, proto=1) / (b"\0" * 8)))),
    "fragmented": frame(geneve(syn(flags="MF"))),
    "malformed_l4": frame(geneve(bytes(IP(src=SANDBOX, dst=SITE, proto=6) / (b"\0" * 8)))),
    "job_not_bound_to_node": frame(geneve(syn(), job=OTHER_JOB)),
    "outer_bad_length": frame(geneve(syn()), len=2000),
    "outer_bad_checksum": bad_outer_checksum(),
}


@pytest.mark.parametrize("reason", sorted(DROPS))
def test_each_drop_reason_is_dropped_and_counted_once(bed: Bed, reason: str) -> None:
    program(bed, JOB, OTHER_JOB)
    before = bed.stats()
    result = bed.run(DROPS[reason])
    assert result.retval == TC_ACT_SHOT
    after = bed.stats()
    changed = {s: after[s] - before[s] for s in km.Stat if after[s] != before[s]}
    assert changed == {km.Stat[reason]: 1}


def test_every_kernel_drop_reason_has_a_crafted_packet() -> None:
    assert set(DROPS) | {"decap_failed"} == set(km.KERNEL_DROP_REASONS)


def test_an_unknown_job_goes_up_unchanged_then_the_fast_path_once_programmed(bed: Bed) -> None:
    datagram = frame(geneve(syn()))
    first = bed.run(datagram)
    assert (first.retval, first.data, first.mark) == (TC_ACT_OK, datagram, 0)
    assert bed.stats()[km.Stat.slow] == 1

    program(bed, JOB)
    second = bed.run(datagram)
    assert second.retval == TC_ACT_OK
    assert second.data[14:] == syn()  # the inner packet, right after the Ethernet header
    assert second.data[12:14] == b"\x08\x00"
    assert second.mark == 2
    stats = bed.stats()
    assert (stats[km.Stat.fast], stats[km.Stat.slow]) == (1, 1)
    flow = bed.kernel.flow(
        int(ipaddress.IPv4Address(SANDBOX)), 41000, int(ipaddress.IPv4Address(SITE)), 443, 6
    )
    assert flow == km.KernelFlow(JOB, POLICY.digest, NODE1.underlay)
    info = bed.datapath.lookup(SANDBOX, 41000, SITE, 443, 6)
    assert info is not None and (info.job_id, info.node) == (JOB, "node1")


def test_another_digest_goes_the_slow_path(bed: Bed) -> None:
    program(bed, JOB)
    result = bed.run(frame(encode(1, option(digest=b"\x01" * 8), syn())))
    assert result.retval == TC_ACT_OK and result.mark == 0
    assert bed.stats()[km.Stat.slow] == 1


def test_an_unknown_job_is_the_slow_path_even_when_others_are_programmed(bed: Bed) -> None:
    program(bed, JOB)
    result = bed.run(frame(geneve(syn(), job=UNKNOWN_JOB)))
    assert (result.retval, result.mark) == (TC_ACT_OK, 0)
    assert bed.stats()[km.Stat.slow] == 1


def test_outer_fragments_and_offload_options_go_up(bed: Bed) -> None:
    program(bed, JOB)
    assert bed.run(frame(geneve(syn()), flags="MF")).retval == TC_ACT_OK
    offload = b"\xff\x01\x02\x02" + b"\x00" * 8
    assert bed.run(frame(raw_geneve(JOB_OPT + offload, syn()))).mark == 0
    assert bed.stats()[km.Stat.slow] == 2


def test_other_traffic_passes_untouched_and_uncounted(bed: Bed) -> None:
    program(bed, JOB)
    for other in (frame(geneve(syn()), dport=9090), bytes(Ether() / IP(dst=str(PROXY)) / TCP())):
        result = bed.run(other)
        assert (result.retval, result.data) == (TC_ACT_OK, other)
    assert not any(bed.stats().values())


def test_a_revoked_policy_takes_its_job_out_of_the_fast_path(bed: Bed) -> None:
    policies: dict[uuid.UUID, VerifiedPolicy] = {JOB: POLICY}
    datapath = KernelDatapath(bed.kernel, nodes=lambda: [NODE1], cached=policies.get)
    datapath.accepted(JOB, POLICY.digest, NODE1.underlay, (1, 1, 1, 1, 6))
    assert bed.run(frame(geneve(syn()))).mark == 2
    del policies[JOB]
    datapath.policy_changed(JOB, POLICY, None)
    assert bed.run(frame(geneve(syn()))).mark == 0  # slow path: Python decides (denies)
    assert bed.kernel.entries("px_jobs") == {}
    assert bed.kernel.entries("px_bound") == {}


def test_close_leaves_no_filter_pin_or_mount(tmp_path: Path) -> None:
    spaces = Namespaces()
    try:
        ns = spaces.create("pc")
        sh("ip", "-n", ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
        sh("ip", "-n", ns, "link", "add", "t0", "type", "veth", "peer", "name", "t1")
        kernel = ProxyKernel(
            state_dir=tmp_path / "k",
            underlay_ifname="u0",
            tun_ifname="t0",
            underlay=PROXY,
            port=6081,
            vni=1,
        )
        with in_netns(ns):
            kernel.load()
            ids = set(kernel.prog_ids().values())
            assert "px_ingress" in sh(
                "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "u0", "ingress"
            )
            assert "px_egress" in sh(
                "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "t0", "egress"
            )
            kernel.close()
            kernel.close()  # idempotent
        for dev in ("u0", "t0"):
            assert "clsact" not in sh("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev)
        assert not (tmp_path / "k" / "bpffs").exists()
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            assert str(tmp_path / "k") not in fh.read()

        # The kernel frees a program after an RCU grace period: under load it may still be
        # listed for a moment after the last reference went.
        def freed() -> bool:
            shown = sh("bpftool", "prog", "show")
            return not any(f"{i}: sched_cls" in shown for i in ids)

        wait_for(
            freed,
            5.0,
            f"programs {sorted(ids)} to be freed",
        )
    finally:
        spaces.cleanup()
