"""The agent's data path, faked: a sandbox record and the underlay sockets it sends on."""

from __future__ import annotations

import uuid
from collections import deque
from ipaddress import IPv4Address
from typing import Any

from egressd.agent.sandboxes import Sandbox

JOB = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"

SANDBOX_IP = IPv4Address("100.96.1.2")
DIGEST = bytes.fromhex("0102030405060708")


def sandbox(ip: IPv4Address = SANDBOX_IP, job: str = JOB, sid: str = "sbx-1") -> Sandbox:
    return Sandbox(
        sandbox_id=sid,
        job_id=uuid.UUID(job),
        digest=DIGEST,
        kid="k",
        exp=2**31,
        ip=ip,
        gateway=IPv4Address("100.96.1.1"),
        prefixlen=24,
        netns="egd-sbx-x",
        host_veth="sbx",
        peer_veth="eth0",
        ifindex=7,
        mac="02:00:00:00:00:01",
        tcp_ports=(),
        exemptions=(),
    )


class FakeTx:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: Any, addr: tuple[str, int]) -> int:
        self.sent.append((bytes(data), addr))
        return len(data)

    def close(self) -> None:
        pass


class FakeRx:
    def __init__(self) -> None:
        self.queue: deque[tuple[bytes, tuple[str, int]]] = deque()

    def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[str, int]]:
        if not self.queue:
            raise BlockingIOError
        data, addr = self.queue.popleft()
        buf[: len(data)] = data
        return len(data), addr

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass
