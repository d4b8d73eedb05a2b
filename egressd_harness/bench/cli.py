"""`egressd bench`: kernel path vs Squid vs egressd, one run, one table, one JSON file.

    egressd bench [--run-dir DIR] [--prefix egd-b-] [--seconds 5] [--repeat 3]
                  [--out bench-results/data_path.json] [--skip-squid] [--keep] [--no-plots]
                  [--skip-intercept | --intercept-only]
                  [--skip-gvisor] [--gvisor-platform ptrace|kvm|systrap]

The fleet (`--prefix`, `--run-dir`) is brought up if it is not running and,
when this command started it, taken down at the end unless `--keep`. The
bench's own namespaces (`{prefix}direct`, `{prefix}squid`, `{prefix}sqcl`),
Squid, its nftables table and the bench sandbox are always removed, also
after a failure or Ctrl-C/SIGTERM.

Measures, each repeated `--repeat` times with the paths interleaved
(kernel, squid, egressd, kernel, ...) so that drift hits every path alike;
the table shows medians:

- latency: wrk, one connection, one thread, keep-alive, `GET /` for
  `--seconds` after a 1 s warm-up: p50 and p99;
- conn/s: wrk, `--connections` clients, `Connection: close`, `GET /`;
- bulk: curl, one `GET /bytes/N` (`--bulk-bytes`), MB/s;
- idle: `--idle-connections` keep-alive connections held open; the RSS of
  the proxy processes before and after (egressd: both proxies summed, Squid:
  its one process).

The interception rows (issue 12), in the default run: `squid-bump` (Squid
`ssl_bump bump`) and `egressd-intercept` (`tls: intercept`), HTTPS to the
same server, the same measures (the latency run's requests/s is the
keep-alive figure), no idle measure; a table of their own, compared with
each other only (`report.render_intercept`). `--skip-intercept` leaves them
out, `--intercept-only` runs only them and the kernel path.

Beside the JSON, `OUT.png`: the medians and ratios as bar charts with every
repeat's value (`egressd_harness.bench.plots`; `--no-plots` leaves it out).

Issue 10: `egressd-gvisor`, the egressd path with wrk and curl inside a runsc
sandbox (`egressd sandbox run --platform P`, the platform printed with the
row; `--skip-gvisor` leaves it out); CPU time per connection (conn/s runs)
and per MB (bulk) of each path's processes from /proc (`cpu`); and the
issue's goals as ratios of this run's medians, egressd against Squid
(`ratios`), printed and in the JSON under `issue10`.

A path that cannot be set up (the egressd path while the agent or proxy has
a bug, say) is reported as an error line; the kernel path must work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from egressd import logs
from egressd.cliutil import CliError
from egressd.errors import EgressdError
from egressd.layout import default_layout
from egressd.proxy.config import DATAPATHS
from egressd.signals import Stopped, sigterm_unwinds
from egressd_harness import plotting
from egressd_harness.bench import cpu, plots, ratios, report
from egressd_harness.bench.gvisor import DEFAULT_PLATFORM, PLATFORMS, GvisorPath
from egressd_harness.bench.load import (
    IdleHolder,
    LoadError,
    Target,
    fd_count,
    rss_kib,
    run_bulk,
    run_wrk,
)
from egressd_harness.bench.paths import (
    CLIENT_SYSCTLS,
    SQUID_CERTGEN,
    BenchPath,
    DirectPath,
    EgressdInterceptPath,
    EgressdPath,
    SquidBumpPath,
    SquidPath,
)
from egressd_harness.bench.report import INTERCEPT_PATHS, IdleResult, PathResult
from egressd_harness.topology.fleet import DEFAULT_DATAPATH, Fleet, down_logged

log = structlog.get_logger("egressd_harness.bench")

DEFAULT_RUN_DIR = Path("/run/egressd-bench")
DEFAULT_PREFIX = "egd-b-"
DEFAULT_OUT = Path("bench-results/data_path.json")
INET_MAX_BYTES = 200 * 1024 * 1024  # the internet daemon's cap on /bytes/N
WARMUP_S = 1.0
IDLE_SETTLE_S = 2.0
IDLE_CPU_S = 2.0  # the window of each path's background CPU figure
# After the client closes its idle connections, how long the proxies get to
# release them, and how many descriptors above the start may remain.
DRAIN_TIMEOUT_S = 30.0
DRAIN_SLACK_FDS = 16
TOOLS = ("wrk", "curl", "nft", "nsenter")


@dataclass(frozen=True, slots=True)
class Options:
    run_dir: Path = DEFAULT_RUN_DIR
    prefix: str = DEFAULT_PREFIX
    seconds: float = 5.0
    repeat: int = 3
    connections: int = 32
    threads: int = 2
    bulk_bytes: int = INET_MAX_BYTES
    idle_connections: int = 10_000
    skip_squid: bool = False
    skip_egressd: bool = False
    # The interception rows (issue 12): HTTPS through Squid `ssl_bump bump` and
    # egressd `tls: intercept`. `intercept_only` leaves out the plain Squid and
    # egressd rows and the idle measure (the kernel path still runs: it is the
    # bench's check that the topology works).
    skip_intercept: bool = False
    intercept_only: bool = False
    # The gVisor row (issue 10): the client inside runsc, on this platform.
    skip_gvisor: bool = False
    gvisor_platform: str = DEFAULT_PLATFORM
    # The fleet's data path (agents and proxies, topology.fleet.Fleet); a fleet that is
    # already running is measured as it is.
    datapath: str = DEFAULT_DATAPATH
    keep: bool = False
    out: Path = DEFAULT_OUT

    def __post_init__(self) -> None:
        if self.seconds < 1:
            raise ValueError("--seconds must be at least 1")
        if self.repeat < 1:
            raise ValueError("--repeat must be at least 1")
        if not 1 <= self.connections <= 10_000:
            raise ValueError("--connections must be 1..10000")
        if not 1 <= self.threads <= self.connections:
            raise ValueError("--threads must be 1..connections")
        if not 1 <= self.bulk_bytes <= INET_MAX_BYTES:
            raise ValueError(f"--bulk-bytes must be 1..{INET_MAX_BYTES}")
        if not 0 <= self.idle_connections <= 60_000:
            raise ValueError("--idle-connections must be 0..60000")
        if self.skip_intercept and self.intercept_only:
            raise ValueError("--skip-intercept and --intercept-only exclude each other")
        if self.gvisor_platform not in PLATFORMS:
            raise ValueError(f"--gvisor-platform must be one of {', '.join(PLATFORMS)}")
        if self.datapath not in DATAPATHS:
            raise ValueError(f"--datapath must be one of {', '.join(DATAPATHS)}")


class BenchError(EgressdError):
    """The bench cannot run at all (missing tool, the kernel path broken)."""


# --- the run -------------------------------------------------------------------------


@dataclass(slots=True)
class _Live:
    path: BenchPath
    target: Target
    result: PathResult


def preflight(opts: Options) -> None:
    if os.geteuid() != 0:
        raise BenchError("not_root", "the bench creates network namespaces: run it as root")
    wanted = (
        *TOOLS,
        *(() if opts.skip_squid else ("squid",)),
        *(() if opts.skip_intercept else ("unshare",)),
        *(() if opts.skip_intercept or opts.skip_squid else (SQUID_CERTGEN,)),
        *(() if not _gvisor_wanted(opts) else ("runsc", "getent")),
    )
    missing = [t for t in wanted if not shutil.which(t)]
    if missing:
        raise BenchError(
            "missing_tools",
            f"not installed: {', '.join(missing)} "
            "(apt-get install wrk curl nftables squid-openssl util-linux)",
        )


def _gvisor_wanted(opts: Options) -> bool:
    return not (opts.skip_gvisor or opts.skip_egressd or opts.intercept_only)


def _measure(live: list[_Live], name: str, opts: Options, once: Callable[[_Live], None]) -> None:
    for rep in range(opts.repeat):
        for item in live:
            if item.result.error is not None:
                continue
            item.path.refresh()
            log.info("measure", measure=name, path=item.result.name, rep=rep + 1, of=opts.repeat)
            try:
                once(item)
            except LoadError as exc:
                item.result.failures.append((name, f"{exc.reason}: {exc.detail}"))
                log.warning(
                    "measure_failed",
                    measure=name,
                    path=item.result.name,
                    reason=exc.reason,
                    detail=exc.detail,
                )


def _latency(opts: Options) -> Callable[[_Live], None]:
    def once(item: _Live) -> None:
        run_wrk(item.target, seconds=WARMUP_S, connections=1, threads=1)
        item.result.latency.append(
            run_wrk(item.target, seconds=opts.seconds, connections=1, threads=1, latency=True)
        )

    return once


def _connrate(opts: Options) -> Callable[[_Live], None]:
    def once(item: _Live) -> None:
        roots = item.path.cpu_roots()
        before = cpu.snapshot(roots)
        result = run_wrk(
            item.target,
            seconds=opts.seconds,
            connections=opts.connections,
            threads=opts.threads,
            close=True,
        )
        after = cpu.snapshot(roots)
        item.result.connrate.append(result)
        if roots:  # every request closes its connection: requests = connections
            sample = cpu.sample(before, after, hz=cpu.clock_ticks(), connections=result.requests)
            item.result.connrate_cpu.append(sample)

    return once


def _bulk(opts: Options) -> Callable[[_Live], None]:
    def once(item: _Live) -> None:
        roots = item.path.cpu_roots()
        before = cpu.snapshot(roots)
        result = run_bulk(item.target, opts.bulk_bytes)
        after = cpu.snapshot(roots)
        item.result.bulk.append(result)
        if roots:
            sample = cpu.sample(before, after, hz=cpu.clock_ticks(), nbytes=result.nbytes)
            item.result.bulk_cpu.append(sample)

    return once


def measure_idle(item: _Live, count: int) -> IdleResult | None:
    """RSS of the path's proxy processes before and after `count` idle connections."""
    processes = item.path.processes()
    if not processes:
        return None
    before = {name: rss_kib(pid) for name, pid in processes.items()}
    fds_before = {name: fd_count(pid) for name, pid in processes.items()}
    with IdleHolder(item.target, count) as holder:
        opened = holder.open()
        time.sleep(IDLE_SETTLE_S)
        after = {name: rss_kib(pid) for name, pid in processes.items()}
        fds_after = {name: fd_count(pid) for name, pid in processes.items()}
        alive = holder.alive()
    drained, fds_closed = _drain(processes, sum(fds_before.values()) + DRAIN_SLACK_FDS)
    rss_closed = {name: rss_kib(pid) for name, pid in processes.items()}
    if opened.failed:
        item.result.failures.append(
            ("idle", f"{opened.failed} of {count} connections failed; first: {opened.first_error}")
        )
    result = IdleResult(
        requested=count,
        opened=opened.opened,
        failed=opened.failed,
        alive_at_measure=alive,
        rss_before_kib=before,
        rss_after_kib=after,
        fds_before=fds_before,
        fds_after=fds_after,
        open_seconds=opened.seconds,
        rss_closed_kib=rss_closed,
        fds_closed=fds_closed,
        drain_seconds=drained,
    )
    if drained is None:
        names = ", ".join(processes)
        message = (
            f"{result.lingering} descriptors still open in {names} "
            f"{DRAIN_TIMEOUT_S:.0f}s after the client closed its connections"
        )
        item.result.failures.append(("idle", message))
    return result


def _drain(processes: dict[str, int], target_fds: int) -> tuple[float | None, dict[str, int]]:
    """Wait until the processes hold at most `target_fds` descriptors in all.

    Returns the seconds it took (None on timeout) and the last counts.
    """
    start = time.monotonic()
    while True:
        fds = {name: fd_count(pid) for name, pid in processes.items()}
        elapsed = time.monotonic() - start
        if sum(fds.values()) <= target_fds:
            return elapsed, fds
        if elapsed > DRAIN_TIMEOUT_S:
            return None, fds
        time.sleep(0.2)


def _fleet_running(fleet: Fleet) -> bool:
    try:
        return all(s.ready for s in fleet.status())
    except EgressdError:
        return False


def _setup(
    path: BenchPath, results: dict[str, PathResult], stack: contextlib.ExitStack, *, required: bool
) -> _Live | None:
    result = PathResult(name=path.name, description=path.description)
    results[path.name] = result
    stack.callback(_teardown, path)
    log.info("path_setup", path=path.name)
    try:
        target = path.setup()
    except (EgressdError, OSError) as exc:
        reason = getattr(exc, "reason", type(exc).__name__)
        detail = getattr(exc, "detail", str(exc))
        if required:
            raise BenchError("baseline_failed", f"{path.name}: {reason}: {detail}") from exc
        result.error = f"{reason}: {detail}"
        log.error("path_failed", path=path.name, reason=reason, detail=detail)
        return None
    result.proxy_processes = len(path.processes())
    if isinstance(path, GvisorPath):
        result.platform = path.platform
    result.idle_cpu_s_per_s = _idle_cpu(path.cpu_roots())
    return _Live(path, target, result)


def _idle_cpu(roots: dict[str, int]) -> float | None:
    """CPU seconds per second the path's processes spend with no load (their background)."""
    if not roots:
        return None
    before = cpu.snapshot(roots)
    time.sleep(IDLE_CPU_S)
    return cpu.sample(before, cpu.snapshot(roots), hz=cpu.clock_ticks()).total_s / IDLE_CPU_S


def _teardown(path: BenchPath) -> None:
    try:
        path.teardown()
    except (EgressdError, OSError) as exc:
        log.error("path_teardown_failed", path=path.name, error=str(exc))


def run_bench(opts: Options) -> tuple[dict[str, PathResult], dict[str, Any]]:
    """Set up, measure and tear down; the per-path results and the run's metadata."""
    preflight(opts)
    layout = default_layout(opts.run_dir, opts.prefix)
    fleet = Fleet(layout, datapath=opts.datapath)
    results: dict[str, PathResult] = {}
    started_at = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        was_running = _fleet_running(fleet)
        if not was_running:
            log.info("fleet_up", run_dir=str(opts.run_dir), prefix=opts.prefix)
            if not opts.keep:
                stack.callback(down_logged, fleet)
            fleet.up()
        live: list[_Live] = []
        kernel = _setup(DirectPath(layout), results, stack, required=True)
        assert kernel is not None
        live.append(kernel)
        # The server hashes /bytes/N once and caches it: pay that outside the measures.
        try:
            run_bulk(kernel.target, opts.bulk_bytes)
        except LoadError as exc:
            raise BenchError("baseline_failed", f"kernel bulk: {exc.reason}: {exc.detail}") from exc
        optional: list[BenchPath] = []
        plain = not opts.intercept_only
        if not opts.skip_squid and plain:
            optional.append(SquidPath(layout))
        if not opts.skip_egressd and plain:
            optional.append(EgressdPath(fleet))
        if _gvisor_wanted(opts):
            optional.append(GvisorPath(fleet, platform=opts.gvisor_platform))
        if not opts.skip_intercept:
            if not opts.skip_squid:
                optional.append(SquidBumpPath(layout))
            if not opts.skip_egressd:
                optional.append(EgressdInterceptPath(fleet))
        for path in optional:
            if (item := _setup(path, results, stack, required=False)) is not None:
                live.append(item)
        _measure(live, "latency", opts, _latency(opts))
        _measure(live, "connrate", opts, _connrate(opts))
        _measure(live, "bulk", opts, _bulk(opts))
        if opts.idle_connections and not opts.intercept_only:
            for item in live:
                if not item.path.processes() or item.result.name in INTERCEPT_PATHS:
                    continue  # no proxy process to weigh (kernel), or HTTPS (the holder is HTTP)
                item.path.refresh()
                log.info(
                    "measure",
                    measure="idle",
                    path=item.result.name,
                    connections=opts.idle_connections,
                )
                try:
                    item.result.idle = measure_idle(item, opts.idle_connections)
                except LoadError as exc:
                    item.result.failures.append(("idle", f"{exc.reason}: {exc.detail}"))
        finished_at = dt.datetime.now(dt.UTC)
    meta = _meta(opts, started_at, finished_at, was_running)
    meta["host"]["loadavg_before"] = [round(x, 2) for x in load_before]
    meta["host"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results, meta


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _meta(
    opts: Options, started: dt.datetime, finished: dt.datetime, fleet_was_running: bool
) -> dict[str, Any]:
    return {
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "tools": {
            "wrk": _version(["wrk", "--version"]),
            "curl": _version(["curl", "--version"]),
            "squid": None if opts.skip_squid else _version(["squid", "-v"]),
        },
        "options": {
            "prefix": opts.prefix,
            "run_dir": str(opts.run_dir),
            "seconds": opts.seconds,
            "repeat": opts.repeat,
            "connections": opts.connections,
            "threads": opts.threads,
            "bulk_bytes": opts.bulk_bytes,
            "idle_connections": opts.idle_connections,
            "skip_intercept": opts.skip_intercept,
            "intercept_only": opts.intercept_only,
            "skip_gvisor": opts.skip_gvisor,
            "gvisor_platform": opts.gvisor_platform,
            "datapath": opts.datapath,
        },
        "fleet_was_running": fleet_was_running,
        "client_sysctls": dict(CLIENT_SYSCTLS),
        "statistic": "median",
        "server": "egressd inet (aiohttp on uvloop, one process) at 203.0.113.10:80",
        "note": "the egressd row's load runs as a plain process in the sandbox netns (the "
        "network path); the egressd-gvisor row runs it inside runsc (gVisor's netstack and "
        "syscall platform included)",
        "cpu": "utime+stime(+reaped children) from /proc/PID/stat of each path's process trees "
        "(egressd: the proxies and the node's agent; Squid: squid and its children); softirq "
        "work charged to other processes is not counted",
    }


# --- command line ------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> Options:
    return Options(
        run_dir=Path(args.run_dir),
        prefix=args.prefix,
        seconds=args.seconds,
        repeat=args.repeat,
        connections=args.connections,
        threads=args.threads,
        bulk_bytes=args.bulk_bytes,
        idle_connections=args.idle_connections,
        skip_squid=args.skip_squid,
        skip_egressd=args.skip_egressd,
        skip_intercept=args.skip_intercept,
        intercept_only=args.intercept_only,
        skip_gvisor=args.skip_gvisor,
        gvisor_platform=args.gvisor_platform,
        datapath=args.datapath,
        keep=args.keep,
        out=Path(args.out),
    )


def _handle(args: argparse.Namespace) -> int:
    logs.configure(json=False)
    try:
        opts = _options(args)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if not args.no_plots and not plotting.available():
        raise CliError(plotting.MISSING)
    try:
        with sigterm_unwinds():
            results, meta = run_bench(opts)  # an EgressdError: one line from cli.main
    except Stopped:
        print("egressd: bench stopped (SIGTERM); everything it set up was removed", file=sys.stderr)
        return 143
    doc = report.to_json(results, meta)
    goals10 = ratios.ratios(results)
    doc["issue10"] = ratios.to_json(goals10)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(report.render_table(results))
    print()
    print(report.render_goals(report.goals(results)))
    print()
    print(ratios.render(goals10, opts.repeat))
    if intercept := report.render_intercept(results):
        print()
        print(intercept)
    print(f"\nJSON: {opts.out}")
    for png in [] if args.no_plots else plotting.write_beside(plots.write, doc, opts.out):
        print(f"PNG: {png}")
    return 0 if all(r.error is None and not r.failures for r in results.values()) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "bench", help="data-path benchmark: kernel vs Squid vs egressd (table + JSON)"
    )
    d = Options()
    parser.add_argument(
        "--run-dir",
        default=str(d.run_dir),
        help=f"the bench fleet's run directory (default {d.run_dir})",
    )
    parser.add_argument(
        "--prefix",
        default=d.prefix,
        help=f"namespace prefix of the bench fleet (default {d.prefix})",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=d.seconds,
        help="duration of each wrk run (default %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=d.repeat,
        help="repetitions of each measure; the table shows medians (default 3)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=d.connections,
        help="concurrent clients of the conn/s measure (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="wrk threads of the conn/s measure (default %(default)s)",
    )
    parser.add_argument(
        "--bulk-bytes",
        type=int,
        default=d.bulk_bytes,
        help="size of the bulk download (default 200 MiB, the server's cap)",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=d.idle_connections,
        help="idle connections for the memory measure; 0 skips it",
    )
    parser.add_argument("--out", default=str(d.out), help="JSON output (default %(default)s)")
    parser.add_argument("--skip-squid", action="store_true", help="do not measure Squid")
    parser.add_argument("--skip-egressd", action="store_true", help="do not measure egressd")
    parser.add_argument(
        "--skip-intercept",
        action="store_true",
        help="leave out the HTTPS interception rows (Squid bump, egressd intercept)",
    )
    parser.add_argument(
        "--intercept-only",
        action="store_true",
        help="only the kernel path and the interception rows (no idle measure)",
    )
    parser.add_argument(
        "--skip-gvisor",
        action="store_true",
        help="leave out the egressd row with the client inside a gVisor sandbox",
    )
    parser.add_argument(
        "--gvisor-platform",
        default=d.gvisor_platform,
        choices=PLATFORMS,
        help="runsc --platform of the gVisor row (default %(default)s; kvm needs /dev/kvm)",
    )
    parser.add_argument(
        "--datapath",
        default=d.datapath,
        choices=DATAPATHS,
        help="data path of the fleet's agents and proxies (default %(default)s)",
    )
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="no PNG beside the JSON (default: OUT with .png, needs matplotlib)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the fleet running if this command started it"
    )
    parser.set_defaults(handler=_handle)
