"""The node kernel data path as data: Maglev, the flow hash, map encodings, and the
reason table and constants against bpf/node.c and bpf/geneve.h."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP

from egressd.agent.node import DEFAULT_HEADERS, DEFAULT_SOURCE
from egressd.agent.node_maps import (
    COUNT,
    MAGLEV_SIZE,
    MAPS,
    MAX_PROXIES,
    NO_PROXY,
    REASONS,
    STATS,
    NodeError,
    NodeReason,
    ProxySlot,
    flow_hash,
    maglev_table,
    pack_config,
    pack_flow_key,
    pack_maglev,
    pack_proxy,
    pack_sandbox,
    pack_sandbox_ip,
    permutation,
    source_port,
    unpack_config,
    unpack_maglev,
    unpack_proxy,
    unpack_sandbox,
    unpack_sandbox_ip,
)
from egressd.geneve import JobOption, decode, header_for
from egressd.layout import GENEVE_OVERHEAD, SANDBOX_MTU, UNDERLAY_MTU

IPv4Address = ipaddress.IPv4Address
NODE_C = DEFAULT_SOURCE.read_text()
GENEVE_H = DEFAULT_HEADERS[0].read_text()
NAMES = [f"proxy{i}" for i in range(1, 11)]


def _define(source: str, name: str) -> str:
    found = re.search(r"#define\s+" + name + r"\s+(\S+)", source)
    assert found is not None, name
    return found[1]


# -- the C side's tables -----------------------------------------------------------------


def test_reason_enum_matches_node_c() -> None:
    body = re.search(r"enum\s+nd_reason\s*\{(.*?)\};", NODE_C, re.DOTALL)
    assert body is not None
    c_enum = {m[1]: int(m[2]) for m in re.finditer(r"ND_(\w+)\s*=\s*(\d+)\s*,", body[1])}
    assert c_enum.pop("REASON_COUNT") == len(REASONS)
    assert c_enum == {reason.name: code for code, reason in enumerate(REASONS)}


def test_gnv_parse_results_line_up_with_the_node_reasons() -> None:
    body = re.search(r"enum\s+gnv_result\s*\{(.*?)\};", GENEVE_H, re.DOTALL)
    assert body is not None
    results = {m[1]: int(m[2]) for m in re.finditer(r"GNV_(\w+)\s*=\s*(\d+)\s*,", body[1])}
    assert results.pop("OK") == 0
    # node.c maps result r to reason OUTER_MALFORMED - 1 + r.
    base = REASONS.index(NodeReason.OUTER_MALFORMED) - 1
    assert {name: REASONS[base + code].name for name, code in results.items()} == {
        name: name for name in results
    }


def test_constants_match_the_c_sources() -> None:
    assert int(_define(NODE_C, "ND_MAGLEV_SIZE")) == MAGLEV_SIZE
    assert int(_define(NODE_C, "ND_MAX_PROXIES")) == MAX_PROXIES
    assert int(_define(NODE_C, "ND_NO_PROXY").rstrip("u"), 16) == NO_PROXY
    assert int(_define(GENEVE_H, "GNV_PREFIX_LEN")) == len(header_for(1, _job()))
    assert int(_define(GENEVE_H, "GNV_PORT")) == 6081
    assert {spec.name for spec in MAPS} == set(re.findall(r"\}\s*(nd_\w+)\s+SEC", NODE_C))


def test_maglev_size_is_prime_and_far_above_the_proxy_count() -> None:
    assert all(MAGLEV_SIZE % d for d in range(2, int(MAGLEV_SIZE**0.5) + 1))
    # Each proxy gets size / n entries (+-1); even at the slot limit that is 63 entries.
    assert MAGLEV_SIZE // MAX_PROXIES >= 63


def test_sandbox_mtu_leaves_room_for_the_encapsulation() -> None:
    # A veth drops a non-GSO frame above its MTU silently: the inner packet plus the
    # 64 bytes tc adds must fit the underlay.
    assert GENEVE_OVERHEAD == 64 == int(_define(GENEVE_H, "GNV_OUTER_LEN")) + 36
    assert SANDBOX_MTU + GENEVE_OVERHEAD <= UNDERLAY_MTU


# -- Maglev ---------------------------------------------------------------------------------


def test_permutation_is_a_valid_preference_list() -> None:
    offset, skip = permutation("proxy1")
    assert 0 <= offset < MAGLEV_SIZE
    assert 1 <= skip < MAGLEV_SIZE
    assert permutation("proxy1") == (offset, skip)
    assert permutation("proxy2") != (offset, skip)
    small = 13
    o, s = permutation("proxy1", small)
    assert sorted((o + j * s) % small for j in range(small)) == list(range(small))


def test_table_is_full_balanced_and_order_free() -> None:
    table = maglev_table(NAMES)
    assert len(table) == MAGLEV_SIZE
    counts = Counter(table)
    assert set(counts) == set(NAMES)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert maglev_table(reversed(NAMES)) == table
    assert maglev_table(NAMES + NAMES[:2]) == table


def test_empty_and_single_tables() -> None:
    assert set(maglev_table([])) == {None}
    assert set(maglev_table(["proxy1"])) == {"proxy1"}
    with pytest.raises(ValueError):
        maglev_table(NAMES, size=7)


def test_removing_a_proxy_moves_its_entries_and_few_others() -> None:
    before = maglev_table(NAMES)
    after = maglev_table(n for n in NAMES if n != "proxy4")
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    theirs = [i for i in moved if before[i] == "proxy4"]
    assert len(theirs) == before.count("proxy4")  # every entry of the removed one moved
    others = len(moved) - len(theirs)
    # Maglev's disruption bound in practice: about 1% of the table for 10 backends.
    assert others <= 0.02 * MAGLEV_SIZE


def test_adding_a_proxy_takes_its_share_and_moves_few_others() -> None:
    before = maglev_table(NAMES)
    after = maglev_table([*NAMES, "proxy11"])
    gained = sum(1 for b in after if b == "proxy11")
    assert abs(gained - MAGLEV_SIZE / 11) <= 1
    others = sum(1 for a, b in zip(before, after, strict=True) if a != b and b != "proxy11")
    assert others <= 0.02 * MAGLEV_SIZE


def test_pack_maglev_uses_slots_and_no_proxy() -> None:
    table = maglev_table(["proxy1", "proxy2"])
    raw = pack_maglev(table, {"proxy1": 0, "proxy2": 7})
    assert len(raw) == 4 * MAGLEV_SIZE
    slots = unpack_maglev(raw)
    assert [0 if name == "proxy1" else 7 for name in table] == list(slots)
    assert set(unpack_maglev(pack_maglev((None,) * MAGLEV_SIZE, {}))) == {NO_PROXY}
    with pytest.raises(NodeError):
        pack_maglev(table[:-1], {"proxy1": 0, "proxy2": 7})


# -- flow hash ----------------------------------------------------------------------------


def test_flow_hash_is_stable_and_spreads() -> None:
    src, dst = IPv4Address("100.96.1.2"), IPv4Address("203.0.113.10")
    first = flow_hash(src, dst, 6, 40000, 443)
    assert first == flow_hash(src, dst, 6, 40000, 443)
    assert 0 <= first < 2**32
    hashes = {flow_hash(src, dst, 6, port, 443) for port in range(40000, 41000)}
    assert len(hashes) == 1000
    ports = {source_port(h) for h in hashes}
    assert min(ports) >= 49152 and max(ports) <= 65535
    assert len(ports) > 900
    # Each field counts.
    assert flow_hash(src, dst, 17, 40000, 443) != first
    assert flow_hash(dst, src, 6, 40000, 443) != first
    assert flow_hash(src, dst, 6, 443, 40000) != first


def test_flow_hash_balances_proxies_through_the_table() -> None:
    table = maglev_table(["proxy1", "proxy2"])
    src, dst = IPv4Address("100.96.1.2"), IPv4Address("203.0.113.10")
    picks = Counter(table[flow_hash(src, dst, 6, p, 443) % MAGLEV_SIZE] for p in range(10000))
    assert 4500 <= picks["proxy1"] <= 5500


# -- map encodings -----------------------------------------------------------------------


def _job() -> JobOption:
    return JobOption(uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2").bytes, b"\x01" * 8)


def test_value_sizes_match_the_specs() -> None:
    sizes = {spec.name: spec.value_size for spec in MAPS}
    assert len(pack_config(IPv4Address("198.18.0.11"), 3, 1, 0)) == sizes["nd_config"]
    assert len(pack_proxy(ProxySlot(None, False, 0))) == sizes["nd_proxies"]
    assert (
        len(pack_sandbox(header_for(1, _job()), IPv4Address("100.96.1.2"))) == sizes["nd_sandboxes"]
    )
    assert (
        len(pack_sandbox_ip(3, b"\x02" * 6, b"\x04" * 6, b"\x05" * 16)) == sizes["nd_sandbox_ips"]
    )
    assert len(pack_flow_key(IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8"), 6, 1, 2)) == 16
    assert STATS.size == sizes["nd_stats"] and COUNT.size == sizes["nd_drops"]


def test_round_trips() -> None:
    addr = IPv4Address("198.18.0.11")
    assert unpack_config(pack_config(addr, 3, 5, 1)) == (addr, 3, 5, 1)
    up = ProxySlot(IPv4Address("198.18.0.21"), True, 4)
    assert unpack_proxy(pack_proxy(up)) == up
    # No address: never up, whatever was asked.
    assert unpack_proxy(pack_proxy(ProxySlot(None, True, 2))) == ProxySlot(None, False, 2)
    prefix = header_for(1, _job())
    assert unpack_sandbox(pack_sandbox(prefix, IPv4Address("100.96.1.2"))) == (
        prefix,
        IPv4Address("100.96.1.2"),
    )
    raw = pack_sandbox_ip(3, b"\x02" * 6, b"\x04" * 6, b"\x05" * 16)
    assert unpack_sandbox_ip(raw) == (3, b"\x02" * 6, b"\x04" * 6, b"\x05" * 16)


def test_flow_key_is_network_order() -> None:
    key = pack_flow_key(IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8"), 6, 0x1234, 443)
    assert key == bytes([1, 2, 3, 4, 5, 6, 7, 8, 0x12, 0x34, 0x01, 0xBB, 6, 0, 0, 0])


def test_sandbox_prefix_is_the_codecs_header() -> None:
    prefix = header_for(1, _job())
    inner = bytes(IP(src="100.96.1.2", dst="203.0.113.10") / TCP(dport=443))
    packet = decode(prefix + inner)
    assert packet.job == _job()


def test_bad_values_are_refused() -> None:
    with pytest.raises(NodeError):
        pack_sandbox(b"\0" * 35, IPv4Address("100.96.1.2"))
    with pytest.raises(NodeError):
        pack_sandbox_ip(3, b"\x02" * 5, b"\x04" * 6, b"\x05" * 16)
