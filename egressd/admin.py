"""The admin HTTP listener every egressd daemon runs (TCP 9090 on its underlay address).

- `/metrics`: Prometheus text exposition of the daemon's own
  `CollectorRegistry` (never the process-global one).
- `/healthz`: 200 `{"status": "ok"}` whenever the event loop answers.
- `/readyz`: 200 `{"status": "ready"}` when the daemon has no reason not to
  be, else 503 `{"status": "not_ready", "reasons": [...]}`.

`add_admin_routes` puts the three routes on any aiohttp app (the control
plane serves them beside its API); `start_admin` runs them on a listener of
their own (the proxies and agents).

The lifecycle follows aiohttp's `web_runner`: `start_admin` sets the runner up
and binds (port 0 binds an ephemeral port, read back into `AdminServer.port`);
`AdminServer.close()` stops it. Nothing is logged per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from egressd.errors import EgressdError

SHUTDOWN_TIMEOUT_S = 2.0

ReadinessCheck = Callable[[], Sequence[str]]
"""Returns the reasons the daemon is not ready; empty when it is."""

MetricsPage = Callable[[], Awaitable[bytes]]
"""The whole `/metrics` text, for a daemon whose page is more than its registry (a proxy
supervisor adds its workers' pages)."""


class AdminError(EgressdError):
    """The admin listener cannot start (`bind_failed`)."""


@dataclass(slots=True)
class AdminServer:
    """A running admin listener; `host`/`port` are what it is bound to."""

    host: str
    port: int
    _runner: web.AppRunner | None

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def add_admin_routes(
    app: web.Application,
    registry: CollectorRegistry,
    readiness: ReadinessCheck,
    page: MetricsPage | None = None,
) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        why = list(readiness())
        if why:
            return web.json_response({"status": "not_ready", "reasons": why}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry) if page is None else await page()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")


def build_admin_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    reasons: Callable[[], Sequence[str]] | None = None,
    page: MetricsPage | None = None,
) -> web.Application:
    def readiness() -> Sequence[str]:
        if ready():
            return ()
        return list(reasons()) if reasons is not None else ["not_ready"]

    app = web.Application()
    add_admin_routes(app, registry, readiness, page)
    return app


async def start_admin(
    registry: CollectorRegistry,
    *,
    host: str,
    port: int,
    ready: Callable[[], bool],
    reasons: Callable[[], Sequence[str]] | None = None,
    page: MetricsPage | None = None,
) -> AdminServer:
    """Serve `/metrics`, `/healthz`, `/readyz` on `host:port`; raises AdminError."""
    runner = web.AppRunner(
        build_admin_app(registry, ready, reasons, page),
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise AdminError(
            "bind_failed", f"admin listener {host}:{port}: {exc.strerror or exc}"
        ) from exc
    bound_host, bound_port = runner.addresses[0][:2]
    return AdminServer(host=bound_host, port=bound_port, _runner=runner)
