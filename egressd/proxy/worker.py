"""One worker process of a proxy supervisor: `egressd proxy worker` (started by `proxy serve`
with ``"workers"`` > 1, never by hand; `egressd.proxy.workers` describes the whole).

Worker i builds tier 2 as `egressd.proxy.service.ProxyService` does (keys, registry poll,
policy store and watch, tier 2 names, limits, interceptor, DNS responder) on the three
sockets it inherited, with the pinned px_flows as its flow table (`PinnedFlows`), its share
of the proxy-wide limits (`worker_limits`), `WorkerPolicies` in front of its policy store,
the UDP DNS hand-over (`DnsSteering`), and `/metrics` and `/readyz` on ``RUN/worker-i.sock``
for the supervisor. Its log lines (audit events included) carry ``worker``: i.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import structlog
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from egressd.admin import add_admin_routes
from egressd.lifecycle import Lifecycle, serve_until_stopped
from egressd.policy.errors import KeyFileError
from egressd.policy.keys import load_trusted_keys
from egressd.proxy import dns, intercept, service
from egressd.proxy.config import ProxyConfig
from egressd.proxy.context import ProxyContext, ProxyIdentity
from egressd.proxy.limiting import ProxyLimits
from egressd.proxy.resolved import ResolvedNames
from egressd.proxy.secrets import SecretStore
from egressd.proxy.workers import (
    DnsSteering,
    IPv4Address,
    PinnedFlows,
    WorkerError,
    WorkerPolicies,
    flows_pin,
    worker_limits,
)

log = structlog.get_logger("egressd.proxy.worker")


class WorkerService(Lifecycle):
    """Worker `index` of a supervisor (see the module docstring). `fds`: its TCP listener,
    UDP DNS and TCP DNS sockets, inherited. Built as `ProxyService` builds tier 2."""

    def __init__(self, config: ProxyConfig, index: int, fds: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.index = index
        self.fds = tuple(fds)
        self.metrics = CollectorRegistry()
        self.run_dir = config.kernel_state_dir / "workers"
        self.registry: Any = None
        self.ctx: Any = None
        self.interceptor: Any = None
        self.dns: Any = None
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.stopping:
            reasons.append("stopping")
        if self.registry is None or not self.registry.ready:
            reasons.append("registry_not_fetched")
        if self.interceptor is None or self.dns is None:
            reasons.append("listeners_not_bound")
        return reasons

    async def _start(self) -> None:
        config, stack, n = self.config, self._stack, self.config.worker_count
        tcp, udp, dns_tcp = (socket.socket(fileno=fd) for fd in self.fds)
        for sock in (tcp, udp, dns_tcp):
            stack.callback(sock.close)
        try:
            trusted = await asyncio.to_thread(load_trusted_keys, config.keys_dir)
        except KeyFileError as exc:
            raise WorkerError("keys", f"{exc.reason}: {exc.detail}") from exc

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), trust_env=False)
        stack.push_async_callback(session.close)
        clients = service.control_clients(
            config, session, trusted, self.metrics, self._fleet_changed
        )
        self.registry = registry = clients.registry
        policies, watch = clients.policies, clients.watch
        registry.start()
        stack.push_async_callback(registry.close)
        stack.push_async_callback(policies.close)
        watch.start()
        stack.push_async_callback(watch.close)

        resolved = ResolvedNames()
        prune = asyncio.get_running_loop().create_task(
            _prune_resolved(resolved, service.RESOLVED_PRUNE_INTERVAL_S),
            name="proxy-resolved-prune",
        )
        self._tasks.add(prune)
        stack.push_async_callback(self._cancel_tasks)

        def node_name(address: IPv4Address) -> str | None:
            node = registry.node_by_underlay(address)
            return None if node is None else str(node.name)

        flows = PinnedFlows(flows_pin(config), node_name)
        stack.callback(flows.close)
        self.ctx = ctx = ProxyContext(
            identity=ProxyIdentity(
                name=config.name, underlay=config.underlay, egress=config.egress
            ),
            flows=flows,
            policies=WorkerPolicies(policies, self.index, n),
            fleet_ranges=registry.fleet,
            upstream_resolver=config.upstream_resolver,
            registry=self.metrics,
            audit=structlog.get_logger("egressd.proxy.audit").bind(
                component="proxy", worker=self.index
            ),
            secrets=SecretStore(config.secrets_dir),
        )
        limits = ProxyLimits(
            worker_limits(config, self.index),
            registry=self.metrics,
            proxy_count=lambda: registry.proxy_count,
        )
        self.interceptor = await intercept.start_interceptor(
            ctx,
            resolved,
            listen=tcp.getsockname(),
            limits=limits,
            interception=service.load_interception(config),
            sock=tcp,
        )
        stack.push_async_callback(self.interceptor.close)

        def job_of(src: IPv4Address, sport: int, dst: IPv4Address) -> uuid.UUID | None:
            flow = flows.lookup(src, sport, dst, dns.DNS_PORT, 17)
            return None if flow is None else flow.job_id

        steering = DnsSteering(self.run_dir, self.index, n, job_of, self.metrics)
        self.dns = await dns.start_dns(
            ctx,
            resolved,
            listen=udp.getsockname(),
            limits=limits,
            refusal_rcode=config.dns_refusal_rcode,
            socks=(udp, dns_tcp),
            steer=steering.steer,
        )
        stack.push_async_callback(self.dns.close)
        steering.start(self.dns.deliver)
        stack.callback(steering.close)

        app = web.Application()
        add_admin_routes(app, self.metrics, self.not_ready_reasons)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        path = self.run_dir / f"worker-{self.index}.sock"
        path.unlink(missing_ok=True)
        await web.UnixSite(runner, str(path)).start()
        log.info("proxy_worker_serving", worker=self.index, pid=os.getpid(), workers=n)

    def _fleet_changed(self, fleet: Any) -> None:
        if self.ctx is not None:
            self.ctx.fleet_ranges = fleet

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        self.stopping = True
        await super().stop()


async def _prune_resolved(resolved: Any, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        resolved.prune(time.monotonic())


async def serve_worker(config: ProxyConfig, index: int, fds: Sequence[int]) -> None:
    await serve_until_stopped(
        WorkerService(config, index, fds),
        stopping=lambda: log.info("stopping", worker=index),
        started=service.settle_heap,
    )
    log.info("stopped", worker=index)


def run_worker(config: ProxyConfig, index: int, fds: Sequence[int]) -> int:
    """`egressd proxy worker`: serve on uvloop until SIGTERM/SIGINT; exit code 0."""
    structlog.contextvars.bind_contextvars(worker=index)
    uvloop.run(serve_worker(config, index, fds))
    return 0
