"""Proxy workers: `bpf/reuseport.c` picks the worker of each new connection by its job.

A proxy host runs N worker processes on the transparent TCP listener, one SO_REUSEPORT
listening socket each, and every connection of a job must land on the same worker so that
the worker's per-job limits stay exact (issue 10 item 4; docs/decisions.md, "Proxy
workers", also plans how the workers are wired into the proxy).

Pure (tested without I/O):

* `worker_for(job_id, n)`: the worker of a job, FNV-1a over the 16 bytes of the job id
  modulo n, exactly as ``rp_select`` computes it;
* `Stat`: ``enum rp_stat``, the outcome counted per connection (drops first);
* `MAPS`, `pack_config`: the maps' shapes and the config value.

I/O edge, `ReuseportSelector` (`egressd.ebpf.build`, `egressd.ebpf.tc` and
`egressd.ebpf.loaded.Loaded`, like the proxy's tc programs): build, mount a bpffs of its own, ``bpftool prog load`` with the proxy's pinned
px_flows map reused (``map name px_flows pinned PATH``: libbpf adopts it whatever its shape),
check every map's shape and that px_flows is that very map (same id), write the worker
count; `listen` makes the N listening sockets,
attaches the program to their group (``SO_ATTACH_REUSEPORT_EBPF``) and puts socket i at
index i of the sockarray; `stats` sums the per-CPU counters; `close` unpins and unmounts
(the proxy's px_flows lives on under its own pin). The sockets belong to the caller: the
program stays attached to their group until the last one is closed.

The supervisor, not a worker, holds every listening socket (workers inherit theirs), so a
worker that dies and is restarted never leaves its slot empty: connections queue in the
socket's backlog meanwhile.

Errors are `ReuseportError`: the reasons of `egressd.ebpf` (tool_missing, build_failed,
mount_failed, load_failed, abi_mismatch, map_failed), bad_workers, not_loaded and
listen_failed.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Final

from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.ebpf.loaded import Loaded
from egressd.errors import EgressdError
from egressd.proxy import kernel_maps as km

# Package data: in a checkout egressd/proxy/bpf/ links to bpf/; px_flows.h sits beside it.
DEFAULT_SOURCE: Final = Path(str(resources.files("egressd.proxy").joinpath("bpf", "reuseport.c")))
PROG_NAME: Final = "rp_select"
PROG_TYPE: Final = "sk_reuseport"  # bpftool's name of BPF_PROG_TYPE_SK_REUSEPORT
BPF_PROG_TYPE_SK_REUSEPORT: Final = 21
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: Final = 20
MAX_WORKERS: Final = 256  # RP_MAX_WORKERS
SO_ATTACH_REUSEPORT_EBPF: Final = 52
SO_COOKIE: Final = 57
IP_TRANSPARENT: Final = getattr(socket, "IP_TRANSPARENT", 19)
FLOWS_MAP: Final = "px_flows"
_FNV_OFFSET: Final = 2166136261
_FNV_PRIME: Final = 16777619


class ReuseportError(EgressdError):
    """The worker selection could not be loaded, attached or read (see the module docstring)."""


class Stat(IntEnum):
    """`enum rp_stat` in bpf/reuseport.c: what happened to a connection's listener lookup."""

    unknown_flow = 0  # dropped: no px_flows entry, so no job
    no_worker = 1  # dropped: the job's worker has no socket in rp_workers
    malformed = 2  # dropped: not IPv4 TCP or UDP, or the headers could not be read
    not_configured = 3  # dropped: rp_config.workers unset
    selected = 4  # the job's worker


DROP_COUNT: Final = 4
STAT_COUNT: Final = len(Stat)

_CONFIG: Final = struct.Struct("=I")
_COOKIE: Final = struct.Struct("=Q")

MAPS: Final = (
    tc.MapSpec("rp_config", bpf.BPF_MAP_TYPE_ARRAY, km.U32.size, _CONFIG.size, 1),
    tc.MapSpec(
        "rp_workers", BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, km.U32.size, _COOKIE.size, MAX_WORKERS
    ),
    tc.MapSpec("rp_stats", km.BPF_MAP_TYPE_PERCPU_ARRAY, km.U32.size, km.U64.size, STAT_COUNT),
    km.MAP_SIZES[FLOWS_MAP],
)
MAP_SIZES: Final = {spec.name: spec for spec in MAPS}


# ---------------------------------------------------------------------------
# Pure.


def fnv1a32(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFF_FFFF
    return h


def check_workers(n: int) -> int:
    if not 1 <= n <= MAX_WORKERS:
        raise ReuseportError("bad_workers", f"{n} workers: must be 1..{MAX_WORKERS}")
    return n


def worker_for(job_id: uuid.UUID, n: int) -> int:
    """The index of the worker (0 .. n - 1) that accepts every connection of `job_id`."""
    return fnv1a32(job_id.bytes) % check_workers(n)


def pack_config(workers: int) -> bytes:
    return _CONFIG.pack(check_workers(workers))


# ---------------------------------------------------------------------------
# I/O edge.


class ReuseportSelector(Loaded[ReuseportError]):
    """`bpf/reuseport.c` for one proxy's transparent listener (see the module docstring)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        workers: int,
        flows_pin: Path,
        source: Path = DEFAULT_SOURCE,
        cache_dir: Path | None = None,
        pin_name: str = "reuseport-bpffs",
    ) -> None:
        self.workers = check_workers(workers)
        # Not the proxy's bpffs: `tc.load_object` clears the pins of the directory it loads
        # into, and the two objects load independently (as do the instances of one proxy,
        # one per listener group, each under a `pin_name` of its own).
        super().__init__(
            state_dir=state_dir,
            pin_name=pin_name,
            source=source,
            deps=(source.with_name("px_flows.h"),),
            cache_dir=cache_dir,
            error=ReuseportError,
        )
        self.flows_pin = flows_pin

    # -- lifecycle ----------------------------------------------------------

    def load(self) -> None:
        """Build if needed, load with the proxy's px_flows, check the maps, write the
        worker count. Pins left by an earlier process that died are replaced."""
        if self.loaded:
            return
        with self._loading(
            (PROG_NAME,),
            MAPS,
            single=True,
            prog_type=BPF_PROG_TYPE_SK_REUSEPORT,
            load_type=PROG_TYPE,
            reuse_maps={FLOWS_MAP: self.flows_pin},
        ):
            self._check_same_flows()
            self._map_update("rp_config", km.U32.pack(0), pack_config(self.workers))

    # `close` (Loaded's) unpins and unmounts; the sockets stay the caller's.

    # -- sockets --------------------------------------------------------------

    def listen(
        self,
        host: str,
        port: int,
        *,
        transparent: bool = True,
        backlog: int = 1024,
        kind: socket.SocketKind = socket.SOCK_STREAM,
    ) -> list[socket.socket]:
        """The workers' listening sockets on (host, port), in the calling thread's network
        namespace: socket i is at index i of rp_workers, the program runs on their group.

        The program is attached to the first socket before any of them listens, so the
        kernel never spreads a connection by its own hash; a SYN that comes before its
        worker's socket is in the map is dropped (no_worker) and retransmitted. On failure
        every socket made here is closed. `kind` SOCK_DGRAM: UDP sockets (bound, no
        listen), each put in its slot as soon as the program is attached.
        """
        prog_fd = self._prog_fd(PROG_NAME)
        socks: list[socket.socket] = []
        try:
            for _ in range(self.workers):
                sock = socket.socket(socket.AF_INET, kind)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if transparent:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((host, port))
                port = sock.getsockname()[1]  # port 0: the others join the first's
            socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog_fd)
            for index, sock in enumerate(socks):
                if kind == socket.SOCK_STREAM:
                    sock.listen(backlog)
                self._map_update("rp_workers", km.U32.pack(index), _COOKIE.pack(sock.fileno()))
        except OSError as exc:
            for sock in socks:
                sock.close()
            raise ReuseportError("listen_failed", f"{host}:{port}: {exc.strerror}") from exc
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def worker_cookies(self) -> dict[int, int]:
        """{index: socket cookie} of the filled slots of rp_workers (`socket_cookie`)."""
        out = {}
        for index in range(self.workers):
            raw = self._map_lookup("rp_workers", km.U32.pack(index), _COOKIE.size)
            if raw is not None:
                out[index] = _COOKIE.unpack(raw)[0]
        return out

    # -- counters -------------------------------------------------------------

    def stats(self) -> dict[Stat, int]:
        return self._counters("rp_stats", Stat)

    # -- internals ------------------------------------------------------------

    def _check_same_flows(self) -> None:
        """The program's px_flows is the map pinned at `flows_pin`, not a copy of its own."""
        try:
            fd = bpf.obj_get(self.flows_pin)
            try:
                theirs = bpf.map_info(fd).map_id
            finally:
                os.close(fd)
            ours = bpf.map_info(self._fd(FLOWS_MAP)).map_id
        except OSError as exc:
            raise ReuseportError("load_failed", f"{self.flows_pin}: {exc.strerror}") from exc
        if theirs != ours:
            raise ReuseportError(
                "abi_mismatch", f"{FLOWS_MAP}: map {ours} is not {self.flows_pin}'s {theirs}"
            )


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's cookie of `sock` (what rp_workers reads back)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, _COOKIE.size)
    value: int = _COOKIE.unpack(raw)[0]
    return value
