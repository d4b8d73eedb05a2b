"""Cost of the limits on the proxy's paths, per connection and per relayed chunk.

    python benchmarks/limits.py --seconds 10 --out bench-results/limits.json

Per connection the interceptor calls `ProxyLimits.admit` + `release` and
`acquire_port` + `release_port` (metrics included); per relayed chunk, one
`departure` from the job's pacer. The baseline, run in the same process, is
what every upstream connection costs anyway: creating and closing a TCP
socket. Each measure is the median of >= 5 timed rounds, with 1,000 jobs
and 50 destinations in the tables (the interesting case: not one hot key).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import platform
import socket
import sys
import uuid
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from egressd.limits.pacing import BandwidthShaper
from egressd.limits.ports import Destination, PortPoolConfig
from egressd.limits.timeouts import Timeouts
from egressd.policy.model import Limits
from egressd.proxy.limiting import LimitsConfig, ProxyLimits
from egressd_harness.bench.microbench import parse_args, run_all

JOBS = [uuid.UUID(int=n + 1) for n in range(1000)]
DESTS = [Destination(ipaddress.IPv4Address(f"203.0.113.{n + 1}"), 443) for n in range(50)]
LIMITS = Limits(
    max_connections=65_536,
    max_new_connections_per_s=100_000,
    ports_per_destination=64_512,
    bandwidth_bps=1_000_000_000,
)
CHUNK = 64 * 1024


def proxy_limits(*, proxy_rate_bps: int) -> ProxyLimits:
    config = LimitsConfig(
        max_connections=1_048_576,
        bandwidth_bps=proxy_rate_bps,
        port_pool=PortPoolConfig(addresses=(ipaddress.IPv4Address("203.0.113.21"),)),
        timeouts=Timeouts(idle_s=300.0, lifetime_s=86_400.0),
    )
    return ProxyLimits(config, registry=CollectorRegistry())


def measures() -> dict[str, Callable[[], object]]:
    limits = proxy_limits(proxy_rate_bps=0)
    keys = itertools.cycle([(j, d) for j, d in zip(JOBS, itertools.cycle(DESTS), strict=False)])
    clock = itertools.count(0.0, 1e-6)  # a connection per microsecond of fake time
    shaper = BandwidthShaper()
    shared = BandwidthShaper(proxy_rate_bps=10_000_000_000)
    chunk_clock = itertools.count(0.0, 1e-4)
    jobs = itertools.cycle(JOBS)

    def socket_baseline() -> None:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()

    def admit_release() -> None:
        job, _ = next(keys)
        assert limits.admit(job, LIMITS, next(clock)) is None
        limits.release(job)

    def port_acquire_release() -> None:
        job, dest = next(keys)
        now = next(clock)
        lease = limits.acquire_port(job, dest, LIMITS, now)
        limits.release_port(lease, now, time_wait=False)  # type: ignore[arg-type]

    def departure() -> None:
        shaper.departure(next(jobs), "down", CHUNK, rate_bps=1_000_000_000, now=next(chunk_clock))

    def departure_shared() -> None:
        shared.departure(next(jobs), "down", CHUNK, rate_bps=1_000_000_000, now=next(chunk_clock))

    return {
        "socket_create_close_per_s": socket_baseline,
        "admit_release_per_s": admit_release,
        "port_acquire_release_per_s": port_acquire_release,
        "departure_per_s": departure,
        "departure_with_proxy_rate_per_s": departure_shared,
    }


def report(results: dict[str, float]) -> dict[str, float]:
    base = results["socket_create_close_per_s"]
    per_conn_ns = 1e9 / results["admit_release_per_s"] + 1e9 / results["port_acquire_release_per_s"]
    derived = {
        "limits_per_connection_ns": per_conn_ns,
        "limits_per_connection_vs_socket": per_conn_ns / (1e9 / base),
        "departure_ns": 1e9 / results["departure_per_s"],
        "departure_with_proxy_rate_ns": 1e9 / results["departure_with_proxy_rate_per_s"],
    }
    print(
        f"limits, {len(JOBS):,} jobs, {len(DESTS)} destinations, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    print(f"{'measure':<34}{'rate/s':>14}{'ns/op':>10}")
    for name, value in results.items():
        print(f"{name:<34}{value:>14,.0f}{1e9 / value:>10,.0f}")
    print(
        f"per connection: {per_conn_ns:,.0f} ns of limits = "
        f"{derived['limits_per_connection_vs_socket']:.2f}x a socket create+close"
    )
    return derived


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    results = run_all(measures(), args)
    derived = report(results)
    if args.out:
        doc = {
            **{name: round(value) for name, value in results.items()},
            **{name: round(value, 2) for name, value in derived.items()},
            "jobs": len(JOBS),
            "destinations": len(DESTS),
            "rounds": args.rounds,
            "statistic": "median",
            "python": sys.version.split()[0],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
