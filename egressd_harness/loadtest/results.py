"""What a load-test run produced, parsed (pure: text in, values out).

- locust's `PREFIX_stats.csv` (`parse_stats_csv`) and `PREFIX_failures.csv`
  (`parse_failures_csv`);
- the JSON summary the locustfile writes (`attacker`, `hog`: read with
  `json.loads`; `client_rate` turns the hog's bytes per second into a rate);
- Prometheus text from the proxies' `/metrics` (`parse_metrics`, `metric_sum`,
  `GaugeMax` for the gauges sampled during a run);
- the daemons' JSON-lines logs (`scan_log`: unhandled errors) and their
  audit events (`deny_reasons`).

Latencies are in milliseconds (locust's unit), rates per second, bytes as bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from egressd import metrics_text
from egressd.metrics_text import (  # noqa: F401 (re-exported)
    Sample,
    Scrape,
    by_label,
    counter_delta,
    metric_present,
    metric_sum,
)
from egressd_harness.bench.report import ParseError

AGGREGATED = "Aggregated"
# Columns of locust's stats CSV that hold percentiles (`50%` ... `100%`).
_PERCENT_SUFFIX = "%"


# --- locust CSV ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestStats:
    """One row of locust's stats CSV (one request name, or the aggregate)."""

    name: str
    method: str
    requests: int
    failures: int
    avg_ms: float
    max_ms: float
    rps: float
    percentiles_ms: Mapping[float, float | None] = field(default_factory=dict)

    def percentile(self, p: float) -> float | None:
        return self.percentiles_ms.get(p)

    @property
    def p50_ms(self) -> float | None:
        return self.percentile(50.0)

    @property
    def p95_ms(self) -> float | None:
        return self.percentile(95.0)

    @property
    def p98_ms(self) -> float | None:
        return self.percentile(98.0)

    @property
    def p99_ms(self) -> float | None:
        return self.percentile(99.0)

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "requests": self.requests,
            "failures": self.failures,
            "failure_rate": round(self.failure_rate, 6),
            "avg_ms": round(self.avg_ms, 2),
            "max_ms": round(self.max_ms, 2),
            "rps": round(self.rps, 2),
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p98_ms": self.p98_ms,
            "p99_ms": self.p99_ms,
        }


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise ParseError("locust_csv", f"{what}: not a number: {text!r}") from exc
    if math.isnan(value):
        raise ParseError("locust_csv", f"{what}: NaN")
    return value


def _optional(text: str, what: str) -> float | None:
    return None if text.strip() in ("", "N/A") else _number(text, what)


def parse_stats_csv(text: str) -> dict[str, RequestStats]:
    """locust's `*_stats.csv`: one `RequestStats` per request name (`Aggregated` included)."""
    reader = csv.DictReader(io.StringIO(text))
    needed = {
        "Type",
        "Name",
        "Request Count",
        "Failure Count",
        "Average Response Time",
        "Max Response Time",
        "Requests/s",
        "99%",
    }
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise ParseError("locust_csv", f"not a locust stats CSV (columns {reader.fieldnames!r})")
    pct_columns = [c for c in reader.fieldnames if c.endswith(_PERCENT_SUFFIX)]
    out: dict[str, RequestStats] = {}
    for row in reader:
        name = row["Name"]
        what = f"row {name!r}"
        out[name] = RequestStats(
            name=name,
            method=row["Type"],
            requests=int(_number(row["Request Count"], what)),
            failures=int(_number(row["Failure Count"], what)),
            avg_ms=_number(row["Average Response Time"], what),
            max_ms=_number(row["Max Response Time"], what),
            rps=_number(row["Requests/s"], what),
            percentiles_ms={float(c[:-1]): _optional(row[c], what) for c in pct_columns},
        )
    if AGGREGATED not in out:
        raise ParseError("locust_csv", "no Aggregated row")
    return out


def phase_of(name: str) -> tuple[str, str | None]:
    """`victim GET / [stress]` -> (`victim GET /`, `stress`); no label -> (name, None)."""
    if name.endswith("]") and " [" in name:
        base, _, label = name[:-1].rpartition(" [")
        return base, label
    return name, None


def rows_by_phase(stats: Mapping[str, RequestStats]) -> dict[str, RequestStats]:
    """The rows labelled with a phase (`... [phase]`), by phase; when several
    request names carry one phase, the one with the most requests."""
    out: dict[str, RequestStats] = {}
    for name, row in stats.items():
        _, phase = phase_of(name)
        if phase is not None and (phase not in out or row.requests > out[phase].requests):
            out[phase] = row
    return out


@dataclass(frozen=True, slots=True)
class Failure:
    method: str
    name: str
    error: str
    occurrences: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "name": self.name,
            "error": self.error,
            "occurrences": self.occurrences,
        }


def parse_failures_csv(text: str) -> list[Failure]:
    """locust's `*_failures.csv`: what failed, how often."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"Method", "Name", "Error", "Occurrences"} <= set(
        reader.fieldnames
    ):
        raise ParseError("locust_csv", f"not a locust failures CSV (columns {reader.fieldnames!r})")
    return [
        Failure(
            row["Method"],
            row["Name"],
            row["Error"],
            int(_number(row["Occurrences"], "occurrences")),
        )
        for row in reader
    ]


# --- the hog's bytes ------------------------------------------------------------------


def client_rate(
    bytes_per_second: Mapping[int, int], spans: Sequence[tuple[float, float]], *, skip_s: int = 3
) -> tuple[float, int]:
    """Bytes/s received over the whole seconds inside `spans` ([start, end)
    Unix times), leaving out the first `skip_s` seconds of each span
    (connection set-up, the burst of what the buffers held while paused).

    `bytes_per_second` maps a Unix second to the bytes received in it; a
    second inside a span with nothing received counts as zero. Returns the
    rate and the number of seconds it is taken over (0: too little data).
    """
    counted: list[int] = []
    for start, end in spans:
        first = math.ceil(start) + skip_s
        last = math.floor(end)  # the second [last, last+1) is not whole inside the span
        counted.extend(range(first, last))
    if not counted or not bytes_per_second:
        return 0.0, 0
    total = sum(bytes_per_second.get(sec, 0) for sec in counted)
    return total / len(counted), len(counted)


def summary_seconds(raw: Mapping[str, Any]) -> dict[int, int]:
    """The hog's `bytes_per_second` from the summary JSON (keys are strings)."""
    try:
        return {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise ParseError("summary", f"bad bytes_per_second: {exc}") from exc


# --- Prometheus text ------------------------------------------------------------------------
# The one parser is egressd.metrics_text's; its names are re-exported here for the load test.


def parse_metrics(text: str) -> Scrape:
    """Prometheus text exposition into samples (`*_created` timestamps left out)."""
    try:
        return metrics_text.parse(text)
    except metrics_text.MetricsTextError as exc:
        raise ParseError(exc.reason, exc.detail) from exc


class GaugeMax:
    """The largest value seen per (member, sample key) across scrapes."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self.maxima: dict[str, dict[str, float]] = {}
        self.scrapes: dict[str, int] = {}
        self.seen: dict[str, set[str]] = {}
        self._series: dict[str, dict[str, Sample]] = {}  # member -> key -> a sample of it

    def update(self, member: str, samples: Iterable[Sample]) -> None:
        table = self.maxima.setdefault(member, {})
        self.scrapes[member] = self.scrapes.get(member, 0) + 1
        seen = self.seen.setdefault(member, set())
        series = self._series.setdefault(member, {})
        if isinstance(samples, Scrape):
            seen.update(n for n in self.names if samples.has(n))
        for s in samples:
            if s.name in self.names:
                seen.add(s.name)
                key = s.key
                series.setdefault(key, s)
                table[key] = max(table.get(key, s.value), s.value)

    def max(self, member: str, name: str, **labels: str) -> float | None:
        """The largest sampled value of `name` (matching `labels`) on `member`;
        None if the metric was never exposed there."""
        if name not in self.seen.get(member, set()):
            return None
        series = self._series.get(member, {})
        table = self.maxima.get(member, {})
        values = [v for k, v in table.items() if series[k].matches(name, **labels)]
        return max(values, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"scrapes": dict(self.scrapes), "max": {m: dict(t) for m, t in self.maxima.items()}}


# --- logs ---------------------------------------------------------------------------------

ERROR_LEVELS = frozenset({"error", "critical", "exception", "fatal"})
ERROR_EVENTS = frozenset({"connection_task_failed"})


@dataclass(frozen=True, slots=True)
class LogProblem:
    component: str
    line_no: int  # 1-based within the scanned text
    what: str  # the event name, or "traceback" / "not_json"
    text: str  # the line, shortened

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "line": self.line_no,
            "what": self.what,
            "text": self.text,
        }


def scan_log(component: str, text: str, *, limit: int = 200) -> list[LogProblem]:
    """Unhandled errors in a daemon's JSON-lines log: `connection_task_failed`,
    any event at level error or above, and tracebacks (in a JSON line's
    `exception` or in raw text the process printed)."""
    out: list[LogProblem] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        short = line if len(line) <= 300 else line[:297] + "..."
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            if "Traceback" in line:
                out.append(LogProblem(component, no, "traceback", short))
            continue
        event = str(item.get("event", ""))
        level = str(item.get("level", "")).lower()
        if event in ERROR_EVENTS or level in ERROR_LEVELS:
            out.append(LogProblem(component, no, event or level, short))
        elif "Traceback" in str(item.get("exception", "")):
            out.append(LogProblem(component, no, event or "traceback", short))
        if len(out) >= limit:
            break
    return out


def deny_reasons(text: str, job_id: str) -> Counter[str]:
    """Reasons of the `connection` audit events that denied `job_id` in a proxy log."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if job_id not in line:
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(item, dict)
            and item.get("event") == "connection"
            and item.get("job_id") == job_id
            and item.get("verdict") == "deny"
        ):
            out[str(item.get("reason", ""))] += 1
    return out
