"""`egressd bench`'s interception rows (issue 12): HTTPS client arguments, Squid's
bump configuration and CA, the intercepting job's policy, the table, JSON and plot."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from egressd.policy.model import parse_policy
from egressd_harness.bench import plots, report
from egressd_harness.bench.load import Target, curl_argv, hosts_line, with_hosts, wrk_argv
from egressd_harness.bench.paths import bench_policy, squid_bump_conf, squid_ruleset, write_bump_ca
from egressd_harness.bench.report import (
    BulkResult,
    PathResult,
    WrkResult,
    compare,
    intercept_goals,
    intercept_json,
    intercept_ratios,
    render_intercept,
    render_table,
    to_json,
)

ADDR = ipaddress.IPv4Address("203.0.113.10")
PLAIN = Target("egd-b-direct", ADDR, 80, "api.allowed.test")
TLS = Target(
    "egd-b-sqtlscl",
    ADDR,
    443,
    "api.allowed.test",
    tls=True,
    ca_file=Path("/tmp/w/bump-ca.pem"),
    hosts_file=Path("/tmp/w/hosts"),
)


# --- clients ------------------------------------------------------------------------------


def test_https_target_names_the_host_so_that_it_is_the_sni() -> None:
    assert TLS.url("/") == "https://api.allowed.test:443/"
    assert PLAIN.url("/") == "http://203.0.113.10:80/"
    assert hosts_line(TLS) == "203.0.113.10 api.allowed.test\n"


def test_wrk_over_https_runs_with_the_hosts_file_bound_on_etc_hosts() -> None:
    argv = with_hosts(TLS, wrk_argv(TLS, seconds=2, connections=1, threads=1, latency=True))
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    script_at = argv.index("-c") + 1
    assert argv[script_at] == 'mount --bind "$0" /etc/hosts && exec "$@"'
    assert argv[script_at + 1] == "/tmp/w/hosts"
    assert argv[script_at + 2] == "wrk" and argv[-1] == "https://api.allowed.test:443/"
    plain = wrk_argv(PLAIN, seconds=2, connections=1, threads=1)
    assert with_hosts(PLAIN, plain) == plain


def test_curl_over_https_resolves_and_verifies_against_the_proxy_ca() -> None:
    argv = curl_argv(TLS, 1000, 60)
    assert argv[argv.index("--resolve") + 1] == "api.allowed.test:443:203.0.113.10"
    assert argv[argv.index("--cacert") + 1] == "/tmp/w/bump-ca.pem"
    assert argv[-1] == "https://api.allowed.test:443/bytes/1000"
    assert "--insecure" not in argv and "-k" not in argv
    assert "--resolve" not in curl_argv(PLAIN, 1000, 60)
    assert curl_argv(TLS, 0, 3, path="/")[-1] == "https://api.allowed.test:443/"


# --- Squid bump --------------------------------------------------------------------------


def test_squid_bump_conf(tmp_path: Path) -> None:
    conf = squid_bump_conf(tmp_path, max_fds=20000, certgen="/c/certgen").splitlines()
    (https,) = [line for line in conf if line.startswith("https_port")]
    assert https.startswith("https_port 3130 intercept ssl-bump ")
    assert f"tls-cert={tmp_path / 'bump-ca.pem'}" in https.split()
    assert f"tls-key={tmp_path / 'bump-ca.key'}" in https.split()
    assert "generate-host-certificates=on" in https.split()
    assert [line for line in conf if line.startswith("http_port")] == ["http_port 127.0.0.1:3128"]
    assert conf.index("ssl_bump peek step1") < conf.index("ssl_bump bump all")
    assert f"tls_outgoing_options cafile={tmp_path / 'upstream-ca.pem'}" in conf
    assert f"sslcrtd_program /c/certgen -s {tmp_path / 'ssl_db'} -M 16MB" in conf
    assert conf.index("http_access allow bench_clients") < conf.index("http_access deny all")
    assert "server_persistent_connections on" in conf  # conservative for egressd: see docstring
    assert not any("sslproxy_cert_error" in line or "DONT_VERIFY" in line for line in conf)


def test_squid_bump_ruleset_redirects_https() -> None:
    rules = squid_ruleset(port=3130, dport=443)
    assert 'iifname "cl0" tcp dport 443 redirect to :3130' in rules
    assert "dport 80" not in rules


def test_bump_ca(tmp_path: Path) -> None:
    cert_path = write_bump_ca(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    key = tmp_path / "bump-ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()


# --- the intercepting job ------------------------------------------------------------------


def test_intercept_policy_is_valid_and_allows_only_what_the_bench_asks() -> None:
    payload = bench_policy("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2", "node1", intercept=True)
    egress = payload["egress"]
    assert isinstance(egress, list)
    (rule,) = egress
    assert rule == {
        "host": "api.allowed.test",
        "ports": [443],
        "tls": "intercept",
        "http": {"allow": [{"methods": ["GET"], "paths": ["/", "/bytes/*"]}]},
    }
    policy = parse_policy(payload, require_timestamps=False)
    assert len(policy.egress) == 1


# --- report ---------------------------------------------------------------------------------


def _wrk(rps: float, p50: float, p99: float) -> WrkResult:
    return WrkResult(int(rps), 1.0, rps, percentiles_us={50.0: p50, 99.0: p99})


def _row(
    name: str, keepalive: list[float], conn: list[float], bulk: list[float], p50: list[float]
) -> PathResult:
    return PathResult(
        name=name,
        latency=[_wrk(k, p, p * 3) for k, p in zip(keepalive, p50, strict=True)],
        connrate=[WrkResult(int(c), 1.0, c) for c in conn],
        bulk=[BulkResult(int(b * 1e6), 1.0) for b in bulk],
    )


def _results() -> dict[str, PathResult]:
    return {
        "kernel": _row("kernel", [9000] * 3, [17000] * 3, [2500] * 3, [80] * 3),
        "squid-bump": _row(
            "squid-bump", [1000, 1100, 900], [500, 450, 550], [200, 210, 190], [900, 850, 1000]
        ),
        "egressd-intercept": _row(
            "egressd-intercept",
            [1500, 1400, 1600],
            [400, 420, 380],
            [250, 240, 260],
            [600, 650, 700],
        ),
    }


def test_intercept_rows_are_compared_with_squid_bump_not_the_kernel() -> None:
    results = _results()
    assert set(compare(results)) == {"kernel"}
    ratios = intercept_ratios(results)
    assert ratios["keepalive_rps"] == pytest.approx(1.5)
    assert ratios["conn_per_s"] == pytest.approx(400 / 500)
    assert ratios["p50_us"] == pytest.approx(650 / 900)
    by_name = {g.name: g for g in intercept_goals(results)}
    assert by_name["intercept_keepalive_rps_vs_squid"].met is True
    assert by_name["intercept_conn_per_s_vs_squid"].met is False
    assert by_name["intercept_bulk_mb_s_vs_squid"].met is True
    assert by_name["intercept_p50_us_vs_squid"].met is True  # lower is better
    assert by_name["intercept_p99_us_vs_squid"].value == pytest.approx(1950)


def test_intercept_goals_not_measurable_without_squid() -> None:
    results = _results()
    results["squid-bump"].error = "squid_exited: exit 1"
    assert intercept_ratios(results) == {}
    assert all(g.met is None for g in intercept_goals(results))


def test_intercept_table() -> None:
    results = _results()
    assert "squid-bump" not in render_table(results)
    lines = render_intercept(results).splitlines()
    assert lines[1].split()[:3] == ["path", "keep-alive", "req/s"]
    assert lines[3].split() == ["squid-bump", "1,000", "500", "200.0", "900", "2,700"]
    assert lines[4].split() == ["egressd-intercept", "1,500", "400", "250.0", "650", "1,950"]
    text = "\n".join(lines)
    assert "egressd-intercept / squid-bump: keep-alive 1.50x, conn/s 0.80x" in text
    assert "[NOT met] egressd intercept conn_per_s >= Squid bump's: 400.0 vs 500.0" in text
    assert render_intercept({"kernel": results["kernel"]}) == ""


def test_intercept_table_names_a_failed_row() -> None:
    results = _results()
    results["egressd-intercept"] = PathResult(
        name="egressd-intercept", error="path_not_working: HTTP 403"
    )
    text = render_intercept(results)
    assert [ln.split()[:2] for ln in text.splitlines()][4] == ["egressd-intercept", "error"]
    assert "! egressd-intercept: path_not_working: HTTP 403" in text


def test_intercept_json_has_medians_ranges_ratios_and_goals() -> None:
    doc = json.loads(json.dumps(to_json(_results(), {})))
    rows = doc["intercept"]["rows"]
    assert list(rows) == ["squid-bump", "egressd-intercept"]
    e = rows["egressd-intercept"]
    assert e["keepalive_rps"] == 1500 and e["keepalive_rps_range"] == [1400, 1600]
    assert e["p50_us_range"] == [600, 700] and e["error"] is None
    assert doc["intercept"]["vs_squid_bump"]["keepalive_rps"] == 1.5
    assert len(doc["intercept"]["goals"]) == 5
    assert "egressd-intercept" not in doc["vs_kernel"]
    assert intercept_json({"kernel": _results()["kernel"]}) == {
        "rows": {},
        "vs_squid_bump": {},
        "goals": [],
    }


def test_plot_draws_the_interception_row(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(to_json(_results(), {"options": {"repeat": 3}})))
    drawn = plots.render(doc, tmp_path / "b.png")
    assert [b.label for b in drawn.conn_per_s] == ["kernel"]
    tls = drawn.intercept
    assert tls is not None
    assert [b.label for b in tls.keepalive_rps] == ["squid-bump", "egressd-intercept"]
    assert tls.keepalive_rps[1].value == 1500 and tls.keepalive_rps[1].ratio == 1.5
    assert tls.keepalive_rps[0].ratio == 1.0
    assert tls.conn_per_s[1].samples == (400.0, 420.0, 380.0)
    assert tls.p99_us[0].value == 2700
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.EGRESSD_INTERCEPT in plots.COLORS
