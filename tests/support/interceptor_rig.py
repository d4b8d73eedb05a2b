"""An `Interceptor` without sockets, for unit tests of its decisions (tier 2, the request gate):
no flows nor policy store (the tests hand both in), a resolver whose answer the test sets, and
a connection of the test job from the sandbox address."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from egressd.proxy.context import FlowInfo, ProxyContext, ProxyIdentity
from egressd.proxy.intercept import Interceptor, _Conn
from egressd.proxy.resolved import ResolvedNames

ADDR = ipaddress.IPv4Address
API = ADDR("203.0.113.10")  # api.allowed.test
ELSEWHERE = ADDR("203.0.113.99")
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")


class Resolver:
    """The proxy's own resolution, with an answer the test changes; counts the asks."""

    def __init__(self, answer: set[ipaddress.IPv4Address]) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def resolve_a(self, name: str, *, fleet_ranges: Sequence[Any] = ()) -> set[Any]:
        self.asked.append(name)
        return set(self.answer)


def interceptor(resolver: Resolver) -> Interceptor:
    ctx = ProxyContext(
        identity=ProxyIdentity("proxy1", ADDR("198.18.0.21"), ADDR("203.0.113.21")),
        flows=None,  # type: ignore[arg-type]
        policies=None,  # type: ignore[arg-type]
        fleet_ranges=(ipaddress.IPv4Network("198.18.0.0/24"),),
        upstream_resolver=ADDR("203.0.113.53"),
        registry=CollectorRegistry(),
        audit=structlog.get_logger("audit"),
    )
    return Interceptor(
        ctx,
        ResolvedNames(),
        listen=("127.0.0.1", 0),
        resolver=resolver,  # type: ignore[arg-type]
    )


def conn(dst: ipaddress.IPv4Address = API, port: int = 80) -> _Conn:
    c = _Conn(ADDR("100.96.1.2"), 40000, dst, port)
    c.flow = FlowInfo(JOB, b"\0" * 8, "node1")
    return c
