"""Policy propagation: from a change at the control plane to every proxy and agent enforcing it.

    sudo python benchmarks/policy_propagation.py [--changes 100] [--out bench-results/policy_propagation.json]
    sudo python benchmarks/policy_propagation.py --up   # bring a fleet up (prefix egd-pp-) and down

Against a running fleet (`egressd topology up`; `--run-dir`, `--prefix`), or
its own with `--up`. One job naming every node is signed, and each proxy is
made to hold its policy (one GENEVE datagram for the job from node1's
underlay address, as a node sends: the proxy fetches the policy to validate
it), and each node agent gets a sandbox of the job registered through its
API socket (netns, veth and tier 1, no runsc: an agent follows only the jobs
that have sandboxes on it). Then `--changes` times: the job's policy is
replaced (PUT, alternating between two egress lists, so every change is a
new digest), and the time from just before the PUT to the moment each member
applied the new digest is one sample: a proxy's `policy_verified`, an
agent's `job_policy_updated` (tier 1 and the GENEVE digest reprogrammed) in
its JSON log (same host clock). The changes are `--gap` seconds apart.

Prints p50/p99/max over every (change, proxy) and (change, agent) sample and
per member; `--out` writes the samples and the summary as JSON. Exit code 1
when a member missed a change for `--timeout` seconds. `--no-agents`
measures the proxies only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, UDP

from egressd.agent.client import AgentClient
from egressd.geneve.codec import JobOption, encode
from egressd.layout import DEFAULT_RUN_DIR, default_layout
from egressd.net import netns as kn
from egressd_harness.topology.fleet import Fleet

GENEVE_PORT = 6081


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class LogTail:
    """New JSON lines of a daemon's log since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.buffer = b""

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        out = []
        for line in complete:
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
        return out


def log_time(item: dict[str, Any]) -> float | None:
    stamp = item.get("time") or item.get("timestamp")
    if not isinstance(stamp, str):
        return None
    return datetime.datetime.fromisoformat(stamp).timestamp()


def warm(fleet: Fleet, job: uuid.UUID) -> None:
    """One GENEVE datagram for `job` to each proxy, from node1's underlay address."""
    node = fleet.layout.nodes[0]
    sandbox = str(next(node.sandbox_cidr.hosts()))
    inner = bytes(
        IP(src=sandbox, dst=str(fleet.layout.sites[0].address)) / UDP(sport=40000, dport=9)
    )
    datagram = encode(fleet.layout.vni, JobOption(job.bytes, b"\0" * 8), inner)
    with contextlib.closing(
        kn.netns_socket(fleet.ns(node.netns), socket.AF_INET, socket.SOCK_DGRAM)
    ) as sock:
        sock.bind((str(node.underlay), 0))
        for proxy in fleet.layout.proxies:
            sock.sendto(datagram, (str(proxy.underlay), GENEVE_PORT))


# The log event with which each kind of member says it applied a new digest.
PROXY_EVENT = "policy_verified"
AGENT_EVENT = "job_policy_updated"


def wait_digest(
    tails: dict[str, LogTail],
    job: str,
    digest: str,
    timeout: float,
    events: dict[str, str] | None = None,
) -> dict[str, float]:
    """Per member, when it logged its event (`events[name]`, default
    `policy_verified`) for `job` with `digest`."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(tails) and time.monotonic() < deadline:
        for name, tail in tails.items():
            event = (events or {}).get(name, PROXY_EVENT)
            for item in tail.lines():
                if (
                    name not in seen
                    and item.get("event") == event
                    and item.get("job_id") == job
                    and item.get("digest") == digest
                ):
                    stamp = log_time(item)
                    if stamp is not None:
                        seen[name] = stamp
        time.sleep(0.005)
    return seen


def agent_sandboxes(fleet: Fleet, jws: str, *, register: bool) -> None:
    """Register (or unregister) one sandbox of the job on every node, no runsc."""

    async def each(node: str) -> None:
        async with AgentClient(fleet.agent_socket(node)) as agent:
            if register:
                await agent.register(f"pp-bench-{node}", jws)
            else:
                await agent.unregister(f"pp-bench-{node}")

    async def every() -> None:
        await asyncio.gather(*(each(n.name) for n in fleet.layout.nodes))

    asyncio.run(every())


def run(args: argparse.Namespace, fleet: Fleet) -> int:
    job = uuid.uuid4()
    nodes = [n.name for n in fleet.layout.nodes]
    site = str(fleet.layout.sites[0].address)
    bodies = [
        {
            "v": 1,
            "job_id": str(job),
            "account": "bench",
            "nodes": nodes,
            "egress": [{"cidr": f"{site}/32", "ports": [80]}],
        },
        {
            "v": 1,
            "job_id": str(job),
            "account": "bench",
            "nodes": nodes,
            "egress": [{"cidr": f"{site}/32", "ports": [80, 443]}],
        },
    ]
    tails = {
        p.name: LogTail(fleet.run_dir / "logs" / f"{p.name}.log") for p in fleet.layout.proxies
    }
    proxies = sorted(tails)
    agents = [] if args.no_agents else sorted(n.name for n in fleet.layout.nodes)
    events = dict.fromkeys(agents, AGENT_EVENT)
    first = fleet.control_put(f"/v1/jobs/{job}/policy", bodies[0])
    warm(fleet, job)
    held = wait_digest(tails, str(job), str(first["digest"]), args.timeout)
    if len(held) < len(tails):
        print(f"proxies never fetched the job: {sorted(set(tails) - set(held))}", file=sys.stderr)
        return 1
    for name in agents:
        tails[name] = LogTail(fleet.run_dir / "logs" / f"{name}.log")
    if agents:
        agent_sandboxes(fleet, str(first["jws"]), register=True)
    samples: dict[str, list[float]] = {name: [] for name in tails}
    missed = 0
    try:
        for i in range(args.changes):
            body = bodies[(i + 1) % 2]
            started = time.time()
            answer = fleet.control_put(f"/v1/jobs/{job}/policy", body)
            seen = wait_digest(tails, str(job), str(answer["digest"]), args.timeout, events)
            for name in tails:
                if name in seen:
                    samples[name].append(max(0.0, seen[name] - started))
                else:
                    missed += 1
            time.sleep(args.gap)
    finally:
        if agents:
            with contextlib.suppress(Exception):
                agent_sandboxes(fleet, "", register=False)
    with contextlib.suppress(Exception):
        from egressd_harness.topology.probe import http_request

        http_request(
            fleet.ns("egd-ctl"),
            "DELETE",
            "198.18.0.2",
            8080,
            f"/v1/jobs/{job}/policy",
            headers={"Authorization": f"Bearer {fleet.admin_token()}"},
        )
    every = [v for values in samples.values() for v in values]
    of_proxies = [v for name in proxies for v in samples[name]]
    of_agents = [v for name in agents for v in samples[name]]

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "n": len(values),
            "p50_ms": 1000 * percentile(values, 50),
            "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * max(values) if values else float("nan"),
            "mean_ms": 1000 * statistics.fmean(values) if values else float("nan"),
        }

    result = {
        "changes": args.changes,
        "proxies": proxies,
        "agents": agents,
        "missed": missed,
        "all": summary(every),
        "all_proxies": summary(of_proxies),
        "all_agents": summary(of_agents),
        "per_proxy": {name: summary(samples[name]) for name in proxies},
        "per_agent": {name: summary(samples[name]) for name in agents},
        "samples_ms": {
            name: [round(1000 * v, 3) for v in values] for name, values in samples.items()
        },
    }
    print(
        f"policy propagation over {args.changes} changes to {len(proxies)} proxies and "
        f"{len(agents)} agents (PUT sent -> proxy verified / agent applied the new digest)"
    )
    print(f"{'':10} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    rows = [
        ("all", result["all"]),
        ("proxies", result["all_proxies"]),
        *result["per_proxy"].items(),
    ]
    if agents:
        rows += [("agents", result["all_agents"]), *result["per_agent"].items()]
    for name, s in rows:
        print(f"{name:10} {s['n']:>5} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f} {s['max_ms']:8.1f}")
    if missed:
        print(f"missed: {missed} (member, change) pairs not seen within {args.timeout} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if missed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between changes")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    parser.add_argument("--prefix", default="egd-")
    parser.add_argument("--up", action="store_true", help="bring a fleet up (and down) for the run")
    parser.add_argument("--out", default=None, metavar="FILE.json")
    parser.add_argument("--no-agents", action="store_true", help="measure the proxies only")
    args = parser.parse_args(argv)
    if args.up:
        if args.prefix == "egd-":
            args.prefix = "egd-pp-"
        if args.run_dir == str(DEFAULT_RUN_DIR):
            args.run_dir = "/run/egressd-pp"
    fleet = Fleet(default_layout(Path(args.run_dir), args.prefix))
    if not args.up:
        return run(args, fleet)
    fleet.up()
    try:
        return run(args, fleet)
    finally:
        fleet.down()


if __name__ == "__main__":
    sys.exit(main())
