"""A failing slow-path map write is counted and its log throttled per (job, reason)
(`egressd.proxy.kernel.LogThrottle`, `KernelDatapath.accepted`); pure, with a fake kernel."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import MutableMapping
from typing import Any, cast

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from egressd.proxy.kernel import KernelDatapath, KernelError, LogThrottle, ProxyKernel

JOB_A = uuid.UUID("11111111-1111-4111-8111-111111111111")
JOB_B = uuid.UUID("22222222-2222-4222-8222-222222222222")
NODE = ipaddress.IPv4Address("198.18.0.11")
FLOW = (0x64600002, 40000, 0x5DB8D822, 443, 6)


class FailingKernel:
    """px_flows writes fail with `reason` while `failing`; other maps accept everything."""

    def __init__(self, reason: str = "map_failed") -> None:
        self.reason = reason
        self.failing = True
        self.writes: list[str] = []

    def write(self, name: str, key: bytes, value: bytes) -> None:
        if self.failing and name == "px_flows":
            raise KernelError(self.reason, f"update {name}: No space left on device")
        self.writes.append(name)

    def delete(self, name: str, key: bytes) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def datapath(kernel: FailingKernel, clock: Clock, metrics: CollectorRegistry) -> KernelDatapath:
    return KernelDatapath(
        cast(ProxyKernel, kernel),
        nodes=list,
        cached=lambda _job: None,
        metrics=metrics,
        clock=clock,
        failure_log_interval_s=10.0,
    )


def failures(metrics: CollectorRegistry, reason: str) -> float:
    value = metrics.get_sample_value("egressd_kernel_map_write_failures_total", {"reason": reason})
    return 0.0 if value is None else value


def events(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "kernel_program_failed"]


# -- LogThrottle -------------------------------------------------------------------------


def test_the_first_line_of_a_key_is_logged_and_the_rest_of_its_interval_held_back() -> None:
    throttle: LogThrottle[str] = LogThrottle(10.0)
    assert throttle.admit("a", 0.0) == 0
    assert [throttle.admit("a", t) for t in (1.0, 5.0, 9.9)] == [None, None, None]
    assert throttle.admit("b", 2.0) == 0  # another key has its own interval
    assert throttle.admit("a", 10.0) == 3  # the next line says how many were held back
    assert throttle.admit("a", 11.0) is None


def test_flush_summarises_held_back_keys_once_their_interval_passed_and_forgets_quiet_ones() -> (
    None
):
    throttle: LogThrottle[str] = LogThrottle(10.0)
    throttle.admit("held", 0.0)
    throttle.admit("held", 1.0)
    throttle.admit("held", 2.0)
    throttle.admit("quiet", 0.0)
    assert throttle.flush(5.0) == {}  # inside the interval: nothing yet
    assert throttle.flush(10.0) == {"held": 2}
    assert throttle.flush(20.0) == {}  # summarised once; then forgotten as quiet
    assert throttle._keys == {}
    assert throttle.admit("held", 20.5) == 0


# -- KernelDatapath.accepted ---------------------------------------------------------------


def test_a_failing_px_flows_write_is_counted_per_packet_and_logged_once_per_interval() -> None:
    kernel, clock, metrics = FailingKernel(), Clock(), CollectorRegistry()
    dp = datapath(kernel, clock, metrics)
    with capture_logs() as logs:
        for _ in range(1000):
            dp.accepted(JOB_A, b"d" * 32, NODE, FLOW)  # does not raise
    assert failures(metrics, "map_failed") == 1000
    (line,) = events(logs)
    assert line["job_id"] == str(JOB_A)
    assert (line["reason"], line["suppressed"]) == ("map_failed", 0)
    assert "No space left" in line["detail"]


def test_each_job_and_reason_has_its_own_line_and_held_back_counts_are_reported() -> None:
    kernel, clock, metrics = FailingKernel(), Clock(), CollectorRegistry()
    dp = datapath(kernel, clock, metrics)
    with capture_logs() as logs:
        for _ in range(5):
            dp.accepted(JOB_A, b"d" * 32, NODE, FLOW)
            dp.accepted(JOB_B, b"d" * 32, NODE, FLOW)
        kernel.reason = "not_loaded"
        dp.accepted(JOB_A, b"d" * 32, NODE, FLOW)
        clock.now += 10.0
        dp.flush_failure_log()
    lines = [(e["job_id"], e["reason"], e["suppressed"]) for e in events(logs)]
    assert lines == [
        (str(JOB_A), "map_failed", 0),
        (str(JOB_B), "map_failed", 0),
        (str(JOB_A), "not_loaded", 0),
        (str(JOB_A), "map_failed", 4),  # the summaries, after the interval
        (str(JOB_B), "map_failed", 4),
    ]
    assert failures(metrics, "map_failed") == 10
    assert failures(metrics, "not_loaded") == 1


def test_once_the_map_takes_writes_again_the_flow_is_recorded_and_nothing_is_logged() -> None:
    kernel, clock, metrics = FailingKernel(), Clock(), CollectorRegistry()
    dp = datapath(kernel, clock, metrics)
    dp.accepted(JOB_A, b"d" * 32, NODE, FLOW)
    kernel.failing = False
    with capture_logs() as logs:
        dp.accepted(JOB_A, b"d" * 32, NODE, FLOW)
    assert kernel.writes[0] == "px_flows"
    assert events(logs) == []
    assert failures(metrics, "map_failed") == 1
