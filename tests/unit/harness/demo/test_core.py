"""The demo core through a fake backend: the two jobs, each attempt judged from the audit
events and tier-1 counters the fleet recorded (never the probe's view alone), the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from egressd.layout import default_layout
from egressd.metrics_text import MetricsTextError
from egressd_harness.demo import core
from tests.support.demo_fleet import FakeFleet, demo_jobs


def ids() -> Callable[[], str]:
    n = iter(range(100))
    return lambda: f"job-{next(n)}"


def run(fleet: FakeFleet, sleeps: list[float] | None = None) -> list[core.Row]:
    slept = [] if sleeps is None else sleeps
    return core.run(fleet, demo_jobs(), new_id=ids(), sleep=slept.append)


def test_a_working_fleet_gives_every_verdict_as_expected() -> None:
    fleet = FakeFleet()
    rows = run(fleet)
    assert [(r.job, r.ok) for r in rows] == [("A", True)] * 7 + [("B", True)] * 3
    seen = {r.target: r.seen for r in rows}
    assert seen["https://evil.test/"] == "allow:allowed_host (proxy connection)"  # B's, not A's
    assert seen["http://169.254.169.254/latest/meta-data/"] == "deny:denied_range (tier 1)"
    assert seen["tcp://100.96.2.2:443"] == "deny:fleet_range (tier 1)"
    assert seen["tcp://203.0.113.10:443"] == "deny:no_matching_rule (proxy connection)"
    assert core.report(rows) == 0


def test_each_job_is_signed_for_its_node_and_probes_its_targets() -> None:
    fleet = FakeFleet()
    run(fleet)
    assert [p["job_id"] for p in fleet.signed] == ["job-0", "job-1"]
    assert [p["nodes"] for p in fleet.signed] == [["node1"], ["node2"]]
    assert fleet.signed[1]["egress"] == [{"host": "evil.test", "ports": [443]}]
    (node_a, jws_a, args_a), (node_b, jws_b, _) = fleet.runs
    assert (node_a, jws_a, node_b, jws_b) == ("node1", "jws.job-0", "node2", "jws.job-1")
    assert args_a == ["--timeout", "3", *demo_jobs()[0].targets]


def test_the_compose_fleet_runs_job_b_on_node1() -> None:
    fleet = FakeFleet()
    core.run(fleet, demo_jobs(node_b="node1"), new_id=ids(), sleep=lambda _s: None)
    assert [node for node, _, _ in fleet.runs] == ["node1", "node1"]


def test_events_are_read_after_the_backend_s_settle_time() -> None:
    sleeps: list[float] = []
    run(FakeFleet(settle_s=0.25), sleeps)
    assert sleeps == [0.25, 0.25]


def test_a_probe_that_failed_without_a_tier1_drop_is_unexpected() -> None:
    rows = run(FakeFleet(broken=frozenset({"tier1"})))
    bad = {r.target: r.seen for r in rows if not r.ok}
    assert bad == {
        "http://169.254.169.254/latest/meta-data/": "no tier-1 denied_range drop",
        "tcp://100.96.2.2:443": "no tier-1 fleet_range drop",
    }
    assert core.report(rows) == 1


def test_drops_counted_before_the_job_do_not_count() -> None:
    fleet = FakeFleet(broken=frozenset({"tier1_uncounted"}))
    fleet.drops.update({"denied_range": 5, "fleet_range": 5})
    rows = run(fleet)
    assert {r.seen for r in rows if not r.ok} == {
        "no tier-1 denied_range drop",
        "no tier-1 fleet_range drop",
    }


def test_an_unreadable_metrics_page_is_no_drops() -> None:
    rows = run(FakeFleet(metrics_up=False))
    assert {r.seen for r in rows if not r.ok} == {
        "no tier-1 denied_range drop",
        "no tier-1 fleet_range drop",
    }


def test_a_proxy_that_allows_everything_is_caught() -> None:
    rows = run(FakeFleet(broken=frozenset({"proxy"})))
    bad = {(r.job, r.target): r.seen for r in rows if not r.ok}
    assert bad == {
        ("A", "https://evil.test/"): "no dns audit event",
        ("A", "tcp://203.0.113.77:443"): "allow:allowed_host (proxy connection)",
        ("B", "https://api.allowed.test/data"): "no dns audit event",
        ("B", "tcp://203.0.113.10:443"): "allow:allowed_host (proxy connection)",
    }


def test_an_allow_event_for_a_failed_attempt_is_unexpected() -> None:
    job = demo_jobs()[1]
    ok_event: core.Event = {
        "event": "connection",
        "host": "evil.test",
        "verdict": "allow",
        "reason": "r",
    }
    rows = core.evaluate(job, [{"target": "https://evil.test/", "ok": False}], [ok_event], {})
    assert rows[0].seen == "allow:r (proxy connection)" and not rows[0].ok


def test_a_missing_attempt_is_unexpected_even_with_an_event() -> None:
    job = demo_jobs()[1]
    ok_event: core.Event = {
        "event": "connection",
        "host": "evil.test",
        "verdict": "allow",
        "reason": "r",
    }
    rows = core.evaluate(job, [], [ok_event], {})
    assert not rows[0].ok


def test_a_sandbox_that_fails_stops_the_demo_with_its_stderr() -> None:
    fleet = FakeFleet(exit_code=3)
    sleeps: list[float] = []
    with pytest.raises(core.SandboxFailed, match=r"^sandbox for job A exited 3: err$"):
        run(fleet, sleeps)
    assert len(fleet.runs) == 1 and sleeps == []


def test_a_page_that_is_not_prometheus_text_is_an_error() -> None:
    with pytest.raises(MetricsTextError):
        core.tier1_drops("egressd_tier1_packets_total{reason=} x\n")


def test_tier1_drops_sums_per_reason_and_skips_passes() -> None:
    page = (
        "# TYPE egressd_tier1_packets_total counter\n"
        'egressd_tier1_packets_total{verdict="drop",reason="fleet_range",ifindex="3"} 2\n'
        'egressd_tier1_packets_total{verdict="drop",reason="fleet_range",ifindex="4"} 3\n'
        'egressd_tier1_packets_total{verdict="pass",reason="ok"} 7\n'
    )
    assert core.tier1_drops(page) == {"fleet_range": 5.0}
    assert core.tier1_drops(None) == {}


def test_audit_events_keeps_the_job_s_dns_and_connection_events() -> None:
    lines = [
        '{"event": "dns", "job_id": "j", "qname": "a."}',
        '{"event": "connection", "job_id": "j"}',
        '{"event": "connection", "job_id": "k"}',
        '{"event": "tier1_drop", "job_id": "j"}',
        '["event", "dns"]',
        "not json",
    ]
    assert [e["event"] for e in core.audit_events(lines, "j")] == ["dns", "connection"]


def test_read_lines_skips_a_log_not_written_yet(tmp_path: Path) -> None:
    (tmp_path / "proxy1.log").write_text("one\ntwo\n")
    paths = [tmp_path / "proxy1.log", tmp_path / "proxy2.log"]
    assert list(core.read_lines(paths)) == ["one", "two"]


def test_a_dns_event_matches_its_name_with_or_without_the_root_dot() -> None:
    exp = core.Expectation("https://evil.test/", "deny", "proxy:dns", host="evil.test")
    other: core.Event = {"event": "dns", "qname": "api.allowed.test.", "verdict": "allow"}
    mine: core.Event = {"event": "dns", "qname": "evil.test.", "verdict": "deny", "reason": "r1"}
    bare: core.Event = {"event": "dns", "qname": "evil.test", "verdict": "deny", "reason": "r2"}
    assert core.judge(exp, None, [other, mine], {}) == "deny:r1 (proxy dns)"
    assert core.judge(exp, None, [other, bare], {}) == "deny:r2 (proxy dns)"
    assert core.judge(exp, None, [other], {}) == "no dns audit event"


def test_the_report_prints_the_table_and_the_summary_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [
        core.Row(
            "A", "https://a.test/", "allow (proxy:connection)", "allow:x (proxy connection)", True
        ),
        core.Row(
            "B", "tcp://1.2.3.4:443", "deny (proxy:connection)", "no connection audit event", False
        ),
    ]
    assert core.report(rows) == 1
    assert capsys.readouterr().out.splitlines() == [
        "job  attempt            expected                  verdict (where decided)",
        "A    https://a.test/    allow (proxy:connection)  allow:x (proxy connection)",
        "B    tcp://1.2.3.4:443  deny (proxy:connection)   no connection audit event   <-- UNEXPECTED",
        "",
        "1 of 2 verdicts as expected",
    ]


def test_no_rows_is_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    assert core.report([]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "0 of 0 verdicts as expected"


def test_the_jobs_use_the_layout_s_addresses() -> None:
    layout = default_layout()
    a, b = core.jobs(layout)
    raw = str(layout.site("raw.test").address)
    assert f"tcp://{raw}:443" in a.targets
    assert (a.node, b.node, len(a.expectations) + len(b.expectations)) == ("node1", "node2", 10)
