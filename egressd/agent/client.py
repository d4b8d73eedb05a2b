"""A small client for the agent's Unix-socket API (used by `egressd sandbox run`).

    async with AgentClient("/run/egressd/agents/node1.sock") as agent:
        info = await agent.register("sbx-1", jws)   # SandboxInfo
        ...
        await agent.unregister("sbx-1")

Every failure is an `AgentClientError`: ``reason`` is the agent's reason
token (``expired``, ``job_not_bound_to_node``, ``duplicate_sandbox`` ...) or,
when the agent could not be reached, ``agent_unreachable``;
``kind`` is the agent's error class (``policy_rejected``, ``bad_request``,
``conflict``, ``not_found``, ``unavailable``, ``internal``, or
``transport``); ``status`` is the HTTP status (0 when unreachable).
`AgentClientError` also subclasses `OSError` for the unreachable case, so
callers can treat it like any other I/O failure.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from egressd.errors import EgressdError

DEFAULT_TIMEOUT_S = 30.0
_BASE = "http://agent"


class AgentClientError(EgressdError):
    def __init__(self, reason: str, detail: str = "", *, kind: str, status: int = 0) -> None:
        super().__init__(reason, detail)
        self.kind = kind
        self.status = status


class AgentUnreachable(AgentClientError, OSError):
    def __init__(self, detail: str) -> None:
        AgentClientError.__init__(self, "agent_unreachable", detail, kind="transport")


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """What the agent made for a sandbox: configure runsc with these."""

    sandbox_id: str
    job_id: str
    ip: ipaddress.IPv4Address
    prefixlen: int
    gateway: ipaddress.IPv4Address
    netns: str
    interface: str
    mtu: int
    resolver: ipaddress.IPv4Address
    raw: dict[str, Any]

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SandboxInfo:
        try:
            return cls(
                sandbox_id=str(obj["sandbox_id"]),
                job_id=str(obj["job_id"]),
                ip=ipaddress.IPv4Address(obj["ip"]),
                prefixlen=int(obj["prefixlen"]),
                gateway=ipaddress.IPv4Address(obj["gateway"]),
                netns=str(obj["netns"]),
                interface=str(obj["interface"]),
                mtu=int(obj["mtu"]),
                resolver=ipaddress.IPv4Address(obj["resolver"]),
                raw=obj,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AgentClientError(
                "bad_response", f"unexpected sandbox JSON: {exc}", kind="transport"
            ) from exc


def _path(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{quote(sandbox_id, safe='')}"


class AgentClient:
    """Talks to one agent over its Unix socket; use as an async context manager."""

    def __init__(self, socket_path: Path | str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = str(socket_path)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path), timeout=self._timeout
            )
        return self._session

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            async with self._sess().request(method, _BASE + path, json=body) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnreachable(f"{self.socket_path}: {exc}") from exc
        if not data:
            return status, None
        try:
            return status, json.loads(data)
        except ValueError as exc:
            raise AgentClientError(
                "bad_response", f"HTTP {status}: not JSON", kind="transport", status=status
            ) from exc

    @staticmethod
    def _raise(status: int, payload: Any) -> None:
        if isinstance(payload, dict):
            raise AgentClientError(
                str(payload.get("reason", "error")),
                str(payload.get("detail", "")),
                kind=str(payload.get("error", "internal")),
                status=status,
            )
        raise AgentClientError("bad_response", f"HTTP {status}", kind="transport", status=status)

    async def register(self, sandbox_id: str, jws: str) -> SandboxInfo:
        status, payload = await self._request(
            "POST", "/v1/sandboxes", {"sandbox_id": sandbox_id, "jws": jws}
        )
        if status != 201 or not isinstance(payload, dict):
            self._raise(status, payload)
        return SandboxInfo.from_json(payload)

    async def unregister(self, sandbox_id: str) -> None:
        status, payload = await self._request("DELETE", _path(sandbox_id))
        if status != 204:
            self._raise(status, payload)

    async def get(self, sandbox_id: str) -> SandboxInfo:
        status, payload = await self._request("GET", _path(sandbox_id))
        if status != 200 or not isinstance(payload, dict):
            self._raise(status, payload)
        return SandboxInfo.from_json(payload)

    async def list(self) -> list[SandboxInfo]:
        status, payload = await self._request("GET", "/v1/sandboxes")
        if status != 200 or not isinstance(payload, dict):
            self._raise(status, payload)
        return [SandboxInfo.from_json(item) for item in payload.get("sandboxes", [])]
