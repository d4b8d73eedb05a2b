"""Tier 1 map encodings (pure) and the reason table against bpf/tier1.c's enum."""

from __future__ import annotations

import ipaddress
import re
import struct

import pytest

from egressd.agent.tier1 import DEFAULT_SOURCE
from egressd.agent.tier1_maps import (
    MAPS,
    MIN_BURST,
    NS_PER_S,
    PORT_BITMAP_BYTES,
    SANDBOX_VALUE_SIZE,
    Bucket,
    DeniedRange,
    PortSpec,
    Reason,
    Tier1Error,
    Verdict,
    bitmap_ranges,
    denied_ranges,
    mac_bytes,
    normalize_denied,
    pack_config,
    pack_counter_key,
    pack_denied_key,
    pack_denied_value,
    pack_exempt_key,
    pack_sandbox,
    port_bitmap,
    unpack_counter_key,
    unpack_denied,
    unpack_exempt_key,
    unpack_sandbox,
)
from egressd.errors import EgressdError
from egressd.layout import RESOLVER, default_layout
from egressd.policy.model import PortRange

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
SOURCE = DEFAULT_SOURCE.read_text()
DNS = Bucket.per_second(50)
SYN = Bucket.per_second(200)


def _c_enum(name: str) -> dict[str, int]:
    body = re.search(r"enum\s+" + name + r"\s*\{(.*?)\};", SOURCE, re.DOTALL)
    assert body is not None, f"enum {name} not found in {DEFAULT_SOURCE}"
    return {m[1]: int(m[2]) for m in re.finditer(r"T1_(\w+)\s*=\s*(\d+)\s*,", body[1])}


def _c_define(name: str) -> str:
    found = re.search(r"#define\s+" + name + r"\s+(.+)", SOURCE)
    assert found is not None, name
    return found[1].strip()


def _c_struct(name: str) -> str:
    found = re.search(r"struct\s+" + name + r"\s*\{(.*?)\};", SOURCE, re.DOTALL)
    assert found is not None, name
    return re.sub(r"/\*.*?\*/", "", found[1], flags=re.DOTALL)


# -- the reason table ---------------------------------------------------------


def test_reason_table_matches_c_enum() -> None:
    c_enum = _c_enum("t1_reason")
    count = c_enum.pop("REASON_COUNT")
    assert c_enum == {r.name: r.code for r in Reason}
    assert count == len(Reason)
    assert sorted(c_enum.values()) == list(range(count))


def test_reason_labels_and_verdicts() -> None:
    assert Reason.REDIRECTED.verdict is Verdict.REDIRECT
    assert Reason.ARP.verdict is Verdict.PASS
    drops = {r for r in Reason if r.verdict is Verdict.DROP}
    assert drops == set(Reason) - {Reason.REDIRECTED, Reason.ARP}
    for reason in Reason:
        assert reason.value == reason.name.lower()
        assert Reason.from_code(reason.code) is reason
    with pytest.raises(Tier1Error) as info:
        Reason.from_code(len(Reason))
    assert info.value.reason == "abi_mismatch"
    assert isinstance(info.value, EgressdError)


def test_c_constants_match() -> None:
    assert _c_define("T1_PORT_BITMAP_BYTES") == "(65536 / 8)"
    assert PORT_BITMAP_BYTES == 65536 // 8
    assert _c_define("T1_DNS_PORT") == "53"
    assert _c_define("T1_DENIED_OVERRIDABLE") == "1u"


@pytest.mark.parametrize(
    ("struct_name", "fields"),
    [
        ("t1_config", ["tun_ifindex", "resolver"]),
        (
            "t1_sandbox",
            ["ip", "mac", "reserved", "pad", "dns", "syn", "events", "suppressed", "tcp_ports"],
        ),
        (
            "t1_event",
            ["ts_ns", "ifindex", "reason", "daddr", "dport", "proto", "flags", "suppressed", "pad"],
        ),
        ("t1_bucket", ["cost_ns", "depth_ns", "tat_ns"]),
        ("t1_denied_key", ["prefixlen", "addr"]),
        ("t1_denied", ["reason", "flags"]),
        ("t1_exempt_key", ["prefixlen", "ifindex", "addr"]),
        ("t1_counter_key", ["ifindex", "reason"]),
        ("t1_counter", ["packets", "bytes"]),
    ],
)
def test_c_struct_field_order(struct_name: str, fields: list[str]) -> None:
    body = _c_struct(struct_name)
    names = [re.sub(r"\[.*", "", decl.split()[-1]) for decl in body.split(";") if decl.strip()]
    assert names == fields


def test_map_specs_cover_the_c_maps() -> None:
    c_maps = set(re.findall(r"\}\s*(t1_\w+)\s+SEC\(\"\.maps\"\)", SOURCE))
    assert c_maps == {spec.name for spec in MAPS}


# -- encodings ------------------------------------------------------------------


def test_config_golden() -> None:
    assert pack_config(7, RESOLVER) == struct.pack("=I", 7) + bytes([100, 100, 100, 53])


def test_sandbox_golden_head_buckets_and_size() -> None:
    raw = pack_sandbox(A("100.96.1.2"), "02:00:00:00:01:02", [443], dns=DNS, syn=SYN)
    assert len(raw) == SANDBOX_VALUE_SIZE == 16 + 3 * 24 + 8 + 8192
    assert raw[:16] == bytes([100, 96, 1, 2, 2, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0])
    assert raw[16:40] == struct.pack("=QQQ", 20_000_000, 50 * 20_000_000, 0)
    assert raw[40:64] == struct.pack("=QQQ", 5_000_000, 200 * 5_000_000, 0)
    # The event bucket: 5 a second after a burst of 20; nothing suppressed yet.
    assert raw[64:88] == struct.pack("=QQQ", 200_000_000, 20 * 200_000_000, 0)
    assert raw[88:96] == bytes(8)
    bitmap = raw[96:]
    assert bitmap[443 >> 3] == 1 << (443 & 7)
    assert sum(bitmap) == bitmap[443 >> 3]


def test_sandbox_roundtrip_with_policy_port_ranges() -> None:
    ports: list[PortSpec] = [
        PortRange(443, 443),
        PortRange(80, 80),
        PortRange(8000, 8010),
        22,
        (1000, 2000),
    ]
    raw = pack_sandbox(A("100.96.1.9"), b"\x02\x00\x00\x00\x00\x09", ports, dns=DNS, syn=SYN)
    entry = unpack_sandbox(raw)
    assert entry.ip == A("100.96.1.9")
    assert entry.mac == b"\x02\x00\x00\x00\x00\x09"
    assert entry.tcp_ports == ((22, 22), (80, 80), (443, 443), (1000, 2000), (8000, 8010))
    assert (entry.dns, entry.syn) == (DNS, SYN)


def test_unpack_sandbox_ignores_bucket_state() -> None:
    raw = bytearray(pack_sandbox(A("100.96.1.9"), "02:00:00:00:00:09", [443], dns=DNS, syn=SYN))
    raw[32:40] = struct.pack("=Q", 123_456_789)  # the kernel's dns tat_ns
    raw[56:64] = struct.pack("=Q", 987_654_321)  # and syn's
    assert unpack_sandbox(bytes(raw)) == unpack_sandbox(
        pack_sandbox(A("100.96.1.9"), "02:00:00:00:00:09", [443], dns=DNS, syn=SYN)
    )


# -- token buckets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "cost", "burst"),
    [
        (1, NS_PER_S, MIN_BURST),
        (3, 333_333_334, MIN_BURST),  # rounded up: never more than the rate
        (10, 100_000_000, 10),
        (50, 20_000_000, 50),
        (200, 5_000_000, 200),
        (7_000, 142_858, 7_000),
        (100_000, 10_000, 100_000),
    ],
)
def test_bucket_per_second(rate: int, cost: int, burst: int) -> None:
    bucket = Bucket.per_second(rate)
    assert (bucket.cost_ns, bucket.depth_ns, bucket.burst) == (cost, burst * cost, burst)
    assert bucket.rate_per_s <= rate
    assert bucket.rate_per_s > rate * 0.9999


def test_bucket_min_burst_is_a_parameter() -> None:
    assert Bucket.per_second(2, min_burst=1).burst == 2
    assert Bucket.per_second(2, min_burst=5).burst == 5


@pytest.mark.parametrize("rate", [0, -1, 1_000_001, True, 1.5, "50", None])
def test_bucket_bad_rate(rate: object) -> None:
    with pytest.raises(Tier1Error) as info:
        Bucket.per_second(rate)  # type: ignore[arg-type]
    assert info.value.reason == "bad_rate"


@pytest.mark.parametrize(
    ("cost", "depth"),
    [(0, 10), (10, 0), (999, 10_000), (NS_PER_S + 1, 2 * NS_PER_S), (1000, 999), (1000, 1 << 62)],
)
def test_bucket_bad_encoding(cost: int, depth: int) -> None:
    with pytest.raises(Tier1Error) as info:
        Bucket(cost, depth)
    assert info.value.reason == "bad_rate"


def test_pack_sandbox_needs_buckets() -> None:
    with pytest.raises(Tier1Error) as info:
        pack_sandbox(
            A("100.96.1.9"),
            "02:00:00:00:00:09",
            [443],
            dns=50,  # type: ignore[arg-type]
            syn=SYN,
        )
    assert info.value.reason == "bad_rate"


def _gcra(bucket: Bucket, arrivals_ns: list[int]) -> list[bool]:
    """bpf/tier1.c's take_token, one CPU: the model the integration tests count against."""
    tat, out = 0, []
    for now in arrivals_ns:
        nxt = max(tat, now) + bucket.cost_ns
        ok = nxt - now <= bucket.depth_ns
        if ok:
            tat = nxt
        out.append(ok)
    return out


def test_gcra_model_burst_then_rate() -> None:
    bucket = Bucket.per_second(100)
    start = 10 * NS_PER_S
    # 1000 packets in 1 s, evenly: the burst plus 100/s (the first of each cost passes).
    passed = sum(_gcra(bucket, [start + i * 1_000_000 for i in range(1000)]))
    assert 199 <= passed <= 201
    # Spaced at the rate: all pass, forever.
    assert all(_gcra(bucket, [start + i * bucket.cost_ns for i in range(5000)]))
    # At once: exactly the burst.
    assert sum(_gcra(bucket, [start] * 500)) == 100


@pytest.mark.parametrize(
    "ports",
    [[], [0], [65535], [(0, 65535)], [(1, 65535)], [1, 3, 5, (7, 9)], [(8, 15), (16, 23)]],
)
def test_port_bitmap_matches_bit_rule(ports: list[int | tuple[int, int]]) -> None:
    bitmap = port_bitmap(ports)
    want: set[int] = set()
    for spec in ports:
        lo, hi = (spec, spec) if isinstance(spec, int) else spec
        want.update(range(lo, hi + 1))
    got = {p for p in range(65536) if bitmap[p >> 3] & (1 << (p & 7))}
    assert got == want
    assert {p for lo, hi in bitmap_ranges(bitmap) for p in range(lo, hi + 1)} == want


@pytest.mark.parametrize("bad", [-1, 65536, (10, 5), (1, 70000), True, "443", (1, 2, 3), 4.0])
def test_bad_ports_rejected(bad: object) -> None:
    with pytest.raises(Tier1Error) as info:
        port_bitmap([bad])  # type: ignore[list-item]
    assert info.value.reason == "bad_port"


@pytest.mark.parametrize("bad", ["02:00:00:00:01", "zz:00:00:00:00:00", b"\x01" * 7, ""])
def test_bad_mac_rejected(bad: str | bytes) -> None:
    with pytest.raises(Tier1Error) as info:
        mac_bytes(bad)
    assert info.value.reason == "bad_sandbox"


def test_mac_forms() -> None:
    assert (
        mac_bytes("02-AB-00-00-00-01")
        == mac_bytes("02:ab:00:00:00:01")
        == bytes.fromhex("02ab00000001")
    )


def test_denied_key_and_value_golden() -> None:
    entry = DeniedRange(N("169.254.0.0/16"), Reason.DENIED_RANGE, True)
    key, value = pack_denied_key(entry.network), pack_denied_value(entry)
    assert key == struct.pack("=I", 16) + bytes([169, 254, 0, 0])
    assert value == struct.pack("=II", Reason.DENIED_RANGE.code, 1)
    assert unpack_denied(key, value) == entry
    fleet = DeniedRange(N("198.18.0.0/24"), Reason.FLEET_RANGE)
    assert pack_denied_value(fleet) == struct.pack("=II", Reason.FLEET_RANGE.code, 0)


def test_exempt_key_golden_and_roundtrip() -> None:
    key = pack_exempt_key(12, N("10.1.2.0/24"))
    assert key == struct.pack("=II", 56, 12) + bytes([10, 1, 2, 0])
    assert unpack_exempt_key(key) == (12, N("10.1.2.0/24"))


def test_counter_key_and_percpu_sum() -> None:
    key = pack_counter_key(5, Reason.PORT_NOT_ALLOWED)
    assert key == struct.pack("=II", 5, 14)
    assert unpack_counter_key(key) == (5, Reason.PORT_NOT_ALLOWED)
    # New reasons were appended: the old codes never move.
    assert [Reason.IP_OPTIONS.code, Reason.DNS_RATE_LIMIT.code, Reason.SYN_RATE_LIMIT.code] == [
        16,
        17,
        18,
    ]
    assert unpack_counter_key(struct.pack("=II", 9, 18)) == (9, Reason.SYN_RATE_LIMIT)


# -- denied ranges ----------------------------------------------------------------


def test_denied_ranges_from_policy_and_fleet() -> None:
    layout = default_layout()
    table = {e.network: e for e in denied_ranges(layout.fleet_ranges)}
    assert table[N("169.254.0.0/16")] == DeniedRange(N("169.254.0.0/16"), Reason.DENIED_RANGE, True)
    assert table[N("10.0.0.0/8")].overridable
    assert not table[N("127.0.0.0/8")].overridable  # loopback: never (addresses.py)
    assert not table[N("224.0.0.0/4")].overridable
    for net in layout.fleet_ranges:
        assert table[net] == DeniedRange(net, Reason.FLEET_RANGE, False)
    assert all(net.version == 4 for net in table)


def test_normalize_prefers_strict_and_closes_nested_overrides() -> None:
    out = normalize_denied(
        [
            DeniedRange(N("10.0.0.0/8"), Reason.DENIED_RANGE, True),
            DeniedRange(N("10.0.0.0/8"), Reason.FLEET_RANGE, False),
            DeniedRange(N("10.1.0.0/16"), Reason.DENIED_RANGE, True),
            DeniedRange(N("172.16.0.0/12"), Reason.DENIED_RANGE, True),
        ]
    )
    assert out == (
        DeniedRange(N("10.0.0.0/8"), Reason.FLEET_RANGE, False),
        DeniedRange(N("172.16.0.0/12"), Reason.DENIED_RANGE, True),
        DeniedRange(N("10.1.0.0/16"), Reason.DENIED_RANGE, False),
    )


@pytest.mark.parametrize(
    ("network", "reason", "overridable"),
    [
        ("10.0.0.0/8", Reason.PORT_NOT_ALLOWED, False),
        ("198.18.0.0/24", Reason.FLEET_RANGE, True),
    ],
)
def test_bad_denied_range(network: str, reason: Reason, overridable: bool) -> None:
    with pytest.raises(Tier1Error) as info:
        DeniedRange(N(network), reason, overridable)
    assert info.value.reason == "bad_denied_range"
