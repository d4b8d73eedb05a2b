"""Issue 10's goals as ratios of one run: egressd against this run's own Squid (pure).

Each figure is a ratio (or a difference) of medians over the run's
repetitions, so drift between runs cancels; "added" latency is over the
kernel path. The goals, on the 2-core bench machine:

| key | figure | goal |
|---|---|---|
| conn_ratio | new connections/s, egressd / Squid | >= 1.5 (below 1.0: not done) |
| added_p50_ratio | added p50, egressd / Squid | <= 0.5 |
| added_p99_ms | egressd's added p99, ms | < 1 |
| bulk_ratio | single-flow bulk MB/s, egressd / Squid | >= 4 |
| cpu_per_conn_ratio | CPU per connection, egressd / Squid | <= 1 |

`cpu_per_mb_ratio` (CPU per MB, egressd / Squid) is printed too, with no goal,
and `machine_per_conn_ratio`: the whole machine's busy time per connection
(every process and the softirq time charged to none), egressd / Squid, which
is what sets conn/s when the box is saturated.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from egressd_harness.bench.report import EGRESSD, KERNEL, SQUID, PathResult

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True, slots=True)
class Ratio:
    key: str
    text: str
    value: float | None
    op: str | None = None  # None: informative, no goal
    target: float | None = None
    unit: str = "x"
    floor: float | None = None  # below this (for ">=" goals) the work is not done

    @property
    def met(self) -> bool | None:
        if self.op is None or self.target is None or self.value is None:
            return None
        return _OPS[self.op](self.value, self.target)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "not met", None: "n/a"}[self.met]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "text": self.text,
            "value": round(self.value, 3) if self.value is not None else None,
            "goal": f"{self.op} {self.target:g}" if self.op and self.target is not None else None,
            "floor": self.floor,
            "unit": self.unit,
            "met": self.met,
            "verdict": self.verdict if self.op is not None else None,
        }


def _ok(results: Mapping[str, PathResult], name: str) -> PathResult | None:
    r = results.get(name)
    return r if r is not None and r.error is None else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def ratios(results: Mapping[str, PathResult]) -> list[Ratio]:
    """The issue's goal figures for the `egressd` row against the `squid` row."""
    e, s, k = _ok(results, EGRESSD), _ok(results, SQUID), _ok(results, KERNEL)

    def get(r: PathResult | None, attr: str) -> float | None:
        return getattr(r, attr) if r is not None else None

    base_p50, base_p99 = get(k, "p50_us"), get(k, "p99_us")
    e_added_p50, s_added_p50 = _sub(get(e, "p50_us"), base_p50), _sub(get(s, "p50_us"), base_p50)
    e_added_p99 = _sub(get(e, "p99_us"), base_p99)
    return [
        Ratio(
            "conn_ratio",
            "new connections/s, egressd / Squid",
            _div(get(e, "conn_per_s"), get(s, "conn_per_s")),
            ">=",
            1.5,
            floor=1.0,
        ),
        Ratio(
            "added_p50_ratio",
            "added p50 over the kernel path, egressd / Squid",
            _div(e_added_p50, s_added_p50),
            "<=",
            0.5,
        ),
        Ratio(
            "added_p99_ms",
            "egressd's added p99 over the kernel path",
            e_added_p99 / 1000 if e_added_p99 is not None else None,
            "<",
            1.0,
            unit="ms",
        ),
        Ratio(
            "bulk_ratio",
            "single-flow bulk MB/s, egressd / Squid",
            _div(get(e, "bulk_mb_s"), get(s, "bulk_mb_s")),
            ">=",
            4.0,
        ),
        Ratio(
            "cpu_per_conn_ratio",
            "CPU per connection, egressd / Squid",
            _div(get(e, "cpu_us_per_conn"), get(s, "cpu_us_per_conn")),
            "<=",
            1.0,
        ),
        Ratio(
            "cpu_per_mb_ratio",
            "CPU per MB, egressd / Squid",
            _div(get(e, "cpu_ms_per_mb"), get(s, "cpu_ms_per_mb")),
        ),
        Ratio(
            "machine_per_conn_ratio",
            "the machine's busy time per connection (softirq included), egressd / Squid",
            _div(get(e, "machine_us_per_conn"), get(s, "machine_us_per_conn")),
        ),
    ]


def _value(r: Ratio) -> str:
    if r.value is None:
        return "-"
    return f"{r.value:.3f} ms" if r.unit == "ms" else f"{r.value:.2f}x"


def render(items: list[Ratio], repeat: int | None = None) -> str:
    medians = f", medians of {repeat}" if repeat else ""
    lines = [f"goals (issue 10, one run{medians}):"]
    for r in items:
        if r.op is None:
            lines.append(f"  [info] {r.text}: {_value(r)}")
            continue
        goal = f"{r.op} {r.target:g}{' ms' if r.unit == 'ms' else 'x'}"
        floor = ""
        if r.floor is not None and r.value is not None and r.value < r.floor:
            floor = f"; below {r.floor:g}x: not done"
        lines.append(f"  [{r.verdict}] {r.text}: {_value(r)} (goal {goal}{floor})")
    return "\n".join(lines)


def to_json(items: list[Ratio]) -> dict[str, Any]:
    return {r.key: r.to_dict() for r in items}
