"""The trust model, end to end (DESIGN.md "Trust model"): both tiers refuse
what is not signed, valid and bound, and a proxy fails closed.

1. At register: an expired, tampered, foreign-key or other-node policy makes
   `egressd sandbox run` exit 2 with one line naming the reason, and leaves
   no sandbox namespace.
2. After a delete: a job deleted at the control plane gets no more
   connections (the node withdraws its sandbox, `no_policy`; the proxies
   revoke its policy); a GENEVE datagram for a job the control plane does not
   know is dropped by the proxy (`policy_missing`).
3. Forged GENEVE, sent from sockets this test controls inside the fleet's
   namespaces, is dropped and counted under its reason on the proxy's
   /metrics, and legitimate traffic keeps flowing.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egressd.geneve.codec import GeneveOption, JobOption, encode
from egressd.layout import (
    CONTROL_ADDR,
    CONTROL_PORT,
    CTL_NS,
    GENEVE_PORT,
    NET_NS,
    UNDERLAY_BRIDGE,
)
from egressd.metrics_text import by_label
from egressd.net import netns as kn
from egressd.policy import jws, keys
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.probe import http_request
from tests.support.fleet import (
    Job,
    metric_sum,
    metrics,
    probe,
    proxy_events,
    sandbox_argv,
    sandbox_run,
)

ALLOWED = [{"host": "api.allowed.test", "ports": [443]}]
API_ADDR = "203.0.113.10"  # api.allowed.test in the layout
DROPPED = "egressd_geneve_rx_dropped_total"
OUTSIDER_ADDR = "198.18.0.99"  # on the underlay, registered as nothing

# A UDF for timed attempts: one JSON line per attempt. It connects to the
# address itself (no DNS), so the first packet the proxy sees is the SYN.
ATTEMPTS_UDF = r"""
import json, socket, ssl, sys, time
host, addr, first_delay, count, gap, timeout = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:7])
ctx = ssl.create_default_context()
request = f"GET /data HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
print(json.dumps({"ready": True, "mono": time.monotonic()}), flush=True)
time.sleep(first_delay)
for i in range(int(count)):
    start = time.monotonic()
    out = {"i": i, "mono": start}
    try:
        with socket.create_connection((addr, 443), timeout=timeout) as raw:
            out["sport"] = raw.getsockname()[1]
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(request)
                head = tls.recv(64)
        out["ok"] = head.startswith(b"HTTP/1.1 200")
        out["head"] = head[:20].decode(errors="replace")
    except OSError as exc:
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["ms"] = round((time.monotonic() - start) * 1000, 1)
    print(json.dumps(out), flush=True)
    time.sleep(gap)
"""


# --- helpers -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _payload(job_id: str, nodes: list[str], *, iat: int, exp: int) -> dict[str, object]:
    return {
        "v": 1,
        "job_id": job_id,
        "account": "e2e",
        "nodes": nodes,
        "mode": "enforce",
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "egress": ALLOWED,
    }


def _sandbox_netns(fleet: Fleet) -> set[str]:
    return set(kn.list_netns(f"{fleet.layout.prefix}sbx-"))


def _drops(fleet: Fleet, proxy: str) -> dict[str, float]:
    """The proxy's GENEVE drops by reason."""
    return by_label(metrics(fleet, proxy), DROPPED, "reason")


def _wait_drop(
    fleet: Fleet, proxy: str, before: dict[str, float], reason: str, n: int, timeout_s: float = 6.0
) -> dict[str, float]:
    """Wait until `reason` rose by `n` on `proxy`; return every reason's increase."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _drops(fleet, proxy)
        grown = {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}
        if grown.get(reason, 0.0) >= n or time.monotonic() > deadline:
            return grown
        time.sleep(0.1)


def _control_delete_policy(fleet: Fleet, job_id: str) -> int:
    reply = http_request(
        fleet.ns(CTL_NS),
        "DELETE",
        str(CONTROL_ADDR),
        CONTROL_PORT,
        f"/v1/jobs/{job_id}/policy",
        headers={"Authorization": f"Bearer {fleet.admin_token()}"},
    )
    return reply.status


def _start_sandbox(fleet: Fleet, job: Job, tmp: Path, argv: list[str]) -> subprocess.Popen[str]:
    """`egressd sandbox run` in the background, the attempts UDF mounted at /t."""
    udf_dir = tmp / "udf"
    udf_dir.mkdir(exist_ok=True)
    (udf_dir / "attempts.py").write_text(ATTEMPTS_UDF)
    cmd = sandbox_argv(
        fleet, job, job.policy_file(tmp), argv, mounts=[f"{udf_dir}:/t"], timeout_s=120
    )
    # stderr to a file: a pipe nobody reads could fill and stall the sandbox.
    with open(tmp / "sandbox.stderr", "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)


def _lines(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def _finish(proc: subprocess.Popen[str], tmp: Path, timeout_s: float = 60) -> str:
    """Wait for the sandbox (kill it past `timeout_s`); its stderr."""
    try:
        proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return (tmp / "sandbox.stderr").read_text()


def _ipv4_tcp_syn(src: str, dst: str = API_ADDR, sport: int = 40123, dport: int = 443) -> bytes:
    """A well-formed inner IPv4/TCP SYN (scapy as the oracle: valid checksums)."""
    from scapy.layers.inet import IP, TCP

    return bytes(IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags="S", seq=1000))


def _send(ns: str, bind_ip: str, datagrams: list[bytes], proxy_ip: str) -> None:
    """UDP from `bind_ip` (an ephemeral port, never 6081) in `ns` to the proxy's GENEVE port."""
    with kn.netns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((bind_ip, 0))
        for datagram in datagrams:
            sock.sendto(datagram, (proxy_ip, GENEVE_PORT))


@pytest.fixture
def outsider(fleet: Fleet) -> Iterator[str]:
    """An extra namespace on the fleet's underlay bridge at 198.18.0.99: no node, no proxy."""
    name = f"{fleet.layout.prefix}x99"
    net = fleet.ns(NET_NS)
    try:
        kn.ensure_netns(name)
        kn.ensure_veth(net, "u-x99", name, "under0")
        kn.enslave(net, "u-x99", UNDERLAY_BRIDGE)
        kn.set_link_up(net, "u-x99")
        kn.ensure_addr(name, "under0", f"{OUTSIDER_ADDR}/24")
        kn.set_link_up(name, "under0")
        yield name
    finally:
        kn.delete_netns(name)  # takes the veth and its bridge port with it
    assert name not in kn.list_netns(fleet.layout.prefix)


# --- 1. rejected at register ------------------------------------------------------


def _expired(fleet: Fleet, job_id: str) -> str:
    now = int(time.time())
    key = keys.load_signing_key(fleet.signing_key)
    return jws.sign_payload(_payload(job_id, ["node1"], iat=now - 7200, exp=now - 3600), key)


def _tampered(fleet: Fleet, job_id: str) -> str:
    token = Job(fleet, "node1", ALLOWED, job_id=job_id).sign().jws
    header, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    claims["egress"] = [{"host": "evil.test", "ports": [443]}]
    return ".".join(
        (
            header,
            _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()),
            signature,
        )
    )


def _foreign_key(fleet: Fleet, job_id: str) -> str:
    now = int(time.time())
    stranger = keys.generate_signing_key()
    assert stranger.kid not in keys.load_trusted_keys(fleet.keys_dir).keys
    return jws.sign_payload(_payload(job_id, ["node1"], iat=now, exp=now + 600), stranger)


def _other_node(fleet: Fleet, job_id: str) -> str:
    return Job(fleet, "node2", ALLOWED, job_id=job_id).sign().jws


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_expired, "expired"),
        (_tampered, "bad_signature"),
        (_foreign_key, "unknown_kid"),
        (_other_node, "job_not_bound_to_node"),
    ],
    ids=["expired", "tampered", "foreign-key", "bound-to-node2"],
)
def test_register_rejects_untrusted_policy(
    fleet: Fleet, tmp_path: Path, make: Callable[[Fleet, str], str], reason: str
) -> None:
    job = Job(fleet, "node1", ALLOWED)
    policy = tmp_path / "policy.jws"
    policy.write_text(make(fleet, job.job_id) + "\n")
    before = _sandbox_netns(fleet)

    done = sandbox_run(
        fleet, job, tmp_path, ["python3", "-c", "print('ran')"], policy_file=policy, timeout_s=60
    )

    # docker run's convention: 125 = egressd or the agent failed.
    assert done.returncode == 125, (done.returncode, done.stdout, done.stderr)
    assert "ran" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert reason in lines[0], lines[0]
    assert _sandbox_netns(fleet) == before, "a rejected sandbox left a namespace"


# --- 2. rejected at the proxy ----------------------------------------------------------


def test_deleted_job_is_denied_before_its_first_connection(fleet: Fleet, tmp_path: Path) -> None:
    """Registered with a valid policy, then the job is deleted before its first
    connection. The node agent follows the control plane's watch and withdraws
    the sandbox from tier 1, so its SYNs are dropped at the node (`no_policy`)
    and no proxy ever allows a connection. (A proxy that gets a deleted job's
    datagrams anyway drops them as `policy_missing`:
    test_geneve_for_unknown_job_is_dropped_as_policy_missing.)"""
    job = Job(fleet, "node1", ALLOWED).sign()
    no_policy_before = metric_sum(
        metrics(fleet, "node1"), "egressd_tier1_packets_total", verdict="drop", reason="no_policy"
    )
    proc = _start_sandbox(
        fleet,
        job,
        tmp_path,
        ["python3", "/t/attempts.py", "api.allowed.test", API_ADDR, "2", "2", "0.2", "3"],
    )
    try:
        lines = _lines(proc)
        assert next(lines, {}).get("ready"), "the sandbox did not start"
        assert _control_delete_policy(fleet, job.job_id) == 204
        attempts = list(lines)
    finally:
        err = _finish(proc, tmp_path)
    assert proc.returncode == 0, err
    assert len(attempts) == 2, attempts
    assert not any(a["ok"] for a in attempts), attempts
    dropped = (
        metric_sum(
            metrics(fleet, "node1"),
            "egressd_tier1_packets_total",
            verdict="drop",
            reason="no_policy",
        )
        - no_policy_before
    )
    assert dropped >= 2, "each attempt's SYNs are dropped at the node as no_policy"
    assert not [
        e for e in proxy_events(fleet, job.job_id, "connection") if e.get("verdict") == "allow"
    ]


def test_deleted_job_is_revoked_on_proxies_that_cached_it(fleet: Fleet, tmp_path: Path) -> None:
    """The job connects (both proxies cache its policy), then is deleted:
    new connections must be denied within a second or two (the proxies watch
    the control plane; fail closed)."""
    revoke_within_s = 2.0
    job = Job(fleet, "node1", ALLOWED).sign()
    # 8 attempts 0.3 s apart before the DELETE: with two proxies, both see
    # the job (probability 1 - 2**-7); then 16 attempts after it, each one
    # waiting out its 2 s connect timeout once the proxies drop the job's
    # packets (~37 s, well inside `sandbox run`'s 120 s).
    proc = _start_sandbox(
        fleet,
        job,
        tmp_path,
        ["python3", "/t/attempts.py", "api.allowed.test", API_ADDR, "0", "24", "0.3", "2"],
    )
    deleted_at = None
    after: list[dict[str, Any]] = []
    try:
        for line in _lines(proc):
            if line.get("ready"):
                continue
            if deleted_at is None:
                assert line["ok"], line
                if line["i"] == 7:
                    proxies = {e["proxy"] for e in proxy_events(fleet, job.job_id, "connection")}
                    assert proxies == {p.name for p in fleet.layout.proxies}, proxies
                    assert _control_delete_policy(fleet, job.job_id) == 204
                    deleted_at = time.monotonic()
            else:
                after.append(
                    {
                        **line,
                        "since_delete_s": time.monotonic() - float(line["ms"]) / 1000 - deleted_at,
                    }
                )
    finally:
        err = _finish(proc, tmp_path)
    assert proc.returncode == 0, err
    late = [a for a in after if float(a["since_delete_s"]) >= revoke_within_s]
    assert late, after
    allowed = [a for a in late if a["ok"]]
    assert not allowed, (
        f"{len(allowed)} of {len(late)} connections allowed {revoke_within_s:.0f}+ s after DELETE, "
        f"the last {allowed[-1]['since_delete_s']:.1f} s after it"
    )


def test_geneve_for_unknown_job_is_dropped_as_policy_missing(fleet: Fleet) -> None:
    node1, proxy1 = fleet.layout.node("node1"), fleet.layout.proxy("proxy1")
    job = JobOption(uuid.uuid4().bytes, b"\x00" * 8)
    before = _drops(fleet, "proxy1")
    _send(
        fleet.ns(node1.netns),
        str(node1.underlay),
        [encode(fleet.layout.vni, job, _ipv4_tcp_syn("100.96.1.200"))],
        str(proxy1.underlay),
    )
    grown = _wait_drop(fleet, "proxy1", before, "policy_missing", 1)
    assert grown == {"policy_missing": 1.0}, grown


# --- 3. forged GENEVE -------------------------------------------------------------------


@dataclass(frozen=True)
class Forgery:
    """A datagram to send to proxy1, from where, and the drop reason it must get."""

    name: str
    reason: str
    sender: str  # "node1" or "outsider"
    build: Callable[[Fleet], bytes]


def _job(fleet: Fleet) -> JobOption:
    """A real job of node1 (its policy exists): only the forged part is wrong."""
    job = Job(fleet, "node1", ALLOWED).sign()
    return JobOption.from_jws(job.job_id, job.jws)


def _good(fleet: Fleet, src: str = "100.96.1.200", vni: int | None = None) -> bytes:
    return encode(fleet.layout.vni if vni is None else vni, _job(fleet), _ipv4_tcp_syn(src))


def _node2_job(fleet: Fleet) -> bytes:
    job = Job(fleet, "node2", ALLOWED).sign()
    return encode(
        fleet.layout.vni, JobOption.from_jws(job.job_id, job.jws), _ipv4_tcp_syn("100.96.1.200")
    )


def _bad_version(fleet: Fleet) -> bytes:
    data = bytearray(_good(fleet))
    data[0] |= 1 << 6
    return bytes(data)


def _options_past_end(fleet: Fleet) -> bytes:
    data = bytearray(_good(fleet)[:60])
    data[0] = 0x3F  # 252 bytes of options in a 60-byte datagram
    return bytes(data)


def _missing_job_option(fleet: Fleet) -> bytes:
    data = bytearray(_good(fleet))
    del data[8:36]  # the job option
    data[0] = 0
    data[1] = 0  # no critical option left
    return bytes(data)


def _unknown_critical(fleet: Fleet) -> bytes:
    return encode(
        fleet.layout.vni,
        _job(fleet),
        _ipv4_tcp_syn("100.96.1.200"),
        options=[GeneveOption(0xFF02, 0x80 | 0x11, b"\x00" * 4)],
    )


def _bad_inner_checksum(fleet: Fleet) -> bytes:
    data = bytearray(_good(fleet))
    data[36 + 10] ^= 0xFF  # the inner IPv4 header checksum
    return bytes(data)


FORGERIES = [
    Forgery("outsider", "unknown_node", "outsider", _good),
    Forgery("other-node-job", "job_not_bound_to_node", "node1", _node2_job),
    Forgery(
        "spoofed-source", "source_outside_node_cidr", "node1", lambda f: _good(f, src="100.96.2.77")
    ),
    Forgery("truncated", "truncated", "node1", lambda f: _good(f)[:5]),
    Forgery("bad-version", "bad_version", "node1", _bad_version),
    Forgery("options-past-end", "options_past_end", "node1", _options_past_end),
    Forgery("missing-job-option", "missing_job_option", "node1", _missing_job_option),
    Forgery("unknown-critical-option", "unknown_critical_option", "node1", _unknown_critical),
    Forgery("inner-bad-checksum", "inner_bad_checksum", "node1", _bad_inner_checksum),
    Forgery("bad-vni", "bad_vni", "node1", lambda f: _good(f, vni=f.layout.vni + 1)),
]


@pytest.mark.parametrize("forgery", FORGERIES, ids=[f.name for f in FORGERIES])
def test_forged_geneve_is_dropped_by_reason(fleet: Fleet, outsider: str, forgery: Forgery) -> None:
    node1, proxy1 = fleet.layout.node("node1"), fleet.layout.proxy("proxy1")
    datagram = forgery.build(fleet)
    before = _drops(fleet, "proxy1")
    if forgery.sender == "outsider":
        _send(outsider, OUTSIDER_ADDR, [datagram] * 3, str(proxy1.underlay))
    else:
        _send(fleet.ns(node1.netns), str(node1.underlay), [datagram] * 3, str(proxy1.underlay))
    grown = _wait_drop(fleet, "proxy1", before, forgery.reason, 3)
    # Counted three times under its reason, and under no other.
    assert grown == {forgery.reason: 3.0}, grown


def test_legitimate_traffic_flows_after_forgeries(
    fleet: Fleet, outsider: str, tmp_path: Path
) -> None:
    """Every forgery again, at both proxies, then a sandbox's HTTPS requests succeed."""
    node1 = fleet.layout.node("node1")
    for proxy in fleet.layout.proxies:
        for forgery in FORGERIES:
            ns, src = (
                (outsider, OUTSIDER_ADDR)
                if forgery.sender == "outsider"
                else (fleet.ns(node1.netns), str(node1.underlay))
            )
            _send(ns, src, [forgery.build(fleet)] * 5, str(proxy.underlay))
    for proxy in fleet.layout.proxies:
        assert metric_sum(metrics(fleet, proxy.name), "egressd_geneve_rx_packets_total") > 0
    job = Job(fleet, "node1", ALLOWED).sign()
    urls = [f"https://api.allowed.test/data?n={i}" for i in range(4)]
    results = probe(fleet, job, tmp_path, urls)
    assert all(results[u]["ok"] and results[u]["status"] == 200 for u in urls), results
