"""`"sandbox_cidr": "auto"`: the agent config parses it (with its rules), and the agent's
registration (egressd.agent.registration) gets the CIDR from a real control plane app on
loopback, the same one again after a restart, and fails closed with one clear reason."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from egressd.agent import service
from egressd.agent.config import (
    DEFAULT_ADMIN_TOKEN_FILE,
    AgentConfig,
    ConfigError,
    RegistrationSettings,
    parse_config,
)
from egressd.agent.registration import (
    RegistrationError,
    parse_node_answer,
    refusal,
    resolve_sandbox_cidr,
)
from egressd.control.app import ControlApi, build_app
from egressd.control.pool import SandboxPool
from egressd.control.store import StateStore
from egressd.policy.keys import TrustedKeys, generate_signing_key

TOKEN = "test-admin-token"


def auto_config(control_url: str = "http://198.18.0.2:8080", **extra: Any) -> dict[str, Any]:
    return {
        "name": "worker-1",
        "underlay": "10.0.0.1",
        "sandbox_cidr": "auto",
        "discovery": {"control_url": control_url, "timeout_s": 1.0},
        **extra,
    }


# --- config ------------------------------------------------------------------------------


def test_auto_parses_unresolved_with_default_registration() -> None:
    config = parse_config(auto_config())
    assert config.sandbox_cidr is None
    assert config.registration == RegistrationSettings()
    assert config.registration.admin_token_file == DEFAULT_ADMIN_TOKEN_FILE
    assert Path("/run/egressd/admin-token") == DEFAULT_ADMIN_TOKEN_FILE
    with pytest.raises(ValueError, match="not resolved"):
        _ = config.gateway
    resolved = config.resolved(IPv4Network("100.96.4.0/24"))
    assert resolved.sandbox_cidr == IPv4Network("100.96.4.0/24")
    assert resolved.gateway == IPv4Address("100.96.4.1")
    assert resolved.registration == config.registration  # still says where it came from
    # An explicit CIDR is exactly as before: no registration.
    explicit = parse_config({**auto_config(), "sandbox_cidr": "100.96.1.0/24"})
    assert explicit.sandbox_cidr == IPv4Network("100.96.1.0/24") and explicit.registration is None


def test_registration_settings_parse() -> None:
    config = parse_config(
        auto_config(registration={"admin_token_file": "/fleet/admin-token", "wait_s": 5})
    )
    assert config.registration == RegistrationSettings(Path("/fleet/admin-token"), 5.0)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"discovery": None}, "sandbox_cidr", "needs discovery.control_url"),
        ({"sandbox_cidr": "Auto"}, "sandbox_cidr", '(or "auto")'),
        ({"sandbox_cidr": "100.96.1.0"}, "sandbox_cidr", "needs a prefix length"),
        ({"sandbox_cidr": None}, "sandbox_cidr", "is required"),
        ({"sandbox_cidr": "100.96.1.0/24", "registration": {}}, "registration", '"auto"'),
        ({"registration": {"wait_s": 601}}, "registration.wait_s", "0..600"),
        ({"registration": {"token": "x"}}, "registration.token", "unknown key"),
        (
            {"registration": {"admin_token_file": "rel/path"}},
            "registration.admin_token_file",
            "absolute",
        ),
        ({"registration": []}, "registration", "must be an object"),
    ],
)
def test_auto_config_errors_name_their_field(
    change: dict[str, Any], field: str, words: str
) -> None:
    obj = auto_config()
    for key, value in change.items():
        if value is None:
            obj.pop(key)
        else:
            obj[key] = value
    if "discovery" not in obj:
        obj["proxies"] = [{"name": "proxy1", "underlay": "198.18.0.21"}]
    with pytest.raises(ConfigError) as caught:
        parse_config(obj)
    assert caught.value.field == field and words in caught.value.detail, caught.value.detail


def test_an_unresolved_config_cannot_start_an_agent() -> None:
    with pytest.raises(ValueError, match="resolve it first"):
        service.AgentService(parse_config(auto_config()))


# --- pure answers ---------------------------------------------------------------------------


def test_parse_node_answer_checks_it_is_this_node() -> None:
    ip = IPv4Address("10.0.0.1")
    good = {"name": "worker-1", "underlay": "10.0.0.1", "sandbox_cidr": "100.96.3.0/24"}
    assert parse_node_answer(good, "worker-1", ip) == IPv4Network("100.96.3.0/24")
    bad: object
    for bad in (
        [],
        {**good, "name": "worker-2"},
        {**good, "underlay": "10.0.0.2"},
        {**good, "sandbox_cidr": "auto"},
        {**good, "sandbox_cidr": "100.96.3.1/24"},
        {k: v for k, v in good.items() if k != "sandbox_cidr"},
    ):
        with pytest.raises(RegistrationError) as caught:
            parse_node_answer(bad, "worker-1", ip)
        assert caught.value.reason == "bad_response"


def test_refusal_is_final_for_4xx_and_retried_for_5xx() -> None:
    final = refusal(409, {"error": "sandbox_pool_exhausted", "detail": "no free /24"})
    assert final is not None and final.reason == "sandbox_pool_exhausted"
    assert final.detail == "HTTP 409: no free /24"
    unauthorized = refusal(401, {"error": "unauthorized"})
    assert unauthorized is not None and unauthorized.reason == "unauthorized"
    teapot = refusal(418, None)
    assert teapot is not None and teapot.reason == "http_418"
    assert refusal(500, {"error": "storage_error"}) is None
    assert refusal(503, None) is None


# --- against a real control plane app on loopback ------------------------------------------


class Plane:
    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.key = generate_signing_key()
        self.token_file = tmp_path / "admin-token"
        self.token_file.write_text(TOKEN + "\n")
        self.servers: list[TestServer] = []

    async def start(self, pool: SandboxPool | None = None) -> str:
        api = ControlApi(
            store=StateStore(self.state_dir),
            signing_key=self.key,
            trusted=TrustedKeys({}),
            admin_token=TOKEN,
            policy_ttl_s=3600,
            sandbox_pool=pool,
        )
        server = TestServer(build_app(api), host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    async def stop(self) -> None:
        for server in self.servers:
            await server.close()
        self.servers.clear()

    def config(self, url: str, name: str, underlay: str, wait_s: float = 2.0) -> AgentConfig:
        return parse_config(
            {
                **auto_config(url),
                "name": name,
                "underlay": underlay,
                "registration": {"admin_token_file": str(self.token_file), "wait_s": wait_s},
            }
        )


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    p = Plane(tmp_path)
    try:
        yield p
    finally:
        await p.stop()


async def test_agents_get_distinct_cidrs_and_the_same_after_restarts(plane: Plane) -> None:
    url = await plane.start()
    a = await resolve_sandbox_cidr(plane.config(url, "worker-1", "10.0.0.1"))
    b = await resolve_sandbox_cidr(plane.config(url, "worker-2", "10.0.0.2"))
    assert (a.sandbox_cidr, b.sandbox_cidr) == (
        IPv4Network("100.96.0.0/24"),
        IPv4Network("100.96.1.0/24"),
    )
    assert a.gateway == IPv4Address("100.96.0.1")
    await plane.stop()
    url = await plane.start()  # the control plane restarted over its state directory
    again = await resolve_sandbox_cidr(plane.config(url, "worker-2", "10.0.0.2"))
    assert again.sandbox_cidr == IPv4Network("100.96.1.0/24")


async def test_an_explicit_config_never_calls_the_control_plane() -> None:
    config = parse_config({**auto_config("http://127.0.0.1:9"), "sandbox_cidr": "100.96.1.0/24"})
    assert await resolve_sandbox_cidr(config) is config


async def test_exhausted_pool_fails_at_once_with_the_reason(plane: Plane) -> None:
    url = await plane.start(SandboxPool(IPv4Network("100.96.8.0/24"), 24))
    await resolve_sandbox_cidr(plane.config(url, "worker-1", "10.0.0.1"))
    started = time.monotonic()
    with pytest.raises(RegistrationError) as caught:
        await resolve_sandbox_cidr(plane.config(url, "worker-2", "10.0.0.2", wait_s=30))
    assert time.monotonic() - started < 5  # a refusal is not retried
    assert caught.value.reason == "sandbox_pool_exhausted"
    assert "/v1/nodes/worker-2: HTTP 409: no free /24 in 100.96.8.0/24" in caught.value.detail


async def test_a_wrong_token_is_unauthorized(plane: Plane) -> None:
    url = await plane.start()
    plane.token_file.write_text("not-the-token\n")
    with pytest.raises(RegistrationError) as caught:
        await resolve_sandbox_cidr(plane.config(url, "worker-1", "10.0.0.1"))
    assert caught.value.reason == "unauthorized"


async def test_a_missing_token_file_fails_before_any_request(plane: Plane) -> None:
    plane.token_file.unlink()
    with pytest.raises(RegistrationError) as caught:
        await resolve_sandbox_cidr(plane.config("http://127.0.0.1:9", "worker-1", "10.0.0.1"))
    assert caught.value.reason == "admin_token"
    assert str(plane.token_file) in caught.value.detail


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_is_retried_for_wait_s_then_fails(plane: Plane) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(RegistrationError) as caught:
        await resolve_sandbox_cidr(plane.config(url, "worker-1", "10.0.0.1", wait_s=1.5))
    took = time.monotonic() - started
    assert caught.value.reason == "control_unreachable"
    assert "wait_s 1.5" in caught.value.detail
    # Retried, then given up within the wait. How long it took depends on the jittered
    # back-off: it stops as soon as the next delay would pass the deadline, which can be
    # well before `wait_s` (a lower bound on the time failed once in CI, at 0.43 s).
    attempts = re.search(r"gave up after (\d+) attempt", caught.value.detail)
    assert attempts is not None and int(attempts.group(1)) >= 2, caught.value.detail
    assert took < 4, took


async def test_a_control_plane_that_comes_up_late_is_waited_for(plane: Plane) -> None:
    """The agent may start before the control plane (a DaemonSet pod before the
    StatefulSet's): transient failures are retried within wait_s."""
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    config = plane.config(url, "worker-1", "10.0.0.1", wait_s=10)

    async def late() -> web.AppRunner:
        await asyncio.sleep(1.0)
        api = ControlApi(
            store=StateStore(plane.state_dir),
            signing_key=plane.key,
            trusted=TrustedKeys({}),
            admin_token=TOKEN,
            policy_ttl_s=3600,
        )
        runner = web.AppRunner(build_app(api))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    starter = asyncio.create_task(late())
    try:
        resolved = await resolve_sandbox_cidr(config)
    finally:
        runner = await starter
        await runner.cleanup()
    assert resolved.sandbox_cidr == IPv4Network("100.96.0.0/24")


async def test_serve_turns_a_refusal_into_one_startup_error(plane: Plane) -> None:
    """The agent's start: no CIDR -> AgentStartupError (one line), before any set-up."""
    url = await plane.start(SandboxPool(IPv4Network("100.96.8.0/24"), 24))
    await resolve_sandbox_cidr(plane.config(url, "worker-1", "10.0.0.1"))
    with pytest.raises(service.AgentStartupError) as caught:
        await service.serve(plane.config(url, "worker-2", "10.0.0.2"), stop=asyncio.Event())
    assert caught.value.reason == "sandbox_cidr"
    assert caught.value.detail.startswith("sandbox_pool_exhausted: PUT ")
    assert "\n" not in caught.value.detail


async def test_serve_stops_while_waiting_for_the_control_plane(plane: Plane) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        service.serve(plane.config(url, "worker-1", "10.0.0.1", wait_s=60), stop=stop)
    )
    await asyncio.sleep(0.5)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=3)  # returns: nothing was set up
