"""The DNS and HTTP request layers' reasons are enums (`dns.DnsReason`,
`http_rules.RequestReason`); the DNS counters' label sets derive from them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from egressd.limits import dns as dns_limits
from egressd.policy import matcher
from egressd.proxy import audit, credentials, dns, http_rules, tls_intercept
from egressd.proxy.dns import DROP_REASONS, DnsReason
from egressd.proxy.http_rules import RequestReason


def test_every_reason_a_query_can_carry_is_a_member() -> None:
    produced = {
        matcher.ALLOWED_HOST,
        matcher.NO_MATCHING_RULE,
        matcher.INVALID_HOST,
        dns_limits.DNS_RATE_LIMIT,
        dns_limits.DNS_INFLIGHT_LIMIT,
        dns_limits.DNS_TCP_CONNECTION_LIMIT,
        "policy_missing",
        "policy_unverifiable",
        "policy_expired",
        "control_unreachable",
    }
    assert produced <= set(DnsReason)
    assert dns.MALFORMED is DnsReason.MALFORMED and dns.MALFORMED == "malformed"
    assert dns.UPSTREAM_NXDOMAIN == "nxdomain"


def test_counters_start_at_zero_for_every_label_and_refuse_others() -> None:
    ctx = SimpleNamespace(registry=CollectorRegistry())  # what _Metrics takes of a context
    metrics = dns._Metrics.on(ctx)  # type: ignore[arg-type]
    text = generate_latest(ctx.registry).decode()
    for verdict in (audit.VERDICT_ALLOW, audit.VERDICT_DENY, audit.VERDICT_DROP):
        assert f'egressd_dns_queries_total{{verdict="{verdict}"}} 0.0' in text
    for reason in DROP_REASONS:
        assert f'egressd_dns_dropped_total{{reason="{reason}"}} 0.0' in text
    metrics.count(audit.VERDICT_DROP, dns.OVERLOAD)
    assert ctx.registry.get_sample_value("egressd_dns_dropped_total", {"reason": "overload"}) == 1
    assert ctx.registry.get_sample_value("egressd_dns_queries_total", {"verdict": "drop"}) == 1
    with pytest.raises(ValueError):
        metrics.count("maybe")
    with pytest.raises(ValueError):
        metrics.count(audit.VERDICT_DROP, "no_such_reason")
    assert "no_such_reason" not in generate_latest(ctx.registry).decode()


def test_http_request_reasons_are_members() -> None:
    """The request layer's reasons (`http_rules.RequestReason`), wherever their constants live."""
    assert {
        tls_intercept.HOST_SNI_MISMATCH,
        credentials.CREDENTIAL_EXFILTRATION,
        credentials.CREDENTIAL_UNAVAILABLE,
        http_rules.HTTP_MALFORMED,
        http_rules.HOST_ADDRESS_MISMATCH,
    } <= set(RequestReason)
    assert http_rules.METHOD_NOT_ALLOWED is RequestReason.METHOD_NOT_ALLOWED
    assert RequestReason.HTTP_MALFORMED == "http_malformed"
    assert {"http_malformed": 1}[RequestReason.HTTP_MALFORMED] == 1
