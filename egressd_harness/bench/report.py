"""Results of `egressd bench`: parsing the load generators' output, medians,
comparisons with the kernel path, the table and the JSON document (pure).

Nothing here touches a socket, a process or a file: `parse_wrk` and
`parse_curl` take text, `render_table` and `to_json` take results.

Units: latency in microseconds, rates per second, throughput in MB/s
(10^6 bytes per second), memory in MiB (RSS from /proc is in KiB).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from egressd.errors import EgressdError
from egressd_harness.bench.cpu import CpuSample

KERNEL = "kernel"
SQUID = "squid"
EGRESSD = "egressd"
# The egressd path with the client inside a runsc sandbox (issue 10): gVisor's
# netstack and syscall interception included.
EGRESSD_GVISOR = "egressd-gvisor"
# The interception rows (issue 12): HTTPS to the same server, Squid `ssl_bump bump`
# against egressd `tls: intercept`. They are compared with each other, not with
# the kernel path's plain HTTP.
SQUID_BUMP = "squid-bump"
EGRESSD_INTERCEPT = "egressd-intercept"
INTERCEPT_PATHS = (SQUID_BUMP, EGRESSD_INTERCEPT)
PATH_ORDER = (KERNEL, SQUID, EGRESSD, EGRESSD_GVISOR, SQUID_BUMP, EGRESSD_INTERCEPT)

SCHEMA = "egressd_harness.bench.data_path/1"
MB = 1_000_000
KIB = 1024
MIB = 1024 * 1024

# Goals from issue 3, item 8.
GOAL_CONN_PER_S_PER_PROXY = 4_000

_SOCKET_ERROR_KINDS = ("connect", "read", "write", "timeout")
_UNIT_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0, "m": 60_000_000.0, "h": 3_600_000_000.0}


class ParseError(EgressdError):
    """A load generator's output that does not say what it should."""


# --- wrk ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: totals, throughput, latency percentiles and error counts."""

    requests: int
    duration_s: float
    requests_per_s: float
    percentiles_us: Mapping[float, float] = field(default_factory=dict)
    socket_errors: Mapping[str, int] = field(default_factory=dict)
    non_2xx: int = 0

    @property
    def p50_us(self) -> float | None:
        return self.percentiles_us.get(50.0)

    @property
    def p99_us(self) -> float | None:
        return self.percentiles_us.get(99.0)

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s,
            "percentiles_us": {_pct_key(p): v for p, v in sorted(self.percentiles_us.items())},
            "socket_errors": dict(self.socket_errors),
            "non_2xx": self.non_2xx,
        }


def _pct_key(p: float) -> str:
    return f"p{p:g}"


def duration_us(text: str) -> float:
    """wrk's printed duration (`379.00us`, `1.56ms`, `2.00s`, `1.50m`) in microseconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)\s*", text)
    if match is None:
        raise ParseError("bad_duration", f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNIT_US[match.group(2)]


_REQUESTS = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s+([0-9.]+)%\s+([0-9.]+(?:us|ms|s|m|h))\s*$", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(text: str) -> WrkResult:
    """Parse the report wrk prints (with or without `--latency`)."""
    totals = _REQUESTS.search(text)
    rps = _RPS.search(text)
    if totals is None or rps is None:
        first = text.strip().splitlines()[:1]
        raise ParseError("wrk_output", f"no totals in wrk output: {first!r}")
    percentiles: dict[float, float] = {}
    if "Latency Distribution" in text:
        section = text.split("Latency Distribution", 1)[1]
        for pct, value in _PERCENTILE.findall(section):
            percentiles[float(pct)] = duration_us(value)
    socket_errors = dict.fromkeys(_SOCKET_ERROR_KINDS, 0)
    if (errors := _SOCKET_ERRORS.search(text)) is not None:
        socket_errors = dict(zip(_SOCKET_ERROR_KINDS, map(int, errors.groups()), strict=True))
    non_2xx = _NON_2XX.search(text)
    return WrkResult(
        requests=int(totals.group(1)),
        duration_s=duration_us(totals.group(2) + totals.group(3)) / 1e6,
        requests_per_s=float(rps.group(1)),
        percentiles_us=percentiles,
        socket_errors=socket_errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


# --- curl (bulk) --------------------------------------------------------------------

# What `load.run_bulk` asks curl to print: `-w` with this format.
CURL_WRITE_OUT = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}\\n"


@dataclass(frozen=True, slots=True)
class BulkResult:
    """One single-flow download: bytes and the time from start to the last byte."""

    nbytes: int
    seconds: float
    first_byte_s: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / MB if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.nbytes,
            "seconds": self.seconds,
            "first_byte_s": self.first_byte_s,
            "mb_per_s": round(self.mb_per_s, 1),
        }


def parse_curl(text: str, *, expect_bytes: int) -> BulkResult:
    """Parse curl's `-w CURL_WRITE_OUT` line; the transfer must be whole and a 200."""
    fields = text.strip().split()
    if len(fields) != 4:
        raise ParseError("curl_output", f"unexpected curl output {text.strip()!r}")
    try:
        status, size, total, first = (
            int(fields[0]),
            int(fields[1]),
            float(fields[2]),
            float(fields[3]),
        )
    except ValueError as exc:
        raise ParseError("curl_output", f"unexpected curl output {text.strip()!r}") from exc
    if status != 200:
        raise ParseError("http_status", f"bulk download answered HTTP {status}")
    if size != expect_bytes:
        raise ParseError("short_download", f"got {size} of {expect_bytes} bytes")
    return BulkResult(nbytes=size, seconds=total, first_byte_s=first)


# --- idle connections -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdleResult:
    """Memory of the proxy processes before and after holding `opened` idle connections.

    `rss_*_kib` and `fds_*` map a process name (`proxy1`) to its VmRSS (KiB)
    and its count of open file descriptors.
    """

    requested: int
    opened: int
    failed: int
    alive_at_measure: int
    rss_before_kib: Mapping[str, int]
    rss_after_kib: Mapping[str, int]
    fds_before: Mapping[str, int] = field(default_factory=dict)
    fds_after: Mapping[str, int] = field(default_factory=dict)
    open_seconds: float = 0.0
    # After the client closed them all: what the processes still hold.
    rss_closed_kib: Mapping[str, int] = field(default_factory=dict)
    fds_closed: Mapping[str, int] = field(default_factory=dict)
    drain_seconds: float | None = None  # None: still not back to `fds_before` + slack

    @property
    def lingering(self) -> int:
        """Descriptors the processes still hold, over `fds_before`, after the close."""
        if not self.fds_closed:
            return 0
        return max(0, sum(self.fds_closed.values()) - sum(self.fds_before.values()))

    @property
    def rss_after_mib(self) -> float:
        return sum(self.rss_after_kib.values()) / KIB

    @property
    def rss_before_mib(self) -> float:
        return sum(self.rss_before_kib.values()) / KIB

    @property
    def kib_per_connection(self) -> float | None:
        if self.alive_at_measure <= 0:
            return None
        grown = sum(self.rss_after_kib.values()) - sum(self.rss_before_kib.values())
        return grown / self.alive_at_measure

    def to_dict(self) -> dict[str, Any]:
        per_conn = self.kib_per_connection
        return {
            "requested": self.requested,
            "opened": self.opened,
            "failed": self.failed,
            "alive_at_measure": self.alive_at_measure,
            "open_seconds": round(self.open_seconds, 2),
            "rss_before_kib": dict(self.rss_before_kib),
            "rss_after_kib": dict(self.rss_after_kib),
            "fds_before": dict(self.fds_before),
            "fds_after": dict(self.fds_after),
            "rss_closed_kib": dict(self.rss_closed_kib),
            "fds_closed": dict(self.fds_closed),
            "drain_seconds": _round(self.drain_seconds, 2),
            "lingering_fds": self.lingering,
            "rss_before_mib": round(self.rss_before_mib, 1),
            "rss_after_mib": round(self.rss_after_mib, 1),
            "kib_per_connection": round(per_conn, 2) if per_conn is not None else None,
        }


# --- one path ---------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(slots=True)
class PathResult:
    """Every sample taken on one path; the table shows their medians."""

    name: str
    description: str = ""
    latency: list[WrkResult] = field(default_factory=list)
    connrate: list[WrkResult] = field(default_factory=list)
    bulk: list[BulkResult] = field(default_factory=list)
    idle: IdleResult | None = None
    error: str | None = None
    # Measurements that failed without failing the path: (measure, message).
    failures: list[tuple[str, str]] = field(default_factory=list)
    # Proxy processes serving this path (their count scales conn/s per process).
    proxy_processes: int = 0
    # CPU time of the path's processes during each conn/s and bulk run (issue 10).
    connrate_cpu: list[CpuSample] = field(default_factory=list)
    bulk_cpu: list[CpuSample] = field(default_factory=list)
    # The same processes' CPU while no load runs (background work), per second of wall time.
    idle_cpu_s_per_s: float | None = None
    # The runsc platform of the gVisor row, shown with its name.
    platform: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} [{self.platform}]" if self.platform else self.name

    @property
    def cpu_us_per_conn(self) -> float | None:
        return median(c.us_per_connection for c in self.connrate_cpu)

    @property
    def cpu_ms_per_mb(self) -> float | None:
        return median(c.ms_per_mb for c in self.bulk_cpu)

    @property
    def machine_us_per_conn(self) -> float | None:
        """The whole machine's busy time per connection (load generator, server,
        softirq included): what sets conn/s on a saturated box."""
        return median(c.machine_us_per_connection for c in self.connrate_cpu)

    @property
    def cpu_user_share(self) -> float | None:
        """The path's user time over its CPU time in the conn/s runs."""
        return median(c.user_share for c in self.connrate_cpu)

    @property
    def p50_us(self) -> float | None:
        return median(r.p50_us for r in self.latency)

    @property
    def p99_us(self) -> float | None:
        return median(r.p99_us for r in self.latency)

    @property
    def conn_per_s(self) -> float | None:
        return median(r.requests_per_s for r in self.connrate)

    @property
    def keepalive_rps(self) -> float | None:
        """Requests/s of the latency runs (one keep-alive connection, one request at a time)."""
        return median(r.requests_per_s for r in self.latency)

    @property
    def bulk_mb_s(self) -> float | None:
        return median(r.mb_per_s for r in self.bulk)

    @property
    def idle_rss_mib(self) -> float | None:
        return self.idle.rss_after_mib if self.idle is not None else None

    @property
    def errors(self) -> int:
        return sum(r.errors for r in (*self.latency, *self.connrate))

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "error": self.error,
            "failures": [{"measure": m, "message": msg} for m, msg in self.failures],
            "proxy_processes": self.proxy_processes,
            "platform": self.platform,
            "idle_cpu_s_per_s": _round(self.idle_cpu_s_per_s, 3),
            "median": {
                "p50_us": _round(self.p50_us),
                "p99_us": _round(self.p99_us),
                "conn_per_s": _round(self.conn_per_s),
                "bulk_mb_s": _round(self.bulk_mb_s),
                "idle_rss_mib": _round(self.idle_rss_mib),
                "keepalive_rps": _round(self.keepalive_rps),
                "cpu_us_per_conn": _round(self.cpu_us_per_conn),
                "cpu_ms_per_mb": _round(self.cpu_ms_per_mb, 2),
                "machine_us_per_conn": _round(self.machine_us_per_conn),
                "cpu_user_share": _round(self.cpu_user_share, 3),
            },
            "wrk_errors": self.errors,
            "samples": {
                "latency": [r.to_dict() for r in self.latency],
                "connrate": [r.to_dict() for r in self.connrate],
                "bulk": [r.to_dict() for r in self.bulk],
                "connrate_cpu": [c.to_dict() for c in self.connrate_cpu],
                "bulk_cpu": [c.to_dict() for c in self.bulk_cpu],
            },
            "idle": self.idle.to_dict() if self.idle is not None else None,
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return round(value, digits) if value is not None else None


# --- comparisons and goals ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """One path against the kernel path: added latency and ratios of rates."""

    path: str
    added_p50_us: float | None
    added_p99_us: float | None
    conn_ratio: float | None
    bulk_ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "added_p50_us": _round(self.added_p50_us),
            "added_p99_us": _round(self.added_p99_us),
            "conn_ratio": _round(self.conn_ratio, 3),
            "bulk_ratio": _round(self.bulk_ratio, 3),
        }


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(results: Mapping[str, PathResult], baseline: str = KERNEL) -> dict[str, Comparison]:
    """Each path (the baseline included, trivially) against the baseline path."""
    base = results.get(baseline)
    if base is None:
        return {}
    return {
        name: Comparison(
            path=name,
            added_p50_us=_diff(r.p50_us, base.p50_us),
            added_p99_us=_diff(r.p99_us, base.p99_us),
            conn_ratio=_ratio(r.conn_per_s, base.conn_per_s),
            bulk_ratio=_ratio(r.bulk_mb_s, base.bulk_mb_s),
        )
        for name, r in results.items()
        if r.error is None and name not in INTERCEPT_PATHS
    }


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    value: float | None
    target: float | None
    met: bool | None  # None: not measurable in this run
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _round(self.value, 2),
            "target": _round(self.target, 2),
            "met": self.met,
            "text": self.text,
        }


def _at_most(value: float | None, target: float | None) -> bool | None:
    return value <= target if value is not None and target is not None else None


def _at_least(value: float | None, target: float | None) -> bool | None:
    return value >= target if value is not None and target is not None else None


def goals(results: Mapping[str, PathResult]) -> list[Goal]:
    """The issue's goals for egressd, judged against this run's own Squid and kernel."""
    cmp = compare(results)
    egressd, squid = cmp.get(EGRESSD), cmp.get(SQUID)
    e = results.get(EGRESSD)
    egressd_ok = e is not None and e.error is None
    added = egressd.added_p50_us if egressd else None
    squid_added = squid.added_p50_us if squid else None
    per_proxy = None
    if egressd_ok and e is not None and e.conn_per_s is not None and e.proxy_processes > 0:
        per_proxy = e.conn_per_s / e.proxy_processes
    e_bulk = e.bulk_mb_s if egressd_ok and e is not None else None
    s = results.get(SQUID)
    s_bulk = s.bulk_mb_s if s is not None and s.error is None else None
    return [
        Goal(
            "added_p50_vs_squid",
            added,
            squid_added,
            _at_most(added, squid_added),
            "egressd's added p50 over the kernel path <= Squid's",
        ),
        Goal(
            "conn_per_s_per_proxy",
            per_proxy,
            GOAL_CONN_PER_S_PER_PROXY,
            _at_least(per_proxy, GOAL_CONN_PER_S_PER_PROXY),
            f">= {GOAL_CONN_PER_S_PER_PROXY} new connections/s per proxy process",
        ),
        Goal(
            "bulk_vs_squid",
            e_bulk,
            s_bulk,
            _at_least(e_bulk, s_bulk),
            "egressd single-flow bulk MB/s >= Squid's",
        ),
    ]


# --- rendering ------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ordered(results: Mapping[str, PathResult]) -> list[PathResult]:
    known = [results[n] for n in PATH_ORDER if n in results]
    return known + [r for n, r in results.items() if n not in PATH_ORDER]


TABLE_COLUMNS = (
    "path",
    "p50 us",
    "p99 us",
    "conn/s",
    "bulk MB/s",
    "proxy RSS idle10k MiB",
    "CPU us/conn",
    "CPU ms/MB",
)
_IDLE_COLUMN = 5


def _columns(results: Mapping[str, PathResult]) -> tuple[str, ...]:
    """TABLE_COLUMNS, the idle column naming the connection count actually used."""
    counts = {r.idle.requested for r in results.values() if r.idle is not None}
    if len(counts) != 1:
        return TABLE_COLUMNS
    (n,) = counts
    label = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    idle = f"proxy RSS idle{label} MiB"
    return (*TABLE_COLUMNS[:_IDLE_COLUMN], idle, *TABLE_COLUMNS[_IDLE_COLUMN + 1 :])


def render_table(results: Mapping[str, PathResult]) -> str:
    """The human table: medians per path, then each path against the kernel path."""
    rows: list[tuple[str, ...]] = []
    errors: list[str] = []
    for r in _ordered(results):
        if r.name in INTERCEPT_PATHS:
            continue  # their own table: `render_intercept`
        if r.error is not None:
            rows.append((r.label, "error", "-", "-", "-", "-", "-", "-"))
            errors.append(f"{r.name}: {r.error}")
            continue
        rows.append(
            (
                r.label,
                _fmt(r.p50_us),
                _fmt(r.p99_us),
                _fmt(r.conn_per_s),
                _fmt(r.bulk_mb_s, 1),
                _fmt(r.idle_rss_mib, 1),
                _fmt(r.cpu_us_per_conn),
                _fmt(r.cpu_ms_per_mb, 2),
            )
        )
        errors += [f"{r.name}: {measure} failed: {msg}" for measure, msg in r.failures]
    columns = _columns(results)
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(columns)]
    lines = [_row(columns, widths), _row(tuple("-" * w for w in widths), widths)]
    lines += [_row(row, widths) for row in rows]
    cmp = compare(results)
    others = [c for name, c in cmp.items() if name != KERNEL]
    if others:
        lines.append("")
        lines.append("vs kernel path: added p50 / added p99 / conn/s ratio / bulk ratio")
        width = max(8, *(len(c.path) for c in others))
        for c in others:
            lines.append(
                f"  {c.path:<{width}} {_signed(c.added_p50_us)} us / {_signed(c.added_p99_us)} us / "
                f"{_times(c.conn_ratio)} / {_times(c.bulk_ratio)}"
            )
    wrk_errors = [f"{r.name}: {r.errors} wrk errors" for r in _ordered(results) if r.errors]
    if errors or wrk_errors:
        lines.append("")
        lines += [f"! {e}" for e in (*errors, *wrk_errors)]
    return "\n".join(lines)


def render_goals(items: Sequence[Goal], title: str = "goals (issue 3, item 8):") -> str:
    lines = [title]
    for g in items:
        mark = {True: "met", False: "NOT met", None: "n/a"}[g.met]
        lines.append(f"  [{mark}] {g.text}: {_fmt(g.value, 1)} vs {_fmt(g.target, 1)}")
    return "\n".join(lines)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    first = f"{cells[0]:<{widths[0]}}"
    rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join([first, *rest]).rstrip()


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+,.0f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# --- interception (issue 12) ----------------------------------------------------------------

INTERCEPT_COLUMNS = ("path", "keep-alive req/s", "new TLS conn/s", "bulk MB/s", "p50 us", "p99 us")
# (JSON key, PathResult property, higher is better)
_INTERCEPT_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("keepalive_rps", "keepalive_rps", True),
    ("conn_per_s", "conn_per_s", True),
    ("bulk_mb_s", "bulk_mb_s", True),
    ("p50_us", "p50_us", False),
    ("p99_us", "p99_us", False),
)


def _samples(r: PathResult, key: str) -> list[float]:
    values: dict[str, list[float | None]] = {
        "keepalive_rps": [s.requests_per_s for s in r.latency],
        "conn_per_s": [s.requests_per_s for s in r.connrate],
        "bulk_mb_s": [s.mb_per_s for s in r.bulk],
        "p50_us": [s.p50_us for s in r.latency],
        "p99_us": [s.p99_us for s in r.latency],
    }
    return [v for v in values[key] if v is not None]


def intercept_ratios(results: Mapping[str, PathResult]) -> dict[str, float | None]:
    """egressd-intercept / squid-bump per metric (for latency, < 1 is better)."""
    e, s = results.get(EGRESSD_INTERCEPT), results.get(SQUID_BUMP)
    if e is None or s is None or e.error is not None or s.error is not None:
        return {}
    return {key: _ratio(getattr(e, attr), getattr(s, attr)) for key, attr, _ in _INTERCEPT_METRICS}


def intercept_goals(results: Mapping[str, PathResult]) -> list[Goal]:
    """Issue 12's goal: egressd intercepting at or above Squid bumping, metric by metric."""
    e, s = results.get(EGRESSD_INTERCEPT), results.get(SQUID_BUMP)
    ok = e is not None and s is not None and e.error is None and s.error is None
    out = []
    for key, attr, higher in _INTERCEPT_METRICS:
        value = getattr(e, attr) if ok and e is not None else None
        target = getattr(s, attr) if ok and s is not None else None
        met = _at_least(value, target) if higher else _at_most(value, target)
        text = f"egressd intercept {key} {'>=' if higher else '<='} Squid bump's"
        out.append(Goal(f"intercept_{key}_vs_squid", value, target, met, text))
    return out


def intercept_json(results: Mapping[str, PathResult]) -> dict[str, Any]:
    """Medians, each metric's range over the repeats, ratios and goals of the interception rows."""
    rows: dict[str, Any] = {}
    for name in INTERCEPT_PATHS:
        r = results.get(name)
        if r is None:
            continue
        row: dict[str, Any] = {"error": r.error}
        for key, attr, _ in _INTERCEPT_METRICS:
            samples = _samples(r, key)
            row[key] = _round(getattr(r, attr))
            row[f"{key}_range"] = [_round(min(samples)), _round(max(samples))] if samples else None
        rows[name] = row
    return {
        "rows": rows,
        "vs_squid_bump": {k: _round(v, 3) for k, v in intercept_ratios(results).items()},
        "goals": [g.to_dict() for g in intercept_goals(results)] if rows else [],
    }


def render_intercept(results: Mapping[str, PathResult]) -> str:
    """The interception table (HTTPS), the ratio to Squid and issue 12's goals; "" without rows."""
    present = [r for r in _ordered(results) if r.name in INTERCEPT_PATHS]
    if not present:
        return ""
    rows: list[tuple[str, ...]] = []
    problems: list[str] = []
    for r in present:
        if r.error is not None:
            rows.append((r.name, "error", "-", "-", "-", "-"))
            problems.append(f"{r.name}: {r.error}")
            continue
        rows.append(
            (
                r.name,
                _fmt(r.keepalive_rps),
                _fmt(r.conn_per_s),
                _fmt(r.bulk_mb_s, 1),
                _fmt(r.p50_us),
                _fmt(r.p99_us),
            )
        )
        problems += [f"{r.name}: {measure} failed: {msg}" for measure, msg in r.failures]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(INTERCEPT_COLUMNS)]
    lines = ["interception (HTTPS, same server): egressd tls: intercept vs Squid ssl_bump bump"]
    lines += [_row(INTERCEPT_COLUMNS, widths), _row(tuple("-" * w for w in widths), widths)]
    lines += [_row(row, widths) for row in rows]
    if ratios := intercept_ratios(results):
        lines.append("")
        lines.append(
            f"{EGRESSD_INTERCEPT} / {SQUID_BUMP}: keep-alive {_times(ratios['keepalive_rps'])}, "
            f"conn/s {_times(ratios['conn_per_s'])}, bulk {_times(ratios['bulk_mb_s'])}, "
            f"p50 {_times(ratios['p50_us'])}, p99 {_times(ratios['p99_us'])}"
        )
    if problems:
        lines.append("")
        lines += [f"! {p}" for p in problems]
    lines.append("")
    lines.append(render_goals(intercept_goals(results), title="goals (issue 12, interception):"))
    return "\n".join(lines)


# --- JSON ---------------------------------------------------------------------------------


def to_json(results: Mapping[str, PathResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The document `egressd bench --out` writes."""
    return {
        "schema": SCHEMA,
        "meta": dict(meta),
        "table": {
            r.name: {
                "p50_us": _round(r.p50_us),
                "p99_us": _round(r.p99_us),
                "conn_per_s": _round(r.conn_per_s),
                "bulk_mb_s": _round(r.bulk_mb_s),
                "proxy_rss_idle10k_mib": _round(r.idle_rss_mib),
                "cpu_us_per_conn": _round(r.cpu_us_per_conn),
                "cpu_ms_per_mb": _round(r.cpu_ms_per_mb, 2),
                "platform": r.platform,
                "error": r.error,
            }
            for r in _ordered(results)
        },
        "vs_kernel": {name: c.to_dict() for name, c in compare(results).items() if name != KERNEL},
        "goals": [g.to_dict() for g in goals(results)],
        "intercept": intercept_json(results),
        "paths": {r.name: r.to_dict() for r in _ordered(results)},
    }
