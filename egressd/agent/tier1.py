"""Tier 1: the tc ingress eBPF program on each sandbox veth, and its maps.

`bpf/tier1.c` decides per frame (see its header comment and DESIGN.md, "The
packet path", step 3); this module builds it, loads it, attaches it and keeps
its maps in step with the node's sandboxes.

How, and why (the loading, pinning and attaching are `egressd.ebpf.tc`, and the fds, pins
and their cleanup `egressd.ebpf.loaded.Loaded`, shared with `egressd.agent.node`,
`egressd.proxy.kernel` and `egressd.proxy.reuseport`):

* Build: `egressd.ebpf.build.build_object` runs clang into a cache directory
  when the object is missing or older than the source.
* Load: once per agent, ``bpftool prog load OBJ PIN pinmaps DIR``. bpftool
  (libbpf) does the ELF, BTF and relocation work; the program and its maps are
  pinned in a bpffs that this module mounts on ``STATE_DIR/bpffs``. Each mount
  of bpffs is its own instance, so two agents on one host (two node
  namespaces, two state dirs) never share maps, and nothing depends on
  /sys/fs/bpf being mounted.
* Maps: read and written through the bpf(2) syscall (`egressd.ebpf.syscall`,
  ctypes) on fds from ``BPF_OBJ_GET``: no process per update. At load the maps'
  key and value sizes are checked against the layouts below, so a C/Python
  drift fails loudly instead of corrupting entries.
* Attach: a clsact qdisc and one ``bpf direct-action`` filter (fixed priority
  and handle, created with "replace") on the veth's ingress, over rtnetlink
  (pyroute2) from the calling thread's network namespace. Attaching twice
  leaves one filter; a filter that outlives its agent keeps the old program
  until the next attach replaces it.

bpf(2) and bpffs do not care about network namespaces; only `Tier1.attach` and
`Tier1.detach` do, and they act in the namespace of the calling thread, which is
the node's when the agent runs under ``nsenter --net=/run/netns/NODE``.

Map layouts, the reason table and key/value packing are pure data in
`egressd.agent.tier1_maps`.
Token-bucket state lives in the sandbox entry and in the kernel only: a new
entry (registration) starts with full buckets, and an agent restart loads
fresh maps (its sandboxes are torn down anyway, see `egressd.agent.sandboxes`).
Denials are also events: `open_events` maps the t1_events ring buffer
(`egressd.agent.ringbuf`), which the program fills at most a few records per
second per sandbox (`EVENT_BUCKET`, carried in the sandbox entry).
Counters count skbs: a TSO/GSO super-packet from the sandbox's stack counts
once (the kernel segments it, with checksums, on its way into the TUN), and its
bytes are the frame's length on the veth, Ethernet header included.

Not thread-safe: one `Tier1` per agent, used from one thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Final

from egressd.agent.ringbuf import RingBuffer
from egressd.agent.tier1_maps import (
    CONFIG_KEY,
    COUNTER_VALUE,
    EXEMPT_VALUE,
    MAPS,
    SANDBOX_VALUE_SIZE,
    U32,
    DeniedRange,
    SandboxEntry,
    normalize_denied,
    pack_config,
    pack_counter_key,
    pack_denied_key,
    pack_denied_value,
    pack_exempt_key,
    pack_sandbox,
    unpack_counter_key,
    unpack_exempt_key,
    unpack_sandbox,
)

# Re-exported (`X as X`): the agent and the tests use tier1 as the one door to the maps' types.
from egressd.agent.tier1_maps import Bucket as Bucket
from egressd.agent.tier1_maps import Count as Count
from egressd.agent.tier1_maps import PortSpec as PortSpec
from egressd.agent.tier1_maps import Reason as Reason
from egressd.agent.tier1_maps import Tier1Error as Tier1Error
from egressd.agent.tier1_maps import Tier1Event as Tier1Event
from egressd.agent.tier1_maps import Verdict as Verdict  # callers label metrics with it
from egressd.agent.tier1_maps import denied_ranges as denied_ranges
from egressd.agent.tier1_maps import unpack_event as unpack_event
from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.loaded import Loaded
from egressd.errors import EgressdError

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

# Package data (pyproject.toml), so an installed egressd finds it too: in the
# checkout egressd/agent/bpf/tier1.c links to bpf/tier1.c, the one source, and a
# wheel carries a copy. clang reads it from the file system, hence a Path.
DEFAULT_SOURCE: Final = Path(str(resources.files("egressd.agent").joinpath("bpf", "tier1.c")))
PROG_NAME: Final = "tier1_ingress"
FILTER_NAME: Final = "egressd-tier1"


# ---------------------------------------------------------------------------
# The I/O edge.


def read_counters(fd: int, *, skip_unknown: bool = False) -> dict[tuple[int, Reason], Count]:
    """{(ifindex, reason): (packets, bytes)} summed over CPUs, from the t1_counters map `fd`
    (`Tier1.counters`, and the load test's fd on a running agent's pin).

    A reason code this checkout does not know is abi_mismatch, or left out with
    `skip_unknown` (a reader of another agent's map). Map errors are `EbpfError` map_failed.
    """
    name = "t1_counters"
    key_size = next(spec.key_size for spec in MAPS if spec.name == name)
    size = bpf.percpu_value_size(COUNTER_VALUE.size)
    cpus = bpf.possible_cpus()
    out = {}
    for key in tc.map_keys(fd, name, key_size):
        raw = tc.map_lookup(fd, name, key, size)
        if raw is None:
            continue
        try:
            slot = unpack_counter_key(key)
        except Tier1Error:
            if skip_unknown:
                continue
            raise
        out[slot] = Count(*tc.sum_percpu(raw, COUNTER_VALUE, cpus))
    return out


class Tier1(Loaded[Tier1Error]):
    """Tier 1 of one node: load once, attach per sandbox veth, program per sandbox.

    `denied`: the ranges to drop (see `denied_ranges`). `state_dir` is the
    node's own directory (bpffs mounted on ``state_dir/bpffs``, the compiled
    object in `cache_dir`, ``state_dir/cache`` by default).
    """

    def __init__(
        self,
        *,
        tun_ifindex: int,
        resolver: IPv4Address,
        denied: Iterable[DeniedRange],
        state_dir: Path,
        source: Path = DEFAULT_SOURCE,
        cache_dir: Path | None = None,
    ) -> None:
        if not isinstance(tun_ifindex, int) or tun_ifindex <= 0:
            raise Tier1Error("bad_config", f"TUN ifindex must be positive, got {tun_ifindex!r}")
        if not isinstance(resolver, IPv4Address):
            raise Tier1Error("bad_config", f"resolver must be an IPv4 address: {resolver!r}")
        self.tun_ifindex = tun_ifindex
        self.resolver = resolver
        self.denied = normalize_denied(denied)
        super().__init__(
            state_dir=state_dir,
            pin_name="bpffs",
            source=source,
            cache_dir=cache_dir,
            error=Tier1Error,
        )
        self._attached: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------

    def load(self) -> None:
        """Build if needed, mount the bpffs, load and pin, fill config and denied ranges.

        Pins left by an earlier agent that died are replaced.
        """
        if self.loaded:
            return
        with self._loading((PROG_NAME,), MAPS, single=True):
            self._map_update("t1_config", CONFIG_KEY, pack_config(self.tun_ifindex, self.resolver))
            for entry in self.denied:
                self._map_update(
                    "t1_denied", pack_denied_key(entry.network), pack_denied_value(entry)
                )

    def _unwind(self) -> list[EgressdError]:
        """`close`: detach from every veth this object attached to."""
        errors: list[EgressdError] = []
        for ifname in list(self._attached):
            try:
                self.detach(ifname)
            except Tier1Error as exc:
                errors.append(exc)
                self._attached.pop(ifname, None)
        return errors

    @property
    def prog_id(self) -> int:
        return bpf.prog_info(self._prog_fd(PROG_NAME)).prog_id

    # -- tc -------------------------------------------------------------------

    def attach(self, ifname: str) -> int:
        """Ensure clsact and our ingress filter on `ifname`; returns its ifindex."""
        prog_fd = self._prog_fd(PROG_NAME)
        ifindex = self._ebpf(tc.attach, ifname, prog_fd, name=FILTER_NAME)
        self._attached[ifname] = ifindex
        return ifindex

    def detach(self, ifname: str) -> None:
        """Remove our filter from `ifname` (and clsact once it holds nothing). Idempotent."""
        self._ebpf(tc.detach, ifname)
        self._attached.pop(ifname, None)

    @property
    def attached(self) -> Mapping[str, int]:
        return dict(self._attached)

    # -- sandboxes ------------------------------------------------------------

    def set_sandbox(
        self,
        ifindex: int,
        ip: IPv4Address,
        mac: str | bytes,
        tcp_ports: Iterable[PortSpec],
        exemptions: Iterable[IPv4Network] = (),
        *,
        dns: Bucket,
        syn: Bucket,
    ) -> None:
        """Create or replace the sandbox behind veth `ifindex`.

        `dns` limits its UDP datagrams and TCP SYNs to the resolver's port 53,
        `syn` its other TCP SYNs (those every other check allowed). Writing the
        entry refills both buckets.

        `exemptions` are the job's cidr rules that lie inside an overridable
        always-denied range (egressd.policy.addresses.overrides); any other
        network is refused with ``bad_exemption``. New exemptions go in
        before the entry, stale ones come out after it, so no packet sees a
        state that neither the old nor the new policy allows.
        """
        if not isinstance(ifindex, int) or ifindex <= 0:
            raise Tier1Error("bad_sandbox", f"ifindex must be positive, got {ifindex!r}")
        value = pack_sandbox(ip, mac, tcp_ports, dns=dns, syn=syn)
        wanted = {pack_exempt_key(ifindex, self._check_exemption(net)) for net in exemptions}
        stale = set(self._exempt_keys(ifindex)) - wanted
        for key in wanted:
            self._map_update("t1_exempt", key, EXEMPT_VALUE)
        self._map_update("t1_sandboxes", U32.pack(ifindex), value)
        for key in stale:
            self._map_delete("t1_exempt", key)

    def remove_sandbox(self, ifindex: int) -> None:
        """Forget the sandbox: its veth's frames drop as no_policy from now on. Idempotent."""
        self._map_delete("t1_sandboxes", U32.pack(ifindex))
        for key in self._exempt_keys(ifindex):
            self._map_delete("t1_exempt", key)

    def sandbox(self, ifindex: int) -> SandboxEntry | None:
        raw = self._map_lookup("t1_sandboxes", U32.pack(ifindex), SANDBOX_VALUE_SIZE)
        return None if raw is None else unpack_sandbox(raw)

    def sandboxes(self) -> dict[int, SandboxEntry]:
        out = {}
        for key in self._keys("t1_sandboxes"):
            raw = self._map_lookup("t1_sandboxes", key, SANDBOX_VALUE_SIZE)
            if raw is not None:
                out[U32.unpack(key)[0]] = unpack_sandbox(raw)
        return out

    def exemptions(self, ifindex: int) -> set[IPv4Network]:
        return {unpack_exempt_key(key)[1] for key in self._exempt_keys(ifindex)}

    def _check_exemption(self, net: IPv4Network) -> IPv4Network:
        if not isinstance(net, IPv4Network):
            raise Tier1Error("bad_exemption", f"not an IPv4 network: {net!r}")
        around = [e for e in self.denied if net.subnet_of(e.network)]
        innermost = max(around, key=lambda e: e.network.prefixlen, default=None)
        if innermost is None or not innermost.overridable:
            raise Tier1Error("bad_exemption", f"{net} is not inside an overridable denied range")
        return net

    def _exempt_keys(self, ifindex: int) -> list[bytes]:
        return [k for k in self._keys("t1_exempt") if unpack_exempt_key(k)[0] == ifindex]

    # -- counters -------------------------------------------------------------

    def counters(self) -> dict[tuple[int, Reason], Count]:
        """{(ifindex, reason): (packets, bytes)} summed over CPUs."""
        return self._ebpf(read_counters, self._fd("t1_counters"))

    def clear_counters(self, ifindex: int) -> dict[Reason, Count]:
        """Delete the veth's counters (when it is gone) and return their last values."""
        last = {r: c for (i, r), c in self.counters().items() if i == ifindex}
        for reason in last:
            self._map_delete("t1_counters", pack_counter_key(ifindex, reason))
        return last

    # -- kernel data path ----------------------------------------------------

    def set_forward(self, prog_fd: int) -> None:
        """Allowed frames go to the program `prog_fd` (a tail call) instead of the TUN."""
        self._map_update("t1_forward", U32.pack(0), U32.pack(prog_fd))

    def clear_forward(self) -> None:
        """Allowed frames go to the TUN again (the userspace data path). Idempotent."""
        self._map_delete("t1_forward", U32.pack(0))

    # -- denial events --------------------------------------------------------

    def open_events(self) -> RingBuffer:
        """A consumer of t1_events (its own fd; close it before `close`).

        Records decode with `unpack_event`; the fd polls readable while records wait.
        """
        fd = self._fd("t1_events")
        try:
            return RingBuffer(fd, bpf.map_info(fd).max_entries)
        except OSError as exc:
            raise Tier1Error("map_failed", f"t1_events: {exc.strerror or exc}") from exc

    # -- maps -----------------------------------------------------------------

    def _keys(self, name: str) -> Iterator[bytes]:
        size = next(spec.key_size for spec in MAPS if spec.name == name)
        return iter(self._map_keys(name, size))
