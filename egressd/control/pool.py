"""Sandbox CIDRs that the control plane hands out to node agents (`"sandbox_cidr": "auto"`).

A fleet whose nodes come and go (a Kubernetes DaemonSet) cannot write each
node's sandbox CIDR into its configuration: every pod of the DaemonSet gets
the same one, and the control plane refuses overlapping node records. So a
node may register with `"sandbox_cidr": "auto"` and the control plane picks
one from its pool (`--sandbox-pool`, blocks of `--sandbox-prefix`).

`allocate` is pure (the node records and the pool in, a CIDR or
`PoolExhausted` out); the app calls it under its write lock, so two nodes
registering at once never get the same block. Decisions:

- Stable: a name that has a node record keeps that record's CIDR, whether it
  was allocated or set explicitly (an operator pins a node by registering it
  first), even if it lies outside the pool or the pool changed since. The
  record, one file in the state directory, is the allocation, so the same
  name gets the same CIDR back across agent and control-plane restarts.
  Deleting the record frees the block.
- New names get the lowest block of the pool that overlaps no node's CIDR
  (explicit ones included, inside the pool or not). Lowest-first keeps
  allocations compact and the result a function of the records alone.
- Exhausted: `PoolExhausted` (reason `sandbox_pool_exhausted`; the API
  answers 409): no guess, no smaller block.
- The default pool is the fleet's sandbox supernet (`100.96.0.0/16`, which
  proxies route to `gnv0` and every tier denies to sandboxes) in /24s: 256
  nodes. A pool must not hold the sandbox resolver address (100.100.100.53),
  which sandboxes reach through the proxies, not on a node's CIDR. A wider
  pool also needs the proxies' `sandbox_supernet` and the fleet ranges
  widened to match.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from egressd.control.records import SANDBOX_PREFIX_MIN, NodeRecord
from egressd.errors import EgressdError
from egressd.layout import RESOLVER, SANDBOX_SUPERNET

IPv4Network = ipaddress.IPv4Network

DEFAULT_POOL = SANDBOX_SUPERNET
DEFAULT_NODE_PREFIX = 24
# An agent needs a gateway and room for sandboxes: /29 at most (egressd.agent.config).
NODE_PREFIX_MAX = 29
EXHAUSTED = "sandbox_pool_exhausted"


class PoolExhausted(EgressdError):
    """No block of the pool is free; `detail` says how full it is."""

    def __init__(self, detail: str) -> None:
        super().__init__(EXHAUSTED, detail)


@dataclass(frozen=True, slots=True)
class SandboxPool:
    """Where auto-allocated sandbox CIDRs come from: `network` in blocks of `/prefixlen`.

    An unusable pool raises ValueError with one line of detail."""

    network: IPv4Network = DEFAULT_POOL
    prefixlen: int = DEFAULT_NODE_PREFIX

    def __post_init__(self) -> None:
        if not SANDBOX_PREFIX_MIN <= self.prefixlen <= NODE_PREFIX_MAX:
            raise ValueError(
                f"per-node prefix /{self.prefixlen}: must be "
                f"/{SANDBOX_PREFIX_MIN}../{NODE_PREFIX_MAX}"
            )
        if self.network.prefixlen > self.prefixlen:
            raise ValueError(f"pool {self.network} is smaller than one /{self.prefixlen} block")
        if RESOLVER in self.network:
            raise ValueError(f"pool {self.network} holds the sandbox resolver address {RESOLVER}")

    @property
    def blocks(self) -> int:
        return 1 << (self.prefixlen - self.network.prefixlen)

    def to_json(self) -> dict[str, object]:
        return {"pool": str(self.network), "prefixlen": self.prefixlen, "blocks": self.blocks}


@dataclass(frozen=True, slots=True)
class Allocation:
    """The CIDR for a node; `reused` when its record already had it."""

    cidr: IPv4Network
    reused: bool


def allocate(name: str, nodes: Iterable[NodeRecord], pool: SandboxPool) -> Allocation:
    """The sandbox CIDR for node `name` (see the module docstring); raises PoolExhausted."""
    records = list(nodes)
    for node in records:
        if node.name == name:
            return Allocation(node.sandbox_cidr, reused=True)
    size = 1 << (32 - pool.prefixlen)
    first = int(pool.network.network_address)
    last = int(pool.network.broadcast_address)
    # Taken address intervals in the pool, by start: one pass moves the candidate
    # block past each interval it overlaps (aligned up to a block boundary).
    taken = sorted(
        (int(n.sandbox_cidr.network_address), int(n.sandbox_cidr.broadcast_address))
        for n in records
        if n.sandbox_cidr.overlaps(pool.network)
    )
    candidate = first
    for lo, hi in taken:
        if hi < candidate:
            continue
        if lo > candidate + size - 1:
            break
        candidate = (hi + size) // size * size  # the first block boundary after hi
    if candidate + size - 1 <= last:
        return Allocation(IPv4Network((candidate, pool.prefixlen)), reused=False)
    in_pool = sum(1 for n in records if n.sandbox_cidr.overlaps(pool.network))
    raise PoolExhausted(
        f"no free /{pool.prefixlen} in {pool.network} ({pool.blocks} blocks; "
        f"{in_pool} node(s) hold CIDRs in it): widen --sandbox-pool, use a longer "
        "--sandbox-prefix, or delete nodes that are gone"
    )
