"""A node's sandbox manager without a kernel or a control plane: fakes for tier 1, the route
listener and the control plane's held policies, and a signed policy's payload for one job.
The `keys_dir` fixture (a key directory trusting `KEY`) is in tests/unit/agent/conftest.py."""

from __future__ import annotations

import ipaddress
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from egressd.agent.policy_watch import ControlUnavailable
from egressd.agent.sandboxes import Sandbox, SandboxManager
from egressd.agent.tier1 import Bucket
from egressd.policy.keys import generate_signing_key

JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
OTHER_JOB = uuid.UUID("9d7e4c2a-1111-4a9a-9f55-1f0c5ac1d3e2")
KEY = generate_signing_key()


def payload(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "v": 1,
        "job_id": str(JOB),
        "account": "acme",
        "nodes": ["node1"],
        "iat": now - 5,
        "nbf": now - 5,
        "exp": now + 3600,
        "egress": [{"host": "api.allowed.test", "ports": [443]}],
    }
    out.update(over)
    return out


class FakeControl:
    def __init__(self) -> None:
        self.tokens: dict[uuid.UUID, str] = {}
        self.down = False
        self.asked: list[uuid.UUID] = []

    async def held(self, job_id: uuid.UUID) -> str | None:
        self.asked.append(job_id)
        if self.down:
            raise ControlUnavailable("connection refused")
        return self.tokens.get(job_id)


class FakeTier1:
    def __init__(self) -> None:
        self.entries: dict[int, tuple[Any, ...]] = {}

    def set_sandbox(
        self, ifindex: int, ip: Any, mac: Any, ports: Any, exempt: Any, *, dns: Bucket, syn: Bucket
    ) -> None:
        self.entries[ifindex] = (tuple(ports), tuple(exempt), dns, syn)

    def remove_sandbox(self, ifindex: int) -> None:
        self.entries.pop(ifindex, None)


class FakeListener:
    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}

    def sandbox_added(self, sandbox: Sandbox) -> None:
        self.routes[sandbox.sandbox_id] = sandbox.digest

    def sandbox_removed(self, sandbox: Sandbox) -> None:
        self.routes.pop(sandbox.sandbox_id, None)


def make_manager(
    keys_dir: Path, tmp_path: Path
) -> tuple[SandboxManager, FakeTier1, FakeListener, FakeControl]:
    config = SimpleNamespace(
        name="node1",
        sandbox_cidr=ipaddress.IPv4Network("100.96.1.0/24"),
        state_dir=tmp_path,
        keys_dir=keys_dir,
        fleet_ranges=(),
    )
    tier1, listener, control = FakeTier1(), FakeListener(), FakeControl()
    manager = SandboxManager(
        config,  # type: ignore[arg-type]
        tier1,  # type: ignore[arg-type]
        listener,
        ThreadPoolExecutor(max_workers=1),
    )
    manager.control = control  # type: ignore[assignment]
    return manager, tier1, listener, control
