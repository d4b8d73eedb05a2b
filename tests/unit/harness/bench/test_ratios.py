"""Issue 10's goal ratios (egressd against this run's Squid) and the CPU columns."""

from __future__ import annotations

import json

import pytest

from egressd_harness.bench import ratios, report
from egressd_harness.bench.cpu import CpuSample
from egressd_harness.bench.report import BulkResult, PathResult, WrkResult


def _wrk(rps: float, p50: float | None = None, p99: float | None = None) -> WrkResult:
    pct = {} if p50 is None else {50.0: p50, 99.0: p99 if p99 is not None else p50 * 2}
    return WrkResult(requests=int(rps * 5), duration_s=5.0, requests_per_s=rps, percentiles_us=pct)


def _path(
    name: str,
    lat: list[tuple[float, float]],
    rates: list[float],
    mbs: list[float],
    cpu_conn_s: list[float] | None = None,
    cpu_mb_s: list[float] | None = None,
) -> PathResult:
    r = PathResult(
        name=name,
        latency=[_wrk(1000, p50, p99) for p50, p99 in lat],
        connrate=[_wrk(x) for x in rates],
        bulk=[BulkResult(nbytes=int(m * 1e6), seconds=1.0) for m in mbs],
    )
    # CPU seconds per 10,000 connections / per 100 MB.
    r.connrate_cpu = [CpuSample({"p": s}, connections=10_000) for s in cpu_conn_s or []]
    r.bulk_cpu = [CpuSample({"p": s}, nbytes=100_000_000) for s in cpu_mb_s or []]
    return r


def _results() -> dict[str, PathResult]:
    return {
        "kernel": _path("kernel", [(100, 200), (90, 180), (110, 220)], [20000], [3000]),
        "squid": _path(
            "squid",
            [(300, 1000), (310, 1100), (290, 900)],
            [4000, 3900, 4100],
            [500, 400, 450],
            cpu_conn_s=[2.0, 2.2, 1.8],  # 200 us / connection (median)
            cpu_mb_s=[1.0, 1.0, 1.0],  # 10 ms / MB
        ),
        "egressd": _path(
            "egressd",
            [(180, 900), (200, 1300), (190, 1000)],  # added p50 90, added p99 800
            [7000, 6000, 6500],
            [2000, 1900, 1800],
            cpu_conn_s=[1.0, 3.0, 1.5],  # 150 us / connection
            cpu_mb_s=[0.2, 0.3, 0.25],
        ),
    }


def test_cpu_medians_on_the_path() -> None:
    e = _results()["egressd"]
    assert e.cpu_us_per_conn == pytest.approx(150)
    assert e.cpu_ms_per_mb == pytest.approx(2.5)
    assert PathResult(name="kernel").cpu_us_per_conn is None


def test_ratios_from_medians_and_verdicts() -> None:
    by_key = {r.key: r for r in ratios.ratios(_results())}
    conn = by_key["conn_ratio"]
    assert conn.value == pytest.approx(6500 / 4000) and conn.met is True
    p50 = by_key["added_p50_ratio"]
    assert p50.value == pytest.approx(90 / 200) and p50.met is True
    p99 = by_key["added_p99_ms"]
    assert p99.value == pytest.approx(0.8) and p99.met is True
    bulk = by_key["bulk_ratio"]
    assert bulk.value == pytest.approx(1900 / 450) and bulk.met is True
    cpu = by_key["cpu_per_conn_ratio"]
    assert cpu.value == pytest.approx(0.75) and cpu.met is True
    info = by_key["cpu_per_mb_ratio"]
    assert info.value == pytest.approx(0.25) and info.met is None
    # No /proc/stat figures in these samples: the machine ratio has no value, no verdict.
    assert by_key["machine_per_conn_ratio"].value is None


def test_machine_per_conn_ratio_from_the_samples_medians() -> None:
    results = _results()
    for name, busy in (("squid", [5.0, 6.0, 4.0]), ("egressd", [9.0, 8.0, 7.5])):
        results[name].connrate_cpu = [
            CpuSample({"p": 1.0}, connections=10_000, machine_busy_s=b) for b in busy
        ]
    assert results["squid"].machine_us_per_conn == pytest.approx(500)
    machine = {r.key: r for r in ratios.ratios(results)}["machine_per_conn_ratio"]
    assert machine.value == pytest.approx(800 / 500) and machine.met is None
    assert "[info] the machine's busy time per connection" in ratios.render([machine])


def test_goals_not_met() -> None:
    results = _results()
    results["egressd"] = _path(
        "egressd",
        [(400, 2500)] * 3,
        [3000] * 3,
        [900] * 3,
        cpu_conn_s=[3.0] * 3,
    )
    by_key = {r.key: r for r in ratios.ratios(results)}
    assert all(
        by_key[k].met is False
        for k in ("conn_ratio", "added_p50_ratio", "added_p99_ms", "bulk_ratio")
    )
    assert by_key["cpu_per_conn_ratio"].met is False
    text = ratios.render(list(by_key.values()), repeat=3)
    assert "goals (issue 10, one run, medians of 3):" in text
    assert (
        "[not met] new connections/s, egressd / Squid: 0.75x (goal >= 1.5x; below 1x: not done)"
        in text
    )
    assert "[not met] egressd's added p99 over the kernel path: 2.300 ms (goal < 1 ms)" in text


def test_unmeasurable_without_squid_or_on_failure() -> None:
    results = _results()
    del results["squid"]
    by_key = {r.key: r for r in ratios.ratios(results)}
    assert by_key["conn_ratio"].value is None and by_key["conn_ratio"].met is None
    assert by_key["added_p99_ms"].value == pytest.approx(0.8)  # needs only the kernel path
    results = _results()
    results["egressd"].error = "sandbox_not_registered: boom"
    assert all(r.met is None for r in ratios.ratios(results))
    # Squid adding nothing over the kernel path: no ratio rather than a division by zero.
    results = _results()
    results["squid"].latency = results["kernel"].latency
    assert {r.key: r for r in ratios.ratios(results)}["added_p50_ratio"].value is None


def test_render_and_json() -> None:
    items = ratios.ratios(_results())
    text = ratios.render(items)
    assert "[met] CPU per connection, egressd / Squid: 0.75x (goal <= 1x)" in text
    assert "[info] CPU per MB, egressd / Squid: 0.25x" in text
    doc = json.loads(json.dumps(ratios.to_json(items)))
    assert doc["conn_ratio"]["met"] is True and doc["conn_ratio"]["verdict"] == "met"
    assert doc["conn_ratio"]["goal"] == ">= 1.5" and doc["conn_ratio"]["floor"] == 1.0
    assert doc["added_p99_ms"]["unit"] == "ms"
    assert doc["cpu_per_mb_ratio"]["verdict"] is None


def test_table_and_json_carry_cpu_and_platform() -> None:
    results = _results()
    gv = _path("egressd-gvisor", [(900, 3000)], [800], [60], cpu_conn_s=[2.0])
    gv.platform = "ptrace"
    results["egressd-gvisor"] = gv
    lines = report.render_table(results).splitlines()
    assert lines[0].split()[-4:] == ["CPU", "us/conn", "CPU", "ms/MB"]
    assert lines[3].split()[-2:] == ["200", "10.00"]  # squid
    assert lines[4].split()[-2:] == ["150", "2.50"]  # egressd
    assert lines[5].split()[:2] == ["egressd-gvisor", "[ptrace]"]
    assert "  egressd-gvisor +" in "\n".join(lines)
    doc = report.to_json(results, {})
    assert doc["table"]["egressd-gvisor"]["platform"] == "ptrace"
    assert doc["table"]["squid"]["cpu_us_per_conn"] == 200
    assert doc["paths"]["egressd"]["samples"]["connrate_cpu"][0]["us_per_connection"] == 100
    assert list(doc["table"]) == ["kernel", "squid", "egressd", "egressd-gvisor"]
