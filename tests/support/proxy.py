"""The proxy's side of the GENEVE tunnel, faked: a node registry, a policy store whose
`get` waits for the test, and a TUN made of a SOCK_SEQPACKET pair (no root needed)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import uuid
from collections.abc import Callable

from egressd.policy.jws import VerifiedPolicy, sign_payload, verify_policy
from egressd.policy.keys import TrustedKeys, generate_signing_key
from egressd.proxy.context import PolicyUnavailable
from egressd.proxy.registry import NodeEntry, NodeView

KEY = generate_signing_key()
TRUSTED = TrustedKeys.of(KEY.public)
NOW = int(time.time())
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
OTHER_JOB = uuid.UUID("7d1b0e0a-1111-4a9a-9f55-1f0c5ac1d3e2")
NODE1 = NodeEntry(
    "node1", ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Network("100.96.1.0/24")
)
NODE2 = NodeEntry(
    "node2", ipaddress.IPv4Address("198.18.0.12"), ipaddress.IPv4Network("100.96.2.0/24")
)
NODES = NodeView([NODE1, NODE2])
SANDBOX = "100.96.1.5"
SITE = "203.0.113.10"


def verified(job_id: uuid.UUID = JOB, nodes: tuple[str, ...] = ("node1",)) -> VerifiedPolicy:
    token = sign_payload(
        {
            "v": 1,
            "job_id": str(job_id),
            "account": "acme",
            "nodes": list(nodes),
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "exp": NOW + 3600,
            "egress": [{"host": "api.allowed.test", "ports": [443]}],
        },
        KEY,
    )
    return verify_policy(token, TRUSTED)


POLICY = verified()
POLICIES: dict[uuid.UUID, VerifiedPolicy] = {
    JOB: POLICY,
    OTHER_JOB: verified(OTHER_JOB, ("node2",)),
}


class FakeTun:
    """The tunnel's end of a SOCK_SEQPACKET pair: one packet per read/write, like a TUN."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.theirs.settimeout(2.0)
        self.name = "faketun0"
        self.closed = False

    @property
    def fd(self) -> int:
        return self.ours.fileno()

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


class FakeNodes:
    def __init__(self, view: NodeView) -> None:
        self.view = view


class FakePolicies:
    """cached/negative/get/request_refresh, with `get` held until `release()`."""

    def __init__(self, cached: dict[uuid.UUID, VerifiedPolicy]) -> None:
        self._cached = dict(cached)
        self.negatives: dict[uuid.UUID, str] = {}
        self.refreshes: list[uuid.UUID] = []
        self.gets: list[uuid.UUID] = []
        self.serve: dict[uuid.UUID, VerifiedPolicy | str] = {}
        self.digest_states: dict[bytes, str] = {}  # digest -> egressd.proxy.digests verdict
        self._gate = asyncio.Event()

    def digest_state(self, job_id: uuid.UUID, digest: bytes) -> str:
        return self.digest_states.get(digest, "unknown")

    def cached(self, job_id: uuid.UUID) -> VerifiedPolicy | None:
        return self._cached.get(job_id)

    def negative(self, job_id: uuid.UUID) -> str | None:
        return self.negatives.get(job_id)

    def request_refresh(self, job_id: uuid.UUID) -> None:
        self.refreshes.append(job_id)

    def release(self) -> None:
        self._gate.set()

    async def get(self, job_id: uuid.UUID) -> VerifiedPolicy:
        self.gets.append(job_id)
        await self._gate.wait()
        answer = self.serve.get(job_id, "policy_missing")
        if isinstance(answer, str):
            raise PolicyUnavailable(answer, "test")
        self._cached[job_id] = answer
        return answer


async def until(check_fn: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check_fn():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)
