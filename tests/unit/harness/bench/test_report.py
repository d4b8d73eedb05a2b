"""`egressd bench` results: wrk and curl parsing, medians, comparisons, table, JSON."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from egressd_harness.bench import report
from egressd_harness.bench.load import Target, curl_argv, wrk_argv
from egressd_harness.bench.paths import bench_policy, squid_conf, squid_ruleset
from egressd_harness.bench.report import (
    BulkResult,
    IdleResult,
    ParseError,
    PathResult,
    WrkResult,
    compare,
    duration_us,
    goals,
    parse_curl,
    parse_wrk,
    render_table,
    to_json,
)

# Real wrk 4.1.0 output (Debian bookworm), keep-alive latency run.
WRK_LATENCY = """\
Running 5s test @ http://203.0.113.10/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   422.56us  293.45us   7.59ms   96.74%
    Req/Sec     2.50k   470.16     3.54k    74.00%
  Latency Distribution
     50%  379.00us
     75%  467.00us
     90%  576.00us
     99%    1.56ms
  12437 requests in 5.00s, 3.56MB read
Requests/sec:   2487.06
Transfer/sec:    728.63KB
"""

# A Connection: close run with socket errors and error responses.
WRK_CLOSE_ERRORS = """\
Running 5s test @ http://203.0.113.10/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    28.52ms   17.60ms  88.13ms   60.58%
    Req/Sec   503.01    122.96   777.00     64.00%
  5018 requests in 5.02s, 1.53MB read
  Socket errors: connect 3, read 17, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:   1000.10
Transfer/sec:    311.55KB
"""

# Percentiles past a millisecond and a second; a run shorter than a second.
WRK_SLOW = """\
Running 1s test @ http://203.0.113.10/
  1 threads and 1 connections
  Latency Distribution
     50%    1.20ms
     75%    2.00ms
     90%  900.00ms
     99%    2.50s
  12 requests in 800.00ms, 3.00KB read
Requests/sec:     15.00
Transfer/sec:      3.75KB
"""

TARGET = Target("egd-b-direct", ipaddress.IPv4Address("203.0.113.10"), 80, "api.allowed.test")


# --- wrk ----------------------------------------------------------------------------


def test_parse_wrk_latency_run() -> None:
    r = parse_wrk(WRK_LATENCY)
    assert r.requests == 12437
    assert r.duration_s == pytest.approx(5.0)
    assert r.requests_per_s == pytest.approx(2487.06)
    assert r.p50_us == pytest.approx(379.0)
    assert r.p99_us == pytest.approx(1560.0)
    assert r.percentiles_us[75.0] == pytest.approx(467.0)
    assert r.errors == 0
    assert r.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}


def test_parse_wrk_errors() -> None:
    r = parse_wrk(WRK_CLOSE_ERRORS)
    assert r.socket_errors == {"connect": 3, "read": 17, "write": 0, "timeout": 2}
    assert r.non_2xx == 5
    assert r.errors == 27
    assert r.p50_us is None and r.p99_us is None  # no --latency: no distribution
    assert r.requests_per_s == pytest.approx(1000.10)


def test_parse_wrk_units() -> None:
    r = parse_wrk(WRK_SLOW)
    assert r.p50_us == pytest.approx(1200.0)
    assert r.percentiles_us[90.0] == pytest.approx(900_000.0)
    assert r.p99_us == pytest.approx(2_500_000.0)
    assert r.duration_s == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("text", "us"),
    [("379.00us", 379.0), ("1.56ms", 1560.0), ("2.00s", 2e6), ("1.50m", 90e6), ("7us", 7.0)],
)
def test_duration_units(text: str, us: float) -> None:
    assert duration_us(text) == pytest.approx(us)


@pytest.mark.parametrize("text", ["", "1.5", "3 ms", "-1ms", "1.5ks"])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(ParseError):
        duration_us(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unable to connect to 203.0.113.10:81 Connection refused\n",
        WRK_LATENCY.split("  12437")[0],
    ],
)
def test_parse_wrk_rejects_output_without_totals(text: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_wrk(text)
    assert info.value.reason == "wrk_output"


def test_wrk_argv() -> None:
    argv = wrk_argv(TARGET, seconds=5, connections=32, threads=2, close=True)
    assert argv[0] == "wrk"
    assert "--connections=32" in argv and "--threads=2" in argv and "--duration=5s" in argv
    assert argv[argv.index("Connection: close") - 1] == "--header"
    assert "Host: api.allowed.test" in argv
    assert "--latency" not in argv
    assert argv[-1] == "http://203.0.113.10:80/"
    latency = wrk_argv(TARGET, seconds=5, connections=1, threads=4, latency=True)
    assert "--threads=1" in latency  # wrk refuses more threads than connections
    assert "--latency" in latency and "Connection: close" not in latency


# --- curl ---------------------------------------------------------------------------


def test_parse_curl() -> None:
    r = parse_curl("200 209715200 0.231 0.002\n", expect_bytes=209715200)
    assert r.nbytes == 209715200
    assert r.mb_per_s == pytest.approx(209715200 / 0.231 / 1e6)
    assert r.first_byte_s == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("404 20 0.01 0.01", "http_status"),
        ("200 1000 0.5 0.01", "short_download"),
        ("200 1000", "curl_output"),
        ("200 many 0.5 0.1", "curl_output"),
    ],
)
def test_parse_curl_rejects(text: str, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_curl(text, expect_bytes=2000)
    assert info.value.reason == reason


def test_curl_argv_matches_parser() -> None:
    argv = curl_argv(TARGET, 1000, 60)
    assert argv[-1] == "http://203.0.113.10:80/bytes/1000"
    assert argv[argv.index("--write-out") + 1] == report.CURL_WRITE_OUT
    assert report.CURL_WRITE_OUT.count("%{") == 4  # what parse_curl reads


# --- results, comparisons, goals -----------------------------------------------------


def _wrk(rps: float, p50: float | None = None, p99: float | None = None) -> WrkResult:
    pct = {} if p50 is None else {50.0: p50, 99.0: p99 if p99 is not None else p50 * 3}
    return WrkResult(requests=int(rps * 5), duration_s=5.0, requests_per_s=rps, percentiles_us=pct)


def _path(
    name: str,
    p50s: list[float],
    rates: list[float],
    mbs: list[float],
    idle: IdleResult | None = None,
    proxies: int = 0,
) -> PathResult:
    return PathResult(
        name=name,
        latency=[_wrk(1000, p) for p in p50s],
        connrate=[_wrk(r) for r in rates],
        bulk=[BulkResult(nbytes=int(m * 1e6), seconds=1.0) for m in mbs],
        idle=idle,
        proxy_processes=proxies,
    )


IDLE = IdleResult(
    requested=10_000,
    opened=10_000,
    failed=0,
    alive_at_measure=10_000,
    rss_before_kib={"proxy1": 50 * 1024, "proxy2": 50 * 1024},
    rss_after_kib={"proxy1": 150 * 1024, "proxy2": 250 * 1024},
)


def _results() -> dict[str, PathResult]:
    return {
        "kernel": _path("kernel", [80, 70, 90], [17000, 16000, 18000], [2500, 2400, 2600]),
        "squid": _path("squid", [250, 240, 260], [2000, 2100, 1900], [230, 220, 240], proxies=1),
        "egressd": _path(
            "egressd", [200, 190, 400], [9000, 8000, 8500], [300, 310, 290], idle=IDLE, proxies=2
        ),
    }


def test_medians() -> None:
    r = _results()["egressd"]
    assert r.p50_us == 200
    assert r.p99_us == 600
    assert r.conn_per_s == 8500
    assert r.bulk_mb_s == pytest.approx(300)
    assert r.idle_rss_mib == pytest.approx(400)
    assert IDLE.kib_per_connection == pytest.approx(300 * 1024 / 10_000)


def test_median_ignores_missing_samples() -> None:
    assert report.median([None, 3.0, 1.0]) == 2.0
    assert report.median([None]) is None
    assert PathResult(name="x").p50_us is None


def test_compare_against_kernel() -> None:
    cmp = compare(_results())
    assert cmp["squid"].added_p50_us == 170
    assert cmp["egressd"].added_p50_us == 120
    assert cmp["egressd"].conn_ratio == pytest.approx(0.5)
    assert cmp["squid"].bulk_ratio == pytest.approx(0.092)
    assert cmp["kernel"].added_p50_us == 0


def test_compare_skips_failed_paths_and_needs_a_baseline() -> None:
    results = _results()
    results["egressd"].error = "sandbox_not_registered: agent_unreachable"
    assert "egressd" not in compare(results)
    del results["kernel"]
    assert compare(results) == {}


def test_goals() -> None:
    by_name = {g.name: g for g in goals(_results())}
    assert by_name["added_p50_vs_squid"].met is True  # 120 <= 170
    per_proxy = by_name["conn_per_s_per_proxy"]
    assert per_proxy.value == pytest.approx(4250) and per_proxy.met is True
    assert by_name["bulk_vs_squid"].met is True


def test_goals_not_measurable_when_egressd_failed() -> None:
    results = _results()
    results["egressd"].error = "boom"
    assert all(g.met is None for g in goals(results))


# --- table ------------------------------------------------------------------------------


def test_table() -> None:
    text = render_table(_results())
    lines = text.splitlines()
    assert lines[0].split() == [
        "path",
        "p50",
        "us",
        "p99",
        "us",
        "conn/s",
        "bulk",
        "MB/s",
        "proxy",
        "RSS",
        "idle10k",
        "MiB",
        "CPU",
        "us/conn",
        "CPU",
        "ms/MB",
    ]
    assert lines[2].split() == ["kernel", "80", "240", "17,000", "2,500.0", "-", "-", "-"]
    assert lines[3].split() == ["squid", "250", "750", "2,000", "230.0", "-", "-", "-"]
    assert lines[4].split() == ["egressd", "200", "600", "8,500", "300.0", "400.0", "-", "-"]
    assert "  squid    +170 us / +510 us / 0.12x / 0.09x" in lines
    assert "  egressd  +120 us / +360 us / 0.50x / 0.12x" in lines
    assert not any(line.startswith("!") for line in lines)
    # Numbers are right-aligned under their headers.
    assert len({len(line) for line in lines[:5]}) == 1


def test_table_reports_a_failed_path_and_failed_measures() -> None:
    results = _results()
    results["egressd"] = PathResult(
        name="egressd", error="sandbox_not_registered: agent_unreachable: no socket"
    )
    results["squid"].failures.append(("bulk", "curl_failed: exit 28"))
    results["squid"].connrate.append(WrkResult(10, 5.0, 2.0, socket_errors={"read": 4}))
    text = render_table(results)
    assert text.splitlines()[4].split() == ["egressd", "error", "-", "-", "-", "-", "-", "-"]
    assert "! egressd: sandbox_not_registered: agent_unreachable: no socket" in text
    assert "! squid: bulk failed: curl_failed: exit 28" in text
    assert "! squid: 4 wrk errors" in text
    assert "egressd  +" not in text


def test_table_names_the_idle_count_used() -> None:
    results = _results()
    idle = results["egressd"].idle
    assert idle is not None
    results["egressd"].idle = IdleResult(
        requested=500,
        opened=500,
        failed=0,
        alive_at_measure=500,
        rss_before_kib=idle.rss_before_kib,
        rss_after_kib=idle.rss_after_kib,
    )
    assert "proxy RSS idle500 MiB" in render_table(results).splitlines()[0]


def test_render_goals() -> None:
    text = report.render_goals(goals(_results()))
    assert "[met] egressd's added p50 over the kernel path <= Squid's: 120.0 vs 170.0" in text


# --- JSON -----------------------------------------------------------------------------------


def test_json_document(tmp_path: Path) -> None:
    doc = to_json(_results(), {"host": {"cpus": 2}})
    path = tmp_path / "out.json"
    path.write_text(json.dumps(doc))  # serialisable as is
    back = json.loads(path.read_text())
    assert back["schema"] == report.SCHEMA
    assert list(back["table"]) == ["kernel", "squid", "egressd"]
    assert back["table"]["egressd"] == {
        "p50_us": 200,
        "p99_us": 600,
        "conn_per_s": 8500,
        "bulk_mb_s": 300.0,
        "proxy_rss_idle10k_mib": 400.0,
        "cpu_us_per_conn": None,
        "cpu_ms_per_mb": None,
        "platform": None,
        "error": None,
    }
    assert back["vs_kernel"]["egressd"]["added_p50_us"] == 120
    assert "kernel" not in back["vs_kernel"]
    samples = back["paths"]["egressd"]["samples"]
    assert [s["percentiles_us"]["p50"] for s in samples["latency"]] == [200, 190, 400]
    assert len(samples["connrate"]) == 3 and len(samples["bulk"]) == 3
    assert back["paths"]["egressd"]["idle"]["rss_after_kib"] == {"proxy1": 153600, "proxy2": 256000}
    assert {g["name"] for g in back["goals"]} == {
        "added_p50_vs_squid",
        "conn_per_s_per_proxy",
        "bulk_vs_squid",
    }
    assert back["meta"] == {"host": {"cpus": 2}}


# --- Squid and policy configuration (pure) ---------------------------------------------


def test_squid_conf(tmp_path: Path) -> None:
    conf = squid_conf(tmp_path, max_fds=20000).splitlines()
    assert "http_port 3129 intercept" in conf
    assert "acl bench_clients src 198.51.100.0/24" in conf
    assert conf.index("http_access allow bench_clients") < conf.index("http_access deny all")
    assert "cache deny all" in conf and "workers 1" in conf
    assert f"pid_filename {tmp_path / 'squid.pid'}" in conf
    assert f"access_log stdio:{tmp_path / 'access.log'}" in conf
    assert "server_persistent_connections off" in conf
    assert "max_filedescriptors 20000" in conf
    # Only the loopback forward port and the intercept port are open.
    assert [line for line in conf if line.startswith("http_port")] == [
        "http_port 127.0.0.1:3128",
        "http_port 3129 intercept",
    ]


def test_squid_ruleset_redirects_only_http_from_the_client_side() -> None:
    rules = squid_ruleset()
    assert 'iifname "cl0" tcp dport 80 redirect to :3129' in rules
    # Atomic replace: create-if-missing, delete, recreate.
    assert rules.index("delete table ip egressd_bench") < rules.index("chain prerouting")


def test_bench_policy_allows_only_the_site() -> None:
    policy = bench_policy("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2", "node1")
    assert policy["egress"] == [{"host": "api.allowed.test", "ports": [80]}]
    assert policy["nodes"] == ["node1"]
    assert not {"iat", "nbf", "exp"} & set(policy)
