"""Sandboxes on this node: register (verify, allocate, plumb, program tier 1), unregister.

Pure part (unit-tested without a kernel): sandbox id and name rules,
`IpPool`, `tcp_ports` (the union of a policy's rule ports), `exemptions`
(cidr rules inside an overridable always-denied range), `tier1_buckets` (the
DNS and SYN rate limits from the policy's limits), `verify_for_node`.

I/O part: `SandboxManager`. Registering `sandbox_id` with a JWS:

1. the id is checked (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``) and must be new;
2. the policy is verified with the trusted keys read from `keys_dir` (never
   keys from the network), must be valid now and must name this node
   (``job_not_bound_to_node``);
3. the lowest free address of the sandbox CIDR is taken (``.1`` is the
   gateway; the network and broadcast addresses are never used);
4. a record is written to ``state_dir/sandboxes/<short>.json`` *before* any
   kernel object exists, so an agent that dies half-way can clean up after
   itself at its next start (see below);
5. netns ``<prefix><short>`` (``egd-sbx-1a2b3c4d``; short = 8 hex of SHA-256 of
   the id) is created, and a veth pair: ``sb<short>`` in the node's
   namespace, ``eth0`` in the sandbox's;
6. tier 1 is attached to ``sb<short>`` and programmed (sandbox IP and MAC,
   TCP ports, exemptions, DNS and SYN token buckets) while both ends are
   still down, so no frame of the sandbox ever reaches the node's kernel
   unfiltered;
7. the node end gets the gateway address as a /32 (every sandbox veth has
   the same one, so the gateway answers ARP on each of them without
   proxy_arp), rp_filter off, IPv6 off, MTU `sandbox_mtu`, and a /32 route
   to the sandbox IP; the sandbox end gets ``ip/<cidr prefix>``, the same MTU,
   a default route via the gateway, and ``lo`` up. The sandbox therefore
   believes the whole CIDR is on-link, but the node answers ARP only for the
   gateway, and tier 1 drops the fleet's own ranges anyway;
8. the data path learns ``ip -> (job, digest)``.

Any failure rolls back everything the attempt made, in reverse order.
Unregistering removes the tier-1 entry first (frames then drop as
``no_policy``), then the link, the namespace and the record.

Restarts: the agent keeps no sandbox across a restart. It does not rebuild
sandboxes from its records (their policies would have to be re-verified and
the launcher would not know); at start it tears down whatever the records
name (veth, namespace), so a sandbox that outlived its agent loses its
network and its launcher sees the failure. Stopping the agent (SIGTERM)
unregisters every sandbox.

A policy that expires while its sandbox runs is withdrawn from tier 1 and
the data path (`expire`): the sandbox stays (state ``expired``) until it is
unregistered, but its packets are dropped as ``no_policy``.

Live policies (with a control plane; `egressd.agent.policy_watch`): step 2
also requires the control plane to hold the same policy (``policy_not_held``,
``policy_superseded``, ``control_unreachable``), and the sandbox runs on the
control plane's copy. `refresh_job` applies a change of the job: tier 1
reprogrammed in place (`Tier1.set_sandbox` replaces the entry; the veth and
address stay) and the data path's GENEVE digest updated; a deleted job (or
a new policy that does not verify here) withdraws its sandboxes from tier 1
(state ``withdrawn``, frames dropped as ``no_policy``) until a new policy
for the job is put or the sandbox is unregistered; the data path keeps their
return route, so the proxies' resets of their connections still arrive. A
re-signed copy of the same content only moves the digest (tier 1 untouched,
so its buckets are not refilled). `renew_job` fetches a re-signed copy ahead
of the held one's exp (`renewals` says when); an answer that does not
verify is logged and the held copy kept until its exp.

All kernel work runs on one worker thread (`executor`): `Tier1` and
pyroute2 are synchronous and not thread-safe, and one thread keeps the
order of changes obvious. Registrations are serialised by an asyncio lock.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import errno
import functools
import hashlib
import ipaddress
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egressd.agent.config import DATAPATH_KERNEL, AgentConfig
from egressd.agent.node_maps import SANDBOX_GSO_MAX_SIZE
from egressd.agent.policy_watch import (
    CHANGED,
    NO_SANDBOX,
    NOT_RESIGNED,
    RENEW_CHANGED,
    RENEW_DELETED,
    RENEW_REJECTED,
    RENEWED,
    SAME_COPY,
    ControlPolicies,
    ControlUnavailable,
    compare_copies,
    renew_at,
)
from egressd.agent.tier1 import Bucket, Count, Reason, Tier1, Tier1Error
from egressd.errors import EgressdError
from egressd.net import netns
from egressd.policy import addresses
from egressd.policy.errors import JwsError, KeyFileError
from egressd.policy.jws import DEFAULT_LEEWAY_S, VerifiedPolicy, verify_policy
from egressd.policy.keys import TrustedKeys, load_trusted_keys
from egressd.policy.model import Policy, PortRange, merge_port_ranges, same_content

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

log = structlog.get_logger("egressd.agent.sandboxes")
T = TypeVar("T")

SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SHORT_ID_LEN = 8  # hex digits
HOST_VETH_PREFIX = "sb"
PEER_VETH = "eth0"
RECORDS_DIR = "sandboxes"

# Error kinds: how the API answers (see egressd.agent.api).
POLICY_REJECTED = "policy_rejected"
BAD_REQUEST = "bad_request"
CONFLICT = "conflict"
NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"


class AgentError(EgressdError):
    """A sandbox operation that failed; `reason` is a token, `kind` says whose fault.

    `kind` is one of policy_rejected, bad_request, conflict, not_found,
    unavailable, internal.
    """

    def __init__(self, reason: str, detail: str = "", *, kind: str = INTERNAL) -> None:
        super().__init__(reason, detail)
        self.kind = kind


# --- pure rules --------------------------------------------------------------


def check_sandbox_id(sandbox_id: object) -> str:
    if not isinstance(sandbox_id, str) or not SANDBOX_ID.fullmatch(sandbox_id):
        raise AgentError(
            "bad_sandbox_id",
            "sandbox_id must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
            kind=BAD_REQUEST,
        )
    return sandbox_id


def short_id(sandbox_id: str) -> str:
    """8 hex digits naming the sandbox's netns and veth (stable, fits IFNAMSIZ)."""
    return hashlib.sha256(sandbox_id.encode("utf-8")).hexdigest()[:SHORT_ID_LEN]


@dataclass(frozen=True, slots=True)
class SandboxNames:
    netns: str
    host_veth: str
    peer_veth: str = PEER_VETH


def names_for(sandbox_id: str, netns_prefix: str) -> SandboxNames:
    short = short_id(sandbox_id)
    return SandboxNames(netns=f"{netns_prefix}{short}", host_veth=f"{HOST_VETH_PREFIX}{short}")


class IpPool:
    """Sandbox addresses of one CIDR: lowest free first; the gateway (.1),
    the network and the broadcast address are never handed out."""

    def __init__(self, cidr: IPv4Network) -> None:
        self.cidr = cidr
        self.gateway = cidr.network_address + 1
        self._first = int(cidr.network_address) + 2
        self._last = int(cidr.broadcast_address) - 1
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return max(0, self._last - self._first + 1)

    def __len__(self) -> int:
        return len(self._used)

    def allocate(self) -> IPv4Address:
        for value in range(self._first, self._last + 1):
            if value not in self._used:
                self._used.add(value)
                return IPv4Address(value)
        raise AgentError(
            "no_free_address",
            f"all {self.capacity} addresses of {self.cidr} are in use",
            kind=UNAVAILABLE,
        )

    def reserve(self, ip: IPv4Address) -> None:
        value = int(ip)
        if not self._first <= value <= self._last:
            raise AgentError("bad_address", f"{ip} is not a sandbox address of {self.cidr}")
        if value in self._used:
            raise AgentError("address_in_use", str(ip), kind=CONFLICT)
        self._used.add(value)

    def release(self, ip: IPv4Address) -> None:
        self._used.discard(int(ip))

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, IPv4Address) and int(ip) in self._used


def tcp_ports(policy: Policy) -> tuple[PortRange, ...]:
    """The union of every rule's ports, merged into sorted disjoint ranges.

    Tier 1 can only check ports (it does not know names); tier 2 checks the
    port per destination. A policy with no rules allows no port.
    """
    return merge_port_ranges(r for rule in policy.egress for r in rule.ports)


def exemptions(policy: Policy, fleet_ranges: Sequence[IPv4Network] = ()) -> tuple[IPv4Network, ...]:
    """The policy's IPv4 cidr rules that lift an always-denied range for tier 1.

    A cidr rule counts when it lies entirely inside an overridable
    always-denied range (`egressd.policy.addresses.overrides`): ``10.1.2.0/24``
    or ``169.254.169.254/32`` do; ``0.0.0.0/0``, a rule in a fleet range, or in
    loopback, never do. Rules outside every denied range need no exemption.
    """
    out: list[IPv4Network] = []
    for rule in policy.egress:
        net = rule.cidr
        if not isinstance(net, IPv4Network):
            continue
        match = addresses.find_denied(net.network_address, fleet_ranges=fleet_ranges)
        if match is None:
            continue
        if addresses.overrides(match, net.network_address, net) and net not in out:
            out.append(net)
    return tuple(out)


def tier1_buckets(policy: Policy) -> tuple[Bucket, Bucket]:
    """(dns, syn): the sandbox's tier-1 token buckets, one second's burst each.

    Both use the job's whole rate: ``dns_queries_per_s`` is per node, and a
    node cannot know how many sandboxes the job runs elsewhere, so the SYN
    bucket gets the job's fleet-wide ``max_new_connections_per_s`` (the
    proxies hold the job to it exactly; tier 1 only keeps a flood on the node).
    """
    limits = policy.limits
    return (
        Bucket.per_second(limits.dns_queries_per_s),
        Bucket.per_second(limits.max_new_connections_per_s),
    )


def verify_for_node(
    jws: object,
    trusted: TrustedKeys,
    node: str,
    *,
    now: float | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
) -> VerifiedPolicy:
    """Verify `jws` and check that it names `node`; AgentError(kind=policy_rejected).

    The reason is the JWS check's (``expired``, ``bad_signature``,
    ``unknown_kid`` ...) or ``job_not_bound_to_node``.
    """
    if not isinstance(jws, str) or not jws:
        raise AgentError("malformed", "jws must be a non-empty string", kind=POLICY_REJECTED)
    try:
        verified = verify_policy(jws, trusted, now=now, leeway_s=leeway_s)
    except JwsError as exc:
        raise AgentError(exc.reason, exc.detail, kind=POLICY_REJECTED) from exc
    if node not in verified.policy.nodes:
        raise AgentError(
            "job_not_bound_to_node",
            f"job {verified.policy.job_id} may run on "
            f"{', '.join(verified.policy.nodes)}, not on {node}",
            kind=POLICY_REJECTED,
        )
    return verified


# --- the registry ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sandbox:
    """One registered sandbox and everything the agent made for it."""

    sandbox_id: str
    job_id: uuid.UUID
    digest: bytes
    kid: str
    exp: int
    ip: IPv4Address
    gateway: IPv4Address
    prefixlen: int
    netns: str
    host_veth: str
    peer_veth: str
    ifindex: int
    mac: str
    tcp_ports: tuple[PortRange, ...]
    exemptions: tuple[IPv4Network, ...]
    created_at: float = field(default=0.0)
    # The verified policy the sandbox runs on (its held copy): renewal compares content.
    policy: Policy | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "job_id": str(self.job_id),
            "digest": self.digest.hex(),
            "kid": self.kid,
            "exp": self.exp,
            "ip": str(self.ip),
            "prefixlen": self.prefixlen,
            "gateway": str(self.gateway),
            "netns": self.netns,
            "interface": self.peer_veth,
            "host_veth": self.host_veth,
            "mac": self.mac,
            "tcp_ports": [str(p) for p in self.tcp_ports],
            "exemptions": [str(n) for n in self.exemptions],
        }


class SandboxListener(Protocol):
    """What the data path needs to know about sandboxes."""

    def sandbox_added(self, sandbox: Sandbox) -> None: ...

    def sandbox_removed(self, sandbox: Sandbox) -> None: ...


@dataclass(slots=True)
class _Undo:
    """Rollback steps of one registration attempt, run in reverse."""

    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def run(self) -> None:
        for what, fn in reversed(self.steps):
            try:
                fn()
            except (EgressdError, OSError) as exc:
                log.warning("rollback_step_failed", step=what, error=str(exc))
        self.steps.clear()


class SandboxManager:
    """The node's sandboxes; every kernel change happens on `executor`'s one thread."""

    def __init__(
        self,
        config: AgentConfig,
        tier1: Tier1,
        listener: SandboxListener,
        executor: Executor,
        *,
        clock: Callable[[], float] = time.time,
        keys_loader: Callable[[Path], TrustedKeys] = load_trusted_keys,
    ) -> None:
        self.config = config
        self.tier1 = tier1
        self.listener = listener
        self.executor = executor
        self.clock = clock
        self._keys_loader = keys_loader
        # AgentService resolves "auto" (the control plane's CIDR) before it builds the manager.
        assert config.sandbox_cidr is not None, "sandbox_cidr not resolved"
        self.pool = IpPool(config.sandbox_cidr)
        self._sandboxes: dict[str, Sandbox] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._expired: set[str] = set()
        # Sandboxes whose job the control plane deleted (or whose new policy does
        # not verify here): sandbox id -> reason; tier 1 drops their frames.
        self._withdrawn: dict[str, str] = {}
        # The control plane (None: no control_url; registrations are not checked
        # against it and nothing is watched). See egressd.agent.policy_watch.
        self.control: ControlPolicies | None = None
        self._lock = asyncio.Lock()
        self.records_dir = config.state_dir / RECORDS_DIR
        # Tier-1 counters of veths that are gone, so that totals never go down.
        self._retired: dict[Reason, list[int]] = {}
        self._counters_lock = threading.Lock()

    # -- queries ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sandboxes)

    def get(self, sandbox_id: str) -> Sandbox | None:
        return self._sandboxes.get(sandbox_id)

    # Shadows `list` in the annotations of the methods below: they say builtins.list.
    def list(self) -> list[Sandbox]:
        return sorted(self._sandboxes.values(), key=lambda s: int(s.ip))

    def state(self, sandbox_id: str) -> str:
        if sandbox_id in self._withdrawn:
            return "withdrawn"
        return "expired" if sandbox_id in self._expired else "active"

    def jobs(self) -> set[uuid.UUID]:
        """The jobs with a sandbox on this node."""
        return {s.job_id for s in list(self._sandboxes.values())}

    def by_ifindex(self, ifindex: int) -> Sandbox | None:
        """The registered sandbox behind host veth `ifindex` (tier-1 events name the veth)."""
        for sandbox in list(self._sandboxes.values()):
            if sandbox.ifindex == ifindex:
                return sandbox
        return None

    def tier1_totals(self) -> dict[Reason, Count]:
        """Tier-1 counters summed over every veth, past ones included (for /metrics)."""
        with self._counters_lock:
            live = self.tier1.counters()
            out: dict[Reason, list[int]] = {r: list(v) for r, v in self._retired.items()}
        for (_ifindex, reason), count in live.items():
            acc = out.setdefault(reason, [0, 0])
            acc[0] += count.packets
            acc[1] += count.bytes
        return {r: Count(p, b) for r, (p, b) in out.items()}

    def tier1_by_sandbox(self) -> dict[Sandbox, dict[Reason, Count]]:
        """The live tier-1 counters of each registered sandbox (for /metrics).

        Only reasons that counted at least one frame; a sandbox's series end
        when it is unregistered (its counts stay in `tier1_totals`).
        """
        by_ifindex = {s.ifindex: s for s in list(self._sandboxes.values())}
        with self._counters_lock:
            live = self.tier1.counters()
        out: dict[Sandbox, dict[Reason, Count]] = {}
        for (ifindex, reason), count in live.items():
            sandbox = by_ifindex.get(ifindex)
            if sandbox is not None:
                out.setdefault(sandbox, {})[reason] = count
        return out

    # -- register / unregister ---------------------------------------------------

    async def register(self, sandbox_id: object, jws: object) -> Sandbox:
        """Verify, allocate, plumb, program tier 1; raises AgentError.

        The work runs in its own task, shielded: a caller that goes away (a
        client disconnect, the API shutting down) cannot leave half a sandbox
        behind; the registration completes and `unregister_all` sees it.
        """
        sandbox_id = check_sandbox_id(sandbox_id)
        return await self._shielded(self._register(sandbox_id, jws), f"register:{sandbox_id}")

    async def unregister(self, sandbox_id: str) -> None:
        await self._shielded(self._unregister(sandbox_id), f"unregister:{sandbox_id}")

    async def _shielded(self, coro: Coroutine[Any, Any, T], name: str) -> T:
        task = asyncio.create_task(coro, name=name)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _register(self, sandbox_id: str, jws: object) -> Sandbox:
        async with self._lock:
            if sandbox_id in self._sandboxes:
                raise AgentError("duplicate_sandbox", sandbox_id, kind=CONFLICT)
            names = names_for(sandbox_id, self.config.sandbox_netns_prefix)
            if any(s.host_veth == names.host_veth for s in self._sandboxes.values()):
                raise AgentError("id_collision", f"{sandbox_id} hashes like another", kind=CONFLICT)
            trusted = await self._trusted_keys()
            verified = verify_for_node(jws, trusted, self.config.name, now=self.clock())
            if self.control is not None:
                verified = await self._held_copy(self.control, verified, trusted)
            ip = self.pool.allocate()
            try:
                loop = asyncio.get_running_loop()
                sandbox = await loop.run_in_executor(
                    self.executor, self._setup, sandbox_id, names, verified, ip
                )
            except BaseException:
                self.pool.release(ip)
                raise
            self._sandboxes[sandbox_id] = sandbox
            self.listener.sandbox_added(sandbox)
        log.info(
            "sandbox_registered",
            sandbox_id=sandbox_id,
            job_id=str(sandbox.job_id),
            ip=str(ip),
            netns=sandbox.netns,
            kid=sandbox.kid,
        )
        return sandbox

    async def _unregister(self, sandbox_id: str) -> None:
        async with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
            if sandbox is None:
                raise AgentError("unknown_sandbox", sandbox_id, kind=NOT_FOUND)
            self.listener.sandbox_removed(sandbox)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.executor, self._teardown, sandbox)
            finally:
                # Whatever failed is logged by _teardown; never keep a half sandbox.
                del self._sandboxes[sandbox_id]
                self._expired.discard(sandbox_id)
                self._withdrawn.pop(sandbox_id, None)
                self.pool.release(sandbox.ip)
        log.info("sandbox_unregistered", sandbox_id=sandbox_id, job_id=str(sandbox.job_id))

    async def unregister_all(self) -> None:
        """Unregister every sandbox, registrations still in flight included."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for sandbox_id in list(self._sandboxes):
            with contextlib.suppress(AgentError):
                await self.unregister(sandbox_id)

    async def expire(self) -> builtins.list[str]:
        """Withdraw the sandboxes whose policy expired (leeway included); their ids."""
        now = self.clock()
        due = [
            s
            for s in self._sandboxes.values()
            if s.sandbox_id not in self._expired
            and s.sandbox_id not in self._withdrawn
            and now - DEFAULT_LEEWAY_S >= s.exp
        ]
        if not due:
            return []
        async with self._lock:
            loop = asyncio.get_running_loop()
            for sandbox in due:
                if self._sandboxes.get(sandbox.sandbox_id) is not sandbox:
                    continue
                self.listener.sandbox_removed(sandbox)
                self._expired.add(sandbox.sandbox_id)
                try:
                    await loop.run_in_executor(
                        self.executor, self.tier1.remove_sandbox, sandbox.ifindex
                    )
                except Tier1Error as exc:
                    log.error("expire_failed", sandbox_id=sandbox.sandbox_id, error=str(exc))
                log.info(
                    "sandbox_policy_expired",
                    sandbox_id=sandbox.sandbox_id,
                    job_id=str(sandbox.job_id),
                )
        return [s.sandbox_id for s in due]

    # -- live policies (egressd.agent.policy_watch) ---------------------------------------

    async def _held_copy(
        self, control: ControlPolicies, verified: VerifiedPolicy, trusted: TrustedKeys
    ) -> VerifiedPolicy:
        """The control plane's copy of the presented policy; AgentError if it holds none,
        holds another, or cannot be asked (fail closed)."""
        job_id = verified.policy.job_id
        try:
            token = await control.held(job_id)
        except ControlUnavailable as exc:
            raise AgentError(
                "control_unreachable",
                f"cannot check job {job_id} with the control plane: {exc.detail}",
                kind=UNAVAILABLE,
            ) from exc
        if token is None:
            raise AgentError(
                "policy_not_held",
                f"the control plane holds no policy for job {job_id}: sign it with "
                "`egressd job put POLICY.json` and use the JWS it prints",
                kind=POLICY_REJECTED,
            )
        # The same checks as the presented JWS (keys, validity, this node).
        held = verify_for_node(token, trusted, self.config.name, now=self.clock())
        if not same_content(held.policy, verified.policy):
            raise AgentError(
                "policy_superseded",
                f"the control plane holds another policy for job {job_id}: use the JWS of "
                f"`egressd job get {job_id}`, or sign this one with `egressd job put POLICY.json`",
                kind=POLICY_REJECTED,
            )
        # Same content: run on the control plane's copy, whose digest the proxies fetch too.
        return held

    async def refresh_job(self, job_id: uuid.UUID) -> builtins.list[str]:
        """Refetch the job's policy and reprogram (or withdraw) its sandboxes here.

        Under the registration lock, the fetch included, so that a registration
        and a change of the same job are applied in the order the control plane
        answered them. Returns the ids of the sandboxes changed. Raises
        ControlUnavailable (the sandboxes keep their policy until its exp).
        """
        control = self.control
        if control is None:
            return []
        async with self._lock:
            targets = [s for s in self._sandboxes.values() if s.job_id == job_id]
            if not targets:
                return []
            token = await control.held(job_id)
            if token is None:
                return await self._withdraw(targets, "policy_deleted")
            try:
                verified = verify_for_node(
                    token, await self._trusted_keys(), self.config.name, now=self.clock()
                )
            except AgentError as exc:
                return await self._withdraw(targets, exc.reason)
            return await self._reprogram(targets, verified)

    async def _reprogram(
        self, targets: builtins.list[Sandbox], verified: VerifiedPolicy
    ) -> builtins.list[str]:
        policy = verified.policy
        ports = tcp_ports(policy)
        exempt = exemptions(policy, self.config.fleet_ranges)
        dns, syn = tier1_buckets(policy)
        loop = asyncio.get_running_loop()
        changed = []
        reprogrammed = False
        for old in targets:
            if old.digest == verified.digest and old.sandbox_id not in self._withdrawn:
                continue
            # A re-signed copy of what tier 1 enforces already only moves the digest:
            # rewriting the entry would refill the sandbox's buckets at every re-sign.
            kind = compare_copies(old.digest, old.policy, verified.digest, policy)
            live = old.sandbox_id not in self._expired and old.sandbox_id not in self._withdrawn
            if kind == CHANGED or not live:
                reprogrammed = True
                program = functools.partial(
                    self.tier1.set_sandbox,
                    old.ifindex,
                    old.ip,
                    old.mac,
                    ports,
                    exempt,
                    dns=dns,
                    syn=syn,
                )
                try:
                    await loop.run_in_executor(self.executor, program)
                except Tier1Error as exc:
                    log.error(
                        "job_policy_update_failed",
                        sandbox_id=old.sandbox_id,
                        reason=exc.reason,
                        detail=exc.detail,
                    )
                    await self._withdraw([old], f"tier1_{exc.reason}")
                    continue
            new = dataclasses.replace(
                old,
                digest=verified.digest,
                kid=verified.kid,
                exp=int(policy.exp or 0),
                tcp_ports=ports,
                exemptions=exempt,
                policy=policy,
            )
            self.listener.sandbox_removed(old)
            self._sandboxes[old.sandbox_id] = new
            self.listener.sandbox_added(new)
            self._expired.discard(old.sandbox_id)
            self._withdrawn.pop(old.sandbox_id, None)
            changed.append(old.sandbox_id)
        if changed:
            log.info(
                "job_policy_updated" if reprogrammed else "job_policy_renewed",
                job_id=str(policy.job_id),
                digest=verified.digest.hex(),
                exp=policy.exp,
                sandbox_ids=changed,
                tcp_ports=[str(p) for p in ports],
            )
        return changed

    def renewals(self) -> dict[uuid.UUID, float]:
        """When each job's held copy here is due for renewal (`policy_watch.renew_at`):
        the earliest over its sandboxes. Withdrawn ones wait for the watch (a put)."""
        out: dict[uuid.UUID, float] = {}
        for sandbox in list(self._sandboxes.values()):
            if sandbox.sandbox_id in self._withdrawn:
                continue
            nbf = sandbox.policy.nbf if sandbox.policy is not None else None
            at = renew_at(nbf, sandbox.exp)
            if at is not None and at < out.get(sandbox.job_id, float("inf")):
                out[sandbox.job_id] = at
        return out

    async def renew_job(self, job_id: uuid.UUID) -> str:
        """Renew the held copy of the job's policy from the control plane, ahead of its exp.

        Like `refresh_job`, except that an answer that does not verify here
        keeps the held copy (until its exp) instead of withdrawing: a renewal
        is not news that the job changed. Returns a `policy_watch` RENEW_*
        token; raises ControlUnavailable (the held copy is kept).
        """
        control = self.control
        if control is None:
            raise ControlUnavailable("the agent has no control plane")
        async with self._lock:
            targets = [
                s
                for s in self._sandboxes.values()
                if s.job_id == job_id and s.sandbox_id not in self._withdrawn
            ]
            if not targets:
                return NO_SANDBOX
            token = await control.held(job_id)
            if token is None:
                await self._withdraw(targets, "policy_deleted")
                return RENEW_DELETED
            try:
                verified = verify_for_node(
                    token, await self._trusted_keys(), self.config.name, now=self.clock()
                )
                if verified.policy.job_id != job_id:
                    raise AgentError(
                        "wrong_job", f"asked for {job_id}, got {verified.policy.job_id}"
                    )
            except AgentError as exc:
                log.warning(
                    "job_policy_renewal_rejected",
                    job_id=str(job_id),
                    reason=exc.reason,
                    detail=exc.detail,
                    kept_exp=min(s.exp for s in targets),
                )
                return RENEW_REJECTED
            kinds = {
                compare_copies(s.digest, s.policy, verified.digest, verified.policy)
                for s in targets
            }
            if kinds == {SAME_COPY}:
                return NOT_RESIGNED  # not re-signed yet (a longer TTL now?): retried later
            await self._reprogram(targets, verified)
            return RENEW_CHANGED if CHANGED in kinds else RENEWED

    async def _withdraw(self, targets: builtins.list[Sandbox], reason: str) -> builtins.list[str]:
        """Tier 1 forgets the sandboxes (their frames drop as no_policy); one event.

        The data path keeps their return route: the proxies reset the job's
        open connections at the same moment, and those resets must reach the
        sandbox (without them its connections would stall silently). Nothing
        leaves the sandbox any more, so only what a proxy sends back arrives.
        """
        loop = asyncio.get_running_loop()
        withdrawn = []
        for sandbox in targets:
            if sandbox.sandbox_id in self._withdrawn:
                continue
            self._withdrawn[sandbox.sandbox_id] = reason
            try:
                await loop.run_in_executor(
                    self.executor, self.tier1.remove_sandbox, sandbox.ifindex
                )
            except Tier1Error as exc:
                log.error("withdraw_failed", sandbox_id=sandbox.sandbox_id, error=str(exc))
            withdrawn.append(sandbox.sandbox_id)
        if withdrawn:
            log.warning(
                "job_policy_withdrawn",
                job_id=str(targets[0].job_id),
                reason=reason,
                sandbox_ids=withdrawn,
            )
        return withdrawn

    async def _trusted_keys(self) -> TrustedKeys:
        # Read on every registration: a rotated key is picked up without a restart.
        try:
            return await asyncio.to_thread(self._keys_loader, self.config.keys_dir)
        except KeyFileError as exc:
            raise AgentError(
                "trusted_keys_unavailable", f"{exc.reason}: {exc.detail}", kind=UNAVAILABLE
            ) from exc

    # -- kernel work (executor thread) -------------------------------------------------

    def _setup(
        self, sandbox_id: str, names: SandboxNames, verified: VerifiedPolicy, ip: IPv4Address
    ) -> Sandbox:
        config = self.config
        policy = verified.policy
        ports = tcp_ports(policy)
        exempt = exemptions(policy, config.fleet_ranges)
        prefixlen = self.pool.cidr.prefixlen
        gateway = config.gateway
        undo = _Undo()
        try:
            dns_bucket, syn_bucket = tier1_buckets(policy)
            self._write_record(sandbox_id, names)
            undo.push("record", lambda: self._remove_record(names))
            if netns.netns_exists(names.netns):
                raise AgentError("netns_exists", names.netns, kind=CONFLICT)
            with _net_errors("netns"):
                netns.ensure_netns(names.netns)
            undo.push("netns", lambda: _delete_netns(names.netns))
            _create_veth(names.host_veth, names.peer_veth, names.netns)
            undo.push("veth", lambda: _delete_link(names.host_veth))
            mac = _peer_mac(names.netns, names.peer_veth)
            ifindex = self.tier1.attach(names.host_veth)
            undo.push("tier1_attach", lambda: self.tier1.detach(names.host_veth))
            self.tier1.set_sandbox(ifindex, ip, mac, ports, exempt, dns=dns_bucket, syn=syn_bucket)
            undo.push("tier1_sandbox", lambda: self._forget_tier1(ifindex))
            # Only now, with tier 1 in place, may frames flow: configure and bring up.
            with _net_errors("sandbox_link"):
                # No IPv6 in the sandbox: tier 1 would drop it anyway, and
                # without an IPv6 address runsc's netstack sends no router or
                # neighbour solicitations that count as `ipv6` drops.
                for scope in ("all", "default", names.peer_veth):
                    netns.set_sysctl(names.netns, f"net.ipv6.conf.{scope}.disable_ipv6", 1)
                netns.set_mtu(names.netns, names.peer_veth, config.sandbox_mtu)
                if config.datapath == DATAPATH_KERNEL:
                    # tc adds 64 bytes to a super-packet too: it must stay a valid IPv4 packet.
                    netns.set_gso_max_size(names.netns, names.peer_veth, SANDBOX_GSO_MAX_SIZE)
                netns.ensure_addr(names.netns, names.peer_veth, f"{ip}/{prefixlen}")
                netns.set_link_up(names.netns, "lo")
                netns.set_link_up(names.netns, names.peer_veth)
                netns.ensure_route(names.netns, "default", via=gateway, dev=names.peer_veth)
            _configure_host_veth(names.host_veth, gateway, ip, config.sandbox_mtu)
        except Tier1Error as exc:
            undo.run()
            raise AgentError(f"tier1_{exc.reason}", exc.detail) from exc
        except BaseException:
            undo.run()
            raise
        return Sandbox(
            sandbox_id=sandbox_id,
            job_id=policy.job_id,
            digest=verified.digest,
            kid=verified.kid,
            exp=int(policy.exp or 0),
            ip=ip,
            gateway=gateway,
            prefixlen=prefixlen,
            netns=names.netns,
            host_veth=names.host_veth,
            peer_veth=names.peer_veth,
            ifindex=ifindex,
            mac=mac,
            tcp_ports=ports,
            exemptions=exempt,
            created_at=self.clock(),
            policy=policy,
        )

    def _teardown(self, sandbox: Sandbox) -> None:
        names = SandboxNames(sandbox.netns, sandbox.host_veth, sandbox.peer_veth)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("tier1_sandbox", lambda: self._forget_tier1(sandbox.ifindex)),
            ("tier1_detach", lambda: self.tier1.detach(sandbox.host_veth)),
            ("veth", lambda: _delete_link(sandbox.host_veth)),
            ("netns", lambda: _delete_netns(sandbox.netns)),
            ("record", lambda: self._remove_record(names)),
        ]
        failed = []
        for what, fn in steps:
            try:
                fn()
            except (EgressdError, OSError) as exc:
                failed.append(what)
                log.error(
                    "teardown_step_failed", sandbox_id=sandbox.sandbox_id, step=what, error=str(exc)
                )
        if failed:
            raise AgentError("teardown_incomplete", ", ".join(failed))

    def _forget_tier1(self, ifindex: int) -> None:
        self.tier1.remove_sandbox(ifindex)
        with self._counters_lock:
            last = self.tier1.clear_counters(ifindex)
            for reason, count in last.items():
                acc = self._retired.setdefault(reason, [0, 0])
                acc[0] += count.packets
                acc[1] += count.bytes

    # -- records and clean-up after a crash ------------------------------------------------

    def _record_path(self, names: SandboxNames) -> Path:
        return self.records_dir / f"{names.host_veth}.json"

    def _write_record(self, sandbox_id: str, names: SandboxNames) -> None:
        record = {"sandbox_id": sandbox_id, "netns": names.netns, "host_veth": names.host_veth}
        path = self._record_path(names)
        try:
            self.records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            raise AgentError("state_write_failed", f"{path}: {exc.strerror or exc}") from exc

    def _remove_record(self, names: SandboxNames) -> None:
        self._record_path(names).unlink(missing_ok=True)

    def cleanup_leftovers(self) -> builtins.list[str]:
        """Tear down what earlier runs recorded (blocking; call before serving)."""
        cleaned = []
        for path in _records(self.records_dir):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                ns, veth = str(record["netns"]), str(record["host_veth"])
                netns.check_netns_name(ns)
                netns.check_ifname(veth)
            except (OSError, ValueError, KeyError, TypeError, EgressdError) as exc:
                log.warning("bad_sandbox_record", path=str(path), error=str(exc))
                path.unlink(missing_ok=True)
                continue
            if not ns.startswith(self.config.sandbox_netns_prefix):
                log.warning("foreign_sandbox_record", path=str(path), netns=ns)
                path.unlink(missing_ok=True)
                continue
            try:
                with contextlib.suppress(Tier1Error):
                    self.tier1.detach(veth)
                _delete_link(veth)
                _delete_netns(ns)
            except EgressdError as exc:
                log.error("leftover_cleanup_failed", netns=ns, veth=veth, error=str(exc))
                continue
            path.unlink(missing_ok=True)
            cleaned.append(str(record.get("sandbox_id", ns)))
            log.info("leftover_sandbox_removed", sandbox_id=record.get("sandbox_id"), netns=ns)
        return cleaned


def _records(directory: Path) -> Iterator[Path]:
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.suffix == ".tmp":
            entry.unlink(missing_ok=True)
        elif entry.suffix == ".json":
            yield entry


# --- kernel helpers (node side: this process's own namespace) ------------------------


@contextlib.contextmanager
def _net_errors(what: str) -> Iterator[None]:
    try:
        yield
    except netns.NetError as exc:
        raise AgentError(f"{what}_failed", f"{exc.reason}: {exc.detail}") from exc


@contextlib.contextmanager
def _netlink(what: str) -> Iterator[IPRoute]:
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise AgentError("link_failed", f"{what}: {os.strerror(exc.code)}") from exc
    except OSError as exc:
        raise AgentError("link_failed", f"{what}: {exc.strerror or exc}") from exc


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _create_veth(host: str, peer: str, ns: str) -> None:
    """veth `host` (here, down) <-> `peer` (in netns `ns`, down)."""
    netns.check_ifname(host)
    with _netlink(f"add veth {host} <-> {ns}/{peer}") as ipr:
        if _index(ipr, host) is not None:
            raise AgentError("link_exists", f"{host} already exists", kind=CONFLICT)
        ipr.link("add", ifname=host, kind="veth", peer={"ifname": peer, "net_ns_fd": ns})


def _peer_mac(ns: str, ifname: str) -> str:
    try:
        with IPRoute(netns=ns, flags=0) as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise AgentError("link_failed", f"no {ifname} in {ns}")
            mac = ipr.get_links(found[0])[0].get("address")
    except NetlinkError as exc:
        raise AgentError("link_failed", f"{ns}/{ifname}: {os.strerror(exc.code)}") from exc
    except OSError as exc:
        raise AgentError("link_failed", f"{ns}/{ifname}: {exc.strerror or exc}") from exc
    if not isinstance(mac, str):
        raise AgentError("link_failed", f"{ns}/{ifname} has no MAC address")
    return mac


def _write_proc_sys(path: str, value: str) -> None:
    """A sysctl of this process's own network namespace (no subprocess)."""
    try:
        with open(f"/proc/sys/{path}", "w", encoding="ascii") as fh:
            fh.write(value)
    except OSError as exc:
        raise AgentError("sysctl_failed", f"{path}={value}: {exc.strerror or exc}") from exc


def _configure_host_veth(host: str, gateway: IPv4Address, ip: IPv4Address, mtu: int) -> None:
    _write_proc_sys(f"net/ipv4/conf/{host}/rp_filter", "0")
    with contextlib.suppress(AgentError):  # IPv6 may be compiled out or disabled already
        _write_proc_sys(f"net/ipv6/conf/{host}/disable_ipv6", "1")
    with _netlink(f"configure {host}") as ipr:
        index = _index(ipr, host)
        if index is None:
            raise AgentError("link_failed", f"{host} vanished")
        ipr.link("set", index=index, mtu=mtu)
        try:
            ipr.addr("add", index=index, address=str(gateway), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.link("set", index=index, state="up")
        ipr.route("replace", dst=f"{ip}/32", oif=index, scope="link")


def _delete_link(ifname: str) -> None:
    with _netlink(f"delete {ifname}") as ipr:
        index = _index(ipr, ifname)
        if index is None:
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise


def _delete_netns(name: str) -> None:
    with _net_errors("netns_delete"):
        netns.delete_netns(name)
