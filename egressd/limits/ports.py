"""The source-port allocator: the proxy's safeguard against port exhaustion.

Every upstream socket is bound to an (egress address, port) that this
allocator chose. A destination sees connections from the proxy's egress
addresses; what can run out is the number of distinct source (address, port)
pairs toward *one* destination (IP, port, protocol), since the kernel needs
each 4-tuple to be unique. So ports are accounted per destination, as Cloud
NAT does per VM:

* a job holds at most ``max_per_job`` ports toward one destination (the
  policy's ``ports_per_destination``) -> `PORT_BUDGET_EXHAUSTED`;
* ``min_per_job`` ports per destination are guaranteed to every job: a job
  that already holds its minimum may take another port only if what stays
  free covers the minimum of every job below it (its deficit) plus the
  minimum of ``reserved_newcomers`` jobs that hold none yet -> otherwise
  `PORT_POOL_EXHAUSTED`, as when no port is free at all;
* a released port is not handed out toward the same destination for
  ``reuse_delay_s`` (the kernel's TIME_WAIT, 60 s on Linux) when the proxy's
  socket may be in TIME_WAIT (the proxy closed first), so a new connection
  never collides with the old one's 4-tuple. It may be used toward other
  destinations at once. A port whose connection left no TIME_WAIT on the
  proxy goes back to the end of the free list at once: with servers that
  close first (HTTP ``Connection: close``) the pool is not drained by
  TIME_WAIT that lives on the server;

The same (address, port) is shared by connections to different destinations
(the proxy sets SO_REUSEADDR on upstream sockets), so more egress addresses
scale every destination's pool: its size is ``len(addresses) * len(ports)``.
Candidate ports are handed out round-robin over the addresses, in order;
every pair is used once before any is used again (then the one free the
longest), so a 4-tuple comes back as late as the pool allows.

`quarantine` takes a lease whose bind failed (someone else holds the port
on this host): the port is held back like a released one, without counting
for the job, so the caller can try another.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from egressd.limits import PORT_BUDGET_EXHAUSTED, PORT_POOL_EXHAUSTED

IPv4Address = ipaddress.IPv4Address

#: Linux's TCP_TIMEWAIT_LEN.
DEFAULT_REUSE_DELAY_S = 60.0
#: Below the kernel's ephemeral range (32768-60999), so that a proxy's own
#: client sockets never take a port the allocator hands out.
DEFAULT_SOURCE_PORTS = (16_384, 32_767)
#: Cloud NAT's default minimum ports per VM.
DEFAULT_MIN_PER_JOB = 64
DEFAULT_RESERVED_NEWCOMERS = 4


@dataclass(frozen=True, slots=True)
class Destination:
    ip: IPv4Address
    port: int
    proto: str = "tcp"
    # IPv4Address hashes through hex() every time; a destination is a dict
    # key several times per connection, so its hash is computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((int(self.ip), self.port, self.proto)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.proto}"


@dataclass(frozen=True, slots=True)
class PortPoolConfig:
    """The pool: egress addresses x a port range, and the per-job guarantees."""

    addresses: tuple[IPv4Address, ...]
    first_port: int = DEFAULT_SOURCE_PORTS[0]
    last_port: int = DEFAULT_SOURCE_PORTS[1]
    min_per_job: int = DEFAULT_MIN_PER_JOB
    reserved_newcomers: int = DEFAULT_RESERVED_NEWCOMERS
    reuse_delay_s: float = DEFAULT_REUSE_DELAY_S
    #: A proxy worker's slice of the range: the ports p with p % stride == offset (worker
    #: `offset` of `stride`), so workers never hand out the same pair; 1, 0: every port.
    stride: int = 1
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("addresses: at least one egress address is needed")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError("addresses: must be distinct")
        if not 1024 <= self.first_port <= self.last_port <= 65535:
            raise ValueError("ports: must be a range within 1024-65535")
        if not 0 <= self.offset < self.stride:
            raise ValueError("offset: must be 0 .. stride - 1")
        if self.ports_per_address < 1:
            raise ValueError(f"ports: no port p with p % {self.stride} == {self.offset} in range")
        if self.min_per_job < 0 or self.reserved_newcomers < 0:
            raise ValueError("min_per_job and reserved_newcomers must not be negative")
        if self.min_per_job * (self.reserved_newcomers + 1) > self.capacity:
            raise ValueError(
                f"min_per_job x (reserved_newcomers + 1) = "
                f"{self.min_per_job * (self.reserved_newcomers + 1)} exceeds the pool's "
                f"{self.capacity} ports per destination"
            )
        if self.reuse_delay_s < 0:
            raise ValueError("reuse_delay_s must not be negative")

    @property
    def _first(self) -> int:
        """The slice's first port."""
        return self.first_port + (self.offset - self.first_port) % self.stride

    @property
    def ports_per_address(self) -> int:
        first = self._first
        return 0 if first > self.last_port else (self.last_port - first) // self.stride + 1

    @property
    def capacity(self) -> int:
        """Source (address, port) pairs toward one destination."""
        return len(self.addresses) * self.ports_per_address

    def candidate(self, index: int) -> tuple[IPv4Address, int]:
        """The `index`-th pair in hand-out order: round-robin over the addresses."""
        n = len(self.addresses)
        return self.addresses[index % n], self._first + (index // n) * self.stride

    def index(self, address: IPv4Address, port: int) -> int | None:
        """The inverse of `candidate`; None for a pair outside the pool."""
        if not self.first_port <= port <= self.last_port or address not in self.addresses:
            return None
        if port % self.stride != self.offset:
            return None
        n = len(self.addresses)
        return (port - self._first) // self.stride * n + self.addresses.index(address)


@dataclass(frozen=True, slots=True)
class Lease:
    """A source (address, port) held toward a destination by a job."""

    job: Hashable
    destination: Destination
    address: IPv4Address
    port: int
    #: The pair's index in the pool (`PortPoolConfig.candidate`); -1: work it out.
    index: int = field(default=-1, compare=False)


@dataclass(slots=True)
class _DestinationPool:
    # Pairs are kept as their index in the pool (`PortPoolConfig.candidate`):
    # int keys hash fast, (IPv4Address, port) tuples do not.
    cursor: int = 0  # candidates below it have been handed out at least once
    free: collections.deque[int] = field(default_factory=collections.deque)
    cooling: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    in_use: dict[int, Hashable] = field(default_factory=dict)
    held: dict[Hashable, int] = field(default_factory=dict)
    by_address: dict[int, int] = field(default_factory=dict)  # address index -> pairs in use
    deficit: int = 0  # sum over jobs holding 1..min-1 ports of (min - held)

    def cool_down(self, now: float) -> None:
        while self.cooling and self.cooling[0][0] <= now:
            self.free.append(self.cooling.popleft()[1])

    def is_empty(self) -> bool:
        return not self.in_use and not self.cooling


class SourcePortAllocator:
    """Hands out source (address, port) pairs per destination; see the module doc."""

    def __init__(self, config: PortPoolConfig) -> None:
        self.config = config
        self._n_addresses = len(config.addresses)
        self._pools: dict[Destination, _DestinationPool] = {}
        # The addresses as text, by their place in the pool (`address_text`).
        self._texts = tuple(str(address) for address in config.addresses)
        # The config's derived numbers (properties that compute), read per connection.
        self._capacity = config.capacity
        self._min_per_job = config.min_per_job
        self._first_port = config.candidate(0)[1]
        self._stride = config.stride

    def available(self, destination: Destination, now: float) -> int:
        """Pairs that could be handed out toward `destination` now (ignoring reservations)."""
        pool = self._pools.get(destination)
        if pool is None:
            return self.config.capacity
        pool.cool_down(now)
        return self.config.capacity - len(pool.in_use) - len(pool.cooling)

    def acquire(
        self, job: Hashable, destination: Destination, *, max_per_job: int, now: float
    ) -> Lease | str:
        """A lease, or the refusal reason (`PORT_BUDGET_EXHAUSTED`, `PORT_POOL_EXHAUSTED`)."""
        pool = self._pools.get(destination)
        if pool is None:
            pool = self._pools[destination] = _DestinationPool()
        if pool.cooling:
            pool.cool_down(now)
        held = pool.held.get(job, 0)
        if held >= max_per_job:
            return PORT_BUDGET_EXHAUSTED
        available = self._capacity - len(pool.in_use) - len(pool.cooling)
        if available <= 0:
            return PORT_POOL_EXHAUSTED
        minimum = self._min_per_job
        if held >= minimum:
            reserve = pool.deficit + minimum * self.config.reserved_newcomers
            if available - 1 < reserve:
                return PORT_POOL_EXHAUSTED
        index = self._next_index(pool)
        pool.in_use[index] = job
        self._set_held(pool, job, held + 1, held)
        n = self._n_addresses
        slot = index % n
        pool.by_address[slot] = pool.by_address.get(slot, 0) + 1
        # `PortPoolConfig.candidate`, with its numbers read once.
        port = self._first_port + (index // n) * self._stride
        return Lease(job, destination, self.config.addresses[slot], port, index)

    def release(self, lease: Lease, now: float, *, time_wait: bool = True) -> None:
        """The lease's connection is closed: the port cools down toward its destination.

        `time_wait=False` says the proxy's socket did not enter TIME_WAIT (the
        connection never opened, was reset, or the destination closed first,
        so that TIME_WAIT is on its side): the pair goes back at once, to the
        end of the free list, so it is the last to be handed out again.
        """
        pool, index = self._take_back(lease)
        held = pool.held[lease.job]
        self._set_held(pool, lease.job, held - 1, held)
        if time_wait:
            pool.cooling.append((now + self.config.reuse_delay_s, index))
        else:
            pool.free.append(index)

    def quarantine(self, lease: Lease, now: float) -> None:
        """The lease's bind failed: hold the port back, and do not count it for the job."""
        self.release(lease, now)

    def address_text(self, lease: Lease) -> str:
        """The lease's address as text, for ``bind``: formatted once per pool
        address, not once per connection (``str`` of an address is ~1 µs)."""
        if lease.index >= 0:
            return self._texts[lease.index % self._n_addresses]
        return str(lease.address)

    def held(self, job: Hashable, destination: Destination) -> int:
        pool = self._pools.get(destination)
        return 0 if pool is None else pool.held.get(job, 0)

    def in_use(self, destination: Destination, lease: Lease) -> int:
        """Pairs of the lease's address in use toward `destination`."""
        pool = self._pools.get(destination)
        index = self._index(lease)
        if pool is None or index is None:
            return 0
        return pool.by_address.get(index % self._n_addresses, 0)

    def counts(self, lease: Lease) -> tuple[int, int]:
        """`held` by the lease's job toward its destination and `in_use` of its
        address there, from one look-up of the destination's pool."""
        pool = self._pools.get(lease.destination)
        if pool is None:
            return 0, 0
        held = pool.held.get(lease.job, 0)
        index = self._index(lease)
        if index is None:
            return held, 0
        return held, pool.by_address.get(index % self._n_addresses, 0)

    def in_use_by_address(self, destination: Destination) -> dict[IPv4Address, int]:
        pool = self._pools.get(destination)
        if pool is None:
            return {}
        return {self.config.addresses[a]: n for a, n in pool.by_address.items() if n}

    def destinations(self) -> Iterator[Destination]:
        return iter(list(self._pools))

    def prune(self, now: float) -> int:
        """Forget destinations with nothing in use or cooling; returns how many."""
        gone = []
        for destination, pool in self._pools.items():
            pool.cool_down(now)
            if pool.is_empty():
                gone.append(destination)
        for destination in gone:
            del self._pools[destination]
        return len(gone)

    # internals

    def _next_index(self, pool: _DestinationPool) -> int:
        # Never-used pairs first, then the longest-free one: a 4-tuple is
        # reused as late as the pool allows (a server may hold it in TIME_WAIT).
        if pool.cursor < self._capacity:
            pool.cursor += 1
            return pool.cursor - 1
        return pool.free.popleft()

    def _take_back(self, lease: Lease) -> tuple[_DestinationPool, int]:
        pool = self._pools.get(lease.destination)
        index = self._index(lease)
        if pool is None or index is None or pool.in_use.get(index, _NOBODY) != lease.job:
            raise ValueError(f"unknown lease {lease!r}")
        del pool.in_use[index]
        pool.by_address[index % self._n_addresses] -= 1
        return pool, index

    def _index(self, lease: Lease) -> int | None:
        """The lease's pair's index in the pool: the one `acquire` recorded in
        it, if it is that pair's, else worked out (None: not in the pool)."""
        index = lease.index
        n = self._n_addresses
        if (
            0 <= index < self._capacity
            and lease.port == self._first_port + (index // n) * self._stride
            and lease.address is self.config.addresses[index % n]
        ):
            return index
        return self.config.index(lease.address, lease.port)

    def _set_held(self, pool: _DestinationPool, job: Hashable, held: int, old: int) -> None:
        pool.deficit += self._deficit(held) - self._deficit(old)
        if held:
            pool.held[job] = held
        else:
            pool.held.pop(job, None)

    def _deficit(self, held: int) -> int:
        minimum = self.config.min_per_job
        return minimum - held if 0 < held < minimum else 0


_NOBODY = object()

__all__ = ["DEFAULT_REUSE_DELAY_S", "Destination", "Lease", "PortPoolConfig", "SourcePortAllocator"]
