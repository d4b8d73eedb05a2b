"""`egressd.agent.tier1.read_counters`, the one reader of t1_counters (the agent's
`Tier1.counters` and the load test's `floodio.tier1_counts`), over a map faked at the
`egressd.ebpf.tc` edge; the real map is tests/integration/test_tier1_counter_readers.py."""

from __future__ import annotations

import os
import struct

import pytest

from egressd.agent import tier1
from egressd.agent.tier1 import Count, Reason, Tier1Error, read_counters
from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.build import EbpfError

CPUS = 3
UNKNOWN = struct.pack("=II", 7, len(Reason) + 40)


def _key(ifindex: int, reason: Reason) -> bytes:
    return struct.pack("=II", ifindex, reason.code)


def _percpu(*slots: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("=QQ", p, b) for p, b in slots)


@pytest.fixture
def fake_map(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, bytes | None]:
    """The t1_counters map as {key: per-CPU value}; None: gone between listing and lookup."""
    entries: dict[bytes, bytes | None] = {}
    monkeypatch.setattr(bpf, "possible_cpus", lambda: CPUS)

    def keys(fd: int, name: str, key_size: int) -> list[bytes]:
        assert (fd, name, key_size) == (9, "t1_counters", 8)
        return list(entries)

    def lookup(fd: int, name: str, key: bytes, size: int) -> bytes | None:
        assert (fd, name, size) == (9, "t1_counters", 16 * CPUS)
        return entries[key]

    monkeypatch.setattr(tc, "map_keys", keys)
    monkeypatch.setattr(tc, "map_lookup", lookup)
    return entries


def test_counts_are_summed_over_cpus_by_veth_and_reason(
    fake_map: dict[bytes, bytes | None],
) -> None:
    fake_map[_key(7, Reason.REDIRECTED)] = _percpu((1, 60), (2, 120), (0, 0))
    fake_map[_key(8, Reason.NO_POLICY)] = _percpu((0, 0), (0, 0), (5, 300))
    fake_map[_key(7, Reason.SYN_RATE_LIMIT)] = None
    assert read_counters(9) == {
        (7, Reason.REDIRECTED): Count(3, 180),
        (8, Reason.NO_POLICY): Count(5, 300),
    }


def test_unknown_reason_is_abi_mismatch_unless_skipped(fake_map: dict[bytes, bytes | None]) -> None:
    fake_map[_key(7, Reason.REDIRECTED)] = _percpu((1, 60), (0, 0), (0, 0))
    fake_map[UNKNOWN] = _percpu((4, 4), (0, 0), (0, 0))
    with pytest.raises(Tier1Error) as caught:
        read_counters(9)
    assert caught.value.reason == "abi_mismatch"
    assert read_counters(9, skip_unknown=True) == {(7, Reason.REDIRECTED): Count(1, 60)}


def test_unknown_reason_already_gone_is_no_error(fake_map: dict[bytes, bytes | None]) -> None:
    fake_map[UNKNOWN] = None
    assert read_counters(9) == {}


def test_a_failed_map_call_is_map_failed() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)  # not a map: the kernel refuses it
    try:
        with pytest.raises(EbpfError) as caught:
            tier1.read_counters(fd)
    finally:
        os.close(fd)
    assert caught.value.reason == "map_failed"
    assert caught.value.detail.startswith("keys of t1_counters: ")
