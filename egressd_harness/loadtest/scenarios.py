"""The scenarios of `egressd loadtest` (pure data and arithmetic).

A scenario is a set of jobs (one locust user class each, one load-generator
namespace each, one signed policy each) and a schedule of windows. Every
job's locust process runs through the whole schedule; in `baseline` windows
only the well-behaved job works (the abusive one holds nothing: the attacker
closes its connections, the hog stops reading), in `stress` windows the
abusive job works beside it. The windows alternate (baseline, stress,
baseline, stress, ...), so that a change in the machine's load during the
run (the 2-core box is shared) hits both alike; the well-behaved job labels
each request with the window it started in, and its latency in the stress
windows is compared with its own baseline windows of the same run. `steady`
has a single stress window.

| scenario        | abusive job              | well-behaved job | limit under test                       |
|-----------------|--------------------------|------------------|----------------------------------------|
| port-exhaustion | PortExhaustionAttacker   | Victim           | ports_per_destination, connection caps |
| bandwidth       | BandwidthHog             | Steady           | bandwidth_bps (EDT pacing)             |
| steady          | -                        | Steady           | none hit: no refusals, no errors       |
| dns-flood       | flooder (`flood dns`)    | Victim x 2       | dns_queries_per_s (tier 1, proxy DNS)  |
| syn-flood       | flooder (`flood syn`)    | Victim x 2       | max_new_connections_per_s (tier 1 SYN) |

The flood scenarios (issue 15) have two well-behaved jobs, `victim_a` on the
attacker's node and `victim_b` on the other, and an attacker that is not a
locust process but `egressd_harness.loadtest.flood` (raw UDP/TCP packets); their
floods are bounded to `MAX_FLOOD_S` seconds in all (`MAX_DURATION_BY`).

Limits semantics (the proxies'): `max_connections`,
`max_new_connections_per_s` and `bandwidth_bps` are fleet-wide per job; each
proxy enforces its share, the value divided by the number of proxies and
rounded up (`share`). `ports_per_destination` is per proxy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SITE = "api.allowed.test"
HTTP_PORT = 80
SCENARIOS = ("port-exhaustion", "bandwidth", "steady", "dns-flood", "syn-flood")
FLOODS = ("dns-flood", "syn-flood")
# Two cycles of 5 + 5 + 1 s at least (the flood: 10 s), four at most (20 s).
MIN_DURATION_S = {
    "port-exhaustion": 30.0,
    "bandwidth": 30.0,
    "steady": 10.0,
    "dns-flood": 22.0,
    "syn-flood": 22.0,
}
MAX_DURATION_S = 3600.0
MAX_FLOOD_S = 20.0
MAX_DURATION_BY = {"dns-flood": 44.0, "syn-flood": 44.0}
# Windows of about this length; a two-phase scenario has at least one of each.
# Short windows interleave the phases finely (the attacker reaches its budget
# within 2 s); the hog's need 3 s to settle after each pause (see `assess`).
WINDOW_TARGET_S = {"port-exhaustion": 5.0, "bandwidth": 10.0, "dns-flood": 5.0, "syn-flood": 5.0}
SETTLE_S = 1.0

BASELINE = "baseline"
STRESS = "stress"
SETTLE = "settle"  # after each stress window: counts for neither phase
WARMUP = "warmup"  # before the first window (locust starting, users spawning)
END = "end"  # after the last window

# Limits that a well-behaved job never reaches in these scenarios.
GENEROUS = {
    "max_connections": 256,
    "max_new_connections_per_s": 200,
    "ports_per_destination": 256,
    "bandwidth_bps": 400_000_000,
    "dns_queries_per_s": 1000,
}


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job: its role, locust user class, users, node and policy limits."""

    role: str  # attacker | victim | hog | steady
    user_class: str
    users: int
    node: str
    limits: Mapping[str, int]
    # EGRESSD_LT_* variables for the locustfile.
    env: Mapping[str, str] = field(default_factory=dict)
    abusive: bool = False
    # `locust` (user_class is a locust class) or `flood` (user_class is the
    # kind of `egressd_harness.loadtest.flood`: dns, syn).
    driver: str = "locust"
    egress: tuple[Mapping[str, Any], ...] = ()  # rules besides SITE:HTTP_PORT

    def policy(self, job_id: str) -> dict[str, Any]:
        """The job's policy payload (the control plane adds iat/nbf/exp and signs)."""
        return {
            "v": 1,
            "job_id": job_id,
            "account": f"loadtest-{self.role}",
            "nodes": [self.node],
            "mode": "enforce",
            "egress": [{"host": SITE, "ports": [HTTP_PORT]}, *(dict(r) for r in self.egress)],
            "limits": dict(self.limits),
        }


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) seconds from the schedule's start, and its phase."""

    start: float
    end: float
    phase: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    duration_s: float
    jobs: tuple[JobSpec, ...]
    windows: tuple[Window, ...]

    def job(self, role: str) -> JobSpec:
        for job in self.jobs:
            if job.role == role:
                return job
        raise KeyError(role)

    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w.phase for w in self.windows))

    @property
    def abusive(self) -> JobSpec | None:
        return next((j for j in self.jobs if j.abusive), None)

    @property
    def well_behaved(self) -> JobSpec:
        return next(j for j in self.jobs if not j.abusive)

    def schedule(self, t0: float) -> str:
        """The schedule for the locustfile (`EGRESSD_LT_SCHEDULE`): absolute
        Unix times, `T:phase,...,T:end`."""
        return schedule_text(self.windows, t0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "duration_s": self.duration_s,
            "jobs": [
                {
                    "role": j.role,
                    "user_class": j.user_class,
                    "users": j.users,
                    "node": j.node,
                    "limits": dict(j.limits),
                    "env": dict(j.env),
                    "abusive": j.abusive,
                    "driver": j.driver,
                }
                for j in self.jobs
            ],
            "windows": [{"start": w.start, "end": w.end, "phase": w.phase} for w in self.windows],
        }


def schedule_text(windows: tuple[Window, ...] | list[Window], t0: float) -> str:
    parts = [f"{t0 + w.start:.3f}:{w.phase}" for w in windows]
    parts.append(f"{t0 + windows[-1].end:.3f}:end")
    return ",".join(parts)


def parse_schedule(text: str) -> list[tuple[float, str]]:
    """`T:phase,...,T:end` (Unix times, ascending) into [(T, phase), ...]."""
    out = []
    for part in text.split(","):
        when, sep, phase = part.partition(":")
        if not sep or not phase:
            raise ValueError(f"bad schedule entry {part!r}")
        out.append((float(when), phase))
    times = [t for t, _ in out]
    if times != sorted(times) or out[-1][1] != END:
        raise ValueError(f"schedule must ascend and finish with {END!r}: {text!r}")
    return out


def phase_at(schedule: list[tuple[float, str]], now: float) -> str:
    """The phase at `now`: `warmup` before the first window, `end` after the last."""
    current = WARMUP
    for when, phase in schedule:
        if now < when:
            break
        current = phase
    return current


def alternating(
    duration_s: float, target_s: float, settle_s: float = SETTLE_S
) -> tuple[Window, ...]:
    """baseline, stress, settle, baseline, stress, settle ...: baseline and
    stress windows of equal length, about `target_s` each.

    In a `settle` window the abusive job lets go of what it holds (the
    attacker closes its connections all at once, an artefact of switching it
    off) and the well-behaved job's requests count for neither phase.
    """
    cycle = 2 * target_s + settle_s
    cycles = max(1, int(duration_s // cycle))
    length = (duration_s / cycles - settle_s) / 2
    out = []
    t = 0.0
    for _ in range(cycles):
        for phase, seconds in ((BASELINE, length), (STRESS, length), (SETTLE, settle_s)):
            out.append(Window(round(t, 3), round(t + seconds, 3), phase))
            t += seconds
    return tuple(out)


class ScenarioError(ValueError):
    """A scenario name or duration that cannot run."""


def share(value: int, proxies: int) -> int:
    """A proxy's share of a fleet-wide per-job limit: value / proxies, rounded up."""
    if proxies < 1:
        raise ValueError("no proxies")
    return math.ceil(value / proxies)


def attack_budget_per_proxy(limits: Mapping[str, int], proxies: int) -> int:
    """How many connections to one destination one proxy lets the job hold:
    its ports for the destination, or its share of the connection cap if lower."""
    return min(int(limits["ports_per_destination"]), share(int(limits["max_connections"]), proxies))


def check_duration(name: str, duration_s: float) -> None:
    if name not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {name!r} (one of {', '.join(SCENARIOS)})")
    top = MAX_DURATION_BY.get(name, MAX_DURATION_S)
    if not math.isfinite(duration_s) or not MIN_DURATION_S[name] <= duration_s <= top:
        raise ScenarioError(
            f"--duration for {name} must be {MIN_DURATION_S[name]:g}..{top:g} seconds"
        )


# --- the scenarios -------------------------------------------------------------------------

# The attacker may hold 24 ports per proxy toward the destination (48 over two
# proxies); its connection cap (64 per proxy) is above that, so the port budget
# binds. Its new-connection rate (15/s per proxy) is below its attempt rate
# (60/s over both proxies), so `job_rate_limit` refusals show up too.
ATTACKER_LIMITS = {
    "max_connections": 128,
    "max_new_connections_per_s": 30,
    "ports_per_destination": 24,
    "bandwidth_bps": 100_000_000,
}
ATTACK_RATE_PER_S = 60
ATTACK_TARGET = 256  # what the attacker tries to hold: far above its budget
VICTIM_USERS = 6
VICTIM_RPS_PER_USER = 5.0

# 64 Mbit/s fleet-wide: 32 Mbit/s (4 MB/s) per proxy.
HOG_LIMITS = {**GENEROUS, "bandwidth_bps": 64_000_000}
HOG_USERS = 8
HOG_BYTES = 16 * 1024 * 1024
STEADY_USERS = 4
STEADY_RPS_PER_USER = 5.0


# The flood scenarios (issue 15). The attacker's rate limits are the policy
# defaults' order (50/s); its flood runs at a rate above the incident's
# 3,600 DNS queries/s. Tier 1's token buckets hold one second's worth.
FLOOD_DNS_PER_S = 50
FLOOD_SYN_PER_S = 50
FLOOD_RATE = {"dns-flood": 5000, "syn-flood": 10000}
TIER1_BURST_S = 1.0
FLOOD_LIMITS = {
    **GENEROUS,
    "dns_queries_per_s": FLOOD_DNS_PER_S,
    "max_new_connections_per_s": FLOOD_SYN_PER_S,
}
FLOOD_VICTIM_USERS = 4
WILDCARD = "*.data.allowed.test"


def tier1_budget(
    rate_per_s: float, seconds: float, windows: int, burst_s: float = TIER1_BURST_S
) -> float:
    """What a token bucket of `rate_per_s` (holding `burst_s` seconds' worth)
    lets through in `windows` floods of `seconds` in all: full before each
    window (it refills in the pauses between them)."""
    return rate_per_s * (seconds + burst_s * windows)


def flood_rate_limit(scenario: Scenario) -> int:
    """The attacker's per-second limit that tier 1 enforces against its flood."""
    key = "dns_queries_per_s" if scenario.name == "dns-flood" else "max_new_connections_per_s"
    return int(scenario.job("attacker").limits[key])


def _flood(name: str, duration_s: float) -> Scenario:
    kind = name.removesuffix("-flood")
    attacker = JobSpec(
        "attacker",
        kind,
        1,
        "node1",
        FLOOD_LIMITS,
        abusive=True,
        driver="flood",
        env={"rate": str(FLOOD_RATE[name])},
        egress=({"host": WILDCARD, "ports": [443]},),
    )
    victims = tuple(
        JobSpec(
            role,
            "Victim",
            FLOOD_VICTIM_USERS,
            node,
            GENEROUS,
            env={"EGRESSD_LT_RPS": str(VICTIM_RPS_PER_USER)},
        )
        for role, node in (("victim_a", "node1"), ("victim_b", "node2"))
    )
    return Scenario(
        name, duration_s, (attacker, *victims), alternating(duration_s, WINDOW_TARGET_S[name])
    )


def build(name: str, duration_s: float) -> Scenario:
    check_duration(name, duration_s)
    if name in FLOODS:
        return _flood(name, duration_s)
    if name == "steady":
        steady = JobSpec(
            "steady",
            "Steady",
            STEADY_USERS * 2,
            "node2",
            GENEROUS,
            env={"EGRESSD_LT_RPS": str(STEADY_RPS_PER_USER)},
        )
        return Scenario(name, duration_s, (steady,), (Window(0.0, duration_s, STRESS),))
    if name == "port-exhaustion":
        abusive = JobSpec(
            "attacker",
            "PortExhaustionAttacker",
            1,
            "node1",
            ATTACKER_LIMITS,
            abusive=True,
            env={
                "EGRESSD_LT_ATTACK_RATE": str(ATTACK_RATE_PER_S),
                "EGRESSD_LT_ATTACK_TARGET": str(ATTACK_TARGET),
            },
        )
        neighbour = JobSpec(
            "victim",
            "Victim",
            VICTIM_USERS,
            "node2",
            GENEROUS,
            env={"EGRESSD_LT_RPS": str(VICTIM_RPS_PER_USER)},
        )
    else:
        abusive = JobSpec(
            "hog",
            "BandwidthHog",
            HOG_USERS,
            "node1",
            HOG_LIMITS,
            abusive=True,
            env={"EGRESSD_LT_HOG_BYTES": str(HOG_BYTES)},
        )
        neighbour = JobSpec(
            "steady",
            "Steady",
            STEADY_USERS,
            "node2",
            GENEROUS,
            env={"EGRESSD_LT_RPS": str(STEADY_RPS_PER_USER)},
        )
    return Scenario(
        name, duration_s, (abusive, neighbour), alternating(duration_s, WINDOW_TARGET_S[name])
    )
