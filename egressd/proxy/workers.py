"""Proxy workers: N processes serve tier 2 on one proxy host (issue 10 item 4; proxy config
``"workers"``, kernel data path only; docs/decisions.md, "Proxy workers").

With ``workers`` = N > 1 `egressd proxy serve` is a supervisor (`egressd.proxy.service`):
it keeps what exists once per host (nftables, the TUN, the slow-path GENEVE endpoint,
`ProxyKernel` + `KernelDatapath`, the only writer of px_jobs/px_bound/px_nodes, the admin
listener, the registry) and a `WorkerPool`, which

* makes every listening socket, N per listener: the transparent TCP listener and DNS over
  TCP, each an SO_REUSEPORT group with its own `ReuseportSelector` (bpf/reuseport.c picks
  the job's worker, `worker_for`), and DNS over UDP, a plain SO_REUSEPORT group (see
  "DNS over UDP" below);
* starts worker i as ``python -m egressd proxy worker --config RUN/config.json --index i
  --fds T,U,D`` (a child process, `subprocess.Popen` with its three sockets in
  ``pass_fds``, and PR_SET_PDEATHSIG so that it never outlives the supervisor), and
  restarts one that exits on the same sockets (``egressd_proxy_worker_restarts_total``,
  logged); connections queue in the sockets' backlogs meanwhile, the slots are never
  empty, since the supervisor holds every socket;
* asks each worker's `/readyz` over its Unix socket (``RUN/worker-i.sock``): the proxy is
  ready when every worker is; and sums the workers' `/metrics` pages into the
  supervisor's (`merge_pages`);
* on stop: SIGTERM to every worker, SIGKILL to one still there after `STOP_TIMEOUT_S`,
  then closes the sockets and the selectors (pins, bpffs mounts) and the run directory.

Worker i (`WorkerService`): its sockets; its own `PolicyStore` and watch stream; the
registry poll; the interceptor, DNS responder, tier 2 names and limits of its jobs; flow
lookups in the pinned px_flows through a read-only fd (`PinnedFlows`). Proxy-wide limits
are split statically (`worker_limits`): ``max_connections`` and ``bandwidth_bps`` give each
worker ``value // N`` or one more, adding up to the value (`split_limit`), and worker i
hands out the source ports p with ``p % N == i``.
Per-job limits are exact: all of a job's connections and queries reach its worker.
Defence in depth: a job whose `worker_for` is another worker is denied ``wrong_worker``
(`WorkerPolicies`; counted as any deny, never expected).

DNS over UDP: nftables' UDP TPROXY looks the socket up without the packet, so the
kernel's reuseport hash picks the socket and no program runs (found on kernel 6.18;
tests/integration/test_reuseport.py pins it). A worker that receives a query of another
worker's job hands it over (`DnsSteering`): one Unix datagram to ``RUN/dns-j.sock``
carrying the query and its peer; worker j answers it from the query's original
destination as if it had received it. A query that cannot be handed over (worker j
restarting) is dropped and counted (``egressd_dns_steered_total{result="failed"}``);
the client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from egressd.ebpf import syscall as bpf
from egressd.ebpf import tc
from egressd.errors import EgressdError
from egressd.proxy import kernel_maps as km
from egressd.proxy import reuseport as rp
from egressd.proxy.config import ProxyConfig, config_to_mapping
from egressd.proxy.context import FlowInfo, PolicyUnavailable
from egressd.proxy.limiting import LimitsConfig

log = structlog.get_logger("egressd.proxy.workers")

IPv4Address = ipaddress.IPv4Address

WRONG_WORKER: Final = "wrong_worker"
STOP_TIMEOUT_S: Final = 10.0
MONITOR_INTERVAL_S: Final = 0.2
READY_TIMEOUT_S: Final = 2.0
SCRAPE_TIMEOUT_S: Final = 3.0
#: A worker that exits within this long of its start is crash-looping: its next start waits.
QUICK_EXIT_S: Final = 10.0
MAX_RESTART_DELAY_S: Final = 5.0
PR_SET_PDEATHSIG: Final = 1
CONFIG_FILE: Final = "config.json"
#: (src, sport, dst) of a steered DNS query, then the query.
_STEERED: Final = struct.Struct("!4sH4s")
MAX_STEERED: Final = _STEERED.size + 65535
#: A live worker whose admin socket has answered nothing (not even 503) for this long is hung:
#: it is killed and restarted, so its jobs' connections never wait in a backlog for nobody.
UNRESPONSIVE_S: Final = 30.0
#: How often a ready worker is asked again (a worker not ready: every `MONITOR_INTERVAL_S`).
RECHECK_S: Final = 2.0


class WorkerError(EgressdError):
    """The workers could not be started: `listen_failed`, `spawn_failed`, the selector's."""


# ---------------------------------------------------------------------------
# Pure.


def flows_pin(config: ProxyConfig) -> Path:
    """Where `egressd.proxy.kernel.ProxyKernel` pins px_flows (its bpffs, maps folder)."""
    return config.kernel_state_dir / "bpffs" / tc.MAPS_DIR / rp.FLOWS_MAP


def split_limit(value: int, workers: int, index: int = 0) -> int:
    """Worker `index`'s share of a proxy-wide limit: value // workers, one more for the first
    value % workers workers, so the shares add up to the value exactly (ceil(value / workers)
    each exceeded it by up to workers - 1). Never 0 for a value: 0 is "none" (bandwidth) or
    invalid (connections), so a value below `workers` gives each 1. 0 (none) stays 0."""
    if value <= 0:
        return 0
    return max(1, value // workers + (index < value % workers))


def worker_limits(config: ProxyConfig, index: int) -> LimitsConfig:
    """Worker `index`'s proxy-wide limits: its share of the connections and the bandwidth,
    its slice of the source ports; the rest as configured."""
    n = config.worker_count
    whole = config.limits
    return dataclasses.replace(
        whole,
        max_connections=split_limit(whole.max_connections, n, index),
        bandwidth_bps=split_limit(whole.bandwidth_bps, n, index),
        port_pool=config.worker_port_pool(index) if n > 1 else whole.port_pool,
    )


@lru_cache(maxsize=65536)
def _worker_of(job_id: uuid.UUID, workers: int) -> int:
    return rp.worker_for(job_id, workers)


def unresponsive(now: float, started: float, answered: float | None) -> bool:
    """A worker process that has answered nothing on its admin socket for `UNRESPONSIVE_S`,
    counted from its start or from its last answer, whichever came last."""
    return now - max(started, answered or 0.0) > UNRESPONSIVE_S


def prepare_run_dir(run_dir: Path, mapping: dict[str, Any]) -> None:
    """The run directory, private to the supervisor's user (0700 even when it existed: the
    admin and hand-over sockets in it take requests and DNS queries), emptied of stale
    sockets, with the workers' configuration."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    for stale in run_dir.glob("*.sock"):
        stale.unlink()
    (run_dir / CONFIG_FILE).write_text(json.dumps(mapping))


def restart_delay(quick_exits: int) -> float:
    """How long to wait before restarting a worker that exited `quick_exits` times in a
    row within `QUICK_EXIT_S` of its start: at once the first time, then doubling."""
    if quick_exits <= 1:
        return 0.0
    return float(min(MAX_RESTART_DELAY_S, 0.25 * 2 ** (quick_exits - 2)))


def pack_steered(query: bytes, src: IPv4Address, sport: int, dst: IPv4Address) -> bytes:
    return _STEERED.pack(src.packed, sport, dst.packed) + query


def unpack_steered(data: bytes) -> tuple[bytes, IPv4Address, int, IPv4Address] | None:
    """(query, src, sport, dst), or None for a datagram too short or with source port 0."""
    if len(data) < _STEERED.size:
        return None
    src, sport, dst = _STEERED.unpack_from(data)
    if sport == 0:
        return None
    return data[_STEERED.size :], IPv4Address(src), sport, IPv4Address(dst)


_SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def _families(text: str) -> list[Metric] | None:
    """A worker's page parsed whole, or None if any of it is malformed (a line the parser
    refuses, a name or type `Metric` refuses): such a page is left out, not half summed."""
    try:
        families = list(text_string_to_metric_families(text))
        for family in families:
            Metric(family.name, family.documentation, family.type)
    except Exception:  # noqa: BLE001 - the parser raises more than ValueError on bad input
        return None
    return families


def merge_pages(
    own: str, workers: Iterable[str], on_bad_page: Callable[[], None] | None = None
) -> bytes:
    """The supervisor's `/metrics`: its own page and its workers', read with prometheus_client's
    parser (as `egressd.metrics_text` reads pages), samples with equal names and labels summed.

    Counters and histograms add up (each process counted its own events). A gauge the
    supervisor exports too (registry, watch, policy cache: state every process keeps a copy
    of) is the supervisor's value; any other gauge (connections, ports, admission: each
    worker's share of the host's) is the sum of the workers'. Counters' ``_created`` are
    left out. A worker that does not answer adds nothing (its counters dip until it does);
    nor does a malformed page (`on_bad_page` is called for each), and a family whose kind
    differs from the first page's that has it is left out of the later page.
    """
    families: dict[str, tuple[str, str]] = {}  # name: (type, help)
    values: dict[str, dict[_SeriesKey, float]] = {}
    own_gauges: set[str] = set()
    pages: list[list[Metric]] = [list(text_string_to_metric_families(own))]
    for text in workers:
        parsed = _families(text)
        if parsed is None:
            if on_bad_page is not None:
                on_bad_page()
            continue
        pages.append(parsed)
    for index, page in enumerate(pages):
        for family in page:
            kind, name = family.type, family.name
            if name.endswith("_created"):
                continue  # a counter's or histogram's creation time (its own family as text)
            if name not in families:
                families[name] = (kind, family.documentation)
                values[name] = {}
            elif families[name][0] != kind:
                continue  # a counter here, a gauge there: never summed into each other
            if index == 0 and kind == "gauge":
                own_gauges.add(name)
            elif index > 0 and name in own_gauges:
                continue
            summed = families[name][0] in ("counter", "gauge", "histogram", "summary")
            series = values[name]
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # the same, when the parser keeps it in its family
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in series and not summed:
                    continue
                series[key] = series.get(key, 0.0) + s.value
    out = []
    for name, (kind, doc) in families.items():
        metric = Metric(name, doc, kind)
        for (sample, labels), value in values[name].items():
            metric.add_sample(sample, dict(labels), value)
        out.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(out))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


# ---------------------------------------------------------------------------
# A worker's view of the host's state.


class PinnedFlows:
    """`FlowLookup` of a worker: the pinned px_flows through a read-only fd (the supervisor's
    `KernelDatapath` and the kernel write it), node names from the worker's registry."""

    def __init__(self, pin: Path, node_name: Callable[[IPv4Address], str | None]) -> None:
        self._fd = bpf.obj_get(pin, bpf.BPF_F_RDONLY)
        self._node_name = node_name
        # One per worker process, used only from its event loop (`km.FlowReader`).
        self._reader = km.FlowReader(self._fd)

    def lookup(
        self,
        src: int | str | IPv4Address,
        sport: int,
        dst: int | str | IPv4Address,
        dport: int,
        proto: int,
    ) -> FlowInfo | None:
        try:
            raw = self._reader.read(km.ip_int(src), sport, km.ip_int(dst), dport, proto)
        except OSError as exc:
            log.warning("flow_lookup_failed", reason="map_failed", detail=str(exc.strerror))
            return None
        if raw is None:
            return None
        # None when the node left the registry: its flows no longer count.
        return self._reader.info(raw, self._node_name)

    def close(self) -> None:
        if self._fd >= 0:
            self._reader.release()
            os.close(self._fd)
            self._fd = -1


class WorkerPolicies:
    """`ctx.policies` of worker `index` of `workers`: its `PolicyStore`, but a job whose
    connections belong to another worker is `wrong_worker` (bpf/reuseport.c and the DNS
    steering never let one through; this is the defence behind them)."""

    def __init__(self, store: Any, index: int, workers: int) -> None:
        self._store = store
        self._index = index
        self._workers = workers

    async def get(self, job_id: uuid.UUID) -> Any:
        if _worker_of(job_id, self._workers) != self._index:
            raise PolicyUnavailable(
                WRONG_WORKER, f"job {job_id} is worker {_worker_of(job_id, self._workers)}'s"
            )
        return await self._store.get(job_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class DnsSteering:
    """Worker `index`'s half of the UDP DNS hand-over (module docstring): `steer` is the
    responder's hook, `start` binds ``dns-index.sock`` and delivers what other workers send."""

    def __init__(
        self,
        run_dir: Path,
        index: int,
        workers: int,
        lookup: Callable[[IPv4Address, int, IPv4Address], uuid.UUID | None],
        metrics: CollectorRegistry,
    ) -> None:
        self.run_dir = run_dir
        self.index = index
        self.workers = workers
        self._lookup = lookup
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Callable[[bytes, Any], None] | None = None
        counter = Counter(
            "egressd_dns_steered_total",
            "UDP DNS queries a worker handed to the worker of their job (sent, failed: "
            "dropped, the client retries) or received from another (received; dropped: "
            "malformed, or rejected: no flow of this worker's jobs from that peer)",
            ["result"],
            registry=metrics,
        )
        self._sent = counter.labels("sent")
        self._failed = counter.labels("failed")
        self._received = counter.labels("received")
        self._malformed = counter.labels("malformed")
        self._rejected = counter.labels("rejected")

    def path(self, index: int) -> Path:
        return self.run_dir / f"dns-{index}.sock"

    def start(self, deliver: Callable[[bytes, Any], None]) -> None:
        path = self.path(self.index)
        path.unlink(missing_ok=True)  # a previous instance of this worker's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(str(path))
        os.chmod(path, 0o600)  # the run directory is 0700 too (`prepare_run_dir`)
        self._sock = sock
        self._loop = asyncio.get_running_loop()

        def readable() -> None:
            for _ in range(64):
                try:
                    data = sock.recv(MAX_STEERED)
                except OSError:  # BlockingIOError included: nothing more queued
                    return
                self.received(data, deliver)

        self._loop.add_reader(sock.fileno(), readable)

    def received(self, data: bytes, deliver: Callable[[bytes, Any], None]) -> None:
        """One hand-over datagram. Answered only if px_flows holds a UDP DNS flow from its
        peer whose job is this worker's: the peer in a datagram is only its sender's word,
        and the answer goes out of a transparent socket from `dst`, so a forged one must
        never make the proxy send to an address no query came from (dropped, counted)."""
        from egressd.proxy.dns import DnsPeer

        unpacked = unpack_steered(data)
        if unpacked is None:
            self._malformed.inc()
            return
        query, src, sport, dst = unpacked
        job = self._lookup(src, sport, dst)
        if job is None or _worker_of(job, self.workers) != self.index:
            self._rejected.inc()
            return
        self._received.inc()
        try:
            deliver(query, DnsPeer(src, sport, dst, 17))
        except Exception:  # one query never stops the hand-over's reader
            log.exception("dns_steered_delivery_failed", worker=self.index)

    def steer(self, query: bytes, peer: Any) -> bool:
        """True when the query belongs to another worker's job and was handed to it (or
        dropped because it could not be)."""
        job = self._lookup(peer.src, peer.sport, peer.dst)
        if job is None:
            return False  # no flow: answered here (unknown_flow), as by any worker
        owner = _worker_of(job, self.workers)
        if owner == self.index or self._sock is None:
            return False
        try:
            self._sock.sendto(
                pack_steered(query, peer.src, peer.sport, peer.dst), str(self.path(owner))
            )
            self._sent.inc()
        except OSError:
            self._failed.inc()
        return True

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self.path(self.index).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# The supervisor's side.


@dataclasses.dataclass
class _Worker:
    index: int
    fds: tuple[int, ...]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready: bool = False
    quick_exits: int = 0
    restart_at: float | None = None
    answered: float | None = None  # when its admin socket last answered (any status)
    checked: float = 0.0


@lru_cache(maxsize=1)
def _prctl() -> Any:
    # Resolved in the supervisor, not between fork and exec: dlopen takes the loader's lock,
    # which a thread of the supervisor (asyncio.to_thread) may hold at the fork.
    return ctypes.CDLL(None, use_errno=True).prctl


def _set_pdeathsig(parent: int) -> None:
    _prctl()(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the supervisor died before the prctl: no signal would ever come


def transparent_udp_group(host: str, port: int, n: int) -> list[socket.socket]:
    """N transparent UDP sockets in one SO_REUSEPORT group on (host, port)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_IP, rp.IP_TRANSPARENT, 1)
            sock.bind((host, port))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class WorkerPool:
    """The supervisor's workers (see the module docstring). `open` (blocking: a thread)
    loads the selectors and makes the sockets; `start` spawns the workers and watches
    them; `close` stops and removes everything."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        flows_pin: Path,
        listen_host: str,
        metrics: CollectorRegistry,
        run_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.n = config.worker_count
        self.flows_pin = flows_pin
        self.listen_host = listen_host
        self.run_dir = run_dir if run_dir is not None else config.kernel_state_dir / "workers"
        self.selectors: dict[str, rp.ReuseportSelector] = {}
        self.sockets: dict[str, list[socket.socket]] = {}
        self.workers: list[_Worker] = []
        self.closing = False
        self._task: asyncio.Task[None] | None = None
        self._restarts = Counter(
            "egressd_proxy_worker_restarts_total",
            "Worker processes restarted after they exited, by worker",
            ["worker"],
            registry=metrics,
        )
        Gauge("egressd_proxy_workers", "Worker processes of this proxy", registry=metrics).set(
            self.n
        )
        Gauge(
            "egressd_proxy_workers_ready", "Worker processes that answer ready", registry=metrics
        ).set_function(lambda: sum(w.ready for w in self.workers))
        metrics.register(_SelectionStats(self))
        self._bad_pages = Counter(
            "egressd_proxy_worker_pages_malformed_total",
            "Worker /metrics pages left out of the proxy's because they did not parse",
            registry=metrics,
        )
        self._last_pages: dict[int, str] = {}  # each worker's last answered /metrics page

    # -- start ----------------------------------------------------------------------

    def open(self) -> None:
        """Selectors loaded, every socket made (in the calling thread's namespace)."""
        mapping = config_to_mapping(self.config)
        mapping["workers"] = self.n  # "auto" once, here: every worker with the same N
        prepare_run_dir(self.run_dir, mapping)
        cfg = self.config
        groups = (
            ("tcp", cfg.tproxy_tcp_port, socket.SOCK_STREAM),
            ("dns-tcp", cfg.tproxy_dns_port, socket.SOCK_STREAM),
        )
        try:
            for group, port, kind in groups:
                selector = rp.ReuseportSelector(
                    state_dir=cfg.kernel_state_dir,
                    workers=self.n,
                    flows_pin=self.flows_pin,
                    pin_name=f"reuseport-{group}",
                )
                self.selectors[group] = selector
                selector.load()
                self.sockets[group] = selector.listen(self.listen_host, port, kind=kind)
            self.sockets["dns-udp"] = transparent_udp_group(
                self.listen_host, cfg.tproxy_dns_port, self.n
            )
        except OSError as exc:
            raise WorkerError(
                "listen_failed", f"{self.listen_host}: {exc.strerror or exc}"
            ) from exc
        except rp.ReuseportError as exc:
            raise WorkerError(exc.reason, exc.detail) from exc
        self.workers = [
            _Worker(
                i,
                (
                    self.sockets["tcp"][i].fileno(),
                    self.sockets["dns-udp"][i].fileno(),
                    self.sockets["dns-tcp"][i].fileno(),
                ),
            )
            for i in range(self.n)
        ]

    def start(self) -> None:
        for worker in self.workers:
            self._spawn(worker)
        self._task = asyncio.get_running_loop().create_task(
            self._monitor(), name="proxy-workers-monitor"
        )

    def _argv(self, worker: _Worker) -> list[str]:
        return [
            sys.executable,
            "-m",
            "egressd",
            "proxy",
            "worker",
            "--config",
            str(self.run_dir / CONFIG_FILE),
            "--index",
            str(worker.index),
            "--fds",
            ",".join(str(fd) for fd in worker.fds),
        ]

    def _spawn(self, worker: _Worker) -> None:
        # From the event loop's thread: PR_SET_PDEATHSIG follows the thread that forked.
        worker.ready = False
        worker.restart_at = None
        worker.answered = None
        worker.started = time.monotonic()
        _prctl()  # resolved before the fork (`_prctl`)
        try:
            worker.proc = subprocess.Popen(
                self._argv(worker),
                pass_fds=worker.fds,
                stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's ^C reaches the supervisor, which stops
                # the workers itself (not restarting them as if they had died).
                process_group=0,
                # In the child before exec: a prctl resolved beforehand and getppid, no lock.
                preexec_fn=functools.partial(_set_pdeathsig, os.getpid()),  # noqa: PLW1509
            )
        except OSError as exc:
            raise WorkerError("spawn_failed", f"worker {worker.index}: {exc}") from exc
        log.info("proxy_worker_started", worker=worker.index, pid=worker.proc.pid)

    # -- watch ------------------------------------------------------------------------

    async def _monitor(self) -> None:
        while not self.closing:
            now = time.monotonic()
            for worker in self.workers:
                proc = worker.proc
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._restart(worker)
                    continue
                if proc is None:
                    continue
                if proc.poll() is None:
                    if unresponsive(now, worker.started, worker.answered):
                        # Hung: alive but answering nothing. Killed, it exits and is
                        # restarted below (with the crash loop's back-off).
                        log.error("proxy_worker_unresponsive", worker=worker.index, pid=proc.pid)
                        worker.ready = False
                        proc.kill()
                    continue
                worker.ready = False
                quick = now - worker.started < QUICK_EXIT_S
                worker.quick_exits = worker.quick_exits + 1 if quick else 1
                delay = restart_delay(worker.quick_exits)
                log.error(
                    "proxy_worker_exited",
                    worker=worker.index,
                    pid=proc.pid,
                    returncode=proc.returncode,
                    restart_in_s=delay,
                )
                worker.restart_at = now + delay
                if delay == 0:
                    self._restart(worker)
            due = [w for w in self.workers if not w.ready or now - w.checked >= RECHECK_S]
            await asyncio.gather(*(self._check_ready(w) for w in due))
            await asyncio.sleep(MONITOR_INTERVAL_S)

    def _restart(self, worker: _Worker) -> None:
        self._restarts.labels(str(worker.index)).inc()
        try:
            self._spawn(worker)
        except WorkerError as exc:
            log.error("proxy_worker_spawn_failed", worker=worker.index, detail=exc.detail)
            worker.restart_at = time.monotonic() + MAX_RESTART_DELAY_S

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}.sock"

    async def _get(self, index: int, path: str, timeout: float) -> tuple[int, bytes]:
        connector = aiohttp.UnixConnector(path=str(self.socket_path(index)))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                f"http://worker{index}{path}", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response,
        ):
            return response.status, await response.read()

    async def _check_ready(self, worker: _Worker) -> None:
        proc = worker.proc
        if proc is None or proc.poll() is not None:
            return
        worker.checked = time.monotonic()
        try:
            status, _ = await self._get(worker.index, "/readyz", READY_TIMEOUT_S)
        except (OSError, aiohttp.ClientError, TimeoutError):
            return
        if worker.proc is not proc:
            return  # restarted meanwhile: the answer was the old process's
        worker.answered = time.monotonic()
        if status == 200 and not worker.ready:
            log.info("proxy_worker_ready", worker=worker.index, pid=proc.pid)
        elif status != 200 and worker.ready:
            log.warning("proxy_worker_not_ready", worker=worker.index, pid=proc.pid)
        worker.ready = status == 200

    def not_ready(self) -> list[int]:
        if not self.workers:
            return list(range(self.n))
        return [w.index for w in self.workers if not w.ready]

    async def pages(self) -> list[str]:
        """The workers' `/metrics` pages. A worker that does not answer this time (busy,
        restarting) is represented by its last page, so that the summed counters never
        step back while it is slow; only a restart starts its counters from zero."""

        async def one(index: int) -> str | None:
            try:
                status, body = await self._get(index, "/metrics", SCRAPE_TIMEOUT_S)
                page = body.decode() if status == 200 else None
            except (OSError, aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
                page = None
            if page is None:
                return self._last_pages.get(index)
            self._last_pages[index] = page
            return page

        found = await asyncio.gather(*(one(w.index) for w in self.workers))
        return [page for page in found if page is not None]

    def page(self, registry: CollectorRegistry) -> Callable[[], Awaitable[bytes]]:
        async def render() -> bytes:
            own = generate_latest(registry).decode()
            return merge_pages(own, await self.pages(), self._bad_pages.inc)

        return render

    # -- stop -------------------------------------------------------------------------

    async def close(self) -> None:
        self.closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("proxy_worker_killed", pid=proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.wait)
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()
        errors = []
        for selector in self.selectors.values():
            try:
                await asyncio.to_thread(selector.close)
            except rp.ReuseportError as exc:
                errors.append(exc)
        self.selectors.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise errors[0]


class _SelectionStats(Collector):
    """``egressd_worker_selection_total{outcome}``: bpf/reuseport.c's rp_stats, read at
    scrape, summed over the selectors (the TCP listener's and DNS over TCP's)."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        metric = Metric(
            "egressd_worker_selection",
            "Listener lookups bpf/reuseport.c decided, by outcome (selected: the job's "
            "worker; the others are drops)",
            "counter",
        )
        totals = dict.fromkeys(rp.Stat, 0)
        for selector in list(self._pool.selectors.values()):
            if not selector.loaded:
                continue
            with contextlib.suppress(rp.ReuseportError):
                for stat, n in selector.stats().items():
                    totals[stat] += n
        for stat, n in totals.items():
            metric.add_sample("egressd_worker_selection_total", {"outcome": stat.name}, n)
        return [metric]
