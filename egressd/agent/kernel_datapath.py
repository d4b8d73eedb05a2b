"""The agent's data path with ``"datapath": "kernel"``: packets never reach Python.

`KernelDatapath` is the userspace `Datapath` (still there, for its TUN: a frame
tier 1 allows goes to it only when the tail call into the kernel path is not set,
before `start` and after `stop`) plus the programming of bpf/node.c through
`egressd.agent.node.NodeKernel`:

* sandboxes: `sandbox_added` writes the sandbox's GENEVE prefix
  (`egressd.geneve.header_for`, the codec's golden bytes) under its host veth and
  its return entry (MACs, job id) under its IP; `sandbox_removed` deletes both;
* proxies: every proxy keeps the data path's index as its kernel slot; on each
  health or discovery change the slots are rewritten (address, up, a generation
  bumped when a slot's address changes) and a fresh Maglev table over the healthy
  proxies (`egressd.agent.node_maps.maglev_table`) is written into the inactive
  buffer and flipped. Flows pinned in nd_flows keep their proxy while it is up and
  its generation unchanged; only new flows and those of a proxy that went down
  (or away) are placed by the new table;
* counters: the kernel's per-proxy stats and drops are added to the same metric
  families as the userspace path's (`kernel_counters`).

`start` points tier 1's tail call at node_encap; `stop` clears it first.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import socket
import struct
from typing import TYPE_CHECKING

import structlog

from egressd.agent.config import AgentConfig, ProxyEndpoint
from egressd.agent.datapath import Datapath, KernelCounters
from egressd.agent.node import NodeKernel
from egressd.agent.node_maps import MAX_PROXIES, NodeError, ProxySlot, maglev_table, pack_maglev
from egressd.agent.tier1 import Tier1, Tier1Error
from egressd.agent.tier1_maps import mac_bytes
from egressd.geneve import JobOption, header_for

if TYPE_CHECKING:
    from collections.abc import Sequence

    from egressd.agent.sandboxes import Sandbox

log = structlog.get_logger("egressd.agent.kernel_datapath")

IPv4Address = ipaddress.IPv4Address
_SIOCGIFHWADDR = 0x8927


def link_mac(ifname: str) -> bytes:
    """The MAC address of link `ifname` in this thread's network namespace.

    An ioctl, not netlink: it runs on the event loop (pyroute2 would start a loop of its
    own there), and /sys may show another namespace than the agent's.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            raw = fcntl.ioctl(sock, _SIOCGIFHWADDR, struct.pack("256s", ifname.encode()))
    except OSError as exc:
        raise NodeError("bad_sandbox", f"link {ifname}: {exc.strerror or exc}") from exc
    return raw[18:24]  # struct ifreq: name[16], then sockaddr {u16 family, data}


class KernelDatapath(Datapath):
    """`Datapath` whose packets are carried by bpf/node.c (see the module docstring)."""

    def __init__(
        self,
        config: AgentConfig,
        tun_fd: int,
        *,
        node: NodeKernel,
        tier1: Tier1,
    ) -> None:
        super().__init__(config, tun_fd)
        self.node = node
        self.tier1 = tier1
        self._slots: dict[int, ProxySlot] = {}
        self._forwarding = False
        self._sync_proxies()

    # -- lifecycle ------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        super().start(loop)
        try:
            self.tier1.set_forward(self.node.encap_fd)
        except Tier1Error as exc:
            raise NodeError("attach_failed", f"tier 1 tail call: {exc.detail}") from exc
        self._forwarding = True

    def stop(self) -> None:
        if self._forwarding:
            self._forwarding = False
            try:
                self.tier1.clear_forward()
            except Tier1Error as exc:
                log.error("clear_forward_failed", reason=exc.reason, detail=exc.detail)
        super().stop()

    # -- sandboxes ------------------------------------------------------------------

    def sandbox_added(self, sandbox: Sandbox) -> None:
        super().sandbox_added(sandbox)
        job = JobOption(sandbox.job_id.bytes, sandbox.digest)
        try:
            self.node.set_sandbox(
                sandbox.ifindex,
                sandbox.ip,
                prefix=header_for(self._vni, job),
                mac=mac_bytes(sandbox.mac),
                gw_mac=link_mac(sandbox.host_veth),
                job_id=job.job_id,
            )
        except (NodeError, Tier1Error) as exc:
            # Its frames then drop as no_sandbox: counted, never sent unlabelled.
            log.error(
                "kernel_sandbox_failed",
                sandbox_id=sandbox.sandbox_id,
                reason=exc.reason,
                detail=exc.detail,
            )

    def sandbox_removed(self, sandbox: Sandbox) -> None:
        super().sandbox_removed(sandbox)
        try:
            self.node.remove_sandbox(sandbox.ifindex, sandbox.ip)
        except NodeError as exc:
            log.error(
                "kernel_sandbox_failed",
                sandbox_id=sandbox.sandbox_id,
                reason=exc.reason,
                detail=exc.detail,
            )

    # -- proxies --------------------------------------------------------------------

    def proxy_health(self, name: str, up: bool) -> None:
        super().proxy_health(name, up)
        self._sync_proxies()

    def set_proxies(self, proxies: Sequence[ProxyEndpoint]) -> None:
        super().set_proxies(proxies)
        self._sync_proxies()

    def _sync_proxies(self) -> None:
        """Rewrite the slots and the Maglev table from the userspace path's proxy state."""
        healthy = set(self.healthy)
        slots: dict[int, ProxySlot] = {}
        for index, name in enumerate(self.proxy_names):
            if index >= MAX_PROXIES:
                log.error("too_many_proxies", proxy=name, slot=index)
                healthy.discard(name)
                continue
            active = name in self._active
            addr = IPv4Address(self._proxy_addr[index]) if active else None
            old = self._slots.get(index)
            gen = 0 if old is None else old.gen + (old.addr != addr)
            slots[index] = ProxySlot(addr, active and name in healthy, gen)
        table = pack_maglev(maglev_table(healthy), {n: self._proxy_index[n] for n in healthy})
        try:
            self.node.set_proxies(slots, table)
        except NodeError as exc:
            log.error("kernel_proxies_failed", reason=exc.reason, detail=exc.detail)
            return
        self._slots = slots
        log.info("kernel_proxies", healthy=sorted(healthy))

    # -- metrics --------------------------------------------------------------------

    def kernel_counters(self) -> KernelCounters:
        stats = self.node.stats(range(len(self.proxy_names)))
        drops = {reason.value: packets for reason, (packets, _) in self.node.drops().items()}
        return KernelCounters(stats, drops)
