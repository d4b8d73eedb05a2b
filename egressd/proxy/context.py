"""What the proxy's parts share: the contract between the data plane
(GENEVE endpoint, flow table, policy store) and tier 2 (interceptor, DNS).

The service builds one `ProxyContext` and hands it to every part; parts never
reach into each other's internals.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry

from egressd.errors import EgressdError
from egressd.policy.addresses import FleetAddresses
from egressd.policy.jws import VerifiedPolicy
from egressd.proxy.secrets import SecretStore


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """Who a sandbox flow belongs to, as learned from the GENEVE option that carried it."""

    job_id: uuid.UUID
    digest: bytes
    node: str


class PolicyUnavailable(EgressdError):
    """No usable policy for a job: reasons "policy_missing", "policy_unverifiable",
    "policy_expired", "control_unreachable". Tier 2 denies with this reason (fail closed)."""


class FlowLookup(Protocol):
    def lookup(
        self,
        src: ipaddress.IPv4Address,
        sport: int,
        dst: ipaddress.IPv4Address,
        dport: int,
        proto: int,
    ) -> FlowInfo | None:
        """The flow recorded when the sandbox's packet came in over GENEVE (proto 6 or 17)."""
        ...


class PolicySource(Protocol):
    async def get(self, job_id: uuid.UUID) -> VerifiedPolicy:
        """A verified, unexpired policy for the job, or PolicyUnavailable."""
        ...


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    name: str
    underlay: ipaddress.IPv4Address
    egress: ipaddress.IPv4Address


@dataclass(slots=True)
class ProxyContext:
    identity: ProxyIdentity
    flows: FlowLookup
    policies: PolicySource
    #: Always denied by tier 2 and DNS. In the service, a `FleetAddresses`:
    #: the configured fleet ranges plus every fleet member's address, replaced
    #: (one assignment, a new object) whenever the registry changes it; a
    #: plain tuple of ranges works too (tests, tools).
    fleet_ranges: Sequence[ipaddress.IPv4Network] | FleetAddresses
    upstream_resolver: ipaddress.IPv4Address
    registry: CollectorRegistry
    audit: structlog.typing.FilteringBoundLogger
    #: The secrets behind ``http.credentials`` (`egressd.proxy.secrets`);
    #: None: the proxy holds none, every credential is unavailable.
    secrets: SecretStore | None = None
