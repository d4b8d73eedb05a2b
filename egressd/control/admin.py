"""Admin routes every egressd daemon serves: `/healthz`, `/readyz`, `/metrics`.

- `/healthz`: 200 `{"status": "ok"}` whenever the event loop answers.
- `/readyz`: 200 `{"status": "ready"}` when the daemon's readiness check
  returns no problems, else 503 `{"status": "not_ready", "reasons": [...]}`.
- `/metrics`: Prometheus text exposition of the daemon's own
  `CollectorRegistry` (never the process-global one, so two apps in one test
  process do not share counters).

This lives under `egressd/control/` for now; the proxy and agent admin
listeners (TCP 9090) can import it until it moves to a shared module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Sequence[str]]
"""Returns the reasons the daemon is not ready; empty when it is."""


def add_admin_routes(
    app: web.Application, registry: CollectorRegistry, readiness: ReadinessCheck
) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        reasons = list(readiness())
        if reasons:
            return web.json_response({"status": "not_ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
