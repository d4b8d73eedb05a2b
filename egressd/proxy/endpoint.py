"""Validation of one received GENEVE datagram: a pure function, no I/O.

`validate(datagram, src_ip, nodes=..., vni=..., policy_lookup=...)` returns
one of three values:

* `Accepted`: write `inner` to the TUN and record the flow;
* `Dropped(reason)`: count and forget;
* `NeedPolicy(job_id)`: everything but the job's binding checked out and no
  verified policy is cached: the caller fetches it and validates again.

Checks, in this order (the first failing one names the reason):

1. the sender is a registered node (`unknown_node`); looked up first, so
   that bytes from anyone else cost one dict lookup and are never parsed;
2. `egressd.geneve.decode` (its reasons verbatim: `truncated`,
   `bad_version`, ..., `inner_bad_checksum`);
3. the VNI is the fleet's (`bad_vni`);
4. the inner source address is inside that node's sandbox CIDR
   (`source_outside_node_cidr`): a node can only speak for its own sandboxes;
5. the inner packet is TCP or UDP (`proto_not_allowed`), not a fragment
   (`fragmented`: a non-first fragment has no ports to check or record, and
   sandboxes get an MTU that makes fragmentation unnecessary), with a whole
   L4 header and non-zero ports (`malformed_l4`): TCP data offset >= 5 and
   within the packet, UDP length within the packet;
6. an offload option (class 0xFF01, type 0x02: the inner packet's GSO and
   checksum metadata, `egressd.geneve.offload_vnet_header`) must describe
   the inner packet (`bad_offload_option`) and is only accepted by a proxy
   whose TUN has offloads (`offload=True`; else `offload_disabled`: a
   super-packet must not reach a TUN that would take it for one packet);
   `Accepted.vnet` is then the virtio-net header to write in front of it;
7. the job's verified policy (`policy_lookup`, the proxy's own cache) names
   that node (`job_not_bound_to_node`); no cached policy -> `NeedPolicy`.

The GENEVE option also carries the digest of the policy the node enforces.
The proxy enforces its own verified policy, never the digest's. A digest
that differs from the cached policy's is reported
(`Accepted.digest_mismatch`) and the caller decides with
`egressd.proxy.digests` (the tunnel: a replaced policy's digest is accepted
for a grace period, then dropped as `stale_digest`; an unknown one is
accepted, counted and makes the proxy refetch, since the node may hold a
newer policy).

`Dropped` values are preallocated per reason: dropping allocates nothing.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import NamedTuple, Protocol

from egressd.geneve.codec import (
    DECODE_REASONS,
    OFFLOAD_REASON,
    GeneveError,
    JobOption,
    decode,
    offload_vnet_header,
)
from egressd.policy.jws import VerifiedPolicy
from egressd.proxy.registry import NodeEntry

PROTO_TCP = 6
PROTO_UDP = 17

ENDPOINT_REASONS: tuple[str, ...] = (
    "unknown_node",
    *DECODE_REASONS,
    "bad_vni",
    "source_outside_node_cidr",
    "proto_not_allowed",
    "fragmented",
    "malformed_l4",
    OFFLOAD_REASON,
    "offload_disabled",
    "job_not_bound_to_node",
)

# IPv4 header: ver_ihl, (tos, total, id), flags|fragment, (ttl), proto, (csum), src, dst.
_IPV4 = struct.Struct("!B5xHxB2xII")
_TCP = struct.Struct("!HH8xB")  # sport, dport, data offset << 4
_UDP = struct.Struct("!HHH")  # sport, dport, length
_TCP_MIN = 20
_UDP_LEN = 8
_FRAGMENT_BITS = 0x3FFF  # MF flag + fragment offset
MAX_JOB_IDS = 65536


class NodeLookup(Protocol):
    def node_by_underlay(self, ip: str) -> NodeEntry | None: ...


class Accepted(NamedTuple):
    inner: memoryview
    job: JobOption
    job_id: uuid.UUID
    node: NodeEntry
    policy: VerifiedPolicy
    src: int
    sport: int
    dst: int
    dport: int
    proto: int
    digest_mismatch: bool
    # The virtio-net header to write `inner` with (offload peers), None for a plain packet.
    vnet: bytes | None = None


class Dropped(NamedTuple):
    reason: str


class NeedPolicy(NamedTuple):
    job_id: uuid.UUID


Result = Accepted | Dropped | NeedPolicy

DROPPED: dict[str, Dropped] = {reason: Dropped(reason) for reason in ENDPOINT_REASONS}
_UNKNOWN_NODE = DROPPED["unknown_node"]
_BAD_VNI = DROPPED["bad_vni"]
_OUTSIDE = DROPPED["source_outside_node_cidr"]
_PROTO = DROPPED["proto_not_allowed"]
_FRAGMENT = DROPPED["fragmented"]
_MALFORMED = DROPPED["malformed_l4"]
_NOT_BOUND = DROPPED["job_not_bound_to_node"]
_BAD_OFFLOAD = DROPPED[OFFLOAD_REASON]
_OFFLOAD_DISABLED = DROPPED["offload_disabled"]


def validate(
    datagram: bytes | bytearray | memoryview,
    src_ip: str,
    *,
    nodes: NodeLookup,
    vni: int,
    policy_lookup: Callable[[uuid.UUID], VerifiedPolicy | None],
    job_ids: dict[bytes, uuid.UUID] | None = None,
    offload: bool = False,
) -> Result:
    """Check one datagram received from `src_ip` (see the module docstring).

    `job_ids`, when given, is the caller's memo of job id bytes -> UUID
    (building a UUID costs about as much as decoding the datagram); it is
    bounded to `MAX_JOB_IDS` entries.
    """
    node = nodes.node_by_underlay(src_ip)
    if node is None:
        return _UNKNOWN_NODE
    try:
        pkt = decode(datagram)
    except GeneveError as exc:
        return DROPPED.get(exc.reason) or Dropped(exc.reason)
    if pkt.vni != vni:
        return _BAD_VNI
    inner = pkt.inner
    ver_ihl, frag, proto, src, dst = _IPV4.unpack_from(inner, 0)
    if src & node.cidr_mask != node.cidr_base:
        return _OUTSIDE
    if proto != PROTO_TCP and proto != PROTO_UDP:
        return _PROTO
    if frag & _FRAGMENT_BITS:
        return _FRAGMENT
    ihl = (ver_ihl & 0x0F) << 2
    size = len(inner)
    if proto == PROTO_TCP:
        if size < ihl + _TCP_MIN:
            return _MALFORMED
        sport, dport, doff = _TCP.unpack_from(inner, ihl)
        doff = (doff >> 4) << 2
        if doff < _TCP_MIN or ihl + doff > size:
            return _MALFORMED
    else:
        if size < ihl + _UDP_LEN:
            return _MALFORMED
        sport, dport, length = _UDP.unpack_from(inner, ihl)
        if length < _UDP_LEN or ihl + length > size:
            return _MALFORMED
    if not sport or not dport:
        return _MALFORMED
    vnet = None
    if pkt.options:
        try:
            vnet = offload_vnet_header(pkt.options, inner)
        except GeneveError:
            return _BAD_OFFLOAD
        if vnet is not None and not offload:
            return _OFFLOAD_DISABLED
    job = pkt.job
    if job_ids is None:
        job_id = uuid.UUID(bytes=job.job_id)
    else:
        job_id = job_ids.get(job.job_id)  # type: ignore[assignment]
        if job_id is None:
            job_id = uuid.UUID(bytes=job.job_id)
            if len(job_ids) >= MAX_JOB_IDS:
                job_ids.clear()
            job_ids[job.job_id] = job_id
    verified = policy_lookup(job_id)
    if verified is None:
        return NeedPolicy(job_id)
    if node.name not in verified.policy.nodes:
        return _NOT_BOUND
    return Accepted(
        inner,
        job,
        job_id,
        node,
        verified,
        src,
        sport,
        dst,
        dport,
        proto,
        job.digest != verified.digest,
        vnet,
    )
