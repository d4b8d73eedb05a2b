"""A tier-2 connection's outcome as a value, and the reasons it can carry (pure).

Each decision step of the interceptor (`egressd.proxy.intercept`: the flow,
the policy, admission, the address precheck, what the client sent, tier 2,
the TLS interception check, the upstream connect) returns a frozen `Outcome`
or hands on to the next step; one coordinator writes the ``connection``
audit event and ``egressd_connections_total`` once, from the final outcome
(smokescreen's ``Decision`` shape: verdict, reason, host, rule; plus
report mode's ``would_deny``).

`ConnectionReason` is every reason a connection's audit event and counter
can carry: the policy's (`egressd.policy.matcher`, `egressd.policy.addresses`),
tier 2's (`egressd.proxy.tier2`), the request rules' ``http_not_inspectable``,
the policy store's (`PolicyUnavailable`), the limits' (`egressd.limits`),
TLS interception's and the interceptor's own. It is a `StrEnum`: a member is
its string, so counters and audit lines carry exactly the strings they always
did; a unit test holds each module's constants to it. The verdicts are the
policy's `Verdict` (allow, deny): a connection is allowed or denied, never
dropped (DNS's ``drop`` is the responder's own; tier 1's verdicts are what tc
did with a frame, `egressd.agent.tier1_maps.Verdict`).

`CONNECTION_LABELS` is the label set of ``egressd_connections_total``, derived
from the two enums; `LabelledCounter` creates every child up front (a
dashboard sees zeros, not gaps) and refuses a label set outside it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from egressd.policy.matcher import Decision, Verdict
from egressd.policy.model import EgressRule


class ConnectionReason(enum.StrEnum):
    """Why a connection was allowed or denied (the counter's and audit line's ``reason``)."""

    # the policy's rules (egressd.policy.matcher)
    ALLOWED_HOST = "allowed_host"
    ALLOWED_CIDR = "allowed_cidr"
    NO_MATCHING_RULE = "no_matching_rule"
    PORT_NOT_ALLOWED = "port_not_allowed"
    INVALID_HOST = "invalid_host"
    INVALID_ADDRESS = "invalid_address"
    # always-denied destinations (egressd.policy.addresses)
    FLEET_ADDRESS = "fleet_address"
    DENY_FLEET_RANGE = "deny_fleet_range"
    DENY_THIS_NETWORK = "deny_this_network"
    DENY_PRIVATE = "deny_private"
    DENY_CGNAT = "deny_cgnat"
    DENY_LOOPBACK = "deny_loopback"
    DENY_LINK_LOCAL = "deny_link_local"
    DENY_BENCHMARK = "deny_benchmark"
    DENY_MULTICAST = "deny_multicast"
    DENY_RESERVED = "deny_reserved"
    DENY_UNSPECIFIED = "deny_unspecified"
    DENY_IPV4_MAPPED = "deny_ipv4_mapped"
    DENY_IPV4_COMPATIBLE = "deny_ipv4_compatible"
    DENY_NAT64 = "deny_nat64"
    DENY_DISCARD = "deny_discard"
    DENY_TEREDO = "deny_teredo"
    DENY_6TO4 = "deny_6to4"
    DENY_UNIQUE_LOCAL = "deny_unique_local"
    DENY_SITE_LOCAL = "deny_site_local"
    # what the client sent (egressd.proxy.tier2)
    HOST_ADDRESS_MISMATCH = "host_address_mismatch"
    TLS_MALFORMED = "tls_malformed"
    HTTP_MALFORMED = "http_malformed"
    CLIENT_HELLO_INCOMPLETE = "client_hello_incomplete"
    CLIENT_HELLO_TOO_LARGE = "client_hello_too_large"
    HTTP_HEAD_INCOMPLETE = "http_head_incomplete"
    HTTP_HEAD_TOO_LARGE = "http_head_too_large"
    NO_SNI = "no_sni"
    NO_HOST = "no_host"
    ECH_NOT_ALLOWED = "ech_not_allowed"
    # a rule with request rules on a connection whose requests are not read
    HTTP_NOT_INSPECTABLE = "http_not_inspectable"
    # no usable policy (egressd.proxy.context.PolicyUnavailable)
    POLICY_MISSING = "policy_missing"
    POLICY_UNVERIFIABLE = "policy_unverifiable"
    POLICY_EXPIRED = "policy_expired"
    CONTROL_UNREACHABLE = "control_unreachable"
    # another worker's job (egressd.proxy.workers; never expected: bpf/reuseport.c)
    WRONG_WORKER = "wrong_worker"
    # admission and source ports (egressd.limits)
    JOB_CONNECTION_LIMIT = "job_connection_limit"
    JOB_RATE_LIMIT = "job_rate_limit"
    PROXY_CONNECTION_LIMIT = "proxy_connection_limit"
    PORT_BUDGET_EXHAUSTED = "port_budget_exhausted"
    PORT_POOL_EXHAUSTED = "port_pool_exhausted"
    # TLS interception (egressd.proxy.tls_intercept)
    TLS_INTERCEPTION_UNAVAILABLE = "tls_interception_unavailable"
    UPSTREAM_TLS_UNVERIFIED = "upstream_tls_unverified"
    UPSTREAM_TLS_FAILED = "upstream_tls_failed"
    CLIENT_TLS_FAILED = "client_tls_failed"
    # the interceptor's own
    UNKNOWN_FLOW = "unknown_flow"
    UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
    PROXY_SHUTDOWN = "proxy_shutdown"
    ERROR = "error"


#: The refusals of a limit: such a deny is also counted per job (`ProxyLimits.refused`).
LIMIT_REASONS: frozenset[ConnectionReason] = frozenset(
    {
        ConnectionReason.JOB_CONNECTION_LIMIT,
        ConnectionReason.JOB_RATE_LIMIT,
        ConnectionReason.PROXY_CONNECTION_LIMIT,
        ConnectionReason.PORT_BUDGET_EXHAUSTED,
        ConnectionReason.PORT_POOL_EXHAUSTED,
    }
)

#: ``egressd_connections_total``'s label sets, (verdict, reason): every pair
#: can happen (report mode allows a deny's reason, a failure keeps the allow).
CONNECTION_LABELS: tuple[tuple[Verdict, ConnectionReason], ...] = tuple(
    (verdict, reason) for verdict in Verdict for reason in ConnectionReason
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What is enforced for one connection and why: the audit event's and counter's fields.

    `verdict` is the enforced one (report mode allows a deny, `would_deny`);
    `host` the name the audit event carries (one the client sent, or the
    name it resolved that decided); `rule` the rule that decided, if any.
    """

    verdict: Verdict
    reason: ConnectionReason
    host: str | None = None
    rule: EgressRule | None = None
    would_deny: bool = False

    @classmethod
    def deny(cls, reason: ConnectionReason) -> Outcome:
        """A deny before anything was decided by the policy (no host, no rule)."""
        return cls(Verdict.DENY, reason)

    @classmethod
    def decided(
        cls, decision: Decision, *, enforced: Verdict, would_deny: bool, host: str | None
    ) -> Outcome:
        """Tier 2's decision as enforced under the policy's mode (`tier2.apply_mode`)."""
        return cls(enforced, ConnectionReason(decision.reason), host, decision.rule, would_deny)

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    def denied(self, reason: ConnectionReason) -> Outcome:
        """Denied after all, by a later step (the name it decided and `would_deny` stand)."""
        return dataclasses.replace(self, verdict=Verdict.DENY, reason=reason)

    def failed(self, reason: ConnectionReason) -> Outcome:
        """Allowed, but it could not be carried out (the connect or a TLS handshake failed)."""
        return dataclasses.replace(self, reason=reason)


@dataclass(frozen=True, slots=True)
class NotConnected:
    """Why an allowed connection got no upstream socket: a refusal (fleet
    address, no source port: a deny) or a connect that failed (the allow
    stands, reason ``upstream_connect_failed``)."""

    reason: ConnectionReason

    def applied_to(self, outcome: Outcome) -> Outcome:
        if self.reason is ConnectionReason.UPSTREAM_CONNECT_FAILED:
            return outcome.failed(self.reason)
        return outcome.denied(self.reason)


def connection_reason(reason: str) -> ConnectionReason | None:
    """`reason` as a member, None when it is none (a caller's bug: it fails closed)."""
    try:
        return ConnectionReason(reason)
    except ValueError:
        return None


class LabelledCounter:
    """A prometheus counter whose label sets are a closed set, all created up front.

    A dashboard sees every (verdict, reason) as a zero before it first
    happens; a label set outside the set raises ValueError (never a new series).
    """

    __slots__ = ("_children", "_name")

    def __init__(self, counter: Any, label_sets: Iterable[Sequence[str]]) -> None:
        self._name = getattr(counter, "_name", "counter")
        self._children: dict[tuple[str, ...], Any] = {
            tuple(labels): counter.labels(*labels) for labels in label_sets
        }

    def inc(self, *labels: str, amount: float = 1) -> None:
        child = self._children.get(labels)
        if child is None:
            raise ValueError(f"{self._name}: {labels!r} is not one of its label sets")
        child.inc(amount)


__all__ = [
    "CONNECTION_LABELS",
    "LIMIT_REASONS",
    "ConnectionReason",
    "LabelledCounter",
    "NotConnected",
    "Outcome",
    "connection_reason",
]
