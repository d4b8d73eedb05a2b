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

With the interception rows (issue 12) a second row of four charts compares
egressd `tls: intercept` with Squid `ssl_bump bump` over HTTPS: keep-alive
requests/s, new TLS connections/s, bulk MB/s (labelled with the ratio to
Squid), and p50 | p99 latency. Those rows are left out of the first row,
whose latency is relative to the kernel path's plain HTTP.

`bench_series` is pure (dict in, series out); `render` draws it and returns
what it drew.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egressd_harness import plotting
from egressd_harness.bench.report import INTERCEPT_PATHS, KERNEL, MB, PATH_ORDER, SQUID_BUMP

COLORS = {
    "kernel": "0.55",
    "squid": "tab:orange",
    "egressd": "tab:blue",
    "squid-bump": "navajowhite",
    "egressd-intercept": "lightsteelblue",
}


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
    intercept: InterceptSeries | None = None


@dataclass(frozen=True, slots=True)
class InterceptSeries:
    """The interception rows: absolute values, rates with their ratio to Squid bump."""

    keepalive_rps: tuple[Bar, ...]
    conn_per_s: tuple[Bar, ...]
    bulk_mb_s: tuple[Bar, ...]
    p50_us: tuple[Bar, ...]
    p99_us: tuple[Bar, ...]


def _ordered(paths: Mapping[str, Any]) -> list[str]:
    return [n for n in PATH_ORDER if n in paths] + [n for n in paths if n not in PATH_ORDER]


def _pct(sample: Mapping[str, Any], key: str) -> float | None:
    value = (sample.get("percentiles_us") or {}).get(key)
    return float(value) if value is not None else None


def _added(path: Mapping[str, Any], kernel: Mapping[str, Any], key: str) -> tuple[float, ...]:
    """Per repeat: the path's percentile minus the kernel path's in the same repeat."""
    ours = [_pct(s, key) for s in path["samples"]["latency"]]
    base = [_pct(s, key) for s in kernel["samples"]["latency"]]
    return tuple(
        round(a - b, 1) for a, b in zip(ours, base, strict=False) if a is not None and b is not None
    )


def bench_series(doc: Mapping[str, Any]) -> BenchSeries:
    paths = doc["paths"]
    ok = [n for n in _ordered(paths) if paths[n].get("error") is None and n not in INTERCEPT_PATHS]
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
        conn.append(
            Bar(
                name,
                median.get("conn_per_s"),
                tuple(float(s["requests_per_s"]) for s in p["samples"]["connrate"]),
                1.0 if is_kernel else cmp.get("conn_ratio"),
            )
        )
        bulk.append(
            Bar(
                name,
                median.get("bulk_mb_s"),
                tuple(
                    float(s["bytes"]) / float(s["seconds"]) / MB
                    for s in p["samples"]["bulk"]
                    if s["seconds"] > 0
                ),
                1.0 if is_kernel else cmp.get("bulk_ratio"),
            )
        )
        if not is_kernel and kernel is not None:
            p50.append(Bar(name, cmp.get("added_p50_us"), _added(p, kernel, "p50")))
            p99.append(Bar(name, cmp.get("added_p99_us"), _added(p, kernel, "p99")))
    return BenchSeries(
        tuple(conn), tuple(p50), tuple(p99), tuple(bulk), errors, intercept_series(doc)
    )


def intercept_series(doc: Mapping[str, Any]) -> InterceptSeries | None:
    """Bars of the interception rows that ran; None when there are none."""
    paths = doc["paths"]
    names = [n for n in INTERCEPT_PATHS if n in paths and paths[n].get("error") is None]
    if not names:
        return None
    ratios = ((doc.get("intercept") or {}).get("vs_squid_bump")) or {}

    def rates(key: str, samples: Any) -> tuple[Bar, ...]:
        out = []
        for name in names:
            ratio = 1.0 if name == SQUID_BUMP else ratios.get(key)
            out.append(
                Bar(
                    name,
                    paths[name]["median"].get(key),
                    tuple(samples(paths[name])),
                    ratio if SQUID_BUMP in names else None,
                )
            )
        return tuple(out)

    def pct(key: str) -> tuple[Bar, ...]:
        return tuple(
            Bar(
                name,
                paths[name]["median"].get(f"{key}_us"),
                tuple(
                    v for s in paths[name]["samples"]["latency"] if (v := _pct(s, key)) is not None
                ),
            )
            for name in names
        )

    return InterceptSeries(
        keepalive_rps=rates(
            "keepalive_rps", lambda p: (float(s["requests_per_s"]) for s in p["samples"]["latency"])
        ),
        conn_per_s=rates(
            "conn_per_s", lambda p: (float(s["requests_per_s"]) for s in p["samples"]["connrate"])
        ),
        bulk_mb_s=rates(
            "bulk_mb_s",
            lambda p: (
                float(s["bytes"]) / float(s["seconds"]) / MB
                for s in p["samples"]["bulk"]
                if s["seconds"] > 0
            ),
        ),
        p50_us=pct("p50"),
        p99_us=pct("p99"),
    )


def _bars(
    ax: Any,
    bars: Sequence[Bar],
    positions: Sequence[float],
    width: float,
    *,
    colors: Sequence[str],
    ratio: bool,
    hatch: str = "",
    signed: bool = True,
) -> None:
    for x, bar, color in zip(positions, bars, colors, strict=True):
        value = bar.value if bar.value is not None else 0.0
        ax.bar(x, value, width, color=color, hatch=hatch, edgecolor="black", lw=0.5)
        top = value
        if bar.samples:
            lo, hi = min(bar.samples), max(bar.samples)
            ax.errorbar(
                x,
                value,
                yerr=[[max(0.0, value - lo)], [max(0.0, hi - value)]],
                fmt="none",
                ecolor="black",
                capsize=4,
                lw=1,
            )
            ax.scatter([x] * len(bar.samples), bar.samples, s=10, color="black", zorder=3)
            top = max(value, hi)
        text = None
        if ratio and bar.value is not None:
            text = f"{bar.value:,.0f}" + (f"\n{bar.ratio:.2f}x" if bar.ratio is not None else "")
        elif bar.value is not None:
            text = f"{bar.value:+,.0f}" if signed else f"{bar.value:,.0f}"
        if text is not None:
            ax.annotate(
                text,
                (x, top),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )


def render(doc: Mapping[str, Any], path: Path) -> BenchSeries:
    """The bench figure; returns the bars drawn."""
    plt = plotting.pyplot()
    series = bench_series(doc)
    tls = series.intercept
    fig = plt.figure(figsize=(11, 7.6 if tls is not None else 3.8))
    grid = fig.add_gridspec(2 if tls is not None else 1, 12)
    ax_conn, ax_lat, ax_bulk = (fig.add_subplot(grid[0, i * 4 : (i + 1) * 4]) for i in range(3))
    if tls is not None:
        _render_intercept(fig, grid, tls)
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
        # `egressd-gvisor` would run into its neighbour: break after the dash.
        ax.set_xticks(range(len(bars)), [b.label.replace("-", "-\n", 1) for b in bars])
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
    fig.suptitle(
        "egressd bench: kernel path vs Squid vs egressd"
        + (f"\n{note}" if note else "")
        + (f"\nno bars: {broken}" if broken else ""),
        fontsize=10,
    )
    fig.tight_layout()
    plotting.save(fig, path)
    return series


def _render_intercept(fig: Any, grid: Any, tls: InterceptSeries) -> None:
    """The second row: HTTPS through egressd intercept and Squid bump."""
    axes = [fig.add_subplot(grid[1, i * 3 : (i + 1) * 3]) for i in range(4)]
    rates = (
        (axes[0], tls.keepalive_rps, "HTTPS keep-alive req/s (x Squid bump)"),
        (axes[1], tls.conn_per_s, "new TLS connections/s (x Squid bump)"),
        (axes[2], tls.bulk_mb_s, "HTTPS bulk, MB/s (x Squid bump)"),
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
        ax.set_xticks(range(len(bars)), [b.label.replace("-", "\n") for b in bars])
        ax.set_title(title, fontsize=9)
    names = [b.label for b in tls.p50_us]
    xs = range(len(names))
    colors = [COLORS.get(n, "0.3") for n in names]
    ax = axes[3]
    _bars(ax, tls.p50_us, [x - 0.2 for x in xs], 0.38, colors=colors, ratio=False, signed=False)
    _bars(
        ax,
        tls.p99_us,
        [x + 0.2 for x in xs],
        0.38,
        colors=colors,
        ratio=False,
        hatch="//",
        signed=False,
    )
    ax.set_xticks(list(xs), [f"{n.split('-')[0]}\np50 | p99" for n in names])
    ax.set_title("HTTPS keep-alive latency, us", fontsize=9)
    for ax in axes:
        ax.margins(y=0.2)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)


def write(doc: Mapping[str, Any], out: Path) -> list[Path]:
    """The figure beside the JSON file `out`; its path."""
    png = plotting.beside(out)
    render(doc, png)
    return [png]
