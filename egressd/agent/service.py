"""Running the node agent: set-up, serving, and a clean stop.

Before any of it, a config with `"sandbox_cidr": "auto"` gets its CIDR from the
control plane (`egressd.agent.registration`, in `serve`); no CIDR, no start.

`AgentService.start()`, in order (each step undone by `stop()` if a later one fails):

1. sysctls of the node's namespace (this process's): ``ip_forward=1`` (the
   return path is routed from `egr0` to a sandbox veth) and ``rp_filter=0``
   for ``all`` and ``default`` (return packets come from internet addresses
   the node has no route to);
2. the TUN `egr0` (MTU = the sandbox MTU, rp_filter 0, IPv6 off);
3. tier 1: build, load and pin (`Tier1.load`), with the always-denied and
   fleet ranges; then clean-up of sandboxes that an earlier run left behind;
   then the reader of tier 1's denial events (task ``tier1-events``, see
   `egressd.agent.tier1_events`), which logs ``tier1_denial`` lines;
4. the data path: raw send socket, GENEVE socket bound to (underlay, 6081),
   readers on the event loop; with ``"datapath": "kernel"`` first bpf/node.c is
   loaded and attached to the underlay's tc ingress (`egressd.agent.node`), and
   starting the data path points tier 1's tail call at its encapsulation
   (`egressd.agent.kernel_datapath`);
5. proxy health probing (one named task per proxy), and, with `discovery`,
   the proxy list from the control plane (`egressd.agent.discovery`), and then
   live policies: registrations checked against the control plane and its
   watch followed (task ``agent-watch``, `egressd.agent.policy_watch`), and
   the sandboxes' held policies renewed ahead of their exp (``agent-policy-renew``);
6. the sandbox API on its Unix socket, and the reaper (task ``sandbox-reaper``):
   a sandbox whose launcher exited is unregistered (`egressd.agent.launchers`);
7. the admin listener on (underlay, 9090): `/metrics`, `/healthz`, and
   `/readyz`, ready once the TUN is open, tier 1 loaded and the API bound.

`stop()` (SIGTERM/SIGINT) unwinds the exit stack (`egressd.lifecycle`) that
`start()` filled, in reverse: the background tasks, the admin listener, the
API (and its socket); then every sandbox is unregistered (tier-1 entry, veth,
netns; in-flight registrations finish first, while the control plane client
is still open); the watch, the control plane client, discovery and probing
stop; the tier-1 event reader, the data path (the tail call cleared first);
the kernel data path is unloaded (underlay filter, pins, bpffs); tier 1 is unloaded (filters,
pins, bpffs) and the TUN closed (the device goes with it). A step that fails
does not skip the ones after it. Nothing is left behind.

Kernel work that blocks (pyroute2, bpftool, bpf(2)) runs on one worker
thread shared with `SandboxManager`.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
import uvloop
from prometheus_client import CollectorRegistry

from egressd.admin import AdminServer, start_admin
from egressd.agent.api import ApiServer
from egressd.agent.config import DATAPATH_KERNEL, AgentConfig, ProxyEndpoint
from egressd.agent.datapath import AgentCollector, Datapath
from egressd.agent.discovery import ProxyDiscovery
from egressd.agent.health import HealthMonitor
from egressd.agent.kernel_datapath import KernelDatapath
from egressd.agent.launchers import REAP_INTERVAL_S, Launchers
from egressd.agent.node import NodeKernel
from egressd.agent.node_maps import NodeError
from egressd.agent.policy_watch import AgentPolicyWatch, ControlPolicies
from egressd.agent.registration import RegistrationError, resolve_sandbox_cidr
from egressd.agent.sandboxes import SandboxManager
from egressd.agent.tier1 import Tier1, Tier1Error, denied_ranges
from egressd.agent.tier1_events import Tier1EventReader
from egressd.errors import EgressdError
from egressd.lifecycle import Lifecycle, run_until_stopped
from egressd.net.tun import TUN_F_CSUM, TUN_F_TSO4, Tun, TunError, open_tun
from egressd.signals import install_stop_handlers

log = structlog.get_logger("egressd.agent")

EXPIRY_INTERVAL_S = 1.0


class AgentStartupError(EgressdError):
    """The agent cannot start; `reason` names the step (sysctl, tun, tier1, bind ...)."""


def _write_sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        if path.read_text(encoding="ascii").strip() == value:
            return
        path.write_text(value, encoding="ascii")
    except OSError as exc:
        raise AgentStartupError("sysctl", f"{key}={value}: {exc.strerror or exc}") from exc


def ensure_sysctls() -> None:
    """The node namespace's forwarding sysctls (this process's own namespace)."""
    _write_sysctl("net.ipv4.ip_forward", "1")
    _write_sysctl("net.ipv4.conf.all.rp_filter", "0")
    _write_sysctl("net.ipv4.conf.default.rp_filter", "0")


class AgentService(Lifecycle):
    """One node agent: TUN, tier 1, data path, health, API, admin."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__()
        if config.sandbox_cidr is None:
            raise ValueError('sandbox_cidr "auto": resolve it first (resolve_sandbox_cidr)')
        self.config = config
        self.registry = CollectorRegistry()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-kernel")
        self.tun: Tun | None = None
        self.tier1: Tier1 | None = None
        self.node: NodeKernel | None = None
        self.datapath: Datapath | None = None
        self.health: HealthMonitor | None = None
        self.discovery: ProxyDiscovery | None = None
        self.control: ControlPolicies | None = None
        self.watch: AgentPolicyWatch | None = None
        self.manager: SandboxManager | None = None
        self.launchers = Launchers()
        self.events: Tier1EventReader | None = None
        self.api: ApiServer | None = None
        self.admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._api_bound = False

    # -- readiness ------------------------------------------------------------

    def not_ready(self) -> list[str]:
        reasons = []
        if self.tun is None:
            reasons.append("tun_not_open")
        if self.tier1 is None:
            reasons.append("tier1_not_loaded")
        if not self._api_bound:
            reasons.append("api_not_bound")
        return reasons

    def ready(self) -> bool:
        return not self.not_ready()

    # -- lifecycle (egressd.lifecycle: each undo pushed as its step is taken) ------

    async def _start(self) -> None:
        config = self.config
        stack = self._stack
        loop = asyncio.get_running_loop()
        stack.callback(log.info, "agent_stopped", node=config.name)
        stack.callback(self.executor.shutdown, wait=True)
        ensure_sysctls()

        try:
            self.tun = open_tun(
                config.tun,
                mtu=config.sandbox_mtu,
                vnet_hdr=config.offload,
                offload=TUN_F_CSUM | TUN_F_TSO4 if config.offload else 0,
            )
        except TunError as exc:
            raise AgentStartupError("tun", f"{exc.reason}: {exc.detail}") from exc
        stack.callback(self.tun.close)
        _write_sysctl(f"net.ipv4.conf.{self.tun.name}.rp_filter", "0")
        with contextlib.suppress(AgentStartupError):  # IPv6 may be off already
            _write_sysctl(f"net.ipv6.conf.{self.tun.name}.disable_ipv6", "1")
        log.info("tun_open", tun=self.tun.name, ifindex=self.tun.ifindex, offload=config.offload)

        tier1 = Tier1(
            tun_ifindex=self.tun.ifindex,
            resolver=config.resolver,
            denied=denied_ranges(config.fleet_ranges),
            state_dir=config.state_dir,
        )
        try:
            await loop.run_in_executor(self.executor, tier1.load)
        except Tier1Error as exc:
            raise AgentStartupError("tier1", f"{exc.reason}: {exc.detail}") from exc
        self.tier1 = tier1
        stack.push_async_callback(self._unload_tier1, tier1)
        log.info("tier1_loaded", state_dir=str(config.state_dir))

        datapath: Datapath
        if config.datapath == DATAPATH_KERNEL:
            node = NodeKernel(underlay=config.underlay, vni=config.vni, state_dir=config.state_dir)
            try:
                await loop.run_in_executor(self.executor, node.load)
                stack.push_async_callback(self._unload_node, node)
                await loop.run_in_executor(self.executor, node.attach_underlay)
            except NodeError as exc:
                raise AgentStartupError("node_kernel", f"{exc.reason}: {exc.detail}") from exc
            self.node = node
            log.info("node_kernel_loaded", underlay_ifindex=node.underlay_ifindex)
            datapath = KernelDatapath(config, self.tun.fd, node=node, tier1=tier1)
        else:
            datapath = Datapath(config, self.tun.fd)
        self.datapath = datapath
        stack.callback(datapath.stop)  # also closes what a failed `start` opened
        manager = SandboxManager(config, tier1, datapath, self.executor)
        self.manager = manager
        cleaned = await loop.run_in_executor(self.executor, manager.cleanup_leftovers)
        if cleaned:
            log.warning("leftover_sandboxes_removed", sandbox_ids=cleaned)
        try:
            ring = tier1.open_events()
        except Tier1Error as exc:
            raise AgentStartupError("tier1", f"{exc.reason}: {exc.detail}") from exc
        self.events = Tier1EventReader(ring, manager.by_ifindex, config.name)
        stack.push_async_callback(self.events.stop)  # closes the ring, started or not
        self.events.start()

        try:
            datapath.start(loop)
        except NodeError as exc:
            raise AgentStartupError("node_kernel", f"{exc.reason}: {exc.detail}") from exc
        except OSError as exc:
            raise AgentStartupError(
                "bind", f"GENEVE {config.underlay}:{config.geneve_port}: {exc.strerror or exc}"
            ) from exc

        self.health = HealthMonitor(config.proxies, config.health, datapath.proxy_health)
        stack.push_async_callback(self.health.stop)
        await self.health.start()
        if config.discovery is not None:
            self.discovery = ProxyDiscovery(
                config.discovery,
                config.proxies,
                self._set_proxies,
                own_underlay=config.underlay,
                registry=self.registry,
            )
            stack.push_async_callback(self.discovery.stop)
            await self.discovery.start()
            # Live policies: registrations checked against the control plane, and
            # its watch followed (egressd.agent.policy_watch).
            self.control = ControlPolicies(config.discovery.control_url, config.discovery.timeout_s)
            stack.push_async_callback(self.control.close)
            await self.control.start()
            manager.control = self.control
            self.watch = AgentPolicyWatch(
                self.control,
                jobs=manager.jobs,
                refresh_job=manager.refresh_job,
                refresh_discovery=self.discovery.refresh,
                metrics=self.registry,
                renewer=manager,
            )
            stack.push_async_callback(self.watch.close)
            self.watch.start()

        self.registry.register(
            AgentCollector(
                datapath,
                proxy_up=self._proxy_up,
                tier1_totals=manager.tier1_totals,
                sandboxes=lambda: len(manager),
                tier1_by_sandbox=manager.tier1_by_sandbox,
            )
        )
        # Sandboxes come only through the API: they are unregistered right after
        # it closes, before the control plane client that registrations use.
        stack.callback(self.launchers.close)
        stack.push_async_callback(manager.unregister_all)
        self.api = ApiServer(manager, config.api_socket, self.launchers)
        try:
            await self.api.start()
        except EgressdError as exc:
            raise AgentStartupError("api", f"{exc.reason}: {exc.detail}") from exc
        # Only once bound: the socket file of a failed start may be another agent's.
        stack.push_async_callback(self._close_api, self.api)
        self._api_bound = True

        try:
            self.admin = await start_admin(
                self.registry,
                host=str(config.underlay),
                port=config.admin_port,
                ready=self.ready,
                reasons=self.not_ready,
            )
        except EgressdError as exc:
            raise AgentStartupError("admin", f"{exc.reason}: {exc.detail}") from exc
        stack.push_async_callback(self.admin.close)

        stack.push_async_callback(self._cancel_tasks)
        self._tasks.append(asyncio.create_task(self._expiry_loop(), name="sandbox-expiry"))
        self._tasks.append(asyncio.create_task(self._reap_loop(), name="sandbox-reaper"))
        log.info(
            "agent_ready",
            node=config.name,
            underlay=str(config.underlay),
            proxies=[
                p.name for p in (self.discovery.proxies if self.discovery else config.proxies)
            ],
            api_socket=str(config.api_socket),
            admin=f"{self.admin.host}:{self.admin.port}",
        )

    def _set_proxies(self, proxies: tuple[ProxyEndpoint, ...]) -> None:
        """Discovery callback: the data path first, so that it knows every name the
        health monitor may report."""
        if self.datapath is not None:
            self.datapath.set_proxies(proxies)
        if self.health is not None:
            self.health.update(proxies)

    def _proxy_up(self) -> dict[str, bool]:
        if self.health is None:
            return {}
        return {name: state.up for name, state in self.health.states.items()}

    async def _expiry_loop(self) -> None:
        assert self.manager is not None
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            await self.manager.expire()

    async def _reap_loop(self) -> None:
        assert self.manager is not None
        manager = self.manager
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            # Snapshot first: while one is unregistered, an id may change hands.
            orphans = []
            for sandbox_id, pid in self.launchers.gone():
                self.launchers.forget(sandbox_id)
                orphans.append((sandbox_id, pid, manager.get(sandbox_id)))
            for sandbox_id, pid, sandbox in orphans:
                if sandbox is None or manager.get(sandbox_id) is not sandbox:
                    continue
                log.warning(
                    "sandbox_reaped", sandbox_id=sandbox_id, reason="launcher_gone", pid=pid
                )
                try:
                    await manager.unregister(sandbox_id)
                except EgressdError as exc:
                    log.error(
                        "reap_failed", sandbox_id=sandbox_id, reason=exc.reason, detail=exc.detail
                    )

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _close_api(self, api: ApiServer) -> None:
        self._api_bound = False
        await api.close()

    async def _unload_node(self, node: NodeKernel) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, node.close)
        except NodeError as exc:
            log.error("node_kernel_close_failed", reason=exc.reason, detail=exc.detail)

    async def _unload_tier1(self, tier1: Tier1) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, tier1.close)
        except Tier1Error as exc:
            log.error("tier1_close_failed", reason=exc.reason, detail=exc.detail)


async def serve(config: AgentConfig, stop: asyncio.Event | None = None) -> None:
    """Start the agent, serve until `stop` is set or SIGTERM/SIGINT, then stop it."""
    stop = stop if stop is not None else asyncio.Event()
    # Not loop.add_signal_handler: pyroute2 forks helpers (netns sockets) that
    # share the loop's wakeup fd; a SIGTERM to one of them would stop us.
    uninstall = install_stop_handlers(asyncio.get_running_loop(), stop.set)
    try:
        resolved = await _resolve(config, stop)
        if resolved is None:  # stopped while waiting for the control plane
            return
        await run_until_stopped(
            AgentService(resolved),
            stop,
            stopping=lambda: log.info("agent_stopping", node=config.name),
        )
    finally:
        uninstall()


async def _resolve(config: AgentConfig, stop: asyncio.Event) -> AgentConfig | None:
    """The config with its sandbox CIDR (see egressd.agent.registration); None if `stop`
    is set first. A failure is one AgentStartupError line: the agent never guesses."""
    if config.sandbox_cidr is not None:
        return config
    resolving = asyncio.create_task(resolve_sandbox_cidr(config), name="sandbox-cidr")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({resolving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not resolving.done():
            resolving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resolving
    if resolving.cancelled():
        return None
    try:
        return resolving.result()
    except RegistrationError as exc:
        log.error(
            "sandbox_cidr_unavailable", node=config.name, reason=exc.reason, detail=exc.detail
        )
        raise AgentStartupError("sandbox_cidr", f"{exc.reason}: {exc.detail}") from exc


def run(config: AgentConfig) -> int:
    """The `egressd agent serve` entry point: run on uvloop; 0 after a clean stop."""
    uvloop.run(serve(config))
    return 0
