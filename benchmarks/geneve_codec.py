"""Throughput of the GENEVE codec on a 1,400-byte datagram, with scapy as the baseline.

    python benchmarks/geneve_codec.py --seconds 10 --out bench-results/geneve_codec.json

Each measure runs >= 5 timed rounds (time.perf_counter) of a calibrated number
of calls and reports the median rate; loop overhead is included, as it is in
the proxy's receive loop. The goal (DESIGN: proxy hot path) is decode +
validate >= 300,000 datagrams/s on one core.
"""

from __future__ import annotations

import json
import platform
import sys
import uuid
from collections.abc import Callable

from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import IP, TCP

from egressd.geneve import PREFIX_LEN, JobOption, decode, encode, header_for
from egressd_harness.bench.microbench import parse_args, run_all

DATAGRAM_LEN = 1400
DECODE_GOAL_PER_S = 300_000
JOB = JobOption.from_jws(uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"), "header.payload.sig")
VNI = 1


def build_inner() -> bytes:
    """An IPv4/TCP segment sized so that the whole GENEVE datagram is 1,400 bytes."""
    payload_len = DATAGRAM_LEN - PREFIX_LEN - 20 - 20
    segment = IP(src="100.96.1.5", dst="203.0.113.10") / TCP(sport=40000, dport=443, flags="PA")
    inner = bytes(segment / (b"\xa5" * payload_len))
    assert len(inner) == DATAGRAM_LEN - PREFIX_LEN
    return inner


def measures(buf: bytes, inner: bytes) -> dict[str, Callable[[], object]]:
    prefix = header_for(VNI, JOB)
    recv_buf = bytearray(buf)  # what recvfrom_into fills in the proxy
    return {
        "decode_per_s": lambda: decode(buf),
        "decode_bytearray_per_s": lambda: decode(recv_buf),
        "encode_per_s": lambda: encode(VNI, JOB, inner),
        "prefix_concat_per_s": lambda: prefix + inner,
        "scapy_decode_per_s": lambda: GENEVE(buf),
    }


def check(buf: bytes, inner: bytes) -> None:
    """Benchmark only what is correct: both parsers must agree on the datagram."""
    pkt = decode(buf)
    parsed = GENEVE(buf)
    assert len(buf) == DATAGRAM_LEN
    assert bytes(pkt.inner) == inner == bytes(parsed[IP])
    assert pkt.vni == parsed.vni == VNI
    assert pkt.job.job_id + pkt.job.digest == parsed.options[0].data


def report(results: dict[str, float]) -> None:
    scapy = results["scapy_decode_per_s"]
    print(
        f"GENEVE codec, {DATAGRAM_LEN}-byte datagram, {platform.python_implementation()} "
        f"{platform.python_version()}"
    )
    print(f"{'measure':<24}{'rate/s':>14}{'x scapy':>10}")
    for name, value in results.items():
        print(f"{name:<24}{value:>14,.0f}{value / scapy:>10.1f}")
    verdict = "meets" if results["decode_per_s"] >= DECODE_GOAL_PER_S else "MISSES"
    print(f"decode {verdict} the goal of {DECODE_GOAL_PER_S:,}/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    inner = build_inner()
    buf = encode(VNI, JOB, inner)
    check(buf, inner)
    results = run_all(measures(buf, inner), args)
    report(results)

    if args.out:
        doc = {
            **{name: round(value) for name, value in results.items()},
            "decode_vs_scapy": round(results["decode_per_s"] / results["scapy_decode_per_s"], 1),
            "decode_goal_per_s": DECODE_GOAL_PER_S,
            "meets_goal": results["decode_per_s"] >= DECODE_GOAL_PER_S,
            "datagram_bytes": DATAGRAM_LEN,
            "rounds": args.rounds,
            "statistic": "median",
            "python": sys.version.split()[0],
            "machine": platform.machine(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
