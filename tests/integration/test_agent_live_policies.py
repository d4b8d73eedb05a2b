"""Live policies on the node: a real agent (`egressd agent serve`) follows a real control
plane (`egressd control serve`), see `egressd.agent.policy_watch`.

Topology (namespaces ``egd-t<run id>...``, none connected to the host):

    egd-t<id>u: bridge br0 ──veth── egd-t<id>n  node, 198.18.0.11, runs the agent
                           ──veth── egd-t<id>c  control plane, 198.18.0.2:8080

The agent has no proxies (tier 1 is what is checked: the per-sandbox counters
``egressd_tier1_sandbox_packets_total`` tell how it decided each frame sent
from the sandbox's namespace). Checked, in file order against one agent:
a registration whose policy the control plane does not hold (or holds with
other content) is refused with its reason, and `egressd sandbox run` exits
125 with one line saying what to do; a replaced policy reaches the
sandbox's tier-1 port bitmap, DNS bucket and GENEVE digest within 1 s; a
delete stops the sandbox's packets at tier 1 (``no_policy``) within 1 s and
logs one ``job_policy_withdrawn`` event.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from egressd.agent.client import AgentClientError
from egressd.layout import RESOLVER
from egressd.net import netns
from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import generate_signing_key
from tests.support.agent_control import (
    JOB,
    Env,
    bring_up,
    count,
    policy_body,
    syn,
    tear_down,
)
from tests.support.agent_fleet import REPO
from tests.support.root import AGENT_NEEDS

pytestmark = pytest.mark.root(*AGENT_NEEDS)

WITHIN_S = 1.0
QUERY = (
    bytes.fromhex("123401000001000000000000") + b"\x03api\x07allowed\x04test\x00\x00\x01\x00\x01"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = f"egd-t{secrets.token_hex(3)}"
    root = tmp_path_factory.mktemp("agent-live")
    env = Env(
        root=root,
        key=generate_signing_key(),
        under=f"{base}u",
        node=f"{base}n",
        ctl=f"{base}c",
        sandbox_prefix=f"{base}s-",
        run_dir=root / "run",
        state_dir=root / "state",
    )
    (env.run_dir / "agents").mkdir(parents=True)
    try:
        bring_up(env)
        yield env
    finally:
        tear_down(env)


def dns_queries(ns: str, n: int) -> None:
    sock = netns.netns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for _ in range(n):
            sock.sendto(QUERY, (str(RESOLVER), 53))


def until(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` held (polled every 20 ms); AssertionError after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def test_registration_of_a_policy_the_control_plane_does_not_hold_is_refused(env: Env) -> None:
    agent = env.agent()
    now = int(time.time())
    local = sign_payload({**policy_body(443), "iat": now, "nbf": now, "exp": now + 600}, env.key)
    with pytest.raises(AgentClientError) as err:
        agent.register("sbx-unheld", local)
    assert err.value.reason == "policy_not_held", err.value
    assert "egressd job put POLICY.json" in err.value.detail

    # The launcher says so in one line and exits 125.
    jws_file = env.root / "local.jws"
    jws_file.write_text(local)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "egressd",
            "sandbox",
            "run",
            "--node",
            "node1",
            "--policy",
            str(jws_file),
            "--run-dir",
            str(env.run_dir),
            "--",
            "/bin/true",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 125, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "policy_not_held" in lines[0] and "egressd job put POLICY.json" in lines[0]

    # Held, but with other content: refused too.
    status, _ = env.control("PUT", f"/v1/jobs/{JOB}/policy", policy_body(443, 80))
    assert status in (200, 201)
    with pytest.raises(AgentClientError) as err:
        agent.register("sbx-unheld", local)
    assert err.value.reason == "policy_superseded"
    assert agent.list() == []
    assert '"sandbox_registered"' not in env.agent_log()


def test_a_replaced_policy_reprograms_tier1_and_a_delete_stops_the_sandbox(env: Env) -> None:
    agent = env.agent()
    status, held = env.control("PUT", f"/v1/jobs/{JOB}/policy", policy_body(443))
    assert status in (200, 201), held
    info = agent.register("sbx-live", held["jws"])
    ns = info.netns
    assert info.raw["digest"] == policy_digest(held["jws"]).hex()
    assert info.raw["tcp_ports"] == ["443"]

    # Before: 8443 is not allowed, and 30 queries pass the default DNS bucket (50/s).
    syn(ns, 8443)
    until(lambda: count(env, "sbx-live", "drop", "port_not_allowed") >= 1, 2, "8443 refused")
    dns_queries(ns, 30)
    time.sleep(0.1)
    assert count(env, "sbx-live", "drop", "dns_rate_limit") == 0
    redirected = count(env, "sbx-live", "redirect", "redirected")
    refused = count(env, "sbx-live", "drop", "port_not_allowed")

    # Replace: 8443 allowed, DNS at 1/s (burst 10).
    status, new = env.control(
        "PUT", f"/v1/jobs/{JOB}/policy", policy_body(443, 8443, dns_queries_per_s=1)
    )
    assert status in (200, 201), new
    t0 = time.monotonic()

    def programmed() -> bool:
        raw = agent.list()[0].raw
        return raw["digest"] == new["digest"] and raw["tcp_ports"] == ["443", "8443"]

    until(programmed, WITHIN_S, "the new digest and ports in the agent's view")

    def allowed() -> bool:
        syn(ns, 8443)
        return count(env, "sbx-live", "redirect", "redirected") > redirected

    until(allowed, WITHIN_S - (time.monotonic() - t0), "8443 redirected by tier 1")
    replaced_in = time.monotonic() - t0
    assert count(env, "sbx-live", "drop", "port_not_allowed") == refused
    dns_queries(ns, 30)
    until(lambda: count(env, "sbx-live", "drop", "dns_rate_limit") >= 20, 1, "the 1/s bucket")
    assert count(env, "sbx-live", "drop", "dns_rate_limit") == 20
    print(f"replace -> tier 1 redirects 8443: {replaced_in * 1000:.0f} ms")

    # Delete: the sandbox's frames drop as no_policy at tier 1.
    status, _ = env.control("DELETE", f"/v1/jobs/{JOB}/policy")
    assert status == 204
    t0 = time.monotonic()
    before = count(env, "sbx-live", "drop", "no_policy")

    def stopped() -> bool:
        syn(ns, 443)
        return count(env, "sbx-live", "drop", "no_policy") > before

    deleted_in = until(stopped, WITHIN_S, "443 dropped as no_policy")
    print(f"delete -> tier 1 drops: {deleted_in * 1000:.0f} ms")
    stuck = count(env, "sbx-live", "redirect", "redirected")
    for _ in range(5):
        syn(ns, 443)
    time.sleep(0.1)
    assert count(env, "sbx-live", "redirect", "redirected") == stuck
    assert agent.list()[0].raw["state"] == "withdrawn"
    events = [
        json.loads(line)
        for line in env.agent_log().splitlines()
        if line.startswith("{") and '"job_policy_withdrawn"' in line
    ]
    assert len(events) == 1, events
    assert events[0]["reason"] == "policy_deleted" and events[0]["sandbox_ids"] == ["sbx-live"]
    agent.unregister("sbx-live")
    assert agent.list() == []
