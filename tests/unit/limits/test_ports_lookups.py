"""The allocator's per-connection shortcuts answer as the long way does: a lease's recorded
index is used only when it is that lease's pair, `counts` is `held` and `in_use` together,
`address_text` is the address's text (issue 10's per-connection cost)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from egressd.limits.ports import Destination, Lease, PortPoolConfig, SourcePortAllocator

A1 = ipaddress.IPv4Address("192.0.2.1")
A2 = ipaddress.IPv4Address("192.0.2.2")
D1 = Destination(ipaddress.IPv4Address("198.51.100.1"), 443)


def allocator(stride: int = 1, offset: int = 0) -> SourcePortAllocator:
    return SourcePortAllocator(
        PortPoolConfig(
            addresses=(A1, A2),
            first_port=20000,
            last_port=20009,
            min_per_job=0,
            reserved_newcomers=0,
            stride=stride,
            offset=offset,
        )
    )


@pytest.mark.parametrize(("stride", "offset"), [(1, 0), (2, 1), (3, 2)])
def test_leases_are_the_configs_candidates_in_order(stride: int, offset: int) -> None:
    alloc = allocator(stride, offset)
    config = alloc.config
    for index in range(config.capacity):
        lease = alloc.acquire("a", D1, max_per_job=100, now=0.0)
        assert isinstance(lease, Lease)
        assert (lease.address, lease.port) == config.candidate(index)
        assert lease.index == index == config.index(lease.address, lease.port)
        assert alloc.address_text(lease) == str(lease.address)


def test_counts_are_held_and_in_use() -> None:
    alloc = allocator()
    assert alloc.counts(Lease("a", D1, A1, 20000)) == (0, 0)  # no pool yet
    leases = [alloc.acquire(job, D1, max_per_job=100, now=0.0) for job in "aab"]
    for lease in leases:
        assert isinstance(lease, Lease)
        assert alloc.counts(lease) == (alloc.held(lease.job, D1), alloc.in_use(D1, lease))
    assert [alloc.counts(lease) for lease in leases] == [(2, 2), (2, 1), (1, 2)]  # type: ignore[arg-type]


def test_a_lease_whose_index_is_not_its_pair_is_released_by_its_pair() -> None:
    alloc = allocator()
    first = alloc.acquire("a", D1, max_per_job=100, now=0.0)
    second = alloc.acquire("a", D1, max_per_job=100, now=0.0)
    assert isinstance(first, Lease) and isinstance(second, Lease)
    # Made by hand: no index, or the other lease's; an equal address that is another object.
    by_hand = Lease("a", D1, ipaddress.IPv4Address(str(first.address)), first.port)
    wrong = dataclasses.replace(second, index=first.index)
    assert alloc.address_text(by_hand) == str(first.address)
    alloc.release(wrong, now=0.0, time_wait=False)  # releases `second`'s pair ...
    assert alloc.counts(first) == (1, 1)
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(second, now=0.0)  # ... so that one is gone
    alloc.release(by_hand, now=0.0, time_wait=False)
    assert alloc.counts(first) == (0, 0)
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(first, now=0.0)
