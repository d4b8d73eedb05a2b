"""Audit events: field names, builders, level by outcome."""

from __future__ import annotations

import ipaddress
import json
import uuid

import pytest
import structlog

from egressd.proxy import audit

JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
A = ipaddress.IPv4Address


def connection(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "job_id": JOB,
        "account": "acme",
        "node": "node1",
        "proxy": "proxy1",
        "src": A("100.96.1.2"),
        "sport": 40000,
        "dst": A("203.0.113.10"),
        "port": 443,
        "host": "api.allowed.test",
        "verdict": "allow",
        "reason": "allowed_host",
        "mode": "enforce",
        "bytes_up": 517,
        "bytes_down": 4096,
        "duration_ms": 12.34567,
        "time": "2026-01-01T00:00:00.000Z",
    }
    fields.update(overrides)
    return audit.connection_event(**fields)  # type: ignore[arg-type]


def test_connection_event_fields() -> None:
    event = connection()
    assert event == {
        "event": "connection",
        "time": "2026-01-01T00:00:00.000Z",
        "job_id": str(JOB),
        "account": "acme",
        "node": "node1",
        "proxy": "proxy1",
        "source": "100.96.1.2:40000",
        "dst": "203.0.113.10",
        "port": 443,
        "host": "api.allowed.test",
        "verdict": "allow",
        "reason": "allowed_host",
        "mode": "enforce",
        "would_deny": False,
        "bytes_up": 517,
        "bytes_down": 4096,
        "duration_ms": 12.346,
    }
    json.dumps(event)  # JSON-able as is


def test_design_fields_present() -> None:
    # DESIGN.md: job_id, verdict, reason, host, dst, port on every audit line.
    required = {audit.JOB_ID, audit.VERDICT, audit.REASON, audit.HOST, audit.DST, audit.PORT}
    dns_event = audit.dns_event(
        job_id=JOB,
        account="acme",
        node="node1",
        proxy="proxy1",
        src="100.96.1.2",
        sport=5353,
        dst="100.100.100.53",
        qname="api.allowed.test",
        qtype="A",
        verdict="allow",
        reason="allowed_host",
        answers=["203.0.113.10"],
    )
    assert required <= set(connection()) and required <= set(dns_event)
    assert dns_event["event"] == "dns" and dns_event["qname"] == "api.allowed.test"
    assert dns_event["answers"] == ["203.0.113.10"]
    json.dumps(dns_event)


def test_unknown_job_is_null() -> None:
    event = connection(
        job_id=None, account=None, node=None, mode=None, verdict="deny", reason="unknown_flow"
    )
    assert event["job_id"] is None and event["account"] is None


def test_time_defaults_to_now_utc() -> None:
    event = audit.connection_event(
        job_id=None,
        account=None,
        node=None,
        proxy="p",
        src="1.2.3.4",
        sport=1,
        dst="5.6.7.8",
        port=80,
        host=None,
        verdict="deny",
        reason="x",
        mode=None,
    )
    assert str(event["time"]).endswith("Z")


@pytest.mark.parametrize(
    ("verdict", "would_deny", "level"),
    [
        ("allow", False, "info"),
        ("deny", False, "warning"),
        ("allow", True, "warning"),
        ("drop", False, "warning"),
    ],
)
def test_emit_level_by_outcome(verdict: str, would_deny: bool, level: str) -> None:
    logger = structlog.get_logger("audit")
    with structlog.testing.capture_logs() as logs:
        audit.emit(logger, connection(verdict=verdict, would_deny=would_deny))
    (line,) = logs
    assert line["log_level"] == level
    assert line["event"] == "connection"
    assert line["verdict"] == verdict and line["source"] == "100.96.1.2:40000"


def test_job_text_of_alternating_jobs() -> None:
    # `_job` keeps the last UUID's text: each event still names its own job.
    other = uuid.UUID(int=JOB.int + 1)
    for job in (JOB, JOB, other, JOB, other, other, str(JOB)):
        assert connection(job_id=job)["job_id"] == str(job)
    assert connection(job_id=uuid.UUID(str(other)))["job_id"] == str(other)  # equal, not same
