"""`egressd loadtest`: the I/O around the pure parts (fleet, namespaces, locust, scrapes).

    run(Options(...)) -> Report

1. brings up its own fleet (`--prefix`, `--run-dir`; refused if namespaces
   with that prefix exist already), torn down at the end whatever happens
   (exception, Ctrl-C, SIGTERM);
2. has the control plane sign one policy per job (the scenario's limits) and
   registers one load-generator namespace per job with its node's agent, as
   `egressd sandbox run` registers a sandbox: the agent makes the namespace,
   the veth, tier 1 and the routes. The load generator is a plain process in
   that namespace (not runsc): it measures the fleet's limits, not gVisor's
   netstack. `/etc/netns/NS/resolv.conf` names the sandbox resolver, so names
   resolve through the proxy's DNS as in a sandbox;
3. runs each phase: one headless locust process per job
   (`ip netns exec NS python -m locust ... --csv`, `-t` bounded), all of a
   phase at once; during the stress phase a thread scrapes every proxy's
   `/metrics` every `SAMPLE_INTERVAL_S` and keeps the gauges' maxima;
4. reads the CSV files and summaries, the proxies' metrics, liveness and
   logs, and hands an `Observed` to `assess`.

The flood scenarios' attacker is `egressd_harness.loadtest.flood`, not locust; the
runner also reads its veth's tier-1 counters and a tap in each proxy's
namespace before and after the load (`egressd_harness.loadtest.floodio`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.util
import ipaddress
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from egressd.agent.client import AgentClient, AgentClientError, SandboxInfo
from egressd.errors import EgressdError
from egressd.layout import ADMIN_PORT, RESOLVER, default_layout
from egressd.net import netns as kn
from egressd_harness.bench.load import LoadError, resolve_a
from egressd_harness.bench.paths import tune_client
from egressd_harness.bench.report import ParseError
from egressd_harness.loadtest import floodio
from egressd_harness.loadtest import results as r
from egressd_harness.loadtest.assess import M_ACTIVE, Observed, assess
from egressd_harness.loadtest.scenarios import (
    FLOODS,
    HTTP_PORT,
    MAX_FLOOD_S,
    SITE,
    JobSpec,
    Scenario,
    build,
)
from egressd_harness.loadtest.verdicts import Verdict
from egressd_harness.topology import procs
from egressd_harness.topology.fleet import DEFAULT_DATAPATH, Fleet, FleetError, down_logged
from egressd_harness.topology.probe import ProbeError, http_request, is_ready

log = structlog.get_logger("egressd_harness.loadtest")

DEFAULT_RUN_DIR = Path("/run/egressd-loadtest")
# locust's and the floods' raw output (CSV, logs): beside the JSON, not under /run.
RESULTS_DIR = Path("loadtest-results")
DEFAULT_PREFIX = "egd-lt-"
LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"
SAMPLE_INTERVAL_S = 0.5
LOCUST_STARTUP_S = 4.0  # from start to the first window: locust imports, users spawn
LOCUST_GRACE_S = 30.0  # past -t: start-up, the users' stop, the CSV writes
RELEASE_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 20.0
ETC_NETNS = Path("/etc/netns")


class LoadtestError(EgressdError):
    """The load test could not run (not its verdicts: those are results)."""


@dataclass(frozen=True, slots=True)
class Options:
    scenario: str
    duration_s: float
    prefix: str = DEFAULT_PREFIX
    run_dir: Path = DEFAULT_RUN_DIR
    out: Path | None = None
    locustfile: Path = LOCUSTFILE
    python: str = sys.executable
    datapath: str = DEFAULT_DATAPATH


@dataclass
class Report:
    scenario: Scenario
    verdicts: list[Verdict]
    observed: Observed
    meta: dict[str, Any] = field(default_factory=dict)


# --- preflight ------------------------------------------------------------------------------


def preflight(opts: Options) -> None:
    if os.geteuid() != 0:
        raise LoadtestError("not_root", "the load test creates network namespaces: run it as root")
    if importlib.util.find_spec("locust") is None:
        raise LoadtestError("no_locust", "locust is not installed (pip install -e '.[test]')")
    if shutil.which("ip") is None:
        raise LoadtestError("no_ip", "iproute2's `ip` is not installed")
    if not opts.locustfile.is_file():
        raise LoadtestError("no_locustfile", f"{opts.locustfile} not found")
    if taken := kn.list_netns(opts.prefix):
        raise LoadtestError(
            "prefix_in_use",
            f"namespaces with prefix {opts.prefix!r} exist ({', '.join(taken[:3])}...): "
            f"egressd topology down --prefix {opts.prefix} --run-dir {opts.run_dir}",
        )


# --- load generators ------------------------------------------------------------------------


class LoadGenerator:
    """A job's namespace: registered with its node's agent like a sandbox."""

    def __init__(self, fleet: Fleet, job: JobSpec) -> None:
        self.fleet = fleet
        self.job = job
        self.job_id = str(uuid.uuid4())
        self.sandbox_id = f"lt-{job.role}-{secrets.token_hex(3)}"
        self.info: SandboxInfo | None = None
        self._etc: Path | None = None
        self._made_etc_netns = False

    @property
    def netns(self) -> str:
        assert self.info is not None
        return self.info.netns

    def setup(self) -> None:
        try:
            jws = self.fleet.sign_policy(self.job.policy(self.job_id))
        except (FleetError, ProbeError) as exc:
            raise LoadtestError(
                "policy_not_signed", f"{self.job.role}: {exc.reason}: {exc.detail}"
            ) from exc
        try:
            self.info = asyncio.run(self._register(jws))
        except AgentClientError as exc:
            raise LoadtestError(
                "not_registered", f"{self.job.role}: {exc.reason}: {exc.detail}"
            ) from exc
        self._made_etc_netns = not ETC_NETNS.exists()
        self._etc = ETC_NETNS / self.info.netns
        self._etc.mkdir(parents=True, exist_ok=True)
        (self._etc / "resolv.conf").write_text(
            f"nameserver {self.info.resolver}\noptions timeout:2\n"
        )
        tune_client(self.info.netns)
        self._check()

    def _check(self) -> None:
        """The path works: the proxy's DNS answers the site's name, `GET /` answers 200."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            try:
                address = resolve_a(self.netns, RESOLVER, SITE)[0]
                reply = http_request(
                    self.netns,
                    "GET",
                    str(address),
                    HTTP_PORT,
                    "/",
                    headers={"Host": SITE},
                    timeout_s=2.0,
                )
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
            except (LoadError, ProbeError) as exc:
                last = f"{exc.reason}: {exc.detail}"
            time.sleep(0.2)
        raise LoadtestError("path_not_working", f"{self.job.role} in {self.netns}: {last}")

    async def _register(self, jws: str) -> SandboxInfo:
        async with AgentClient(self.fleet.agent_socket(self.job.node)) as agent:
            return await agent.register(self.sandbox_id, jws)

    async def _unregister(self) -> None:
        async with AgentClient(self.fleet.agent_socket(self.job.node)) as agent:
            await agent.unregister(self.sandbox_id)

    def close(self) -> None:
        etc, self._etc = self._etc, None
        if etc is not None:
            shutil.rmtree(etc, ignore_errors=True)
            if self._made_etc_netns:
                with contextlib.suppress(OSError):
                    ETC_NETNS.rmdir()  # only if empty
        info, self.info = self.info, None
        if info is None:
            return
        try:
            asyncio.run(self._unregister())
        except AgentClientError as exc:
            log.warning(
                "unregister_failed",
                sandbox_id=self.sandbox_id,
                reason=exc.reason,
                detail=exc.detail,
            )
            with contextlib.suppress(kn.NetError):
                kn.delete_netns(info.netns)


# --- locust ----------------------------------------------------------------------------------


class LocustRun:
    """One headless locust process for one job, through the whole schedule."""

    def __init__(
        self, opts: Options, gen: LoadGenerator, seconds: int, schedule: str, workdir: Path
    ) -> None:
        self.gen = gen
        self.base = workdir / gen.job.role
        self.summary_path = workdir / f"{gen.job.role}_summary.json"
        self.output = workdir / f"{gen.job.role}_locust.log"
        self.argv = [
            "ip",
            "netns",
            "exec",
            gen.netns,
            opts.python,
            "-m",
            "locust",
            "-f",
            str(opts.locustfile),
            "--headless",
            "--host",
            f"http://{SITE}",
            "-u",
            str(gen.job.users),
            "-r",
            str(gen.job.users),
            "-t",
            f"{seconds}s",
            "--csv",
            str(self.base),
            "--only-summary",
            "--loglevel",
            "WARNING",
            gen.job.user_class,
        ]
        self.timeout_s = seconds + LOCUST_GRACE_S
        self.env = {
            **os.environ,
            **gen.job.env,
            "EGRESSD_LT_SUMMARY": str(self.summary_path),
            "EGRESSD_LT_SCHEDULE": schedule,
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.started = time.monotonic()
        log.info(
            "locust_started",
            role=self.gen.job.role,
            pid=self.proc.pid,
            users=self.gen.job.users,
            netns=self.gen.netns,
        )

    def wait(self) -> int:
        assert self.proc is not None
        remaining = max(0.0, self.timeout_s - (time.monotonic() - self.started))
        try:
            return self.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            log.error("locust_overran", role=self.gen.job.role)
            self.stop()
            return -1

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def read(self) -> tuple[dict[str, r.RequestStats], list[r.Failure], dict[str, Any]]:
        stats = failures = None
        with contextlib.suppress(OSError):
            stats = r.parse_stats_csv(Path(f"{self.base}_stats.csv").read_text())
        with contextlib.suppress(OSError):
            failures = r.parse_failures_csv(Path(f"{self.base}_failures.csv").read_text())
        summary: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads(self.summary_path.read_text())
        return stats or {}, failures or [], summary

    def tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        return ""


# --- metrics -----------------------------------------------------------------------------------


class Scraper:
    """`/metrics` of every proxy over one keep-alive connection each, opened
    inside the proxy's namespace (the admin port is on its underlay address)."""

    def __init__(self, fleet: Fleet) -> None:
        self.targets = {p.name: (fleet.ns(p.netns), str(p.underlay)) for p in fleet.layout.proxies}
        self._conns: dict[str, http.client.HTTPConnection] = {}

    def _conn(self, proxy: str) -> http.client.HTTPConnection:
        conn = self._conns.get(proxy)
        if conn is None:
            ns, addr = self.targets[proxy]
            sock = kn.netns_socket(ns)
            sock.settimeout(2.0)
            sock.connect((addr, ADMIN_PORT))
            conn = http.client.HTTPConnection(addr, ADMIN_PORT, timeout=2.0)
            conn.sock = sock
            self._conns[proxy] = conn
        return conn

    def scrape(self, proxy: str) -> r.Scrape | None:
        for _attempt in range(2):
            try:
                conn = self._conn(proxy)
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    return None
                return r.parse_metrics(body.decode())
            except (OSError, http.client.HTTPException, kn.NetError):
                self.close(proxy)
            except ParseError:
                return None
        return None

    def scrape_all(self) -> dict[str, r.Scrape]:
        return {p: s for p in self.targets if (s := self.scrape(p)) is not None}

    def close(self, proxy: str | None = None) -> None:
        for name in [proxy] if proxy else list(self._conns):
            conn = self._conns.pop(name, None)
            if conn is not None:
                conn.close()


class Sampler(threading.Thread):
    """Scrapes every proxy every `interval_s` into a `GaugeMax` until stopped."""

    def __init__(
        self, fleet: Fleet, gauges: r.GaugeMax, interval_s: float = SAMPLE_INTERVAL_S
    ) -> None:
        super().__init__(name="loadtest-sampler", daemon=True)
        self.scraper = Scraper(fleet)
        self.gauges = gauges
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                for proxy, scrape in self.scraper.scrape_all().items():
                    self.gauges.update(proxy, scrape)
                self._stop_event.wait(self.interval_s)
        finally:
            self.scraper.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


# --- the run -------------------------------------------------------------------------------------


def _log_offsets(fleet: Fleet, components: list[str]) -> dict[str, int]:
    out = {}
    for name in components:
        try:
            out[name] = procs.log_file(fleet.run_dir, name).stat().st_size
        except OSError:
            out[name] = 0
    return out


def _read_from(fleet: Fleet, name: str, offset: int) -> str:
    try:
        with open(procs.log_file(fleet.run_dir, name), "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_cpu(fleet: Fleet) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for component in fleet.components():
        pid = procs.running_pid(fleet.run_dir, component.name)
        out[component.name] = cpu_seconds(pid) if pid is not None else None
    return out


def _run_load(
    opts: Options,
    fleet: Fleet,
    gens: Mapping[str, LoadGenerator],
    scenario: Scenario,
    workdir: Path,
    obs: Observed,
    stack: contextlib.ExitStack,
) -> None:
    """Every job's locust process at once, through the scenario's schedule."""
    t0 = time.time() + LOCUST_STARTUP_S
    schedule = scenario.schedule(t0)
    obs.schedule_t0 = t0
    seconds = math.ceil(LOCUST_STARTUP_S + scenario.windows[-1].end + 1.0)
    runs: list[LocustRun | floodio.FloodRun] = []
    for job in scenario.jobs:
        gen = gens[job.role]
        if job.driver == "flood":
            assert gen.info is not None
            dst = ipaddress.IPv4Address(obs.flood_target) if obs.flood_target else None
            runs.append(
                floodio.FloodRun(
                    opts.python,
                    gen.netns,
                    job.user_class,
                    schedule,
                    seconds,
                    float(job.env["rate"]),
                    MAX_FLOOD_S,
                    workdir,
                    job.role,
                    src=gen.info.ip,
                    dst=dst,
                    port=HTTP_PORT,
                )
            )
        else:
            runs.append(LocustRun(opts, gen, seconds, schedule, workdir))
    sampler = Sampler(fleet, obs.gauges)
    sampler.start()
    stack.callback(sampler.stop)
    log.info(
        "load_start",
        roles=[j.role for j in scenario.jobs],
        seconds=seconds,
        windows=[f"{w.phase} {w.seconds:g}s" for w in scenario.windows],
    )
    cpu_before, started = _daemon_cpu(fleet), time.monotonic()
    for run in runs:
        stack.callback(run.stop)
        run.start()
    codes = {_role(run): run.wait() for run in runs}
    sampler.stop()
    cpu_after, elapsed = _daemon_cpu(fleet), time.monotonic() - started
    obs.cpu = {
        name: round((after - before) / elapsed, 3)
        for name, after in cpu_after.items()
        if after is not None and (before := cpu_before.get(name)) is not None
    }
    for run in runs:
        role = _role(run)
        if isinstance(run, floodio.FloodRun):
            obs.summaries[role] = run.read()
            log.info(
                "flood_done", role=role, exit=codes[role], summary=obs.summaries[role] or run.tail()
            )
            continue
        stats, failures, summary = run.read()
        obs.totals[role] = stats.get(r.AGGREGATED)
        for phase, row in r.rows_by_phase(stats).items():
            obs.stats.setdefault(phase, {})[role] = row
        obs.failures[role] = failures
        obs.summaries[role] = summary
        if not stats:
            log.error("locust_no_stats", role=role, exit=codes[role], output=run.tail())
        else:
            total = stats.get(r.AGGREGATED)
            log.info(
                "locust_done",
                role=role,
                exit=codes[role],
                requests=total.requests if total else None,
                failures=total.failures if total else None,
            )


def _role(run: LocustRun | floodio.FloodRun) -> str:
    return run.role if isinstance(run, floodio.FloodRun) else run.gen.job.role


def _flood_probes(
    fleet: Fleet, attacker: LoadGenerator, obs: Observed, stack: contextlib.ExitStack
) -> tuple[floodio.Tier1Probe, floodio.ProxyTap]:
    """The attacker's tier-1 counters and the proxies' tap; the SYN target."""
    info = attacker.info
    assert info is not None
    node = fleet.layout.node(attacker.job.node)
    probe = floodio.Tier1Probe(
        fleet.run_dir / "agents" / node.name / "bpffs",
        fleet.ns(node.netns),
        str(info.raw["host_veth"]),
    )
    tap = floodio.ProxyTap({p.name: fleet.ns(p.netns) for p in fleet.layout.proxies})
    stack.callback(tap.remove)
    try:
        tap.install(info.ip)
        obs.flood_target = str(resolve_a(attacker.netns, RESOLVER, SITE)[0])
    except (kn.NetError, LoadError) as exc:
        raise LoadtestError("flood_setup_failed", f"{exc.reason}: {exc.detail}") from exc
    obs.attacker_ip = str(info.ip)
    obs.attacker_sandbox = attacker.sandbox_id
    return probe, tap


def _agent_scraper(fleet: Fleet, node_name: str) -> Scraper:
    """A `Scraper` of one node agent's /metrics (same admin port, on its underlay)."""
    scraper = Scraper(fleet)
    node = fleet.layout.node(node_name)
    scraper.targets = {node.name: (fleet.ns(node.netns), str(node.underlay))}
    return scraper


def _wait_released(scraper: Scraper, proxies: list[str]) -> tuple[dict[str, float | None], float]:
    start = time.monotonic()
    while True:
        scrapes = scraper.scrape_all()
        active: dict[str, float | None] = {
            p: (
                r.metric_sum(scrapes[p], M_ACTIVE)
                if p in scrapes and r.metric_present(scrapes[p], M_ACTIVE)
                else None
            )
            for p in proxies
        }
        waited = time.monotonic() - start
        if all(v == 0 for v in active.values()) or waited > RELEASE_TIMEOUT_S:
            return active, waited
        time.sleep(0.5)


def run(opts: Options) -> Report:
    scenario = build(opts.scenario, opts.duration_s)
    preflight(opts)
    fleet = Fleet(
        default_layout(opts.run_dir, opts.prefix), python=opts.python, datapath=opts.datapath
    )
    proxies = [p.name for p in fleet.layout.proxies]
    components = proxies + [n.name for n in fleet.layout.nodes]
    started_at = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    workdir = RESULTS_DIR.absolute() / f"{scenario.name}-{stamp}"
    obs = Observed(proxies=proxies, job_ids={})
    with contextlib.ExitStack() as stack:
        stack.callback(down_logged, fleet)
        log.info("fleet_up", prefix=opts.prefix, run_dir=str(opts.run_dir))
        fleet.up()
        workdir.mkdir(parents=True, exist_ok=True)
        offsets = _log_offsets(fleet, components)
        gens: dict[str, LoadGenerator] = {}
        for job in scenario.jobs:
            gen = LoadGenerator(fleet, job)
            stack.callback(gen.close)
            gen.setup()
            gens[job.role] = gen
            log.info(
                "load_generator_ready",
                role=job.role,
                netns=gen.netns,
                node=job.node,
                job_id=gen.job_id,
            )
        obs.job_ids = {role: gen.job_id for role, gen in gens.items()}
        scraper = Scraper(fleet)
        stack.callback(scraper.close)
        probes = (
            _flood_probes(fleet, gens["attacker"], obs, stack) if scenario.name in FLOODS else None
        )
        if probes is not None:
            agent = _agent_scraper(fleet, gens["attacker"].job.node)
            stack.callback(agent.close)
            obs.tier1_before, obs.tap_before = probes[0].read(), probes[1].read()
            obs.agent_before = agent.scrape_all().get(gens["attacker"].job.node)
        obs.before = scraper.scrape_all()
        _run_load(opts, fleet, gens, scenario, workdir, obs, stack)
        if probes is not None:
            obs.tier1_after, obs.tap_after = probes[0].read(), probes[1].read()
            obs.agent_after = agent.scrape_all().get(gens["attacker"].job.node)
        obs.active_after, obs.released_wait_s = _wait_released(scraper, proxies)
        obs.after = scraper.scrape_all()
        obs.alive = {
            p.name: procs.running_pid(fleet.run_dir, p.name) is not None
            and is_ready(fleet.ns(p.netns), str(p.underlay), ADMIN_PORT)
            for p in fleet.layout.proxies
        }
        obs.log_components = components
        for name in components:
            obs.log_problems += r.scan_log(name, _read_from(fleet, name, offsets[name]))
        for role, gen in gens.items():
            denied: dict[str, int] = {}
            for proxy in proxies:
                for reason, n in r.deny_reasons(
                    _read_from(fleet, proxy, offsets[proxy]), gen.job_id
                ).items():
                    denied[reason] = denied.get(reason, 0) + n
            obs.audit_denials[role] = denied
    finished_at = dt.datetime.now(dt.UTC)
    verdicts = assess(scenario, obs)
    meta = {
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "prefix": opts.prefix,
        "datapath": opts.datapath,
        "run_dir": str(opts.run_dir),
        "workdir": str(workdir),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "load_generators": "plain network namespaces registered with the node agents like sandboxes "
        "(same veth, tier-1 eBPF, GENEVE, proxy); locust runs on the kernel's stack, "
        "not under runsc",
    }
    return Report(scenario, verdicts, obs, meta)
