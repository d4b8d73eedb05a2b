"""The metrics egressd exports, read from its source: every prometheus_client metric
(Counter, Gauge, Histogram, Summary and the custom collectors' *MetricFamily) defined
with a literal name, its labels, and the sample names Prometheus scrapes for it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.support.deploy import ROOT

KINDS = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "Histogram": "histogram",
    "HistogramMetricFamily": "histogram",
    "Summary": "summary",
    "SummaryMetricFamily": "summary",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


@dataclass(frozen=True)
class Metric:
    name: str  # as defined (a counter may or may not end in _total)
    kind: str
    labels: frozenset[str]
    where: str

    @property
    def samples(self) -> frozenset[str]:
        base = self.name.removesuffix("_total") if self.kind == "counter" else self.name
        return frozenset(base + suffix for suffix in SUFFIXES[self.kind])


def _labels(call: ast.Call) -> frozenset[str]:
    node: ast.expr | None = call.args[2] if len(call.args) > 2 else None
    for kw in call.keywords:
        if kw.arg in ("labels", "labelnames"):
            node = kw.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return frozenset(
            e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
        )
    return frozenset()


def exported(package: Path = ROOT / "egressd") -> dict[str, Metric]:
    """Every sample name egressd exports -> its metric."""
    out: dict[str, Metric] = {}
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        if "prometheus_client" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if name not in KINDS or not isinstance(first, ast.Constant):
                continue
            if not isinstance(first.value, str):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            metric = Metric(first.value, KINDS[name], _labels(node), where)
            for sample in metric.samples:
                out[sample] = metric
    return out
