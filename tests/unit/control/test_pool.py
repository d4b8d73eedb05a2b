"""egressd.control.pool: the pure allocation of node sandbox CIDRs from the pool."""

from __future__ import annotations

import random
import re
from ipaddress import IPv4Address, IPv4Network

import pytest

from egressd.control.pool import (
    DEFAULT_NODE_PREFIX,
    DEFAULT_POOL,
    PoolExhausted,
    SandboxPool,
    allocate,
)
from egressd.control.records import NodeRecord
from egressd.layout import SANDBOX_SUPERNET


def node(name: str, cidr: str, last: int = 11) -> NodeRecord:
    """A node record (allocation looks only at names and CIDRs)."""
    return NodeRecord(name, IPv4Address("198.18.0.0") + last, IPv4Network(cidr))


def test_default_pool_is_the_sandbox_supernet_in_24s() -> None:
    pool = SandboxPool()
    assert pool.network == DEFAULT_POOL == SANDBOX_SUPERNET
    assert pool.prefixlen == DEFAULT_NODE_PREFIX == 24
    assert pool.blocks == 256


def test_first_node_gets_the_lowest_block() -> None:
    got = allocate("n1", [], SandboxPool())
    assert got.cidr == IPv4Network("100.96.0.0/24") and not got.reused


def test_a_registered_name_keeps_its_cidr_even_outside_the_pool() -> None:
    nodes = [node("n1", "100.96.1.0/24", 11), node("pinned", "10.9.0.0/24", 12)]
    assert allocate("n1", nodes, SandboxPool()).cidr == IPv4Network("100.96.1.0/24")
    got = allocate("pinned", nodes, SandboxPool())
    assert got.cidr == IPv4Network("10.9.0.0/24") and got.reused


def test_new_names_skip_every_taken_block_explicit_ones_too() -> None:
    # DESIGN.md's explicit node1/node2 CIDRs: auto nodes fill the gaps around them.
    nodes = [node("node1", "100.96.1.0/24", 11), node("node2", "100.96.2.0/24", 12)]
    pool = SandboxPool()
    first = allocate("k1", nodes, pool).cidr
    assert first == IPv4Network("100.96.0.0/24")
    nodes.append(NodeRecord("k1", IPv4Address("198.18.0.31"), first))
    assert allocate("k2", nodes, pool).cidr == IPv4Network("100.96.3.0/24")


def test_a_larger_explicit_cidr_blocks_all_of_its_blocks() -> None:
    # A /22 at .4-.7 and a /25 inside .8: the next free /24 is .9.
    nodes = [
        node("a", "100.96.0.0/24", 11),
        node("b", "100.96.1.0/24", 12),
        node("c", "100.96.2.0/23", 13),
        node("d", "100.96.4.0/22", 14),
        node("e", "100.96.8.128/25", 15),
    ]
    assert allocate("new", nodes, SandboxPool()).cidr == IPv4Network("100.96.9.0/24")


def test_a_supernet_record_covering_the_pool_exhausts_it() -> None:
    nodes = [node("big", "100.96.0.0/16", 11)]
    pool = SandboxPool(IPv4Network("100.96.16.0/20"), 24)
    with pytest.raises(PoolExhausted):
        allocate("new", nodes, pool)


def test_exhausted_is_a_clear_error_and_a_freed_block_is_reused() -> None:
    pool = SandboxPool(IPv4Network("100.96.8.0/23"), 24)
    nodes = [node("a", "100.96.8.0/24", 11), node("b", "100.96.9.0/24", 12)]
    with pytest.raises(PoolExhausted) as caught:
        allocate("c", nodes, pool)
    assert caught.value.reason == "sandbox_pool_exhausted"
    assert "no free /24 in 100.96.8.0/23" in caught.value.detail
    assert "2 node(s)" in caught.value.detail
    # The name that holds a block still gets it back from a full pool.
    assert allocate("b", nodes, pool).cidr == IPv4Network("100.96.9.0/24")
    # Delete a: its block is the next one handed out.
    assert allocate("c", nodes[1:], pool).cidr == IPv4Network("100.96.8.0/24")


def test_the_pool_ends_exactly_at_its_broadcast_address() -> None:
    pool = SandboxPool(IPv4Network("100.96.255.0/24"), 26)
    taken = [node(f"n{i}", f"100.96.255.{64 * i}/26", 11 + i) for i in range(3)]
    assert allocate("x", taken, pool).cidr == IPv4Network("100.96.255.192/26")
    taken.append(node("n3", "100.96.255.192/26", 20))
    with pytest.raises(PoolExhausted):
        allocate("x", taken, pool)


def test_allocations_never_overlap_and_are_unique_until_full() -> None:
    """Random explicit records, then auto nodes until the pool is full: every
    CIDR handed out lies in the pool, on its block size, and overlaps nothing."""
    rng = random.Random(13)
    pool = SandboxPool(IPv4Network("100.96.0.0/20"), 25)
    records: list[NodeRecord] = []
    for i in range(6):
        prefix = rng.choice([23, 24, 25, 26])
        base = IPv4Network(f"100.96.{rng.randrange(0, 16)}.0/24")
        cidr = IPv4Network((int(base.network_address), prefix), strict=False)
        if any(r.sandbox_cidr.overlaps(cidr) for r in records):
            continue
        records.append(NodeRecord(f"x{i}", IPv4Address("198.18.1.0") + i, cidr))
    explicit = len(records)
    for i in range(pool.blocks + 1):
        try:
            got = allocate(f"auto{i}", records, pool)
        except PoolExhausted:
            break
        assert got.cidr.subnet_of(pool.network) and got.cidr.prefixlen == 25
        assert not any(r.sandbox_cidr.overlaps(got.cidr) for r in records)
        records.append(NodeRecord(f"auto{i}", IPv4Address("198.18.2.0") + i, got.cidr))
    else:
        pytest.fail("the pool never ran out")
    covered = sum(
        r.sandbox_cidr.num_addresses for r in records if r.sandbox_cidr.subnet_of(pool.network)
    )
    assert covered == pool.network.num_addresses  # full means full: no free /25 left behind
    assert len(records) > explicit


def test_result_depends_on_the_records_not_their_order() -> None:
    nodes = [
        node("a", "100.96.0.0/24", 11),
        node("c", "100.96.2.0/24", 13),
        node("b", "100.96.1.0/24", 12),
    ]
    assert {allocate("d", order, SandboxPool()).cidr for order in (nodes, nodes[::-1])} == {
        IPv4Network("100.96.3.0/24")
    }


@pytest.mark.parametrize(
    ("network", "prefix", "words"),
    [
        ("100.96.0.0/16", 30, "/16../29"),
        ("100.96.0.0/16", 15, "/16../29"),
        ("100.96.0.0/25", 24, "smaller than one /24"),
        ("100.96.0.0/12", 24, "resolver address 100.100.100.53"),
    ],
)
def test_an_unusable_pool_is_refused(network: str, prefix: int, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        SandboxPool(IPv4Network(network), prefix)
