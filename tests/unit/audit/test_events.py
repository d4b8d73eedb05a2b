"""`egressd audit`: audit events parsed, filtered and printed (pure), and the CLI over files."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from egressd.audit.events import (
    AuditParseError,
    Filter,
    parse_line,
    parse_lines,
    parse_time,
    select,
    table,
    to_json,
)

JOB_A = "1e70c16f-ba66-40d1-b027-b69369a3d498"
JOB_B = "7e7c65a8-0000-4000-8000-000000000001"
NOW = dt.datetime(2026, 12, 6, 18, 0, 0, tzinfo=dt.UTC)


def line(**fields: object) -> str:
    return json.dumps(fields)


PROXY_LOG = [
    line(
        component="proxy",
        time="2026-12-06T17:00:00.100Z",
        job_id=JOB_A,
        proxy="proxy1",
        dst="100.100.100.53",
        port=53,
        host="evil.test",
        qname="evil.test",
        qtype="A",
        verdict="deny",
        reason="no_matching_rule",
        rcode="REFUSED",
        event="dns",
        level="warning",
    ),
    line(
        component="proxy",
        time="2026-12-06T17:00:01.000Z",
        job_id=JOB_A,
        proxy="proxy1",
        dst="203.0.113.10",
        port=443,
        host="api.allowed.test",
        verdict="allow",
        reason="allowed_host",
        mode="enforce",
        would_deny=False,
        event="connection",
    ),
    line(
        component="proxy",
        time="2026-12-06T17:30:00.000Z",
        job_id=JOB_B,
        proxy="proxy1",
        dst="203.0.113.66",
        port=443,
        host="evil.test",
        verdict="allow",
        reason="no_matching_rule",
        mode="report",
        would_deny=True,
        event="connection",
    ),
    line(event="proxy_started", time="2026-12-06T16:59:00Z", proxy="proxy1"),
    "not json at all",
    line(
        component="proxy",
        time="2026-12-06T17:45:00.000Z",
        job_id=JOB_B,
        dst="100.100.100.53",
        port=53,
        host=None,
        qname=None,
        qtype=None,
        verdict="drop",
        reason="dns_rate_limit",
        suppressed=12,
        event="dns",
    ),
]
NODE_LOG = [
    line(
        time="2026-12-06T17:00:00.500Z",
        job_id=JOB_A,
        sandbox_id="sbx-1",
        node="node1",
        source="100.96.1.2",
        dst="169.254.169.254",
        port=80,
        proto="tcp",
        verdict="deny",
        reason="denied_range",
        action="rst",
        suppressed=0,
        event="tier1_denial",
        level="warning",
    ),
    line(
        time="2026-12-06T17:00:00.600Z",
        job_id=JOB_A,
        sandbox_id="sbx-1",
        node="node1",
        dst="203.0.113.77",
        port=9999,
        proto="udp",
        reason="udp_not_dns",
        event="tier1_denial",
    ),
    line(event="sandbox_registered", time="2026-12-06T16:59:59Z", job_id=JOB_A),
]


def events() -> list:  # type: ignore[type-arg]
    return parse_lines(PROXY_LOG, "proxy1") + parse_lines(NODE_LOG, "node1")


def test_only_audit_events_are_parsed() -> None:
    parsed = events()
    assert [(e.log, e.event) for e in parsed] == [
        ("proxy1", "dns"),
        ("proxy1", "connection"),
        ("proxy1", "connection"),
        ("proxy1", "dns"),
        ("node1", "tier1_denial"),
        ("node1", "tier1_denial"),
    ]
    assert parse_line('{"event": "connection"', "x") is None
    assert parse_line('["event"]', "x") is None


def test_job_and_deny_filter_spans_tier1_and_tier2_in_time_order() -> None:
    rows = select(events(), Filter(job=JOB_A, verdict="deny"))
    assert [(e.log, e.reason, e.destination) for e in rows] == [
        ("proxy1", "no_matching_rule", "evil.test A"),
        ("node1", "denied_range", "169.254.169.254:80"),
        ("node1", "udp_not_dns", "203.0.113.77:9999/udp"),
    ]
    assert all(e.verdict == "deny" for e in rows)  # tier 1 without a verdict field is a deny


def test_job_prefix_is_case_insensitive() -> None:
    assert len(select(events(), Filter(job=JOB_A[:8].upper()))) == 4


def test_verdict_filters() -> None:
    by = {
        v: [e.reason for e in select(events(), Filter(verdict=v))]
        for v in ("allow", "deny", "drop", "would_deny")
    }
    assert by["allow"] == ["allowed_host"]  # the report-mode allow is not a plain allow
    assert by["would_deny"] == ["no_matching_rule"]
    assert by["drop"] == ["dns_rate_limit"]
    assert by["deny"] == ["no_matching_rule", "denied_range", "udp_not_dns", "dns_rate_limit"]
    with pytest.raises(AuditParseError):
        Filter(verdict="nope")


def test_since_and_until() -> None:
    since = parse_time("2026-12-06T17:30:00Z", now=NOW)
    assert [e.reason for e in select(events(), Filter(since=since))] == [
        "no_matching_rule",
        "dns_rate_limit",
    ]
    until = parse_time("2026-12-06T17:00:00.5Z", now=NOW)
    assert len(select(events(), Filter(until=until))) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - dt.timedelta(seconds=90)),
        ("15m", NOW - dt.timedelta(minutes=15)),
        ("15min", NOW - dt.timedelta(minutes=15)),
        ("2h", NOW - dt.timedelta(hours=2)),
        ("1d", NOW - dt.timedelta(days=1)),
        ("2026-12-06T16:00:00Z", dt.datetime(2026, 12, 6, 16, tzinfo=dt.UTC)),
        ("2026-12-06T16:00:00", dt.datetime(2026, 12, 6, 16, tzinfo=dt.UTC)),
        ("2026-12-06", dt.datetime(2026, 12, 6, tzinfo=dt.UTC)),
        ("2026-12-06T17:00:00+01:00", dt.datetime(2026, 12, 6, 16, tzinfo=dt.UTC)),
    ],
)
def test_parse_time(text: str, expected: dt.datetime) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "5x", "-2h", "2026-13-01"])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(AuditParseError):
        parse_time(text, now=NOW)


def test_table_fits_100_columns_and_keeps_the_port() -> None:
    long = parse_line(
        line(
            time="2026-12-06T17:00:00Z",
            job_id=JOB_A,
            event="connection",
            host="a-very-long-label.another-long-label.data.allowed.test",
            port=8443,
            verdict="deny",
            reason="client_hello_incomplete",
        ),
        "proxy-21",
    )
    assert long is not None
    text = table([*events(), long])
    rows = text.splitlines()
    assert rows[0].split() == ["TIME", "(UTC)", "WHERE", "JOB", "VERDICT", "REASON", "DESTINATION"]
    assert max(len(r) for r in rows) <= 100
    assert rows[-1].endswith("allowed.test:8443")
    assert "proxy-21:conn" in rows[-1]
    assert "…" in rows[-1]
    assert rows[1].split() == [
        "12-06",
        "17:00:00",
        "proxy1:dns",
        JOB_A[:8],
        "deny",
        "no_matching_rule",
        "evil.test",
        "A",
    ]
    assert "would_deny" in text
    assert "node1:tier1" in text


def test_json_form_is_the_logged_fields_plus_the_log() -> None:
    first = events()[0]
    doc = json.loads(to_json(first))
    assert doc["log"] == "proxy1"
    assert doc["reason"] == "no_matching_rule" and doc["job_id"] == JOB_A


# --- the CLI over a directory of logs -----------------------------------------------------


def egressd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "proxy1.log").write_text("\n".join(PROXY_LOG[:2]) + "\n")
    (logs / "proxy1.log.1").write_text("\n".join(PROXY_LOG[2:]) + "\n")  # a previous run
    (logs / "node1.log").write_text("\n".join(NODE_LOG) + "\n")
    (logs / "control.log").write_text(line(event="listening", time="2026-12-06T16:00:00Z"))
    (logs / "notes.txt").write_text(PROXY_LOG[0])  # not a log: ignored
    return tmp_path


def test_cli_table(run_dir: Path) -> None:
    done = egressd("audit", "--run-dir", str(run_dir), "--job", JOB_A, "--verdict", "deny")
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert len(rows) == 4
    assert [r.split()[5] for r in rows[1:]] == ["no_matching_rule", "denied_range", "udp_not_dns"]


def test_cli_json_reads_rotated_logs(run_dir: Path) -> None:
    done = egressd("audit", "--logs", str(run_dir / "logs"), "--json", "--job", JOB_B[:8])
    assert done.returncode == 0, done.stderr
    docs = [json.loads(x) for x in done.stdout.splitlines()]
    assert [(d["log"], d["reason"]) for d in docs] == [
        ("proxy1", "no_matching_rule"),
        ("proxy1", "dns_rate_limit"),
    ]


def test_cli_nothing_matches_is_not_an_error(run_dir: Path) -> None:
    done = egressd("audit", "--run-dir", str(run_dir), "--job", "ffffffff")
    assert done.returncode == 0
    assert done.stdout.splitlines()[0].startswith("TIME")
    assert "no audit events match" in done.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--run-dir", "/nonexistent"), "no log directory /nonexistent/logs; is the fleet up?"),
        (("--since", "yesterday"), "not a time: 'yesterday'"),
        (("--verdict", "maybe"), "invalid choice"),
    ],
)
def test_cli_bad_arguments_are_one_line_exit_2(
    run_dir: Path, args: tuple[str, ...], needle: str
) -> None:
    done = (
        egressd("audit", "--run-dir", str(run_dir), *args)
        if args[0] != "--run-dir"
        else egressd("audit", *args)
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and needle in done.stderr
