"""Reading the daemons' `/metrics` pages: Prometheus text in, plain samples out (pure).

One parser for every reader of a scrape (demos, deploy health checks, load
tests, test helpers): prometheus_client's own
(`prometheus_client.parser.text_string_to_metric_families`), so a line is
read the way Prometheus reads it (escaped label values, label order, `+Inf`,
`NaN`), never by splitting strings. What it returns is plain data: `Sample`
(name, labels, value) in a `Scrape`, and the questions every reader asks of it
(`metric_sum`, `metric_value`, `by_label`, `counter_delta`, `series`).

A sample's name is the name on the wire (`egressd_connections_total`, a
histogram's `_bucket`/`_sum`/`_count`); counters' `_created` timestamps are
left out: they are not values anyone sums.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from egressd.errors import EgressdError

# (name, labels sorted by label name): a hashable name for one series.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


class MetricsTextError(EgressdError):
    """A page that is not Prometheus text (reason `metrics_text`; `detail` is the parser's)."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float

    @property
    def key(self) -> str:
        """`name{a="1",b="2"}` with labels sorted: stable for JSON and tables."""
        if not self.labels:
            return self.name
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()))
        return f"{self.name}{{{inner}}}"

    @property
    def series(self) -> SeriesKey:
        return self.name, tuple(sorted(self.labels.items()))

    def matches(self, name: str, **labels: str) -> bool:
        """This sample is `name`'s and its labels include `labels`."""
        return self.name == name and all(self.labels.get(k) == v for k, v in labels.items())


class Scrape(list[Sample]):
    """One `/metrics` page: its samples, and the metric families it declares
    (a labelled gauge with no series at the moment still declares its family)."""

    def __init__(self, samples: Iterable[Sample] = (), families: Iterable[str] = ()) -> None:
        super().__init__(samples)
        self.families = frozenset(families)

    def has(self, name: str) -> bool:
        return (
            name in self.families
            or name.removesuffix("_total") in self.families
            or any(s.name == name for s in self)
        )


def parse(text: str) -> Scrape:
    """Prometheus text exposition into samples; MetricsTextError if it is not that."""
    out = []
    families = []
    try:
        for family in text_string_to_metric_families(text):
            families.append(family.name)
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
    except ValueError as exc:
        raise MetricsTextError("metrics_text", str(exc)) from exc
    return Scrape(out, families)


def matching(samples: Iterable[Sample], name: str, **labels: str) -> Iterator[Sample]:
    """`name`'s samples whose labels include `labels`."""
    return (s for s in samples if s.matches(name, **labels))


def metric_sum(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in matching(samples, name, **labels))


def metric_value(samples: Iterable[Sample], name: str, **labels: str) -> float | None:
    """The value of the one series of `name` whose labels are exactly `labels`; None if absent."""
    for s in samples:
        if s.name == name and s.labels == labels:
            return s.value
    return None


def metric_present(samples: Iterable[Sample], name: str) -> bool:
    if isinstance(samples, Scrape):
        return samples.has(name)
    return any(s.name == name for s in samples)


def by_label(samples: Iterable[Sample], name: str, label: str, **labels: str) -> dict[str, float]:
    """`name`'s values summed per value of `label` (samples matching `labels`)."""
    out: defaultdict[str, float] = defaultdict(float)
    for s in matching(samples, name, **labels):
        out[s.labels.get(label, "")] += s.value
    return dict(out)


def counter_delta(
    before: Iterable[Sample], after: Iterable[Sample], name: str, **labels: str
) -> float:
    """How much `name` (summed over the samples matching `labels`) grew from `before`."""
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def series(samples: Iterable[Sample]) -> dict[SeriesKey, float]:
    """Every sample by its `SeriesKey`, for lookups and before/after comparisons."""
    return {s.series: s.value for s in samples}
