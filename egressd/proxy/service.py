"""`egressd proxy serve`: wire the data plane and tier 2 together and run them.

Start-up, in this order (each step's undo is pushed on an exit stack, so a
failure half-way, SIGTERM or SIGINT all unwind exactly what was done):

1. the trusted public keys from `keys_dir` (never from the network);
2. the admin listener on `underlay:admin_port` (`/healthz` answers from here
   on; `/readyz` says 503 with the reasons until everything below is up);
3. the HTTP client session, the node registry (refresh task; it also keeps
   the fleet's member addresses current, `static_fleet` plus what it lists,
   and swaps each new set into the context), the policy
   store, the flow table (sweeper task), the names tier 2 learns from DNS
   (prune task), and the `ProxyContext` that tier 2 shares;
4. tier 2's listeners: the transparent TCP interceptor on
   `127.0.0.1:tproxy_tcp_port` and the DNS responder on
   `127.0.0.1:tproxy_dns_port` (bound before any packet can be TPROXYed to them);
5. the TUN `gnv0` (up, MTU `mtu`);
6. nftables, policy routing and sysctls (`egressd.proxy.nft`), checked after
   install and every `NFT_CHECK_INTERVAL_S` afterwards (re-installed, with an
   error log, if someone removed them);
7. the GENEVE socket on `underlay:geneve_port` and both packet readers;
8. with ``"datapath": "kernel"``, `bpf/proxy.c` (`egressd.proxy.kernel`) loaded and
   attached to the underlay (ingress) and the TUN (egress) after the nftables rules
   that TPROXY what it decapsulates, and its map sync task; the Python endpoint of
   step 7 is then the slow path. Tier 2 finds flows in the kernel's flow map.

Ready (`/readyz` 200) = TUN up, nftables installed, the registry fetched at
least once, the interceptor, DNS responder and GENEVE socket bound.

Stop (SIGTERM, SIGINT) unwinds in reverse: the GENEVE socket closes first
(no new packets), then the nftables table, rule and routes go, the TUN is
closed (the kernel removes the device), the listeners close (their
connections are reset), the background tasks are cancelled, and the admin
listener closes last. Exit code 0. The stop signals are `egressd.signals`'
(`egressd.lifecycle.serve_until_stopped`), never `loop.add_signal_handler`:
a forked helper that inherits the loop's wakeup fd could stop the proxy.

Every task is named and kept by its owner; the service keeps its own
(`proxy-nft-watch`, `proxy-resolved-prune`) in `self._tasks`.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import structlog
import uvloop
from prometheus_client import CollectorRegistry

from egressd.admin import AdminServer, start_admin
from egressd.errors import EgressdError
from egressd.lifecycle import Lifecycle, serve_until_stopped
from egressd.net.tun import TUN_F_CSUM, TUN_F_TSO4, Tun, TunError, open_tun
from egressd.policy.addresses import FleetAddresses
from egressd.policy.errors import KeyFileError
from egressd.policy.keys import TrustedKeys, load_trusted_keys
from egressd.proxy import dns, intercept, tls_intercept
from egressd.proxy.config import ProxyConfig
from egressd.proxy.context import ProxyContext, ProxyIdentity
from egressd.proxy.flows import FlowTable
from egressd.proxy.kernel import DECAP_MARK, KernelDatapath, KernelError, ProxyKernel, ifname_of
from egressd.proxy.limiting import ProxyLimits
from egressd.proxy.nft import NftError, NftSpec, ProxyNetfilter
from egressd.proxy.policies import PolicyStore
from egressd.proxy.registry import NodeRegistry, static_members
from egressd.proxy.resolved import ResolvedNames
from egressd.proxy.secrets import SecretStore
from egressd.proxy.tunnel import GeneveTunnel
from egressd.proxy.watch import PolicyWatch
from egressd.proxy.workers import WorkerError, WorkerPool, flows_pin

NFT_CHECK_INTERVAL_S = 10.0
RESOLVED_PRUNE_INTERVAL_S = 30.0
LISTEN_HOST = "127.0.0.1"

log = structlog.get_logger("egressd.proxy")


class ProxyStartupError(EgressdError):
    """The proxy cannot start: `keys`, `tun`, `nft`, `kernel`, `bind_failed`; `detail` is
    one line."""


def load_interception(config: ProxyConfig) -> tls_intercept.Interception | None:
    """The TLS interception setup of `config` (None without `interception_ca`)."""
    paths = config.interception_ca
    if paths is None:
        return None
    try:
        return tls_intercept.Interception.load(
            paths.cert, paths.key, upstream_ca_file=config.upstream_ca_file
        )
    except tls_intercept.InterceptionError as exc:
        raise ProxyStartupError(exc.reason, exc.detail) from exc


class ProxyService(Lifecycle):
    """One proxy: every part, started and stopped in order (see the module docstring)."""

    def __init__(self, config: ProxyConfig, *, metrics: CollectorRegistry | None = None) -> None:
        super().__init__()
        self.config = config
        self.metrics = metrics if metrics is not None else CollectorRegistry()
        self._tasks: set[asyncio.Task[None]] = set()
        self.admin: AdminServer | None = None
        self.registry: NodeRegistry | None = None
        self.policies: PolicyStore | None = None
        self.watch: PolicyWatch | None = None
        self.flows: FlowTable | None = None
        self.resolved: ResolvedNames | None = None
        self.ctx: ProxyContext | None = None
        self.interceptor: intercept.Interceptor | None = None
        self.dns: dns.DnsResponder | None = None
        self.tun: Tun | None = None
        self.netfilter: ProxyNetfilter | None = None
        self.nft_ok = False
        self.tunnel: GeneveTunnel | None = None
        self.kernel: KernelDatapath | None = None
        # workers > 1 (kernel data path): a supervisor; tier 2 runs in the workers.
        self.pool: WorkerPool | None = None
        self.worker_count = config.worker_count if config.datapath == "kernel" else 1
        self.stopping = False

    # --- readiness -----------------------------------------------------------------

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.stopping:
            reasons.append("stopping")
        if self.tun is None or self.tun.closed:
            reasons.append("tun_down")
        if not self.nft_ok:
            reasons.append("nft_not_installed")
        if self.registry is None or not self.registry.ready:
            reasons.append("registry_not_fetched")
        if self.worker_count > 1:
            if self.pool is None or self.pool.not_ready():
                reasons.append("workers_not_ready")
        elif self.interceptor is None or self.dns is None:
            reasons.append("listeners_not_bound")
        if self.tunnel is None or self.tunnel.bound is None:
            reasons.append("geneve_not_bound")
        if self.config.datapath == "kernel" and (
            self.kernel is None or not self.kernel.kernel.loaded
        ):
            reasons.append("kernel_datapath_not_loaded")
        return reasons

    def ready(self) -> bool:
        return not self.not_ready_reasons()

    # --- start (egressd.lifecycle: each undo pushed as its step is taken) -----------

    async def _start(self) -> None:
        config = self.config
        stack = self._stack
        try:
            trusted = await asyncio.to_thread(load_trusted_keys, config.keys_dir)
        except KeyFileError as exc:
            raise ProxyStartupError("keys", f"{exc.reason}: {exc.detail}") from exc

        if self.worker_count > 1:
            self.pool = WorkerPool(
                config,
                flows_pin=flows_pin(config),
                listen_host=LISTEN_HOST,
                metrics=self.metrics,
            )
        self.admin = await start_admin(
            self.metrics,
            host=config.admin_host,
            port=config.admin_port,
            ready=self.ready,
            reasons=self.not_ready_reasons,
            page=None if self.pool is None else self.pool.page(self.metrics),
        )
        stack.push_async_callback(self._closing("admin", self.admin.close))

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), trust_env=False)
        stack.push_async_callback(self._closing("http_session", session.close))

        clients = control_clients(config, session, trusted, self.metrics, self._fleet_changed)
        self.registry, self.policies, self.watch = clients
        self.registry.start()
        stack.push_async_callback(self._closing("registry", self.registry.close))
        stack.push_async_callback(self._closing("policies", self.policies.close))
        # Change notices from the control plane (polling above stays the fallback).
        self.watch.start()
        stack.push_async_callback(self._closing("watch", self.watch.close))

        self.flows = FlowTable(
            idle_s=config.flow_idle_s, max_flows=config.max_flows, metrics=self.metrics
        )
        self.flows.start()
        stack.push_async_callback(self._closing("flows", self.flows.close))

        self.resolved = ResolvedNames()
        self._spawn(self._prune_resolved(self.resolved), "proxy-resolved-prune")
        stack.push_async_callback(self._cancel_tasks)

        if config.datapath == "kernel":
            self.kernel = await self._kernel_datapath()

        self.ctx = ProxyContext(
            identity=ProxyIdentity(
                name=config.name, underlay=config.underlay, egress=config.egress
            ),
            flows=self.flows if self.kernel is None else self.kernel,
            policies=self.policies,
            fleet_ranges=self.registry.fleet,
            upstream_resolver=config.upstream_resolver,
            registry=self.metrics,
            audit=structlog.get_logger("egressd.proxy.audit").bind(component="proxy"),
            secrets=SecretStore(config.secrets_dir),
        )

        # Workers: tier 2 is theirs, started once the kernel's px_flows is pinned (below).
        if self.pool is None:
            try:
                registry = self.registry
                limits = ProxyLimits(
                    config.limits, registry=self.metrics, proxy_count=lambda: registry.proxy_count
                )
                self.interceptor = await intercept.start_interceptor(
                    self.ctx,
                    self.resolved,
                    listen=(LISTEN_HOST, config.tproxy_tcp_port),
                    limits=limits,
                    interception=load_interception(config),
                )
                stack.push_async_callback(self._closing("interceptor", self.interceptor.close))
                self.dns = await dns.start_dns(
                    self.ctx,
                    self.resolved,
                    listen=(LISTEN_HOST, config.tproxy_dns_port),
                    limits=limits,
                    refusal_rcode=config.dns_refusal_rcode,
                )
                stack.push_async_callback(self._closing("dns", self.dns.close))
            except OSError as exc:
                raise ProxyStartupError(
                    "bind_failed", f"tier 2 listener on {LISTEN_HOST}: {exc.strerror or exc}"
                ) from exc

        try:
            self.tun = open_tun(
                config.tun,
                mtu=config.mtu,
                vnet_hdr=config.offload,
                offload=TUN_F_CSUM | TUN_F_TSO4 if config.offload else 0,
            )
        except TunError as exc:
            raise ProxyStartupError("tun", f"{exc.reason}: {exc.detail}") from exc
        stack.callback(self.tun.close)

        self.netfilter = ProxyNetfilter(
            NftSpec(
                tun=self.tun.name,
                resolver=config.resolver,
                tproxy_tcp_port=config.tproxy_tcp_port,
                tproxy_dns_port=config.tproxy_dns_port,
                sandbox_supernet=config.sandbox_supernet,
                listen_host=LISTEN_HOST,
                decap_mark=None if self.kernel is None else self.kernel.kernel.mark,
                underlay=None if self.kernel is None else self.kernel.kernel.underlay_ifname,
            )
        )
        stack.push_async_callback(self._remove_netfilter)
        try:
            await asyncio.to_thread(self.netfilter.ensure)
        except NftError as exc:
            raise ProxyStartupError("nft", f"{exc.reason}: {exc.detail}") from exc
        self.nft_ok = True
        self._spawn(self._watch_netfilter(self.netfilter), "proxy-nft-watch")
        stack.push_async_callback(self._cancel_tasks)  # the watch stops before the removal

        self.tunnel = GeneveTunnel(
            listen=(str(config.underlay), config.geneve_port),
            vni=config.vni,
            tun=self.tun,
            nodes=self.registry,
            policies=self.policies,
            flows=self.flows,
            metrics=self.metrics,
            offload=config.offload,
            on_accept=None if self.kernel is None else self.kernel.accepted,
        )
        if self.kernel is not None:
            await self._start_kernel(self.kernel)
        try:
            self.tunnel.start()
        except OSError as exc:
            raise ProxyStartupError(
                "bind_failed",
                f"GENEVE socket {config.underlay}:{config.geneve_port}: {exc.strerror or exc}",
            ) from exc
        stack.push_async_callback(self._closing("tunnel", self.tunnel.close))
        if self.pool is not None:
            await self._start_workers(self.pool)

        log.info(
            "proxy_started",
            name=config.name,
            underlay=str(config.underlay),
            egress=str(config.egress),
            geneve_port=config.geneve_port,
            admin=f"{self.admin.host}:{self.admin.port}",
            tun=self.tun.name,
            mtu=config.mtu,
            offload=config.offload,
            tproxy_tcp=f"{LISTEN_HOST}:{config.tproxy_tcp_port}",
            tproxy_dns=f"{LISTEN_HOST}:{config.tproxy_dns_port}",
            control_url=config.control_url,
            trusted_kids=sorted(trusted.keys),
        )

    async def _start_workers(self, pool: WorkerPool) -> None:
        """The workers' sockets and selectors, then the workers (`egressd.proxy.workers`)."""
        self._stack.push_async_callback(self._closing("workers", pool.close))
        try:
            await asyncio.to_thread(pool.open)
            pool.start()
        except WorkerError as exc:
            raise ProxyStartupError("workers", f"{exc.reason}: {exc.detail}") from exc
        log.info(
            "proxy_workers_started",
            workers=pool.n,
            run_dir=str(pool.run_dir),
            programs={group: sel.prog_ids() for group, sel in pool.selectors.items()},
        )

    async def _kernel_datapath(self) -> KernelDatapath:
        config = self.config
        assert self.registry is not None and self.policies is not None
        registry = self.registry
        try:
            # pyroute2 runs its own event loop: never on this thread's.
            underlay_ifname = await asyncio.to_thread(ifname_of, config.underlay)
        except KernelError as exc:
            raise ProxyStartupError("kernel", f"{exc.reason}: {exc.detail}") from exc
        kernel = ProxyKernel(
            state_dir=config.kernel_state_dir,
            underlay_ifname=underlay_ifname,
            tun_ifname=config.tun,
            underlay=config.underlay,
            port=config.geneve_port,
            vni=config.vni,
            mark=DECAP_MARK,
            keep_tx_checksum=config.nodes_decap_in_kernel,
        )
        return KernelDatapath(
            kernel,
            nodes=lambda: registry.view.nodes,
            cached=self.policies.cached,
            count=self._kernel_counts,
            metrics=self.metrics,
        )

    async def _start_kernel(self, datapath: KernelDatapath) -> None:
        """Load and attach `bpf/proxy.c`, start the map sync (undone in reverse)."""
        try:
            await asyncio.to_thread(datapath.kernel.load)
        except KernelError as exc:
            raise ProxyStartupError("kernel", f"{exc.reason}: {exc.detail}") from exc
        self._stack.push_async_callback(self._closing("kernel", self._close_kernel))
        kernel = datapath.kernel
        log.info(
            "kernel_datapath_loaded",
            underlay=kernel.underlay_ifname,
            tun=kernel.tun_ifname,
            underlay_tx_checksum="kept" if kernel.keep_tx_checksum else "off",
            programs=kernel.prog_ids(),
            pins=str(kernel.pin_dir),
        )
        assert self.policies is not None
        self.policies.listeners.append(datapath.policy_changed)
        datapath.start()
        self._stack.push_async_callback(self._closing("kernel_sync", datapath.close))

    async def _close_kernel(self) -> None:
        if self.kernel is not None:
            await asyncio.to_thread(self.kernel.kernel.close)

    def _kernel_counts(self, received: int, drops: dict[str, int], tun: dict[str, int]) -> None:
        if self.tunnel is not None:
            self.tunnel.add_kernel_counts(received, drops, tun)

    def _fleet_changed(self, fleet: FleetAddresses) -> None:
        # One assignment: a connection decides with the old set or the new
        # one, never a mix (and `_DecisionCache` keys on the object).
        if self.ctx is not None:
            self.ctx.fleet_ranges = fleet

    # --- stop ----------------------------------------------------------------------

    async def stop(self) -> None:
        """Unwind everything started, in reverse order. Idempotent."""
        self.stopping = True
        await super().stop()
        self.tunnel = None
        self.nft_ok = False

    def _closing(
        self, what: str, close: Callable[[], Awaitable[object]]
    ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await close()
            except (OSError, EgressdError) as exc:
                log.error("stop_step_failed", step=what, error=str(exc))

        return run

    async def _remove_netfilter(self) -> None:
        self.nft_ok = False
        if self.netfilter is None:
            return
        failures = await asyncio.to_thread(self.netfilter.remove)
        if failures:
            log.error("nft_remove_incomplete", failures=failures)

    # --- background tasks ----------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_netfilter(self, netfilter: ProxyNetfilter) -> None:
        while not self.stopping:
            await asyncio.sleep(NFT_CHECK_INTERVAL_S)
            try:
                problems = await asyncio.to_thread(netfilter.problems)
                if problems:
                    self.nft_ok = False
                    log.error("nft_drift", problems=problems)
                    await asyncio.to_thread(netfilter.ensure)
                    log.info("nft_reinstalled")
                self.nft_ok = True
            except NftError as exc:
                self.nft_ok = False
                log.error("nft_check_failed", reason=exc.reason, detail=exc.detail)

    async def _prune_resolved(self, resolved: ResolvedNames) -> None:
        while True:
            await asyncio.sleep(RESOLVED_PRUNE_INTERVAL_S)
            resolved.prune(time.monotonic())


class ControlClients(NamedTuple):
    registry: NodeRegistry
    policies: PolicyStore
    watch: PolicyWatch


def control_clients(
    config: ProxyConfig,
    session: aiohttp.ClientSession,
    trusted: TrustedKeys,
    metrics: CollectorRegistry,
    on_fleet_change: Callable[[FleetAddresses], None],
) -> ControlClients:
    """The proxy's clients of the control plane (nodes, policies and their change notices),
    not started: the single proxy and each worker (`egressd.proxy.worker`) make theirs here."""
    registry = NodeRegistry(
        session,
        config.control_url,
        refresh_s=config.node_refresh_s,
        metrics=metrics,
        fleet=static_fleet(config),
        on_fleet_change=on_fleet_change,
    )
    policies = PolicyStore(
        session,
        config.control_url,
        trusted,
        metrics=metrics,
        keys_dir=config.keys_dir,
        digest_grace_s=config.digest_grace_s,
    )
    watch = PolicyWatch(
        session, config.control_url, policies, refresh_registry=registry.refresh, metrics=metrics
    )
    return ControlClients(registry, policies, watch)


def static_fleet(config: ProxyConfig) -> FleetAddresses:
    """The fleet set before the registry answers: the configured ranges, and
    the member addresses the configuration names (`registry.static_members`)."""
    host = urlsplit(config.control_url).hostname
    if host is not None and not _is_ipv4(host):
        log.warning(
            "control_plane_address_unknown",
            control_url=config.control_url,
            detail="control_url names a host, not an address: only its registry entries and "
            "fleet_ranges keep it from sandboxes",
        )
    return FleetAddresses(
        config.fleet_ranges,
        static_members(
            underlay=config.underlay,
            egress=config.egress_addresses or (config.egress,),
            control_url=config.control_url,
            resolvers=(config.resolver, config.upstream_resolver),
        ),
    )


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def settle_heap() -> None:
    """Once started: collect the start-up's garbage, then move every object left
    (modules, configuration, keys, compiled policies: ~10^5 of them) out of the
    cyclic collector's reach (`gc.freeze`). They live as long as the process,
    yet each full collection walked them all again, and connections trigger
    collections: ~30 µs per connection in the per-connection profile
    (docs/decisions.md, "Per-connection cost"). Objects made later are collected
    as before, the youngest generation once `YOUNG_GC_THRESHOLD` more tracked
    objects were made than freed (Python's 700 is below what the open
    connections alone hold, so young collections ran every few connections)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


#: The cyclic collector's youngest-generation threshold once started (`settle_heap`).
YOUNG_GC_THRESHOLD = 10_000


async def serve(config: ProxyConfig, *, stop: asyncio.Event | None = None) -> None:
    """Start the proxy and serve until `stop` is set or SIGTERM/SIGINT arrives."""
    await serve_until_stopped(
        ProxyService(config), stop, stopping=lambda: log.info("stopping"), started=settle_heap
    )
    log.info("stopped")


def run(config: ProxyConfig) -> int:
    """`egressd proxy serve`: serve on uvloop until SIGTERM/SIGINT; exit code 0."""
    uvloop.run(serve(config))
    return 0
