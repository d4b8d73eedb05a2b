"""PNG plots of an `egressd loadtest` report (its JSON document, as a dict).

`--out X.json` gets two images beside it:

- `X-latency.png`: each well-behaved job's p50 and p99 per second (log
  scale), from `observed.summaries[ROLE].latency_per_second`;
- `X-throughput.png`: one panel per job: requests/s (and failed/s) of the
  well-behaved jobs, connections held by the port-exhaustion attacker, MB/s
  received by the bandwidth hog, packets/s sent by a flood.

Time is in seconds from the schedule's start (`observed.schedule_t0`);
`warmup` is before 0. Stress windows are shaded, settle windows hatched.

`latency_series` and `throughput_series` are pure (dict in, series out);
`render_*` draw them and return what they drew, so tests can hold a plot to
its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egressd_harness import plotting
from egressd_harness.loadtest.series import KEY as LATENCY_KEY

LATENCY_SUFFIX = "-latency"
THROUGHPUT_SUFFIX = "-throughput"
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Line:
    """One drawn line: x in seconds from the schedule's start."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Panel:
    """One job's throughput panel."""

    role: str
    unit: str
    lines: tuple[Line, ...]


def windows(doc: Mapping[str, Any]) -> list[tuple[float, float, str]]:
    return [
        (float(w["start"]), float(w["end"]), str(w["phase"])) for w in doc["scenario"]["windows"]
    ]


def _t0(doc: Mapping[str, Any]) -> float:
    return float(doc["observed"].get("schedule_t0") or 0.0)


def _summaries(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    return doc["observed"].get("summaries") or {}


def _roles(doc: Mapping[str, Any]) -> list[str]:
    """The jobs in the scenario's order."""
    return [str(j["role"]) for j in doc["scenario"]["jobs"]]


def latency_series(doc: Mapping[str, Any]) -> dict[str, tuple[Line, Line]]:
    """role -> (p50, p99) per second, for each job whose summary has a latency series."""
    t0 = _t0(doc)
    out: dict[str, tuple[Line, Line]] = {}
    for role in _roles(doc):
        rows = (_summaries(doc).get(role) or {}).get(LATENCY_KEY) or []
        if not rows:
            continue
        x = tuple(round(r["t"] + 0.5 - t0, 3) for r in rows)
        out[role] = (
            Line(f"{role} p50", x, tuple(float(r["p50_ms"]) for r in rows)),
            Line(f"{role} p99", x, tuple(float(r["p99_ms"]) for r in rows)),
        )
    return out


def _filled(counts: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """Every second from the first to the last, zero where nothing was counted."""
    if not counts:
        return [], []
    seconds = list(range(min(counts), max(counts) + 1))
    return seconds, [counts.get(s, 0) for s in seconds]


def throughput_series(doc: Mapping[str, Any]) -> list[Panel]:
    """One panel per job with something to show over time."""
    t0 = _t0(doc)
    panels = []
    for role in _roles(doc):
        summary = _summaries(doc).get(role) or {}
        if rows := summary.get(LATENCY_KEY):
            seconds, n = _filled({int(r["t"]): r["n"] for r in rows})
            _, failed = _filled({int(r["t"]): r["failed"] for r in rows})
            x = tuple(round(s + 0.5 - t0, 3) for s in seconds)
            lines = [Line("requests/s", x, tuple(map(float, n)))]
            if any(failed):
                lines.append(Line("failed/s", x, tuple(map(float, failed))))
            panels.append(Panel(role, "requests/s", tuple(lines)))
        elif held := (summary.get("attacker") or {}).get("held_series"):
            x = tuple(round(float(t) - t0, 3) for t, _ in held)
            line = Line("connections held", x, tuple(float(n) for _, n in held))
            panels.append(Panel(role, "connections held", (line,)))
        elif per_s := (summary.get("hog") or {}).get("bytes_per_second"):
            seconds, got = _filled({int(k): v for k, v in per_s.items()})
            x = tuple(round(s + 0.5 - t0, 3) for s in seconds)
            panels.append(
                Panel(role, "MB/s", (Line("MB/s received", x, tuple(b / MB for b in got)),))
            )
        elif summary.get("spans") and summary.get("sent_per_s") is not None:
            # A flood: its mean rate over each span it ran (its summary has no per-second series).
            rate = float(summary["sent_per_s"])
            spans = tuple(
                Line(
                    f"{summary.get('kind', 'flood')} sent/s (mean)",
                    (round(a - t0, 3), round(b - t0, 3)),
                    (rate, rate),
                )
                for a, b in summary["spans"]
            )
            panels.append(Panel(role, "packets/s", spans))
    return panels


def _shade(ax: Any, spans: list[tuple[float, float, str]]) -> None:
    for start, end, phase in spans:
        if phase == "stress":
            ax.axvspan(start, end, color="tab:red", alpha=0.12, lw=0)
        elif phase == "settle":
            ax.axvspan(start, end, facecolor="none", edgecolor="0.6", hatch="///", lw=0)


def _window_legend() -> list[Any]:
    from matplotlib.patches import Patch

    return [
        Patch(color="tab:red", alpha=0.12, label="stress"),
        Patch(facecolor="none", edgecolor="0.6", hatch="///", label="settle"),
    ]


def _title(doc: Mapping[str, Any], what: str) -> str:
    verdicts = doc.get("verdicts") or []
    failed = [v["name"] for v in verdicts if not v.get("passed")]
    status = "every verdict passed" if not failed else f"failed: {', '.join(failed)}"
    return f"egressd loadtest {doc['scenario']['name']}: {what}\n({status})"


def render_latency(doc: Mapping[str, Any], path: Path) -> dict[str, tuple[Line, Line]]:
    """The latency figure; returns the lines drawn."""
    plt = plotting.pyplot()
    series = latency_series(doc)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    _shade(ax, windows(doc))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (p50, p99) in enumerate(series.values()):
        color = colors[i % len(colors)]
        ax.plot(p50.x, p50.y, color=color, lw=1.5, marker=".", ms=4, label=p50.label)
        ax.plot(p99.x, p99.y, color=color, lw=1.2, ls="--", marker=".", ms=3, label=p99.label)
    if not series:
        ax.text(0.5, 0.5, "no latency series in this report", ha="center", transform=ax.transAxes)
    else:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("seconds from the first window (per second of request start)")
    ax.set_ylabel("latency, ms")
    ax.grid(True, which="both", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(
        handles=handles + _window_legend(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8
    )
    ax.set_title(_title(doc, "latency per second of the well-behaved jobs"), fontsize=10)
    plotting.save(fig, path)
    return series


def render_throughput(doc: Mapping[str, Any], path: Path) -> list[Panel]:
    """The throughput figure, one panel per job; returns the panels drawn."""
    plt = plotting.pyplot()
    panels = throughput_series(doc)
    fig, axes = plt.subplots(
        max(1, len(panels)),
        1,
        figsize=(9, 1.2 + 2.0 * max(1, len(panels))),
        sharex=True,
        squeeze=False,
    )
    spans = windows(doc)
    for ax, panel in zip(axes[:, 0], panels, strict=False):
        _shade(ax, spans)
        for i, line in enumerate(panel.lines):
            color = "tab:red" if line.label == "failed/s" else "tab:blue"
            if panel.unit == "packets/s":  # one segment per span: one legend entry
                ax.plot(
                    line.x, line.y, color="tab:purple", lw=3, label=line.label if i == 0 else None
                )
            else:
                # Per-second counts span their second; the attacker's samples hold until the next.
                where = "post" if panel.unit == "connections held" else "mid"
                ax.step(line.x, line.y, where=where, color=color, lw=1.2, label=line.label)
        ax.set_ylabel(panel.unit)
        ax.set_title(f"{panel.role}", fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + _window_legend()
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if not panels:
        axes[0, 0].text(
            0.5,
            0.5,
            "no per-job series in this report",
            ha="center",
            transform=axes[0, 0].transAxes,
        )
    axes[-1, 0].set_xlabel("seconds from the first window")
    fig.suptitle(_title(doc, "per-job throughput"), fontsize=10)
    plotting.save(fig, path)
    return panels


def write(doc: Mapping[str, Any], out: Path) -> list[Path]:
    """Both figures beside the JSON file `out`; their paths."""
    latency, throughput = (
        plotting.beside(out, LATENCY_SUFFIX),
        plotting.beside(out, THROUGHPUT_SUFFIX),
    )
    render_latency(doc, latency)
    render_throughput(doc, throughput)
    return [latency, throughput]
