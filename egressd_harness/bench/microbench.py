"""Timing loops for in-process micro-benchmarks (`benchmarks/*.py`).

`rate` calibrates a call count to about `round_seconds`, runs `rounds` timed
rounds (time.perf_counter) and returns the median calls/s; loop overhead is
included, as it is in the daemons' loops.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def rate(call: Callable[[], object], round_seconds: float, rounds: int) -> float:
    """Median calls/s over `rounds` rounds of about `round_seconds` each."""
    per_call = _calibrate(call)
    n = max(1, int(round_seconds / per_call))
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def _calibrate(call: Callable[[], object]) -> float:
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            call()
        elapsed = time.perf_counter() - start
        if elapsed > 0.05:
            return elapsed / n
        n *= 4


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every micro-benchmark takes: --seconds, --rounds (>= 5), --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=10.0, help="total timed budget")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per measure (>= 5)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.rounds = max(5, args.rounds)
    return args


def run_all(
    calls: Mapping[str, Callable[[], object]], args: argparse.Namespace
) -> dict[str, float]:
    """`rate` of each call, the time budget split evenly; by name."""
    round_seconds = args.seconds / (len(calls) * args.rounds)
    return {name: rate(call, round_seconds, args.rounds) for name, call in calls.items()}
