"""Parsing what a load-test run produced: locust CSVs, metrics text, logs, the hog's bytes."""

from __future__ import annotations

import json

import pytest

from egressd_harness.bench.report import ParseError
from egressd_harness.loadtest import results as r

# Real locust 2.47 output (victim, one run), trimmed to three rows.
STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
GET,victim GET / [baseline],452,0,18,19.75,6.3,78.94,140.0,9.41,0.0,18,20,22,23,28,34,53,58,79,79,79
GET,victim GET / [stress],448,2,19,22.24,6.1,196.31,140.0,9.33,0.04,19,20,22,23,28,34,53,95,200,200,200
,Aggregated,900,2,18,21.0,6.1,196.31,140.0,18.7,0.04,18,20,22,23,28,34,53,76,200,200,200
"""

EMPTY_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
,Aggregated,0,0,0,0.0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A
"""

FAILURES_CSV = """\
Method,Name,Error,Occurrences
TCP,open+GET /,"ConnectionResetError(104, 'Connection reset by peer')",1574
TCP,connect,"ConnectionResetError(104, 'Connection reset by peer')",167
"""

METRICS = """\
# HELP egressd_limit_refusals_total Connections refused by a limit, by job and reason
# TYPE egressd_limit_refusals_total counter
egressd_limit_refusals_total{job_id="a",reason="port_budget_exhausted"} 436.0
egressd_limit_refusals_total{job_id="a",reason="job_rate_limit"} 411.0
egressd_limit_refusals_created{job_id="a",reason="job_rate_limit"} 1.7e+09
# HELP egressd_job_source_ports Source ports a job holds toward a destination now
# TYPE egressd_job_source_ports gauge
egressd_job_source_ports{destination="203.0.113.10:80/tcp",job_id="a"} 24.0
# HELP egressd_job_connections Connections a job holds at this proxy now
# TYPE egressd_job_connections gauge
# HELP egressd_connections_active Relayed connections now
# TYPE egressd_connections_active gauge
egressd_connections_active 3.0
"""


def test_stats_csv_rows_and_percentiles() -> None:
    stats = r.parse_stats_csv(STATS_CSV)
    assert set(stats) == {"victim GET / [baseline]", "victim GET / [stress]", r.AGGREGATED}
    stress = stats["victim GET / [stress]"]
    assert (stress.requests, stress.failures, stress.p99_ms, stress.p50_ms) == (448, 2, 95.0, 19.0)
    assert stress.failure_rate == pytest.approx(2 / 448)
    assert stats[r.AGGREGATED].method == ""
    assert stress.to_dict()["p99_ms"] == 95.0
    assert (stress.p95_ms, stress.p98_ms) == (34.0, 53.0)
    assert (stress.to_dict()["p95_ms"], stress.to_dict()["p98_ms"]) == (34.0, 53.0)


def test_stats_csv_without_requests_has_no_percentiles() -> None:
    agg = r.parse_stats_csv(EMPTY_CSV)[r.AGGREGATED]
    assert agg.requests == 0 and agg.p99_ms is None and agg.failure_rate == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a,b\n1,2\n",
        STATS_CSV.replace(",Aggregated,", ",Other,"),
        STATS_CSV.replace("452", "many"),
    ],
)
def test_stats_csv_rejects_what_is_not_locust(text: str) -> None:
    with pytest.raises(ParseError):
        r.parse_stats_csv(text)


def test_rows_by_phase() -> None:
    rows = r.rows_by_phase(r.parse_stats_csv(STATS_CSV))
    assert set(rows) == {"baseline", "stress"}
    assert rows["stress"].requests == 448
    assert r.phase_of("victim GET / [stress]") == ("victim GET /", "stress")
    assert r.phase_of("hog GET /bytes") == ("hog GET /bytes", None)


def test_failures_csv() -> None:
    failures = r.parse_failures_csv(FAILURES_CSV)
    assert [(f.name, f.occurrences) for f in failures] == [("open+GET /", 1574), ("connect", 167)]
    assert "reset by peer" in failures[0].error
    with pytest.raises(ParseError):
        r.parse_failures_csv("x,y\n")


def test_metrics_samples_and_families() -> None:
    scrape = r.parse_metrics(METRICS)
    assert all(not s.name.endswith("_created") for s in scrape)
    assert r.metric_sum(scrape, "egressd_limit_refusals_total", job_id="a") == 847
    assert r.metric_sum(scrape, "egressd_limit_refusals_total", job_id="b") == 0
    assert r.by_label(scrape, "egressd_limit_refusals_total", "reason", job_id="a") == {
        "port_budget_exhausted": 436,
        "job_rate_limit": 411,
    }
    # A labelled gauge without series is still declared.
    assert r.metric_present(scrape, "egressd_job_connections")
    assert r.metric_present(scrape, "egressd_limit_refusals_total")
    assert not r.metric_present(scrape, "egressd_job_bytes_total")
    assert not r.metric_present(list(scrape), "egressd_job_connections")
    sample = next(s for s in scrape if s.name == "egressd_job_source_ports")
    assert sample.key == 'egressd_job_source_ports{destination="203.0.113.10:80/tcp",job_id="a"}'


def test_metrics_garbage_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        r.parse_metrics('egressd_x{job_id="a" 1\n')


def test_counter_delta() -> None:
    before = r.parse_metrics(METRICS)
    after = r.parse_metrics(METRICS.replace("436.0", "500.0"))
    assert (
        r.counter_delta(
            before, after, "egressd_limit_refusals_total", reason="port_budget_exhausted"
        )
        == 64
    )


def test_gauge_max_keeps_the_largest_sample_per_series() -> None:
    gauges = r.GaugeMax(["egressd_job_source_ports", "egressd_job_connections"])
    gauges.update("proxy1", r.parse_metrics(METRICS))
    gauges.update("proxy1", r.parse_metrics(METRICS.replace("} 24.0", "} 12.0")))
    gauges.update("proxy2", r.parse_metrics("# TYPE other gauge\nother 1\n"))
    assert gauges.max("proxy1", "egressd_job_source_ports", job_id="a") == 24
    assert gauges.max("proxy1", "egressd_job_source_ports", job_id="b") == 0
    # Declared but never with a series: 0, not unknown.
    assert gauges.max("proxy1", "egressd_job_connections", job_id="a") == 0
    assert gauges.max("proxy2", "egressd_job_source_ports", job_id="a") is None
    assert gauges.to_dict()["scrapes"] == {"proxy1": 2, "proxy2": 1}


def test_client_rate_counts_whole_seconds_inside_the_spans() -> None:
    # Two spans of 10 s; 3 s skipped at the start of each; the burst after a pause is left out.
    per_s = dict.fromkeys(range(100, 130), 1000)
    per_s[120] = 50_000  # the buffered burst at the second span's start
    rate, seconds = r.client_rate(per_s, [(100.0, 110.0), (120.0, 130.0)], skip_s=3)
    assert seconds == 14 and rate == 1000
    # A fractional start is rounded up, the partial last second left out.
    rate, seconds = r.client_rate(per_s, [(100.5, 108.7)], skip_s=0)
    assert seconds == 7
    # A second without bytes counts as zero.
    rate, seconds = r.client_rate({100: 1000}, [(100.0, 102.0)], skip_s=0)
    assert (rate, seconds) == (500, 2)
    assert r.client_rate({}, [(100.0, 110.0)]) == (0.0, 0)
    assert r.client_rate(per_s, [(100.0, 102.0)], skip_s=3) == (0.0, 0)


def test_summary_seconds() -> None:
    assert r.summary_seconds({"100": 5, "101": 6}) == {100: 5, 101: 6}
    with pytest.raises(ParseError):
        r.summary_seconds({"x": 1})


def _line(**fields: object) -> str:
    return json.dumps(fields)


def test_scan_log_finds_unhandled_errors_only() -> None:
    text = "\n".join(
        [
            _line(event="connection", level="info", verdict="deny", reason="job_rate_limit"),
            _line(event="policy_refresh_failed", level="warning"),
            _line(
                event="connection_task_failed",
                level="error",
                exception="Traceback (most recent call last): ...",
            ),
            _line(event="nft_drift", level="error"),
            _line(
                event="odd", level="info", exception="Traceback (most recent call last):\n  boom"
            ),
            "Traceback (most recent call last):",
            '  File "x.py", line 1',
            "",
            "[1, 2]",
        ]
    )
    problems = r.scan_log("proxy1", text)
    assert [(p.what, p.line_no) for p in problems] == [
        ("connection_task_failed", 3),
        ("nft_drift", 4),
        ("odd", 5),
        ("traceback", 6),
    ]
    assert problems[0].to_dict()["component"] == "proxy1"
    assert r.scan_log("node1", _line(event="x", level="info")) == []


def test_scan_log_shortens_and_limits() -> None:
    text = "\n".join(_line(event="e", level="error", pad="x" * 500) for _ in range(10))
    problems = r.scan_log("proxy2", text, limit=3)
    assert len(problems) == 3 and all(len(p.text) == 300 for p in problems)


def test_deny_reasons_of_one_job() -> None:
    text = "\n".join(
        [
            _line(event="connection", job_id="a", verdict="deny", reason="port_budget_exhausted"),
            _line(event="connection", job_id="a", verdict="deny", reason="job_rate_limit"),
            _line(event="connection", job_id="a", verdict="deny", reason="job_rate_limit"),
            _line(event="connection", job_id="a", verdict="allow", reason="allowed_host"),
            _line(event="dns", job_id="a", verdict="deny", reason="no_matching_rule"),
            _line(event="connection", job_id="b", verdict="deny", reason="job_rate_limit"),
            "not json a",
        ]
    )
    assert r.deny_reasons(text, "a") == {"port_budget_exhausted": 1, "job_rate_limit": 2}
