"""The agent's local API: HTTP over a Unix socket (mode 0600, root only).

The sandbox launcher (`egressd sandbox run`, root on the node) calls it:

``POST /v1/sandboxes`` ``{"sandbox_id": "...", "jws": "..."}``
    201 ``{"sandbox_id", "ip", "prefixlen", "gateway", "netns", "interface",
    "mtu", "resolver", "job_id", ...}``: the namespace is ready for runsc.
    400 ``{"error": "policy_rejected", "reason": "expired", "detail": ...}``
    for a policy that does not verify, is not valid now or does not name
    this node (reasons: those of `egressd.policy.jws` and
    ``job_not_bound_to_node``; with a control plane configured also
    ``policy_not_held`` and ``policy_superseded``, see
    `egressd.agent.policy_watch`); 503 ``{"error": "unavailable", "reason":
    "control_unreachable"}`` when the control plane cannot be asked (fail
    closed); 400 ``{"error": "bad_request", ...}`` for a
    body that is not that JSON object or a bad sandbox id; 409
    ``{"error": "conflict", "reason": "duplicate_sandbox"}``; 503
    ``{"error": "unavailable", "reason": "no_free_address"}``; 500
    ``{"error": "internal", ...}`` when the kernel refused (nothing is left
    behind: a failed registration is rolled back).
``DELETE /v1/sandboxes/{id}``
    204, or 404 ``{"error": "not_found", "reason": "unknown_sandbox"}``.
``GET /v1/sandboxes``
    200 ``{"sandboxes": [...]}``; ``GET /v1/sandboxes/{id}``: one, or 404.
    ``state`` is ``active``, ``expired`` (its policy's exp passed) or
    ``withdrawn`` (the control plane deleted its job): tier 1 drops the
    sandbox's frames as ``no_policy`` in the last two.

No authentication beyond the socket's mode: who can open it is root.

The process that registers a sandbox (SO_PEERCRED of the connection) is its
launcher: when it exits, the agent unregisters the sandbox
(`egressd.agent.launchers`). A successful unregistration, by anyone, ends the
watch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from egressd.agent.config import AgentConfig
from egressd.agent.launchers import Launchers, peer_pid
from egressd.agent.sandboxes import (
    BAD_REQUEST,
    CONFLICT,
    INTERNAL,
    NOT_FOUND,
    POLICY_REJECTED,
    UNAVAILABLE,
    AgentError,
    Sandbox,
    SandboxManager,
)
from egressd.errors import EgressdError

log = structlog.get_logger("egressd.agent.api")

MAX_BODY = 128 * 1024  # a JWS is at most 64 KiB
SHUTDOWN_TIMEOUT_S = 2.0

_STATUS = {
    POLICY_REJECTED: 400,
    BAD_REQUEST: 400,
    CONFLICT: 409,
    NOT_FOUND: 404,
    UNAVAILABLE: 503,
    INTERNAL: 500,
}


class ApiError(EgressdError):
    """The API socket cannot be bound (`bind_failed`, `socket_in_use`)."""


def _error(kind: str, reason: str, detail: str = "") -> web.Response:
    body = {"error": kind, "reason": reason}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=_STATUS.get(kind, 500))


def sandbox_view(sandbox: Sandbox, config: AgentConfig, state: str = "active") -> dict[str, Any]:
    out = sandbox.to_json()
    out.update(mtu=config.sandbox_mtu, resolver=str(config.resolver), node=config.name, state=state)
    return out


def build_api_app(manager: SandboxManager, launchers: Launchers | None = None) -> web.Application:
    config = manager.config

    async def create(request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            return _error(BAD_REQUEST, "bad_json", "body must be a JSON object")
        if not isinstance(body, dict):
            return _error(BAD_REQUEST, "bad_json", "body must be a JSON object")
        unknown = sorted(set(body) - {"sandbox_id", "jws"})
        if unknown:
            return _error(BAD_REQUEST, "unknown_field", unknown[0])
        if "jws" not in body:
            return _error(BAD_REQUEST, "missing_field", "jws")
        pid = peer_pid(request.transport.get_extra_info("socket") if request.transport else None)
        # Opened while the client waits for this answer: the process is alive.
        pidfd = launchers.open(pid) if launchers is not None else None
        try:
            sandbox = await manager.register(body.get("sandbox_id"), body["jws"])
        except BaseException as exc:
            if pidfd is not None:
                os.close(pidfd)
            if not isinstance(exc, AgentError):
                raise
            log.info(
                "sandbox_rejected",
                sandbox_id=str(body.get("sandbox_id"))[:64],
                reason=exc.reason,
                kind=exc.kind,
                detail=exc.detail,
            )
            return _error(exc.kind, exc.reason, exc.detail)
        if launchers is not None:
            launchers.watch(sandbox.sandbox_id, pid, pidfd)
        return web.json_response(sandbox_view(sandbox, config), status=201)

    async def delete(request: web.Request) -> web.Response:
        sandbox_id = request.match_info["sandbox_id"]
        try:
            await manager.unregister(sandbox_id)
        except AgentError as exc:
            if exc.kind != NOT_FOUND:
                log.error(
                    "unregister_failed", sandbox_id=sandbox_id, reason=exc.reason, detail=exc.detail
                )
            return _error(exc.kind, exc.reason, exc.detail)
        if launchers is not None:
            launchers.forget(sandbox_id)
        return web.Response(status=204)

    async def list_all(_request: web.Request) -> web.Response:
        items = [sandbox_view(s, config, manager.state(s.sandbox_id)) for s in manager.list()]
        return web.json_response({"sandboxes": items})

    async def get_one(request: web.Request) -> web.Response:
        sandbox_id = request.match_info["sandbox_id"]
        sandbox = manager.get(sandbox_id)
        if sandbox is None:
            return _error(NOT_FOUND, "unknown_sandbox", sandbox_id)
        return web.json_response(sandbox_view(sandbox, config, manager.state(sandbox_id)))

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/sandboxes", create)
    app.router.add_get("/v1/sandboxes", list_all)
    app.router.add_get("/v1/sandboxes/{sandbox_id}", get_one)
    app.router.add_delete("/v1/sandboxes/{sandbox_id}", delete)
    return app


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class ApiServer:
    """The Unix-socket listener; `start` binds (replacing a stale socket), `close` removes it."""

    def __init__(
        self, manager: SandboxManager, path: Path, launchers: Launchers | None = None
    ) -> None:
        self.manager = manager
        self.path = path
        self.launchers = launchers
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ApiError("bind_failed", f"{path} exists and is not a socket")
                if _socket_in_use(path):
                    raise ApiError("socket_in_use", f"another process serves {path}")
                path.unlink()
        except OSError as exc:
            raise ApiError("bind_failed", f"{path}: {exc.strerror or exc}") from exc
        runner = web.AppRunner(
            build_api_app(self.manager, self.launchers),
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        # Created with a umask that leaves only the owner: no window where the
        # socket exists with a wider mode.
        old_umask = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(path)).start()
        except OSError as exc:
            await runner.cleanup()
            raise ApiError("bind_failed", f"{path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._runner = runner
        log.info("api_listening", socket=str(path))

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
