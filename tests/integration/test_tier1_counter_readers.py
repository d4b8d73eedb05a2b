"""The two readers of tier 1's per-CPU counters give the same numbers from one real map:
`Tier1.counters` (the agent) and the load test's `floodio.tier1_counts` / `Tier1Probe` (a
second fd on the agent's pin), both through `egressd.agent.tier1.read_counters`. A reason
code this checkout does not know stops the agent (abi_mismatch) and is left out by the
load test's reader."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from egressd.agent.tier1 import Reason, Tier1Error
from egressd.ebpf import syscall as bpf
from egressd_harness.loadtest import floodio
from tests.support.tier1_bed import (
    API,
    OTHER_MAC,
    SBX_IP,
    SBX_MAC,
    Bed,
    expect_verdict,
    make_topology,
)

pytestmark = pytest.mark.root("ip", "tc", "bpftool", "clang", "/dev/net/tun")

UNKNOWN_CODE = len(Reason) + 40


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with ExitStack() as stack:
        bed = make_topology(stack, tmp_path_factory.mktemp("tier1_readers"))
        bed.program()
        yield bed


def _syn(src_mac: str, dst_mac: str) -> Ether:
    return (
        Ether(src=src_mac, dst=dst_mac)
        / IP(src=str(SBX_IP), dst=str(API))
        / TCP(sport=40000, dport=443, flags="S", seq=1)
    )


def _packets_on(bed: Bed, ifindex: int) -> dict[str, int]:
    return {str(r): c.packets for (i, r), c in bed.tier1.counters().items() if i == ifindex}


def test_load_test_reader_matches_the_agents_per_veth(bed: Bed) -> None:
    expect_verdict(bed, _syn(SBX_MAC, bed.h1_mac), Reason.REDIRECTED)
    expect_verdict(bed, _syn(OTHER_MAC, bed.h1_mac), Reason.NO_POLICY, ifindex=bed.h2, sock=bed.s2)
    h1 = floodio.tier1_counts(bed.tier1.pin_dir, bed.h1)
    h2 = floodio.tier1_counts(bed.tier1.pin_dir, bed.h2)
    assert h1 == _packets_on(bed, bed.h1)
    assert h2 == _packets_on(bed, bed.h2)
    assert h1["redirected"] >= 1 and "no_policy" not in h1
    assert h2["no_policy"] >= 1 and "redirected" not in h2
    probe = floodio.Tier1Probe(bed.tier1.pin_dir, bed.node, "h1")
    assert probe.read() == h1


def test_unknown_reason_code_stops_the_agent_and_is_skipped_by_the_load_test(bed: Bed) -> None:
    expect_verdict(bed, _syn(SBX_MAC, bed.h1_mac), Reason.REDIRECTED)
    known = _packets_on(bed, bed.h1)
    key = struct.pack("=II", bed.h1, UNKNOWN_CODE)
    fd = bpf.obj_get(bed.tier1.pin_dir / "maps" / "t1_counters")
    try:
        bpf.map_update(fd, key, bytes(bpf.percpu_value_size(16)))
        with pytest.raises(Tier1Error) as caught:
            bed.tier1.counters()
        assert caught.value.reason == "abi_mismatch"
        assert floodio.tier1_counts(bed.tier1.pin_dir, bed.h1) == known
    finally:
        bpf.map_delete(fd, key)
        os.close(fd)
    assert _packets_on(bed, bed.h1) == known


def test_probe_of_a_missing_pin_is_unreadable(bed: Bed) -> None:
    probe = floodio.Tier1Probe(bed.tier1.pin_dir / "absent", bed.node, "h1")
    assert probe.read() is None
