"""deploy/grafana/egressd.json queries only what egressd exports: every metric name in
every panel's PromQL is a sample of a metric defined in egressd/ (counters as
`_total`), and every label it filters or groups by is one that metric has (or
Prometheus' own `instance`/`job`). The source scan is checked against real
registries, so its naming rules are prometheus_client's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support.deploy import DEPLOY
from tests.support.exported_metrics import Metric, exported

DASHBOARD = DEPLOY / "grafana" / "egressd.json"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def metric_names(expr: str) -> list[str]:
    """The metric names of a PromQL expression (not functions, keywords, labels)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping
    names = []
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.append(match.group())
    return names


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric, labels it is matched on) for every `metric{...}` in expr."""
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        yield match.group(1), set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", match.group(2)))


def grouping_labels(expr: str) -> set[str]:
    found: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        found |= {label.strip() for label in group.split(",") if label.strip()}
    return found


def check(dashboard: dict[str, Any], metrics: dict[str, Metric]) -> list[str]:
    problems = []
    for title, expr in queries(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{title}: no metric in {expr!r}")
        for name in names:
            if name not in metrics:
                problems.append(f"{title}: {name} is not exported by egressd")
        known = set(TARGET_LABELS)
        for name in names:
            if name in metrics:
                known |= metrics[name].labels
        for name, labels in selectors(expr):
            if name in metrics and not labels <= metrics[name].labels | TARGET_LABELS:
                problems.append(f"{title}: {name} has no label {labels - metrics[name].labels}")
        for label in grouping_labels(expr) - known:
            problems.append(f"{title}: no metric of {expr!r} has label {label!r}")
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query["query"])
            assert match, query
            name, label = match.groups()
            if name not in metrics:
                problems.append(f"variable {variable['name']}: {name} is not exported")
            elif label not in metrics[name].labels | TARGET_LABELS:
                problems.append(f"variable {variable['name']}: {name} has no label {label}")
    return problems


@pytest.fixture(scope="module")
def metrics() -> dict[str, Metric]:
    return exported()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_dashboard_query_uses_exported_metrics_and_labels(
    dashboard: dict[str, Any], metrics: dict[str, Metric]
) -> None:
    assert check(dashboard, metrics) == []


def test_the_dashboard_covers_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    used = {n for _, expr in queries(dashboard) for n in metric_names(expr)}
    for wanted in (
        "egressd_connections_total",  # verdicts and reasons
        "egressd_tier1_sandbox_packets_total",  # per job
        "egressd_tier1_packets_total",  # tier-1 drops
        "egressd_tunnel_bytes_total",  # tunnel traffic per proxy
        "egressd_limit_refusals_total",
        "egressd_source_ports_in_use",
        "egressd_source_ports_capacity",
        "egressd_job_bytes_total",  # bandwidth per job
        "egressd_dns_queries_total",
        "egressd_job_denials_total",  # denials per job (proxies)
    ):
        assert wanted in used, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36


def test_the_check_catches_unknown_metrics_and_labels(
    dashboard: dict[str, Any], metrics: dict[str, Metric]
) -> None:
    broken = json.loads(json.dumps(dashboard))
    target = broken["panels"][1]["targets"][0]
    target["expr"] = "sum by (verdict) (rate(egressd_connections[5m]))"  # no _total
    problems = check(broken, metrics)
    assert any("egressd_connections is not exported" in p for p in problems), problems
    target["expr"] = 'sum by (job_id) (rate(egressd_connections_total{colour="red"}[5m]))'
    problems = check(broken, metrics)
    assert any("no label {'colour'}" in p for p in problems), problems
    assert any("label 'job_id'" in p for p in problems), problems


LOOKUP = {"counter": "_total", "histogram": "_count", "summary": "_count", "gauge": ""}


def test_the_source_scan_agrees_with_real_registries(metrics: dict[str, Metric]) -> None:
    """Instantiate the metric sets that need no I/O and compare what they export."""
    from egressd.control.app import ControlMetrics
    from egressd.proxy import limiting, tunnel

    control = ControlMetrics()
    control.latency.labels("jobs").observe(0.01)
    control.requests.labels("jobs", "GET", "200").inc()
    proxy = CollectorRegistry()
    limiting._Metrics(proxy, 1024).refusals.labels("job", "connections").inc()
    tunnel._Metrics(proxy)
    families = [f for r in (control.registry, proxy) for f in r.collect()]
    assert len(families) >= 10
    for family in families:
        metric = metrics.get(family.name + LOOKUP[family.type])
        assert metric is not None, f"{family.name} ({family.type}) not found by the scan"
        assert metric.kind == family.type
        for sample in family.samples:
            assert sample.name in metric.samples, (sample.name, metric)
            assert set(sample.labels) - {"le", "quantile"} <= metric.labels, (sample, metric)
