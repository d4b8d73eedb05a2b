"""Timing loops for in-process micro-benchmarks (`benchmarks/*.py`).

`rate` calibrates a call count to about `round_seconds`, runs `rounds` timed
rounds (time.perf_counter) and returns the median calls/s; loop overhead is
included, as it is in the daemons' loops.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
