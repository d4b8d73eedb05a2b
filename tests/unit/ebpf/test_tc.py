"""The pure parts of `egressd.ebpf.tc`: map and program shape checks, pin paths, the bpftool
command line (the kernel side is in tests/integration/test_tier1.py, test_node_kernel.py and
test_proxy_kernel_prog.py)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.build import EbpfError
from egressd.ebpf.tc import MapSpec

PIN = Path("/state/bpffs")


def info(
    map_type: int = bpf.BPF_MAP_TYPE_HASH, key: int = 4, value: int = 8, entries: int = 16
) -> bpf.MapInfo:
    return bpf.MapInfo(map_type, 7, key, value, entries, 0, "m")


def test_matching_map_is_no_mismatch() -> None:
    assert tc.map_mismatch(MapSpec("m", bpf.BPF_MAP_TYPE_HASH, 4, 8), info()) is None
    assert tc.map_mismatch(MapSpec("m", bpf.BPF_MAP_TYPE_HASH, 4, 8, 16), info()) is None


def test_without_max_entries_the_size_of_the_map_is_not_checked() -> None:
    assert tc.map_mismatch(MapSpec("m", bpf.BPF_MAP_TYPE_HASH, 4, 8), info(entries=99)) is None


@pytest.mark.parametrize(
    "found",
    [info(map_type=bpf.BPF_MAP_TYPE_ARRAY), info(key=8), info(value=4)],
)
def test_other_type_key_or_value_is_a_mismatch(found: bpf.MapInfo) -> None:
    why = tc.map_mismatch(MapSpec("t1_x", bpf.BPF_MAP_TYPE_HASH, 4, 8), found)
    assert why is not None
    assert why.startswith("t1_x: kernel (type, key, value) (")
    assert why.endswith(f"expected ({bpf.BPF_MAP_TYPE_HASH}, 4, 8)")


def test_other_max_entries_is_a_mismatch_when_the_spec_names_it() -> None:
    why = tc.map_mismatch(MapSpec("nd_x", bpf.BPF_MAP_TYPE_HASH, 4, 8, 32), info(entries=16))
    assert why == (
        f"nd_x: kernel (type, key, value, entries) ({bpf.BPF_MAP_TYPE_HASH}, 4, 8, 16), "
        f"expected ({bpf.BPF_MAP_TYPE_HASH}, 4, 8, 32)"
    )


def test_program_must_be_tc_and_carry_its_name_cut_to_15_bytes() -> None:
    sched_cls = bpf.BPF_PROG_TYPE_SCHED_CLS
    assert tc.prog_matches("px_ingress", bpf.ProgInfo(sched_cls, 1, "px_ingress"))
    assert tc.prog_matches("node_underlay_ingress", bpf.ProgInfo(sched_cls, 1, "node_underlay_i"))
    assert not tc.prog_matches("px_ingress", bpf.ProgInfo(sched_cls, 1, "px_egress"))
    assert not tc.prog_matches("px_ingress", bpf.ProgInfo(sched_cls + 1, 1, "px_ingress"))


def test_pin_paths_of_one_program_and_of_all() -> None:
    assert tc.prog_pin(PIN, "tier1_ingress", single=True) == PIN / "prog"
    assert tc.prog_pin(PIN, "px_egress", single=False) == PIN / "progs" / "px_egress"


def test_load_command_pins_the_maps_beside_the_programs() -> None:
    obj = Path("/cache/node.o")
    assert tc.load_command("/usr/sbin/bpftool", obj, PIN, single=True) == [
        "/usr/sbin/bpftool", "prog", "load", "/cache/node.o", "/state/bpffs/prog",
        "type", "classifier", "pinmaps", "/state/bpffs/maps",
    ]  # fmt: skip
    assert tc.load_command("bpftool", obj, PIN, single=False)[2:5] == [
        "loadall",
        "/cache/node.o",
        "/state/bpffs/progs",
    ]


def test_unpin_removes_every_layout_and_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "prog").write_bytes(b"")
    for folder in ("progs", "maps"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    tc.unpin(tmp_path)
    tc.unpin(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_unpin_failure_is_mount_failed(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "sub").mkdir()  # a pin is never a directory: unlink fails
    with pytest.raises(EbpfError) as caught:
        tc.unpin(tmp_path)
    assert caught.value.reason == "mount_failed"
    assert caught.value.detail.startswith(f"unpin {tmp_path}: ")


@pytest.mark.parametrize(
    ("call", "prefix"),
    [
        (lambda fd: tc.map_update(fd, "t1_x", b"k", b"v"), "update t1_x: "),
        (lambda fd: tc.map_delete(fd, "t1_x", b"k"), "delete t1_x: "),
        (lambda fd: tc.map_lookup(fd, "t1_x", b"k", 4), "lookup t1_x: "),
        (lambda fd: tc.map_keys(fd, "t1_x", 4), "keys of t1_x: "),
    ],
)
def test_a_failed_map_call_is_map_failed_and_names_the_map(
    call: Callable[[int], object], prefix: str
) -> None:
    fd = os.open("/dev/null", os.O_RDONLY)  # not a map: the kernel refuses it
    try:
        with pytest.raises(EbpfError) as caught:
            call(fd)
    finally:
        os.close(fd)
    assert caught.value.reason == "map_failed"
    assert caught.value.detail.startswith(prefix)


def test_percpu_values_are_summed_field_by_field_over_8_byte_aligned_slots() -> None:
    u64 = struct.Struct("=Q")
    assert tc.sum_percpu(struct.pack("=QQQ", 1, 2, 3), u64, 3) == (6,)
    count = struct.Struct("=QQ")
    raw = count.pack(1, 60) + count.pack(2, 120) + count.pack(100, 100)
    assert tc.sum_percpu(raw, count, 2) == (3, 180)  # only the first `cpus` slots
    odd = struct.Struct("=II4x")  # 12 bytes: each CPU's slot is rounded up to 16
    raw = struct.pack("=II8x", 1, 2) + struct.pack("=II8x", 10, 20)
    assert tc.sum_percpu(raw, odd, 2) == (11, 22)
