"""The fleet demo's core (pure but for the backend it is handed): two jobs, their attempts,
and the verdicts read back from where the fleet decides them.

Job A (api.allowed.test and *.data.allowed.test, node1) and job B (evil.test only) each get
a signed policy and run the example probe UDF (`sandbox/udfs/probe.py`) in a gVisor sandbox.
Every attempt is then judged from the fleet's own records, never from the probe's view alone:
the proxies' audit events of that job (DNS and connection) and the node agent's tier-1 drop
counters (read with `egressd.metrics_text`, before and after the job). The table and its last
line (`N of M verdicts as expected`) are the output every entry point prints and the tests
read.

A `Backend` is where the fleet is: `netns` (the local topology, `egressd demo`) or `compose`
(the compose fleet's `demo` service). It signs, runs the probe, and hands over a node's
`/metrics` page and the proxies' log lines; deciding what they mean is done here, once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from egressd.layout import Layout
from egressd.metrics_text import by_label, parse

#: The probe UDF and its arguments before the targets.
PROBE_UDF = "probe.py"
PROBE_ARGS = ("--timeout", "3")
#: Sandbox timeout of one job's probe run, seconds.
SANDBOX_TIMEOUT_S = 120

Event = dict[str, object]


@dataclass(frozen=True, slots=True)
class Expectation:
    target: str
    verdict: str  # "allow" or "deny"
    where: str  # "proxy:connection", "proxy:dns", "tier1:<reason>"
    host: str | None = None
    dst: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    label: str
    node: str
    hosts: tuple[tuple[str, tuple[int, ...]], ...]
    expectations: tuple[Expectation, ...]

    @property
    def targets(self) -> list[str]:
        return [e.target for e in self.expectations]


@dataclass(frozen=True, slots=True)
class Row:
    job: str
    target: str
    expected: str
    seen: str
    ok: bool


@dataclass(frozen=True, slots=True)
class ProbeRun:
    """One sandbox run of the probe UDF, as `docker run` reports it."""

    exit_code: int
    stdout: str
    stderr: str


class SandboxFailed(RuntimeError):
    """A job's sandbox exited non-zero: the demo cannot judge its attempts."""


class Backend(Protocol):
    """Where the fleet runs. `settle_s`: how long after a probe run its connection events
    are in the proxies' logs (a connection is logged when its relay closes)."""

    settle_s: float

    def sign(self, payload: dict[str, object]) -> str:
        """The control plane's JWS for a job policy payload."""

    def run_probe(self, job: Job, jws: str, args: Sequence[str]) -> ProbeRun:
        """Run `PROBE_UDF args` in a sandbox of `job.node` under the policy `jws`."""

    def node_metrics(self, node: str) -> str | None:
        """`node`'s agent `/metrics` page; None if it cannot be read."""

    def audit_lines(self) -> Iterable[str]:
        """Every proxy's log lines (audit events among them)."""


def jobs(layout: Layout, *, node_b: str = "node2") -> list[Job]:
    """Job A on node1 and job B on `node_b` (the compose fleet has one node)."""
    api = str(layout.site("api.allowed.test").address)
    raw = str(layout.site("raw.test").address)
    other_sandbox = str(layout.node("node2").sandbox_cidr.network_address + 2)
    a = Job(
        "A",
        "node1",
        (("api.allowed.test", (443, 80)), ("*.data.allowed.test", (443,))),
        (
            Expectation(
                "https://api.allowed.test/data",
                "allow",
                "proxy:connection",
                host="api.allowed.test",
            ),
            Expectation(
                "http://api.allowed.test/", "allow", "proxy:connection", host="api.allowed.test"
            ),
            Expectation(
                "https://eu.data.allowed.test/",
                "allow",
                "proxy:connection",
                host="eu.data.allowed.test",
            ),
            Expectation("https://evil.test/", "deny", "proxy:dns", host="evil.test"),
            Expectation("http://169.254.169.254/latest/meta-data/", "deny", "tier1:denied_range"),
            Expectation(f"tcp://{other_sandbox}:443", "deny", "tier1:fleet_range"),
            Expectation(f"tcp://{raw}:443", "deny", "proxy:connection", dst=raw),
        ),
    )
    b = Job(
        "B",
        node_b,
        (("evil.test", (443,)),),
        (
            Expectation("https://evil.test/", "allow", "proxy:connection", host="evil.test"),
            Expectation(
                "https://api.allowed.test/data", "deny", "proxy:dns", host="api.allowed.test"
            ),
            Expectation(f"tcp://{api}:443", "deny", "proxy:connection", dst=api),
        ),
    )
    return [a, b]


def payload(job: Job, job_id: str) -> dict[str, object]:
    return {
        "v": 1,
        "job_id": job_id,
        "account": "demo",
        "nodes": [job.node],
        "egress": [{"host": h, "ports": list(p)} for h, p in job.hosts],
    }


def tier1_drops(page: str | None) -> dict[str, float]:
    """A node agent's tier-1 drop counters by reason, from its `/metrics` page."""
    if page is None:
        return {}
    return by_label(parse(page), "egressd_tier1_packets_total", "reason", verdict="drop")


def audit_events(lines: Iterable[str], job_id: str) -> list[Event]:
    """The DNS and connection audit events of one job among log lines (others skipped)."""
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(event, dict)
            and event.get("job_id") == job_id
            and event.get("event") in ("dns", "connection")
        ):
            events.append(event)
    return events


def read_lines(paths: Iterable[Path]) -> Iterator[str]:
    """The lines of every readable file of `paths` (a proxy not started has no log yet)."""
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        yield from text.splitlines()


def judge(
    exp: Expectation,
    attempt: Event | None,
    events: list[Event],
    tier1_delta: dict[str, float],
) -> str:
    """What the fleet decided for one attempt, as `verdict:reason (where)`."""
    kind, _, detail = exp.where.partition(":")
    if kind == "tier1":
        dropped = tier1_delta.get(detail, 0) > 0
        failed = attempt is not None and not attempt.get("ok")
        return f"deny:{detail} (tier 1)" if dropped and failed else f"no tier-1 {detail} drop"
    wanted = "dns" if detail == "dns" else "connection"
    for event in events:
        if event.get("event") != wanted:
            continue
        if (
            exp.host is not None
            and wanted == "dns"
            and str(event.get("qname", "")).rstrip(".") != exp.host
        ):
            continue
        if exp.host is not None and wanted == "connection" and event.get("host") != exp.host:
            continue
        if exp.dst is not None and str(event.get("dst", "")).split(":")[0] != exp.dst:
            continue
        return f"{event.get('verdict')}:{event.get('reason')} (proxy {wanted})"
    return f"no {wanted} audit event"


def evaluate(
    job: Job,
    attempts: Iterable[Event],
    events: list[Event],
    tier1_delta: dict[str, float],
) -> list[Row]:
    by_target = {str(a.get("target")): a for a in attempts}
    rows = []
    for exp in job.expectations:
        attempt = by_target.get(exp.target)
        seen = judge(exp, attempt, events, tier1_delta)
        ok = seen.startswith(exp.verdict + ":")
        if exp.verdict == "allow":
            ok = ok and attempt is not None and bool(attempt.get("ok"))
        rows.append(Row(job.label, exp.target, f"{exp.verdict} ({exp.where})", seen, ok))
    return rows


def run(
    backend: Backend,
    demo_jobs: Iterable[Job],
    *,
    new_id: Callable[[], object] = uuid.uuid4,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Row]:
    """Each job in order: sign its policy under a fresh job id, run the probe in a sandbox,
    judge every attempt from the events and tier-1 drops of that run."""
    rows = []
    for job in demo_jobs:
        job_id = str(new_id())
        jws = backend.sign(payload(job, job_id))
        before = tier1_drops(backend.node_metrics(job.node))
        done = backend.run_probe(job, jws, [*PROBE_ARGS, *job.targets])
        if done.exit_code != 0:
            raise SandboxFailed(
                f"sandbox for job {job.label} exited {done.exit_code}: {done.stderr[-800:]}"
            )
        attempts = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
        sleep(backend.settle_s)
        after = tier1_drops(backend.node_metrics(job.node))
        delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
        rows += evaluate(job, attempts, audit_events(backend.audit_lines(), job_id), delta)
    return rows


def table(rows: Sequence[Row]) -> list[str]:
    """The verdict table, one line per attempt."""
    w_target = max(len(r.target) for r in rows)
    w_exp = max(len(r.expected) for r in rows)
    lines = [f"{'job':<4} {'attempt':<{w_target}}  {'expected':<{w_exp}}  verdict (where decided)"]
    for r in rows:
        mark = "" if r.ok else "   <-- UNEXPECTED"
        lines.append(f"{r.job:<4} {r.target:<{w_target}}  {r.expected:<{w_exp}}  {r.seen}{mark}")
    return lines


def report(rows: Sequence[Row]) -> int:
    """Print the table and the summary line; 0 only if there were attempts and every verdict
    is the expected one."""
    if rows:
        print("\n".join(table(rows)))
    good = sum(r.ok for r in rows)
    print(f"\n{good} of {len(rows)} verdicts as expected", flush=True)
    return 0 if rows and good == len(rows) else 1
