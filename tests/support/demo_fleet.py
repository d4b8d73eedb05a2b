"""A fake fleet for the demo core's tests: it answers each probe target the way a working
fleet does (or, with `broken`, the way a fleet with one layer missing does), writing the
audit events and tier-1 counters a real fleet would, plus noise a real log carries."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from egressd.layout import default_layout
from egressd_harness.demo import core


def demo_jobs(node_b: str = "node2") -> list[core.Job]:
    return core.jobs(default_layout(), node_b=node_b)


@dataclass
class FakeFleet:
    """`core.Backend` over an in-memory fleet. `broken`: the layers that let everything
    through ("tier1": no drops; "proxy": the proxy allows every connection and answers every
    name) or, "tier1_uncounted", loses tier 1's packets without counting them. `exit_code` of
    every sandbox run."""

    broken: frozenset[str] = frozenset()
    exit_code: int = 0
    settle_s: float = 0.25
    signed: list[dict[str, object]] = field(default_factory=list)
    runs: list[tuple[str, str, list[str]]] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    metrics_up: bool = True

    def sign(self, payload: dict[str, object]) -> str:
        self.signed.append(payload)
        return f"jws.{payload['job_id']}"

    def run_probe(self, job: core.Job, jws: str, args: Sequence[str]) -> core.ProbeRun:
        self.runs.append((job.node, jws, list(args)))
        job_id = jws.removeprefix("jws.")
        by_target = {e.target: e for e in job.expectations}
        out = []
        for target in args[len(core.PROBE_ARGS) :]:
            out.append(
                json.dumps({"target": target, "ok": self._attempt(job_id, by_target[target])})
            )
        return core.ProbeRun(self.exit_code, "starting probe\n" + "\n".join(out) + "\n", "err")

    def _attempt(self, job_id: str, exp: core.Expectation) -> bool:
        kind, _, detail = exp.where.partition(":")
        if kind == "tier1":
            if "tier1" in self.broken:
                return True
            if "tier1_uncounted" in self.broken:  # lost somewhere, not dropped by tier 1
                return False
            self.drops[detail] += 1
            return False
        allowed = exp.verdict == "allow" or "proxy" in self.broken
        verdict, reason = ("allow", "allowed_host") if allowed else ("deny", "no_matching_rule")
        if detail == "dns" and not allowed:
            self._log(job_id, event="dns", qname=f"{exp.host}.", verdict=verdict, reason=reason)
        else:
            host = exp.host
            address = exp.dst if host is None else default_layout().site(host).address
            dst = f"{address}:443"
            self._log(
                job_id, event="connection", host=host, dst=dst, verdict=verdict, reason=reason
            )
        return allowed

    def _log(self, job_id: str, **event: object) -> None:
        # What else a proxy's log holds: its own lines, other jobs' events, a torn line.
        self.lines.append(json.dumps({"event": "proxy_ready", "job_id": job_id}))
        self.lines.append(json.dumps({"job_id": "someone-else", **event, "verdict": "x"}))
        self.lines.append(json.dumps({"job_id": job_id, **event}))
        self.lines.append('{"event": "conn')

    def node_metrics(self, node: str) -> str | None:
        if not self.metrics_up:
            return None
        lines = [
            "# HELP egressd_tier1_packets_total Tier-1 verdicts.",
            "# TYPE egressd_tier1_packets_total counter",
            'egressd_tier1_packets_total{verdict="pass",reason="ok"} 1234.0',
        ]
        for reason, n in sorted(self.drops.items()):
            lines.append(f'egressd_tier1_packets_total{{verdict="drop",reason="{reason}"}} {n}.0')
        return "\n".join(lines) + "\n"

    def audit_lines(self) -> Iterable[str]:
        return list(self.lines)
