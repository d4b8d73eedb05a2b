"""`"sandbox_cidr": "auto"`: the agent asks the control plane for its sandbox CIDR at start.

`resolve_sandbox_cidr(config)` runs before anything else of the agent's start
(no sysctl, TUN, tier 1 or veth exists yet):

    PUT {control_url}/v1/nodes/{name}  {"underlay": ..., "sandbox_cidr": "auto"}
    Authorization: Bearer <registration.admin_token_file>

and returns the config with the CIDR of the answer (`AgentConfig.resolved`).
The control plane keeps a registered name's CIDR, else allocates the lowest
free block of its pool (`egressd.control.pool`), so a restarted agent gets
the same CIDR back.

Fail closed, never a guessed CIDR: an unreachable control plane or a 5xx is
retried (jittered backoff, `egressd.control.watch_client.backoff_delay`) for
`registration.wait_s`, then the start fails; any other answer that is not a
good record fails at once. Every failure is one `RegistrationError` whose
reason is the control plane's error token (`sandbox_pool_exhausted`,
`conflict`, `unauthorized`, `invalid_node` ...) or `control_unreachable`,
`admin_token` or `bad_response`; the agent's start turns it into one line on
stderr and exit code 2.

`parse_node_answer` and `refusal` are pure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import structlog

from egressd.agent.config import SANDBOX_CIDR_AUTO, AgentConfig, ConfigError
from egressd.control.watch_client import backoff_delay, read_json_body
from egressd.errors import EgressdError

MAX_BODY_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 4096

log = structlog.get_logger("egressd.agent")


class RegistrationError(EgressdError):
    """No sandbox CIDR from the control plane; `reason` as in the module docstring."""


def read_admin_token(path: Path) -> str:
    """The admin token in `path` (surrounding whitespace stripped); RegistrationError."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise RegistrationError(
            "admin_token", f"admin token file {path}: {exc.strerror or exc}"
        ) from exc
    token = data.decode("utf-8", errors="replace").strip()
    if len(data) > MAX_TOKEN_BYTES or not token or any(c.isspace() for c in token):
        raise RegistrationError(
            "admin_token", f"admin token file {path}: empty, too large or has whitespace"
        )
    return token


def parse_node_answer(
    body: object, name: str, underlay: ipaddress.IPv4Address
) -> ipaddress.IPv4Network:
    """The sandbox CIDR of a node PUT's answer, which must be this node's record."""
    if not isinstance(body, dict):
        raise RegistrationError("bad_response", "answer is not a JSON object")
    if body.get("name") != name:
        raise RegistrationError("bad_response", f"answer names node {body.get('name')!r}")
    if body.get("underlay") != str(underlay):
        raise RegistrationError(
            "bad_response", f"answer has underlay {body.get('underlay')!r}, not {underlay}"
        )
    cidr = body.get("sandbox_cidr")
    if not isinstance(cidr, str) or "/" not in cidr:
        raise RegistrationError("bad_response", f"answer has no sandbox_cidr: {cidr!r}")
    try:
        return ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        raise RegistrationError("bad_response", f"sandbox_cidr {cidr!r}: {exc}") from exc


def refusal(status: int, body: object) -> RegistrationError | None:
    """The final error for an answer that is not a 200, or None when it is worth
    retrying (5xx: the control plane is starting or its state write failed)."""
    if status >= 500:
        return None
    token = body.get("error") if isinstance(body, dict) else None
    detail = body.get("detail") if isinstance(body, dict) else None
    reason = token if isinstance(token, str) and token else f"http_{status}"
    text = f"HTTP {status}" + (f": {detail}" if isinstance(detail, str) and detail else "")
    return RegistrationError(reason, text)


async def _attempt(
    session: aiohttp.ClientSession, url: str, token: str, body: dict[str, str]
) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.put(url, json=body, headers=headers, allow_redirects=False) as response:
        try:
            answer = await read_json_body(response, MAX_BODY_BYTES)
        except ValueError:
            answer = None
        return response.status, answer


async def register_node(
    config: AgentConfig, *, clock: Callable[[], float] = time.monotonic
) -> ipaddress.IPv4Network:
    """PUT this node with `"sandbox_cidr": "auto"`; its CIDR, or RegistrationError."""
    if config.discovery is None or config.registration is None:
        raise RegistrationError("bad_config", '"auto" needs discovery and registration')
    token = read_admin_token(config.registration.admin_token_file)
    url = f"{config.discovery.control_url.rstrip('/')}/v1/nodes/{config.name}"
    body = {"underlay": str(config.underlay), "sandbox_cidr": SANDBOX_CIDR_AUTO}
    timeout = config.discovery.timeout_s
    deadline = clock() + config.registration.wait_s
    attempt = 0
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(2.0, timeout))
    ) as session:
        while True:
            attempt += 1
            try:
                status, answer = await _attempt(session, url, token, body)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if status == 200:
                    return parse_node_answer(answer, config.name, config.underlay)
                final = refusal(status, answer)
                if final is not None:
                    raise RegistrationError(final.reason, f"PUT {url}: {final.detail}")
                problem = f"HTTP {status}"
            delay = backoff_delay(attempt)
            if clock() + delay > deadline:
                raise RegistrationError(
                    "control_unreachable",
                    f"PUT {url}: {' '.join(problem.split())} "
                    f"(gave up after {attempt} attempt(s), registration.wait_s "
                    f"{config.registration.wait_s:g})",
                )
            log.warning("node_registration_retry", url=url, attempt=attempt, problem=problem)
            await asyncio.sleep(delay)


async def resolve_sandbox_cidr(config: AgentConfig) -> AgentConfig:
    """`config` itself when its CIDR is explicit; else with the control plane's."""
    if config.sandbox_cidr is not None:
        return config
    cidr = await register_node(config)
    try:
        resolved = config.resolved(cidr)
    except ConfigError as exc:
        raise RegistrationError("bad_response", f"allocated {cidr}: {exc.detail}") from exc
    log.info(
        "sandbox_cidr_allocated",
        node=config.name,
        underlay=str(config.underlay),
        sandbox_cidr=str(cidr),
        control_url=config.discovery.control_url if config.discovery else None,
    )
    return resolved
