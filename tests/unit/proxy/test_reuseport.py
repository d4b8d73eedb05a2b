"""egressd.proxy.reuseport, the pure half: the stat enum and maps against bpf/reuseport.c,
`worker_for` (the C hash; checked against the kernel on real sockets in
tests/integration/test_reuseport.py, as BPF_PROG_TEST_RUN has no SK_REUSEPORT), and the
bpftool command that reuses the proxy's pinned px_flows."""

from __future__ import annotations

import re
import struct
import uuid
from collections import Counter
from pathlib import Path

import pytest

import egressd
from egressd.ebpf import tc
from egressd.proxy import kernel_maps as km
from egressd.proxy import reuseport as rp

ROOT = Path(egressd.__file__).resolve().parents[1]
SOURCE = (ROOT / "bpf" / "reuseport.c").read_text()
HEADER = (ROOT / "bpf" / "px_flows.h").read_text()
PROXY = (ROOT / "bpf" / "proxy.c").read_text()


def test_the_stat_enum_is_the_c_enum() -> None:
    found = {
        name.lower(): int(value)
        for name, value in re.findall(r"^\tRP_([A-Z_]+) = (\d+),", SOURCE, re.MULTILINE)
        if name not in ("DROP_COUNT", "STAT_COUNT")
    }
    assert found == {s.name: int(s) for s in rp.Stat}
    assert f"RP_DROP_COUNT = {rp.DROP_COUNT}," in SOURCE
    assert f"RP_STAT_COUNT = {rp.STAT_COUNT}," in SOURCE
    assert all(s < rp.DROP_COUNT for s in rp.Stat if s is not rp.Stat.selected)


def test_every_map_of_the_object_has_a_spec() -> None:
    maps = re.findall(r"^\} ([a-z_]+) SEC\(\"\.maps\"\);", SOURCE + HEADER, re.MULTILINE)
    declared = set(maps)
    assert declared == set(rp.MAP_SIZES)
    assert f"#define RP_MAX_WORKERS {rp.MAX_WORKERS}\n" in SOURCE
    assert "struct rp_config {\n\t__u32 workers;" in SOURCE


def test_px_flows_is_declared_once_and_shared_with_the_proxy() -> None:
    for text in (SOURCE, PROXY):
        assert '#include "px_flows.h"' in text
        assert "struct px_flow_key {" not in text
        assert "} px_flows SEC(" not in text
    assert rp.MAP_SIZES["px_flows"] == km.MAP_SIZES["px_flows"]


def test_the_program_is_named_and_typed_as_the_loader_expects() -> None:
    assert 'SEC("sk_reuseport")\nint rp_select(' in SOURCE
    assert rp.PROG_NAME == "rp_select"


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"", 0x811C9DC5), (b"a", 0xE40C292C), (b"foobar", 0xBF9CF968)],  # FNV's test vectors
)
def test_fnv1a32_is_the_reference_hash(data: bytes, expected: int) -> None:
    assert rp.fnv1a32(data) == expected


def test_worker_for_hashes_the_16_bytes_of_the_job_id() -> None:
    job = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
    assert rp.worker_for(job, 1) == 0
    for n in (2, 3, 4, 7, 256):
        assert rp.worker_for(job, n) == rp.fnv1a32(job.bytes) % n
    assert rp.fnv1a32(job.bytes) != rp.fnv1a32(job.bytes[::-1])


def test_worker_for_spreads_jobs_over_the_workers() -> None:
    jobs = [uuid.uuid5(uuid.NAMESPACE_URL, f"job-{i}") for i in range(4000)]
    for n in (2, 3, 4):
        per_worker = Counter(rp.worker_for(job, n) for job in jobs)
        assert set(per_worker) == set(range(n))
        assert max(per_worker.values()) < 1.15 * len(jobs) / n, per_worker


@pytest.mark.parametrize("n", [0, -1, 257])
def test_a_worker_count_outside_1_to_256_is_refused(n: int) -> None:
    with pytest.raises(rp.ReuseportError) as err:
        rp.worker_for(uuid.uuid4(), n)
    assert err.value.reason == "bad_workers"
    with pytest.raises(rp.ReuseportError):
        rp.pack_config(n)
    with pytest.raises(rp.ReuseportError):
        rp.ReuseportSelector(state_dir=Path("/nonexistent"), workers=n, flows_pin=Path("/x"))


def test_config_is_the_worker_count() -> None:
    assert rp.pack_config(4) == struct.pack("=I", 4)  # struct rp_config, host order


def test_load_command_reuses_the_proxys_pinned_flow_map() -> None:
    cmd = tc.load_command(
        "bpftool",
        Path("/cache/reuseport.o"),
        Path("/state/reuseport-bpffs"),
        single=True,
        prog_type=rp.PROG_TYPE,
        reuse_maps={"px_flows": Path("/state/bpffs/maps/px_flows")},
    )
    assert cmd == [
        "bpftool", "prog", "load", "/cache/reuseport.o", "/state/reuseport-bpffs/prog",
        "type", "sk_reuseport", "map", "name", "px_flows", "pinned",
        "/state/bpffs/maps/px_flows", "pinmaps", "/state/reuseport-bpffs/maps",
    ]  # fmt: skip


def test_the_selector_must_be_loaded_before_it_listens() -> None:
    selector = rp.ReuseportSelector(state_dir=Path("/nonexistent"), workers=2, flows_pin=Path("/x"))
    with pytest.raises(rp.ReuseportError) as err:
        selector.listen("127.0.0.1", 0)
    assert err.value.reason == "not_loaded"
    with pytest.raises(rp.ReuseportError):
        selector.stats()
