"""The source-port allocator: budgets, pool exhaustion, reservations, reuse delay (fake clock)."""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from egressd.limits import PORT_BUDGET_EXHAUSTED, PORT_POOL_EXHAUSTED
from egressd.limits.ports import (
    DEFAULT_REUSE_DELAY_S,
    Destination,
    Lease,
    PortPoolConfig,
    SourcePortAllocator,
)

A1 = ipaddress.IPv4Address("192.0.2.1")
A2 = ipaddress.IPv4Address("192.0.2.2")
A3 = ipaddress.IPv4Address("192.0.2.3")
D1 = Destination(ipaddress.IPv4Address("198.51.100.1"), 443)
D2 = Destination(ipaddress.IPv4Address("198.51.100.2"), 443)
BIG = 1_000_000


def allocator(
    *,
    addresses: tuple[ipaddress.IPv4Address, ...] = (A1,),
    ports: int = 10,
    min_per_job: int = 0,
    reserved_newcomers: int = 0,
    reuse_delay_s: float = 60.0,
) -> SourcePortAllocator:
    return SourcePortAllocator(
        PortPoolConfig(
            addresses=addresses,
            first_port=20000,
            last_port=20000 + ports - 1,
            min_per_job=min_per_job,
            reserved_newcomers=reserved_newcomers,
            reuse_delay_s=reuse_delay_s,
        )
    )


def take(
    alloc: SourcePortAllocator,
    job: Hashable,
    destination: Destination = D1,
    *,
    max_per_job: int = BIG,
    now: float = 0.0,
) -> Lease:
    lease = alloc.acquire(job, destination, max_per_job=max_per_job, now=now)
    assert isinstance(lease, Lease), lease
    return lease


def take_all(
    alloc: SourcePortAllocator,
    job: Hashable,
    destination: Destination = D1,
    *,
    max_per_job: int = BIG,
    now: float = 0.0,
) -> tuple[list[Lease], str]:
    """Acquire until refused: the leases and the refusal reason."""
    leases: list[Lease] = []
    while True:
        got = alloc.acquire(job, destination, max_per_job=max_per_job, now=now)
        if isinstance(got, str):
            return leases, got
        leases.append(got)
        assert len(leases) <= alloc.config.capacity


def pairs(leases: list[Lease]) -> set[tuple[ipaddress.IPv4Address, int]]:
    return {(lease.address, lease.port) for lease in leases}


# Destination and config


def test_destination_str_and_identity() -> None:
    assert str(D1) == "198.51.100.1:443/tcp"
    udp = Destination(D1.ip, 443, "udp")
    assert str(udp) == "198.51.100.1:443/udp"
    assert udp != D1
    assert Destination(ipaddress.IPv4Address("198.51.100.1"), 443) == D1


def test_config_defaults_and_geometry() -> None:
    config = PortPoolConfig(addresses=(A1,))
    assert (config.first_port, config.last_port) == (16384, 32767)
    assert config.ports_per_address == 16384
    assert config.capacity == 16384
    assert config.reuse_delay_s == DEFAULT_REUSE_DELAY_S == 60.0
    two = PortPoolConfig(addresses=(A1, A2), first_port=1024, last_port=1024, min_per_job=0)
    assert two.capacity == 2
    assert [two.candidate(i) for i in range(2)] == [(A1, 1024), (A2, 1024)]
    three = PortPoolConfig(addresses=(A1, A2, A3), first_port=5000, last_port=5001, min_per_job=0)
    assert [three.candidate(i) for i in range(6)] == [
        (A1, 5000),
        (A2, 5000),
        (A3, 5000),
        (A1, 5001),
        (A2, 5001),
        (A3, 5001),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"addresses": ()}, "at least one egress address"),
        ({"addresses": (A1, A2, A1)}, "distinct"),
        ({"addresses": (A1,), "first_port": 1023, "last_port": 2000}, "1024-65535"),
        ({"addresses": (A1,), "first_port": 2000, "last_port": 65536}, "1024-65535"),
        ({"addresses": (A1,), "first_port": 3000, "last_port": 2999}, "1024-65535"),
        ({"addresses": (A1,), "min_per_job": -1}, "must not be negative"),
        ({"addresses": (A1,), "reserved_newcomers": -1}, "must not be negative"),
        (
            {
                "addresses": (A1,),
                "first_port": 2000,
                "last_port": 2009,
                "min_per_job": 4,
                "reserved_newcomers": 2,
            },
            r"min_per_job x \(reserved_newcomers \+ 1\) = 12 exceeds the pool's 10",
        ),
        ({"addresses": (A1,), "reuse_delay_s": -0.001}, "reuse_delay_s"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PortPoolConfig(**kwargs)


def test_config_boundaries_accepted() -> None:
    # min x (newcomers + 1) exactly the capacity; extreme port range; no delay
    config = PortPoolConfig(
        addresses=(A1, A2), first_port=2000, last_port=2005, min_per_job=3, reserved_newcomers=3
    )
    assert config.capacity == 12
    assert PortPoolConfig(addresses=(A1,), first_port=1024, last_port=65535).capacity == 64512
    assert PortPoolConfig(addresses=(A1,), reuse_delay_s=0).reuse_delay_s == 0
    # the same pool with a second address can afford what one address cannot
    with pytest.raises(ValueError):
        PortPoolConfig(
            addresses=(A1,), first_port=2000, last_port=2005, min_per_job=3, reserved_newcomers=3
        )


# budget and pool exhaustion


def test_budget_per_job_per_destination() -> None:
    alloc = allocator(ports=100)
    leases, reason = take_all(alloc, "a", D1, max_per_job=3)
    assert (len(leases), reason) == (3, PORT_BUDGET_EXHAUSTED)
    assert alloc.held("a", D1) == 3
    # another destination: a fresh budget
    other, reason = take_all(alloc, "a", D2, max_per_job=3)
    assert (len(other), reason) == (3, PORT_BUDGET_EXHAUSTED)
    # another job: its own budget
    theirs, reason = take_all(alloc, "b", D1, max_per_job=5)
    assert (len(theirs), reason) == (5, PORT_BUDGET_EXHAUSTED)
    assert (alloc.held("a", D1), alloc.held("a", D2), alloc.held("b", D1)) == (3, 3, 5)
    # released ports stop counting for the job at once (even while they cool down)
    alloc.release(leases[0], now=1.0)
    assert alloc.held("a", D1) == 2
    take(alloc, "a", D1, max_per_job=3, now=1.0)
    assert alloc.acquire("a", D1, max_per_job=3, now=1.0) == PORT_BUDGET_EXHAUSTED


def test_budget_applies_from_the_call_on() -> None:
    alloc = allocator(ports=100)
    take_all(alloc, "a", max_per_job=5)
    assert alloc.acquire("a", D1, max_per_job=2, now=0.0) == PORT_BUDGET_EXHAUSTED
    assert alloc.held("a", D1) == 5
    assert isinstance(alloc.acquire("a", D1, max_per_job=6, now=0.0), Lease)


def test_pool_exhaustion() -> None:
    alloc = allocator(ports=10)
    a, reason = take_all(alloc, "a", max_per_job=6)
    assert (len(a), reason) == (6, PORT_BUDGET_EXHAUSTED)
    b, reason = take_all(alloc, "b")
    assert (len(b), reason) == (4, PORT_POOL_EXHAUSTED)
    assert alloc.acquire("c", D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    assert alloc.held("c", D1) == 0
    assert alloc.available(D1, 0.0) == 0
    assert len(pairs(a + b)) == 10
    # the budget reason wins when both apply
    assert alloc.acquire("a", D1, max_per_job=6, now=0.0) == PORT_BUDGET_EXHAUSTED
    # another destination is unaffected
    assert len(take_all(alloc, "c", D2)[0]) == 10


def test_available() -> None:
    alloc = allocator(addresses=(A1, A2), ports=5, reuse_delay_s=10)
    assert alloc.available(D1, 0.0) == 10  # unknown destination: the whole pool
    leases = [take(alloc, "a") for _ in range(4)]
    assert alloc.available(D1, 0.0) == 6
    alloc.release(leases[0], now=1.0)
    assert alloc.available(D1, 1.0) == 6  # cooling
    assert alloc.available(D1, 10.999) == 6
    assert alloc.available(D1, 11.0) == 7
    assert alloc.available(D2, 11.0) == 10


# min_per_job reservation


def test_attacker_cannot_take_the_newcomers_reserve() -> None:
    alloc = allocator(ports=20, min_per_job=3, reserved_newcomers=2)
    attacker, reason = take_all(alloc, "attacker")
    assert reason == PORT_POOL_EXHAUSTED
    assert len(attacker) == 20 - 3 * 2
    assert alloc.available(D1, 0.0) == 6
    # every reserved newcomer gets its minimum
    for newcomer in ("b", "c"):
        leases = [take(alloc, newcomer) for _ in range(3)]
        assert alloc.held(newcomer, D1) == 3
        assert len(pairs(leases)) == 3
    assert alloc.available(D1, 0.0) == 0
    # beyond its minimum, a newcomer is an ordinary job
    assert alloc.acquire("b", D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    assert alloc.acquire("attacker", D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    # only reserved_newcomers are guaranteed
    assert alloc.acquire("d", D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED


def test_attacker_is_refused_while_newcomers_take_the_reserve() -> None:
    alloc = allocator(ports=20, min_per_job=3, reserved_newcomers=2)
    take_all(alloc, "attacker")
    take(alloc, "b")  # b holds 1 of its 3: its deficit of 2 is protected too
    for _ in range(5):
        assert alloc.acquire("attacker", D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    assert alloc.held("attacker", D1) == 14


def test_a_job_below_its_minimum_takes_ports_without_reserve_check() -> None:
    alloc = allocator(ports=10, min_per_job=2, reserved_newcomers=4)
    # the pool is exactly the reserve: every job still gets its minimum
    for job in range(5):
        assert [take(alloc, job) for _ in range(2)]
        assert alloc.acquire(job, D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    assert alloc.acquire(5, D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    assert alloc.available(D1, 0.0) == 0


def test_deficit_of_jobs_below_minimum_is_protected() -> None:
    alloc = allocator(ports=20, min_per_job=3, reserved_newcomers=1)
    take(alloc, "b")  # b holds 1: deficit 2
    attacker, reason = take_all(alloc, "attacker")
    assert reason == PORT_POOL_EXHAUSTED
    # what stays free: b's deficit (2) + one newcomer's minimum (3)
    assert len(attacker) == 20 - 1 - 2 - 3
    take(alloc, "b")
    take(alloc, "b")
    assert alloc.held("b", D1) == 3
    for _ in range(3):
        take(alloc, "newcomer")
    assert alloc.available(D1, 0.0) == 0


def test_deficit_goes_when_a_job_below_minimum_releases_everything() -> None:
    alloc = allocator(ports=20, min_per_job=3, reserved_newcomers=1)
    b = [take(alloc, "b") for _ in range(2)]  # deficit 1
    attacker, _ = take_all(alloc, "attacker")
    assert len(attacker) == 20 - 2 - 1 - 3
    assert alloc.available(D1, 0.0) == 4
    # b gives both ports back: holding none, it is a newcomer again (covered by
    # reserved_newcomers) and its deficit no longer counts; its ports cool down
    for lease in b:
        alloc.release(lease, now=0.0)
    assert alloc.held("b", D1) == 0
    assert alloc.available(D1, 0.0) == 4
    # reserve now 0 + 3: the attacker gets the one port that the deficit protected
    more, reason = take_all(alloc, "attacker")
    assert (len(more), reason) == (1, PORT_POOL_EXHAUSTED)
    # after the cool-down, b's 2 ports are free again: the attacker gets them, not the reserve
    more, reason = take_all(alloc, "attacker", now=60.0)
    assert (len(more), reason) == (2, PORT_POOL_EXHAUSTED)
    assert alloc.held("attacker", D1) == 17
    assert [take(alloc, "b", now=60.0) for _ in range(3)]
    assert alloc.available(D1, 60.0) == 0


def test_deficit_shrinks_as_the_job_reaches_its_minimum() -> None:
    alloc = allocator(ports=20, min_per_job=4, reserved_newcomers=0)
    take(alloc, "b")  # deficit 3
    attacker, _ = take_all(alloc, "attacker")
    assert len(attacker) == 20 - 1 - 3
    for _ in range(3):
        take(alloc, "b")  # b's deficit reaches 0 as it takes the protected ports
        assert alloc.acquire("attacker", D1, max_per_job=BIG, now=0.0) == PORT_POOL_EXHAUSTED
    assert alloc.available(D1, 0.0) == 0


def test_reservation_is_per_destination() -> None:
    alloc = allocator(ports=10, min_per_job=2, reserved_newcomers=2)
    assert len(take_all(alloc, "attacker", D1)[0]) == 6
    assert len(take_all(alloc, "attacker", D2)[0]) == 6
    assert [take(alloc, "b", D1) for _ in range(2)]
    assert [take(alloc, "b", D2) for _ in range(2)]


# reuse delay


def test_released_port_not_reused_toward_same_destination_before_delay() -> None:
    alloc = allocator(ports=2, reuse_delay_s=60.0)
    first = take(alloc, "a")
    second = take(alloc, "a")
    assert (first.port, second.port) == (20000, 20001)
    alloc.release(first, now=10.0)
    assert alloc.acquire("a", D1, max_per_job=BIG, now=10.0) == PORT_POOL_EXHAUSTED
    assert alloc.acquire("b", D1, max_per_job=BIG, now=69.999) == PORT_POOL_EXHAUSTED
    # toward another destination at once
    other = take(alloc, "b", D2, now=10.0)
    assert (other.address, other.port) == (A1, 20000)
    # and toward the same destination again after the delay
    again = take(alloc, "b", D1, now=70.0)
    assert (again.address, again.port) == (A1, 20000)
    assert again.job == "b"


def test_ports_rotate_and_are_never_reused_within_the_delay() -> None:
    alloc = allocator(ports=10, reuse_delay_s=5.0)
    seen: dict[tuple[ipaddress.IPv4Address, int], float] = {}
    now = 0.0
    # one connection at a time, each lasting 1 s: no port reused toward D1 within 5 s
    for _ in range(50):
        lease = take(alloc, "a", now=now)
        pair = (lease.address, lease.port)
        if pair in seen:
            assert now - seen[pair] >= 5.0
        now += 1.0
        alloc.release(lease, now=now)
        seen[pair] = now
    # every pair is used once before any is used again
    assert len(seen) == 10


def test_zero_reuse_delay_frees_at_once() -> None:
    alloc = allocator(ports=1, reuse_delay_s=0.0)
    lease = take(alloc, "a", now=1.0)
    alloc.release(lease, now=1.0)
    again = take(alloc, "a", now=1.0)
    assert (again.address, again.port) == (lease.address, lease.port)


def test_reuse_delay_applies_per_destination_only() -> None:
    alloc = allocator(ports=1, reuse_delay_s=60.0)
    d1 = take(alloc, "a", D1)
    d2 = take(alloc, "b", D2)  # the same (address, port) toward another destination
    assert (d1.address, d1.port) == (d2.address, d2.port)
    alloc.release(d1, now=0.0)
    assert alloc.acquire("a", D1, max_per_job=BIG, now=30.0) == PORT_POOL_EXHAUSTED
    assert alloc.held("b", D2) == 1
    assert alloc.available(D2, 30.0) == 0


# egress addresses


def test_two_addresses_double_the_pool_round_robin() -> None:
    one = allocator(addresses=(A1,), ports=4)
    two = allocator(addresses=(A1, A2), ports=4)
    assert len(take_all(one, "a")[0]) == 4
    leases, reason = take_all(two, "a")
    assert (len(leases), reason) == (8, PORT_POOL_EXHAUSTED)
    assert [(lease.address, lease.port) for lease in leases] == [
        (A1, 20000),
        (A2, 20000),
        (A1, 20001),
        (A2, 20001),
        (A1, 20002),
        (A2, 20002),
        (A1, 20003),
        (A2, 20003),
    ]
    assert two.in_use_by_address(D1) == {A1: 4, A2: 4}


def test_in_use_by_address() -> None:
    alloc = allocator(addresses=(A1, A2, A3), ports=4, reuse_delay_s=1.0)
    assert alloc.in_use_by_address(D1) == {}
    leases = [take(alloc, "a") for _ in range(5)]
    assert alloc.in_use_by_address(D1) == {A1: 2, A2: 2, A3: 1}
    alloc.release(leases[2], now=0.0)  # the A3 one
    assert alloc.in_use_by_address(D1) == {A1: 2, A2: 2}
    alloc.release(leases[0], now=0.0)
    assert alloc.in_use_by_address(D1) == {A1: 1, A2: 2}
    assert alloc.in_use_by_address(D2) == {}
    for lease in (leases[1], leases[3], leases[4]):
        alloc.release(lease, now=0.0)
    assert alloc.in_use_by_address(D1) == {}


# quarantine


def test_quarantine_holds_the_port_back_and_frees_the_job() -> None:
    alloc = allocator(ports=3, reuse_delay_s=60.0)
    lease = take(alloc, "a", max_per_job=1, now=5.0)
    alloc.quarantine(lease, now=5.0)
    assert alloc.held("a", D1) == 0  # does not count for the job
    assert alloc.in_use_by_address(D1) == {}
    assert alloc.available(D1, 5.0) == 2  # but the port is held back
    retry = take(alloc, "a", max_per_job=1, now=5.0)
    assert (retry.address, retry.port) != (lease.address, lease.port)
    third = take(alloc, "b", now=5.0)
    assert (third.address, third.port) not in {
        (lease.address, lease.port),
        (retry.address, retry.port),
    }
    assert alloc.acquire("b", D1, max_per_job=BIG, now=64.9) == PORT_POOL_EXHAUSTED
    back = take(alloc, "b", now=65.0)
    assert (back.address, back.port) == (lease.address, lease.port)


def test_quarantine_of_an_unknown_lease_raises() -> None:
    alloc = allocator()
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.quarantine(Lease("a", D1, A1, 20000), now=0.0)


# release errors


def test_release_errors() -> None:
    alloc = allocator(reuse_delay_s=60.0)
    lease = take(alloc, "a")
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(Lease("b", D1, lease.address, lease.port), now=0.0)  # wrong job
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(Lease("a", D2, lease.address, lease.port), now=0.0)  # wrong destination
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(Lease("a", D1, A2, lease.port), now=0.0)  # wrong address
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(Lease("a", D1, lease.address, lease.port + 1), now=0.0)  # never handed out
    assert alloc.held("a", D1) == 1  # failed releases change nothing
    assert alloc.available(D1, 0.0) == 9
    alloc.release(lease, now=0.0)
    with pytest.raises(ValueError, match="unknown lease"):
        alloc.release(lease, now=0.0)  # twice
    assert alloc.held("a", D1) == 0
    assert alloc.available(D1, 0.0) == 9


def test_release_of_a_none_job_lease_twice_raises() -> None:
    alloc = allocator()
    lease = take(alloc, None)
    alloc.release(lease, now=0.0)
    with pytest.raises(ValueError):
        alloc.release(lease, now=0.0)


# prune


def test_prune_forgets_only_destinations_with_nothing_in_use_or_cooling() -> None:
    alloc = allocator(ports=4, reuse_delay_s=10.0)
    busy = take(alloc, "a", D1)
    cooling = take(alloc, "a", D2)
    alloc.release(cooling, now=0.0)
    d3 = Destination(ipaddress.IPv4Address("198.51.100.3"), 80)
    alloc.available(d3, 0.0)  # a look does not create state
    assert set(alloc.destinations()) == {D1, D2}
    assert alloc.prune(9.999) == 0
    assert set(alloc.destinations()) == {D1, D2}
    assert alloc.prune(10.0) == 1
    assert set(alloc.destinations()) == {D1}
    assert alloc.held("a", D1) == 1
    alloc.release(busy, now=20.0)
    assert alloc.prune(29.0) == 0
    assert alloc.prune(30.0) == 1
    assert list(alloc.destinations()) == []
    # a pruned destination starts afresh
    assert alloc.available(D1, 30.0) == 4
    assert take(alloc, "a", D1, now=30.0).port == 20000


def test_destinations_is_a_snapshot() -> None:
    alloc = allocator(reuse_delay_s=0.0)
    alloc.release(take(alloc, "a", D1), now=0.0)
    alloc.release(take(alloc, "a", D2), now=0.0)
    seen = []
    for destination in alloc.destinations():
        seen.append(destination)
        alloc.prune(1.0)  # does not break the iteration
    assert set(seen) == {D1, D2}


# a state machine against an independent model


class AllocatorMachine(RuleBasedStateMachine):
    """Random acquire/release/quarantine/prune/time steps, checked against a model.

    The model predicts every refusal reason; the invariants check that no
    (address, port) is held twice toward one destination, that none is handed
    out toward a destination within reuse_delay_s of its release there, and
    that held counts, by_address and available agree with the model.
    """

    CONFIG = PortPoolConfig(
        addresses=(A1, A2),
        first_port=20000,
        last_port=20004,
        min_per_job=2,
        reserved_newcomers=2,
        reuse_delay_s=5.0,
    )
    DESTINATIONS = (D1, D2)
    JOBS = ("a", "b", "c", "d")

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SourcePortAllocator(self.CONFIG)
        self.now = 0.0
        self.live: dict[Destination, dict[tuple[ipaddress.IPv4Address, int], Hashable]] = (
            collections.defaultdict(dict)
        )
        self.released: dict[Destination, dict[tuple[ipaddress.IPv4Address, int], float]] = (
            collections.defaultdict(dict)
        )

    # model

    def model_held(self, job: Hashable, destination: Destination) -> int:
        return sum(1 for j in self.live[destination].values() if j == job)

    def model_cooling(self, destination: Destination) -> int:
        delay = self.CONFIG.reuse_delay_s
        return sum(
            1
            for pair, t in self.released[destination].items()
            if t + delay > self.now and pair not in self.live[destination]
        )

    def model_available(self, destination: Destination) -> int:
        return self.CONFIG.capacity - len(self.live[destination]) - self.model_cooling(destination)

    def model_reason(self, job: Hashable, destination: Destination, max_per_job: int) -> str | None:
        held = self.model_held(job, destination)
        if held >= max_per_job:
            return PORT_BUDGET_EXHAUSTED
        available = self.model_available(destination)
        if available <= 0:
            return PORT_POOL_EXHAUSTED
        minimum = self.CONFIG.min_per_job
        if held >= minimum:
            counts = collections.Counter(self.live[destination].values())
            deficit = sum(minimum - n for n in counts.values() if 0 < n < minimum)
            if available - 1 < deficit + minimum * self.CONFIG.reserved_newcomers:
                return PORT_POOL_EXHAUSTED
        return None

    # rules

    @rule(
        target=leases,
        job=st.sampled_from(JOBS),
        destination=st.sampled_from(DESTINATIONS),
        max_per_job=st.integers(min_value=1, max_value=12),
    )
    def acquire(self, job: Hashable, destination: Destination, max_per_job: int) -> object:
        expected = self.model_reason(job, destination, max_per_job)
        got = self.alloc.acquire(job, destination, max_per_job=max_per_job, now=self.now)
        if isinstance(got, str):
            assert got == expected
            return multiple()  # no lease
        assert expected is None, f"expected {expected}, got a lease"
        pair = (got.address, got.port)
        assert (got.job, got.destination) == (job, destination)
        assert got.address in self.CONFIG.addresses
        assert self.CONFIG.first_port <= got.port <= self.CONFIG.last_port
        assert pair not in self.live[destination], f"{pair} handed out twice toward {destination}"
        released_at = self.released[destination].get(pair)
        if released_at is not None:
            assert self.now >= released_at + self.CONFIG.reuse_delay_s
        self.live[destination][pair] = job
        return got

    @rule(lease=consumes(leases), quarantine=st.booleans())
    def give_back(self, lease: Lease, quarantine: bool) -> None:
        pair = (lease.address, lease.port)
        if self.live[lease.destination].get(pair, object()) != lease.job:
            return  # already given back (the bundle may hold a lease twice)
        if quarantine:
            self.alloc.quarantine(lease, self.now)
        else:
            self.alloc.release(lease, self.now)
        del self.live[lease.destination][pair]
        self.released[lease.destination][pair] = self.now
        with pytest.raises(ValueError):
            self.alloc.release(lease, self.now)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.5, 5.0, 7.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def prune(self) -> None:
        expected = {
            d for d in self.alloc.destinations() if not self.live[d] and self.model_cooling(d) == 0
        }
        assert self.alloc.prune(self.now) == len(expected)
        assert not expected & set(self.alloc.destinations())

    @precondition(lambda self: any(self.live.values()))
    @rule()
    def release_everything(self) -> None:
        for destination, live in self.live.items():
            for pair, job in list(live.items()):
                self.alloc.release(Lease(job, destination, *pair), self.now)
                del live[pair]
                self.released[destination][pair] = self.now

    # invariants

    @invariant()
    def accounting_agrees(self) -> None:
        for destination in self.DESTINATIONS:
            live = self.live[destination]
            for job in self.JOBS:
                assert self.alloc.held(job, destination) == self.model_held(job, destination)
            by_address = collections.Counter(pair[0] for pair in live)
            assert self.alloc.in_use_by_address(destination) == dict(by_address)
            assert self.alloc.available(destination, self.now) == self.model_available(destination)
            assert 0 <= self.model_available(destination) <= self.CONFIG.capacity


AllocatorMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
TestAllocatorMachine = AllocatorMachine.TestCase


def test_a_port_without_time_wait_comes_back_at_once_and_last() -> None:
    alloc = allocator(ports=3)
    first = alloc.acquire("a", D1, max_per_job=BIG, now=0.0)
    assert isinstance(first, Lease)
    alloc.release(first, 0.0, time_wait=False)  # the server closed first
    assert alloc.available(D1, 0.0) == 3
    # The never-used pairs go first; the returned one is last in line.
    got = [alloc.acquire("a", D1, max_per_job=BIG, now=0.0) for _ in range(3)]
    assert all(isinstance(lease, Lease) for lease in got)
    assert [lease.port for lease in got] == [20001, 20002, first.port]  # type: ignore[union-attr]


def test_a_port_with_time_wait_is_held_back() -> None:
    alloc = allocator(ports=1)
    lease = alloc.acquire("a", D1, max_per_job=BIG, now=0.0)
    assert isinstance(lease, Lease)
    alloc.release(lease, 0.0, time_wait=True)
    assert alloc.acquire("a", D1, max_per_job=BIG, now=59.9) == PORT_POOL_EXHAUSTED
    assert isinstance(alloc.acquire("a", D1, max_per_job=BIG, now=60.0), Lease)
