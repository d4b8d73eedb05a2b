"""PNG plot of an `egressd bench` report (its JSON document, as a dict).

`--out X.json` gets `X.png` beside it: three bar charts, one bar per path
(kernel, Squid, egressd) at the median the table shows, with every repeated
run as a dot and its range as an error bar:

- new connections per second (conn/s), labelled with the ratio to the kernel path;
- latency added over the kernel path, p50 and p99 (us): each repeat's value
  minus the kernel path's value of the same repeat (the paths are measured
  interleaved, so a repeat's drift hits all alike), the bar at the table's
  `vs_kernel` value;
- single-flow bulk download (MB/s), labelled with the ratio to the kernel path.

`bench_series` is pure (dict in, series out); `render` draws it and returns
what it drew.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egressd import plotting
from egressd.bench.report import KERNEL, MB, PATH_ORDER

COLORS = {"kernel": "0.55", "squid": "tab:orange", "egressd": "tab:blue"}


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: the median (or table value) and the repeated runs' values."""

    label: str
    value: float | None
    samples: tuple[float, ...]
    ratio: float | None = None  # to the kernel path, for rates


@dataclass(frozen=True, slots=True)
class BenchSeries:
    conn_per_s: tuple[Bar, ...]
    added_p50_us: tuple[Bar, ...]
    added_p99_us: tuple[Bar, ...]
    bulk_mb_s: tuple[Bar, ...]
    errors: Mapping[str, str]  # path -> why it has no bars


def _ordered(paths: Mapping[str, Any]) -> list[str]:
    return [n for n in PATH_ORDER if n in paths] + [n for n in paths if n not in PATH_ORDER]


def _pct(sample: Mapping[str, Any], key: str) -> float | None:
    value = (sample.get("percentiles_us") or {}).get(key)
    return float(value) if value is not None else None


def _added(path: Mapping[str, Any], kernel: Mapping[str, Any], key: str) -> tuple[float, ...]:
    """Per repeat: the path's percentile minus the kernel path's in the same repeat."""
    ours = [_pct(s, key) for s in path["samples"]["latency"]]
    base = [_pct(s, key) for s in kernel["samples"]["latency"]]
    return tuple(round(a - b, 1) for a, b in zip(ours, base, strict=False)
                 if a is not None and b is not None)  # fmt: skip


def bench_series(doc: Mapping[str, Any]) -> BenchSeries:
    paths = doc["paths"]
    ok = [n for n in _ordered(paths) if paths[n].get("error") is None]
    errors = {
        n: str(paths[n]["error"]) for n in _ordered(paths) if paths[n].get("error") is not None
    }
    vs = doc.get("vs_kernel") or {}
    kernel = paths.get(KERNEL)
    conn, bulk, p50, p99 = [], [], [], []
    for name in ok:
        p = paths[name]
        median = p["median"]
        cmp = vs.get(name, {})
        is_kernel = name == KERNEL
        conn.append(Bar(name, median.get("conn_per_s"),
                        tuple(float(s["requests_per_s"]) for s in p["samples"]["connrate"]),
                        1.0 if is_kernel else cmp.get("conn_ratio")))  # fmt: skip
        bulk.append(Bar(name, median.get("bulk_mb_s"),
                        tuple(float(s["bytes"]) / float(s["seconds"]) / MB
                              for s in p["samples"]["bulk"] if s["seconds"] > 0),
                        1.0 if is_kernel else cmp.get("bulk_ratio")))  # fmt: skip
        if not is_kernel and kernel is not None:
            p50.append(Bar(name, cmp.get("added_p50_us"), _added(p, kernel, "p50")))
            p99.append(Bar(name, cmp.get("added_p99_us"), _added(p, kernel, "p99")))
    return BenchSeries(tuple(conn), tuple(p50), tuple(p99), tuple(bulk), errors)


def _bars(ax: Any, bars: Sequence[Bar], positions: Sequence[float], width: float, *,
          colors: Sequence[str], ratio: bool, hatch: str = "") -> None:  # fmt: skip
    for x, bar, color in zip(positions, bars, colors, strict=True):
        value = bar.value if bar.value is not None else 0.0
        ax.bar(x, value, width, color=color, hatch=hatch, edgecolor="black", lw=0.5)
        top = value
        if bar.samples:
            lo, hi = min(bar.samples), max(bar.samples)
            ax.errorbar(x, value, yerr=[[max(0.0, value - lo)], [max(0.0, hi - value)]],
                        fmt="none", ecolor="black", capsize=4, lw=1)  # fmt: skip
            ax.scatter([x] * len(bar.samples), bar.samples, s=10, color="black", zorder=3)
            top = max(value, hi)
        text = None
        if ratio and bar.value is not None:
            text = f"{bar.value:,.0f}" + (f"\n{bar.ratio:.2f}x" if bar.ratio is not None else "")
        elif bar.value is not None:
            text = f"{bar.value:+,.0f}"
        if text is not None:
            ax.annotate(text, (x, top), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)  # fmt: skip


def render(doc: Mapping[str, Any], path: Path) -> BenchSeries:
    """The bench figure; returns the bars drawn."""
    plt = plotting.pyplot()
    series = bench_series(doc)
    fig, (ax_conn, ax_lat, ax_bulk) = plt.subplots(1, 3, figsize=(11, 3.8))
    rates = (
        (ax_conn, series.conn_per_s, "new connections/s (x kernel)"),
        (ax_bulk, series.bulk_mb_s, "single-flow bulk, MB/s (x kernel)"),
    )
    for ax, bars, title in rates:
        _bars(
            ax,
            bars,
            range(len(bars)),
            0.6,
            colors=[COLORS.get(b.label, "0.3") for b in bars],
            ratio=True,
        )
        ax.set_xticks(range(len(bars)), [b.label for b in bars])
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.2)
    names = [b.label for b in series.added_p50_us]
    xs = range(len(names))
    colors = [COLORS.get(n, "0.3") for n in names]
    _bars(ax_lat, series.added_p50_us, [x - 0.2 for x in xs], 0.38, colors=colors, ratio=False)
    _bars(
        ax_lat,
        series.added_p99_us,
        [x + 0.2 for x in xs],
        0.38,
        colors=colors,
        ratio=False,
        hatch="//",
    )
    ax_lat.set_xticks(list(xs), [f"{n}\np50 | p99" for n in names])
    ax_lat.axhline(0, color="black", lw=0.6)
    ax_lat.set_title("latency added over the kernel path, us", fontsize=9)
    ax_lat.margins(y=0.2)
    for ax in (ax_conn, ax_lat, ax_bulk):
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    options = (doc.get("meta") or {}).get("options") or {}
    repeat = options.get("repeat")
    note = f"bars: medians; dots: each of {repeat} runs; error bars: their range" if repeat else ""
    broken = "; ".join(f"{n}: {e}" for n, e in series.errors.items())
    fig.suptitle("egressd bench: kernel path vs Squid vs egressd" + (f"\n{note}" if note else "")
                 + (f"\nno bars: {broken}" if broken else ""), fontsize=10)  # fmt: skip
    fig.tight_layout()
    plotting.save(fig, path)
    return series


def write(doc: Mapping[str, Any], out: Path) -> list[Path]:
    """The figure beside the JSON file `out`; its path."""
    png = plotting.beside(out)
    render(doc, png)
    return [png]
