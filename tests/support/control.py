"""A fake control plane on 127.0.0.1 for the proxy's policy store and node registry.

It serves `GET /v1/jobs/{job_id}/policy` and `GET /v1/nodes` from dicts the test
fills, counts requests, can delay answers (single-flight) and publishes a JWK set
with a key the proxy does *not* trust (the store never takes keys from the network).
The `control` and `session` fixtures are in tests/unit/proxy/conftest.py.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import SigningKey, TrustedKeys, generate_signing_key, jwks
from egressd.proxy.policies import PolicyStore

T0 = 1_795_392_000.0
TTL = 3600
KEY = generate_signing_key()
ROGUE = generate_signing_key()
TRUSTED = TrustedKeys.of(KEY.public)
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
OTHER = uuid.UUID("7d1b0e0a-1111-4a9a-9f55-1f0c5ac1d3e2")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token(
    job_id: uuid.UUID = JOB,
    *,
    key: SigningKey = KEY,
    iat: float = T0,
    ttl: int = TTL,
    nodes: tuple[str, ...] = ("node1",),
) -> str:
    return sign_payload(
        {
            "v": 1,
            "job_id": str(job_id),
            "account": "acme",
            "nodes": list(nodes),
            "iat": int(iat),
            "nbf": int(iat),
            "exp": int(iat) + ttl,
            "egress": [{"host": "api.allowed.test", "ports": [443]}],
        },
        key,
    )


class FakeControl:
    def __init__(self) -> None:
        self.policies: dict[str, Any] = {}  # job id -> jws str, or an int status
        self.nodes: Any = {"nodes": []}
        self.hits: dict[str, int] = {}
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def policy(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        self.hits[job_id] = self.hits.get(job_id, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.policies.get(job_id, 404)
        if isinstance(answer, int):
            return web.json_response({"error": "x"}, status=answer)
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        return web.json_response(
            {"job_id": job_id, "jws": answer, "digest": policy_digest(answer).hex(), "exp": 0}
        )

    async def list_nodes(self, _request: web.Request) -> web.Response:
        self.hits["nodes"] = self.hits.get("nodes", 0) + 1
        if isinstance(self.nodes, int):
            return web.json_response({"error": "x"}, status=self.nodes)
        return web.json_response(self.nodes)

    async def keys(self, _request: web.Request) -> web.Response:
        return web.json_response(jwks(TrustedKeys.of(ROGUE.public)))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/jobs/{job_id}/policy", self.policy)
        app.router.add_get("/v1/nodes", self.list_nodes)
        app.router.add_get("/v1/keys", self.keys)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class Env:
    def __init__(self, control: FakeControl, session: aiohttp.ClientSession, **kwargs: Any) -> None:
        self.clock = Clock(T0 + 1)
        self.mono = Clock(1000.0)
        self.metrics = CollectorRegistry()
        args: dict[str, Any] = {
            "metrics": self.metrics,
            "clock": self.clock,
            "monotonic": self.mono,
        }
        args.update(kwargs)
        self.store = PolicyStore(
            session, args.pop("url", control.url), args.pop("trusted", TRUSTED), **args
        )

    def fetches(self, result: str) -> float:
        return (
            self.metrics.get_sample_value("egressd_policy_fetch_total", {"result": result}) or 0.0
        )

    def rejected(self, reason: str) -> float:
        return (
            self.metrics.get_sample_value("egressd_policy_rejected_total", {"reason": reason})
            or 0.0
        )


async def settle() -> None:
    """Let background fetches to the fake (on loopback) finish."""
    for _ in range(10):
        await asyncio.sleep(0.01)
