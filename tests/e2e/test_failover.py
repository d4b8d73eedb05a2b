"""Proxy failover, end to end: a proxy dies under a sandbox's steady stream of
new HTTPS connections; within 5 s every new connection goes through the
proxy that is left, node1 reports the dead proxy down, and once the proxy is
back new flows use it again (DESIGN.md packet path step 4; agent/health.py).

The sandbox makes a fresh connection (DNS lookup, TCP, TLS, GET) every
100 ms for 20 s and prints one JSON line per attempt. Attempt times are taken
on the host, from the arrival of each line minus the attempt's duration, so
they share a clock with the moment the proxy is stopped.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from egressd_harness.topology import procs
from egressd_harness.topology.fleet import Fleet, wait_for
from tests.support.fleet import Job, metric_sum, metrics, probe, proxy_events, sandbox_argv

ALLOWED = [{"host": "api.allowed.test", "ports": [443]}]
FAILOVER_BOUND_S = 5.0
LOOP_S = 20.0
STOP_AFTER_S = 5.0  # of attempts before proxy1 is stopped

LOOP_UDF = r"""
import json, socket, ssl, sys, time
host, duration, gap, timeout = sys.argv[1], *map(float, sys.argv[2:5])
ctx = ssl.create_default_context()
request = f"GET /data HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
end = time.monotonic() + duration
i = 0
while time.monotonic() < end:
    start = time.monotonic()
    out = {"i": i, "mono": round(start, 4)}
    try:
        addr = socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        with socket.create_connection(addr, timeout=timeout) as raw:
            out["sport"] = raw.getsockname()[1]
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(timeout)
                tls.sendall(request)
                head = tls.recv(64)
        out["ok"] = head.startswith(b"HTTP/1.1 200")
    except OSError as exc:
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["ms"] = round((time.monotonic() - start) * 1000, 1)
    print(json.dumps(out), flush=True)
    i += 1
    time.sleep(gap)
"""


@dataclass(frozen=True)
class Attempt:
    start: float  # host monotonic
    end: float
    ok: bool
    sport: int | None
    error: str | None


class Reader(threading.Thread):
    """Reads the sandbox's lines as they come, stamping each on arrival."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(name="failover-sandbox-reader", daemon=True)
        self.proc = proc
        self.attempts: list[Attempt] = []
        self.other: list[str] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            if not line.startswith("{"):
                self.other.append(line)
                continue
            item = json.loads(line)
            self.attempts.append(
                Attempt(
                    now - float(item["ms"]) / 1000,
                    now,
                    bool(item["ok"]),
                    item.get("sport"),
                    item.get("error"),
                )
            )


def _proxy_up(fleet: Fleet, node: str, proxy: str) -> float:
    return metric_sum(metrics(fleet, node), "egressd_proxy_up", proxy=proxy)


def _tunnel_tx(fleet: Fleet, node: str, proxy: str) -> float:
    return metric_sum(
        metrics(fleet, node), "egressd_tunnel_packets_total", proxy=proxy, direction="tx"
    )


def _allowed_sports(fleet: Fleet, job_id: str, proxy: str) -> set[int]:
    return {
        int(str(e["source"]).rsplit(":", 1)[1])
        for e in proxy_events(fleet, job_id, "connection")
        if e.get("proxy") == proxy and e.get("verdict") == "allow" and e.get("source")
    }


def _launch_loop(fleet: Fleet, job: Job, tmp: Path) -> subprocess.Popen[str]:
    udf_dir = tmp / "udf"
    udf_dir.mkdir()
    (udf_dir / "loop.py").write_text(LOOP_UDF)
    cmd = sandbox_argv(
        fleet,
        job,
        job.policy_file(tmp),
        ["python3", "/t/loop.py", "api.allowed.test", str(LOOP_S), "0.1", "2"],
        mounts=[f"{udf_dir}:/t"],
        timeout_s=90,
    )
    # stderr to a file: a pipe nobody reads could fill and stall the sandbox.
    with open(tmp / "sandbox.stderr", "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)


def test_proxy_failover_and_return(
    fleet: Fleet, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    job = Job(fleet, "node1", ALLOWED).sign()
    assert wait_for(
        lambda: (
            _proxy_up(fleet, "node1", "proxy1") == 1 and _proxy_up(fleet, "node1", "proxy2") == 1
        ),
        10,
    )
    proc = _launch_loop(fleet, job, tmp_path)
    reader = Reader(proc)
    reader.start()
    stopper: threading.Thread | None = None
    try:
        # Run a while with both proxies, until proxy1 has carried some of the flows.
        assert wait_for(lambda: bool(reader.attempts), 60), "the sandbox did not start"
        first = reader.attempts[0].start
        assert wait_for(lambda: time.monotonic() - first >= STOP_AFTER_S, STOP_AFTER_S + 1)
        assert wait_for(lambda: bool(_allowed_sports(fleet, job.job_id, "proxy1")), 3), (
            "proxy1 carried none of the flows before it was stopped"
        )

        stopped_at = time.monotonic()
        stopper = threading.Thread(
            target=procs.stop, args=(fleet.run_dir, "proxy1"), name="stop-proxy1"
        )
        stopper.start()
        assert wait_for(
            lambda: _proxy_up(fleet, "node1", "proxy1") == 0, FAILOVER_BOUND_S + 1, 0.05
        )
        down_after_s = time.monotonic() - stopped_at
        stopper.join(timeout=15)
        assert not stopper.is_alive()
        proc.wait(timeout=LOOP_S + 60)
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if stopper is not None:
            stopper.join(timeout=15)
        fleet.up()  # proxy1 back for the later tests, also after a failure
    assert proc.returncode == 0, (tmp_path / "sandbox.stderr").read_text()

    attempts = reader.attempts
    before = [a for a in attempts if a.end < stopped_at]
    after = [a for a in attempts if a.start >= stopped_at]
    settled = [a for a in attempts if a.start >= stopped_at + FAILOVER_BOUND_S]
    failed = [a for a in after if not a.ok]
    gap_s = max((a.end - stopped_at for a in failed), default=0.0)
    summary = {
        "attempts": len(attempts),
        "before_stop": len(before),
        "after_stop": len(after),
        "failed_after_stop": len(failed),
        "gap_s": round(gap_s, 2),
        "slowest_after_stop_s": round(max((a.end - a.start for a in after), default=0.0), 2),
        "proxy_up_0_after_s": round(down_after_s, 2),
        "errors": sorted({a.error or "" for a in failed}),
    }
    print("failover:", json.dumps(summary))
    for key, value in summary.items():
        record_property(key, value)

    assert all(a.ok for a in before), [a for a in before if not a.ok]
    assert down_after_s <= FAILOVER_BOUND_S, summary
    assert len(settled) >= 25, summary
    assert all(a.ok for a in settled), [a for a in settled if not a.ok]
    assert gap_s <= FAILOVER_BOUND_S, summary
    # Every connection after the bound went through proxy2: its audit log has each one.
    want = {a.sport for a in settled}
    assert wait_for(lambda: want <= _allowed_sports(fleet, job.job_id, "proxy2"), 5), sorted(
        want - _allowed_sports(fleet, job.job_id, "proxy2"), key=str
    )

    # proxy1 is back (fleet.up waited for its /readyz); node1 takes it up again
    # (two good probes) and new flows hash to it again.
    assert wait_for(lambda: _proxy_up(fleet, "node1", "proxy1") == 1, 10)
    tx_before = _tunnel_tx(fleet, "node1", "proxy1")
    again = Job(fleet, "node1", ALLOWED).sign()
    urls = [f"https://api.allowed.test/data?n={i}" for i in range(12)]
    results = probe(fleet, again, tmp_path, urls)
    assert all(results[u]["ok"] for u in urls), results
    assert _tunnel_tx(fleet, "node1", "proxy1") > tx_before
    assert _allowed_sports(fleet, again.job_id, "proxy1"), "no new flow went through proxy1"
