"""egressd.proxy.kernel_maps: the map encodings against bpf/proxy.c, and what the maps should
hold for given policies and nodes (pure; the kernel side is tests/integration/test_proxy_kernel*)."""

from __future__ import annotations

import errno
import ipaddress
import re
import struct
import uuid
from importlib import resources
from pathlib import Path

import pytest

import egressd
from egressd.proxy import kernel_maps as km
from egressd.proxy.context import FlowInfo
from egressd.proxy.endpoint import ENDPOINT_REASONS
from egressd.proxy.kernel import DEFAULT_SOURCE
from egressd.proxy.tunnel import RX_DROP_REASONS

ROOT = Path(egressd.__file__).resolve().parents[1]
# proxy.c and the header it shares px_flows through (with bpf/reuseport.c).
SOURCE = (ROOT / "bpf" / "proxy.c").read_text() + (ROOT / "bpf" / "px_flows.h").read_text()
A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
OTHER = uuid.UUID("7d1b0e0a-1111-4a9a-9f55-1f0c5ac1d3e2")
DIGEST = bytes(range(8))
NODE1 = km.NodeFacts("node1", A("198.18.0.11"), N("100.96.1.0/24"))
NODE2 = km.NodeFacts("node2", A("198.18.0.12"), N("100.96.2.0/24"))


def test_the_stat_enum_is_the_c_enum() -> None:
    found = {
        name.lower(): int(value)
        for name, value in re.findall(r"^\tPX_([A-Z0-9_]+) = (\d+),", SOURCE, re.MULTILINE)
        if name not in ("DROP_COUNT", "STAT_COUNT")
    }
    expected = {("ret" if s.name == "ret" else s.name): int(s) for s in km.Stat}
    expected["return"] = expected.pop("ret")
    assert found == expected
    assert f"PX_DROP_COUNT = {km.DROP_COUNT}," in SOURCE
    assert f"PX_STAT_COUNT = {km.STAT_COUNT}," in SOURCE


def test_every_kernel_drop_reason_is_a_python_reason_or_a_kernel_only_one() -> None:
    for reason in km.KERNEL_DROP_REASONS:
        assert reason in ENDPOINT_REASONS or reason in km.KERNEL_ONLY_REASONS, reason
        assert reason in RX_DROP_REASONS, reason  # pre-registered in the metric
    # Python's endpoint decides the offload option's reasons; the kernel sends those up.
    assert set(ENDPOINT_REASONS) - set(km.KERNEL_DROP_REASONS) == {
        "bad_offload_option",
        "offload_disabled",
    }


@pytest.mark.parametrize(
    ("struct_name", "size"),
    [
        ("px_config", 20),
        ("px_node", 8),
        ("px_job_key", 24),
        ("px_job", 8),
        ("px_bound_key", 20),
        ("px_flow_key", 16),
        ("px_flow", 32),
        ("px_sandbox_key", 8),
    ],
)
def test_struct_sizes_match_the_map_specs(struct_name: str, size: int) -> None:
    assert f"struct {struct_name} {{" in SOURCE
    specs = {spec.name: spec for spec in km.MAPS}
    by_struct = {
        "px_config": specs["px_config"].value_size,
        "px_node": specs["px_nodes"].value_size,
        "px_job_key": specs["px_jobs"].key_size,
        "px_job": specs["px_jobs"].value_size,
        "px_bound_key": specs["px_bound"].key_size,
        "px_flow_key": specs["px_flows"].key_size,
        "px_flow": specs["px_flows"].value_size,
        "px_sandbox_key": specs["px_sandboxes"].key_size,
    }
    assert by_struct[struct_name] == size


def test_every_map_in_the_source_has_a_spec() -> None:
    declared = set(re.findall(r"^\} (px_[a-z_]+) SEC\(\"\.maps\"\);", SOURCE, re.MULTILINE))
    assert declared == {spec.name for spec in km.MAPS}


def test_flow_key_is_network_order_as_read_from_the_packet() -> None:
    key = km.pack_flow_key(int(A("100.96.1.5")), 41000, int(A("203.0.113.10")), 443, 6)
    assert key == (
        A("100.96.1.5").packed
        + A("203.0.113.10").packed
        + (41000).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
        + b"\x06\x00\x00\x00"
    )


def test_flow_value_round_trips() -> None:
    raw = km.pack_flow(JOB, DIGEST, A("198.18.0.11"))
    assert len(raw) == 32
    assert raw[:16] == JOB.bytes and raw[16:24] == DIGEST and raw[24:28] == bytes([198, 18, 0, 11])
    assert km.unpack_flow(raw) == km.KernelFlow(JOB, DIGEST, A("198.18.0.11"))


@pytest.mark.parametrize("form", [int, str, A], ids=["int", "str", "IPv4Address"])
def test_ip_int_takes_every_address_form(form: type) -> None:
    assert km.ip_int(form(A("100.96.1.5"))) == int(A("100.96.1.5")) == 0x64600105


@pytest.mark.parametrize("bad", ["100.96.1", "not an address", "100.96.1.256"])
def test_ip_int_refuses_what_is_no_address(bad: str) -> None:
    with pytest.raises(ipaddress.AddressValueError):
        km.ip_int(bad)


def values(n: int) -> list[bytes]:
    """`n` distinct px_flows values: n jobs on NODE1."""
    return [km.pack_flow(uuid.UUID(int=i + 1), DIGEST, NODE1.underlay) for i in range(n)]


# A reader on no map (fd -1): decoding needs none; `read` fails as on a closed fd.
def test_a_reader_decodes_as_unpack_flow_and_hands_out_the_same_object_again() -> None:
    reader = km.FlowReader(-1)
    raw = values(1)[0]
    first = reader.flow(raw)
    assert first == km.unpack_flow(raw)
    assert reader.flow(bytes(raw)) is first  # an equal value read again: nothing decoded
    assert len(reader) == 1


def test_a_readers_kept_values_stay_bounded() -> None:
    reader = km.FlowReader(-1, max_values=3)
    for raw in values(10):
        assert reader.flow(raw) == km.unpack_flow(raw)
        assert len(reader) <= 3
    with pytest.raises(ValueError, match="positive"):
        km.FlowReader(-1, max_values=0)


def test_a_readers_info_asks_for_the_node_name_every_time() -> None:
    reader = km.FlowReader(-1)
    raw = values(1)[0]
    names = {NODE1.underlay: "node1"}
    info = reader.info(raw, names.get)
    assert info == FlowInfo(uuid.UUID(int=1), DIGEST, "node1")
    assert reader.info(raw, names.get) is info
    names[NODE1.underlay] = "renamed"
    assert reader.info(raw, names.get) == FlowInfo(uuid.UUID(int=1), DIGEST, "renamed")
    del names[NODE1.underlay]  # the node left the registry: its flows no longer count
    assert reader.info(raw, names.get) is None


def test_a_reader_on_a_bad_fd_raises_the_kernels_errno() -> None:
    with pytest.raises(OSError) as err:
        km.FlowReader(-1).read(int(A("100.96.1.5")), 41000, int(A("203.0.113.10")), 443, 6)
    assert err.value.errno == errno.EBADF


def test_config_port_is_big_endian_in_memory() -> None:
    raw = km.pack_config(underlay=A("198.18.0.21"), port=6081, vni=1, mark=2, ifindex=7)
    assert raw[:4] == A("198.18.0.21").packed
    assert raw[4:6] == (6081).to_bytes(2, "big")
    assert struct.unpack_from("=III", raw, 8) == (1, 2, 7)


def test_lpm_key_is_prefix_length_then_network_order_address() -> None:
    assert km.pack_sandbox_key(N("100.96.1.0/24")) == struct.pack("=I", 24) + bytes([100, 96, 1, 0])
    assert km.pack_sandbox_key(N("100.96.0.0/16"))[:4] == struct.pack("=I", 16)


def test_job_and_bound_keys() -> None:
    assert km.pack_job_key(JOB, DIGEST) == JOB.bytes + DIGEST
    assert km.unpack_job_key(km.pack_job_key(JOB, DIGEST)) == (JOB, DIGEST)
    assert km.unpack_bound_key(km.pack_bound_key(JOB, A("198.18.0.11"))) == (
        JOB,
        A("198.18.0.11"),
    )
    with pytest.raises(ValueError, match="digest"):
        km.pack_job_key(JOB, b"short")


def test_desired_nodes_fill_both_indexes() -> None:
    by_underlay, by_cidr = km.desired_nodes([NODE1, NODE2])
    assert by_underlay == {
        A("198.18.0.11").packed: A("100.96.1.0").packed + A("255.255.255.0").packed,
        A("198.18.0.12").packed: A("100.96.2.0").packed + A("255.255.255.0").packed,
    }
    assert by_cidr[km.pack_sandbox_key(N("100.96.2.0/24"))] == A("198.18.0.12").packed


def test_desired_jobs_bind_only_registered_nodes_until_exp() -> None:
    jobs = [
        km.JobFacts(JOB, DIGEST, frozenset({"node1", "node9"}), exp=1000.0),
        km.JobFacts(OTHER, DIGEST, frozenset({"node2"}), exp=50.0),  # expired
        km.JobFacts(uuid.uuid4(), DIGEST, frozenset({"node1"}), exp=None),
    ]
    entries, bound = km.desired_jobs(jobs, [NODE1, NODE2], wall_now=100.0, boot_offset_ns=-7)
    assert entries == {km.pack_job_key(JOB, DIGEST): km.pack_job(1000 * 10**9 - 7)}
    assert bound == {km.pack_bound_key(JOB, NODE1.underlay): km.BOUND_VALUE}


def test_desired_jobs_are_stable_for_an_unchanged_policy() -> None:
    job = [km.JobFacts(JOB, DIGEST, frozenset({"node1"}), exp=1000.0)]
    first = km.desired_jobs(job, [NODE1], wall_now=100.0, boot_offset_ns=5)
    assert km.desired_jobs(job, [NODE1], wall_now=200.0, boot_offset_ns=5) == first


def test_diff_writes_changes_and_deletes_leftovers() -> None:
    change = km.diff({b"a": b"1", b"b": b"2", b"c": b"3"}, {b"a": b"1", b"b": b"9", b"d": b"4"})
    assert change.put == {b"b": b"9", b"d": b"4"}
    assert change.delete == {b"c"}


def test_proxy_source_is_package_data_with_the_checkouts_content() -> None:
    found = resources.files("egressd.proxy").joinpath("bpf", "proxy.c")
    assert found.read_bytes() == (ROOT / "bpf" / "proxy.c").read_bytes()
    header = resources.files("egressd.proxy").joinpath("bpf", "px_flows.h")
    assert header.read_bytes() == (ROOT / "bpf" / "px_flows.h").read_bytes()
    assert Path(str(found)) == DEFAULT_SOURCE
