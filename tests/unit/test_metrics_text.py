"""egressd.metrics_text: a daemon's /metrics page into samples (pure)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from egressd import metrics_text as mt


def page() -> str:
    """What a daemon's admin listener serves: prometheus_client's own exposition."""
    registry = CollectorRegistry()
    conns = Counter("egressd_connections", "c", ["verdict", "reason"], registry=registry)
    conns.labels("allow", "allowed_host").inc(3)
    conns.labels("deny", "no_matching_rule").inc(2)
    conns.labels("deny", "deny_link_local").inc()
    up = Gauge("egressd_proxy_up", "u", ["proxy"], registry=registry)
    up.labels("proxy1").set(1)
    up.labels("proxy2").set(0)
    Gauge("egressd_sandboxes", "s", registry=registry).set(2)
    Gauge("egressd_job_connections", "j", ["job_id"], registry=registry)  # declared, no series
    hist = Histogram("egressd_decision_seconds", "d", buckets=(0.01, 0.1), registry=registry)
    hist.observe(0.05)
    # A label value that string splitting gets wrong: quote, comma, brace, space.
    odd = Counter("egressd_odd", "o", ["host"], registry=registry)
    odd.labels('a "b", {c} d').inc(7)
    return generate_latest(registry).decode()


def test_samples_carry_wire_names_labels_and_values() -> None:
    scrape = mt.parse(page())
    by_series = mt.series(scrape)
    allowed = ("egressd_connections_total", (("reason", "allowed_host"), ("verdict", "allow")))
    assert by_series[allowed] == 3
    assert by_series[("egressd_sandboxes", ())] == 2
    assert by_series[("egressd_decision_seconds_bucket", (("le", "0.1"),))] == 1
    assert by_series[("egressd_decision_seconds_bucket", (("le", "0.01"),))] == 0
    assert by_series[("egressd_decision_seconds_count", ())] == 1
    assert not [s for s in scrape if s.name.endswith("_created")]


def test_sum_value_and_by_label() -> None:
    scrape = mt.parse(page())
    assert mt.metric_sum(scrape, "egressd_connections_total") == 6
    assert mt.metric_sum(scrape, "egressd_connections_total", verdict="deny") == 3
    assert mt.metric_sum(scrape, "egressd_connections_total", verdict="nope") == 0
    assert mt.metric_sum(scrape, "egressd_connections") == 0  # the wire name has _total
    # Exact label set: a subset does not name one series.
    assert mt.metric_value(scrape, "egressd_proxy_up", proxy="proxy2") == 0
    assert mt.metric_value(scrape, "egressd_connections_total", verdict="allow") is None
    assert mt.metric_value(scrape, "egressd_sandboxes") == 2
    assert mt.by_label(scrape, "egressd_connections_total", "reason", verdict="deny") == {
        "no_matching_rule": 2,
        "deny_link_local": 1,
    }
    assert [s.value for s in mt.matching(scrape, "egressd_proxy_up", proxy="proxy1")] == [1]


def test_label_values_are_unescaped() -> None:
    scrape = mt.parse(page())
    assert mt.by_label(scrape, "egressd_odd_total", "host") == {'a "b", {c} d': 7}


def test_declared_families_are_present_without_series() -> None:
    scrape = mt.parse(page())
    assert mt.metric_present(scrape, "egressd_job_connections")
    assert mt.metric_present(scrape, "egressd_connections_total")
    assert not mt.metric_present(scrape, "egressd_job_bytes_total")
    assert not mt.metric_present(list(scrape), "egressd_job_connections")  # samples only


def test_key_sorts_labels() -> None:
    sample = mt.Sample("egressd_x_total", {"verdict": "deny", "reason": "r"}, 1.0)
    assert sample.key == 'egressd_x_total{reason="r",verdict="deny"}'
    assert mt.Sample("egressd_y", {}, 1.0).key == "egressd_y"


def test_counter_delta() -> None:
    before = mt.parse('egressd_a_total{r="x"} 1\negressd_a_total{r="y"} 5\n')
    after = mt.parse('egressd_a_total{r="x"} 4\negressd_a_total{r="y"} 5\n')
    assert mt.counter_delta(before, after, "egressd_a_total") == 3
    assert mt.counter_delta(before, after, "egressd_a_total", r="y") == 0


def test_special_values() -> None:
    scrape = mt.parse("egressd_a +Inf\negressd_b NaN\negressd_c -1.5e3\n")
    assert mt.metric_value(scrape, "egressd_a") == math.inf
    assert math.isnan(mt.metric_value(scrape, "egressd_b") or 0.0)
    assert mt.metric_value(scrape, "egressd_c") == -1500


@pytest.mark.parametrize(
    "text",
    [
        'egressd_x{job_id="a" 1\n',  # unclosed label set
        "egressd_x one\n",  # not a number
        "egressd x 1 2 3\n",
    ],
)
def test_garbage_is_an_error(text: str) -> None:
    with pytest.raises(mt.MetricsTextError) as info:
        mt.parse(text)
    assert info.value.reason == "metrics_text"


def test_empty_page_has_nothing() -> None:
    scrape = mt.parse("")
    assert list(scrape) == [] and not scrape.families
    assert mt.metric_sum(scrape, "egressd_x") == 0
