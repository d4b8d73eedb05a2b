"""Denials per job (``egressd_job_denials_total``) through a real proxy process.

The fleet of `test_proxy_dataplane` (real control plane, real proxy service
with its `PolicyStore` on the control plane's watch; tests/support/proxy_fleet.py) and the
mini agent of `test_live_policies` for one job. The sandbox address asks the proxy's DNS
responder (100.100.100.53, routed into the sandbox's TUN, so over GENEVE)
for names its policy does not allow; the proxy's metrics then carry the
job's denials by kind and reason, and once the job is deleted at the control
plane its series are gone (the revocation reaches the counter through the
store's listeners), while the node-wide counters keep their counts.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid

import dns.message
import dns.rcode
import pytest

from egressd.layout import RESOLVER
from egressd.net import netns as kn
from tests.support.proxy_fleet import (
    SANDBOX,
    SITE,
    SITE_80,
    Fleet,
    ProxyProcess,
    agent_for,
    control,
    policy,
    try_connect,
    watch_up,
)
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS)

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    return proxy_fleet


def ask(fleet: Fleet, name: str, qtype: str = "A") -> dns.message.Message:
    """One UDP query from the sandbox address to the proxy's resolver."""
    query = dns.message.make_query(name, qtype)
    with contextlib.closing(kn.netns_socket(fleet.node_ns, sock_type=socket.SOCK_DGRAM)) as sock:
        sock.settimeout(3)
        sock.bind((SANDBOX, 0))
        sock.sendto(query.to_wire(), (str(RESOLVER), 53))
        response = dns.message.from_wire(sock.recv(65535))
    assert response.id == query.id
    return response


def denials(metrics: Metrics, job: uuid.UUID) -> dict[tuple[str, str], float]:
    """The job's ``egressd_job_denials_total`` series: (kind, reason) -> value."""
    out = {}
    for (name, labels), value in metrics.items():
        found = dict(labels)
        if name == "egressd_job_denials_total" and found["job_id"] == str(job):
            out[(found["kind"], found["reason"])] = value
    return out


def test_dns_denials_are_labelled_by_job_and_gone_with_the_job(
    fleet: Fleet, proxy: ProxyProcess
) -> None:
    job = uuid.uuid4()
    assert control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, SITE_80))[0] == 200
    wait_for(lambda: watch_up(proxy), 10, "the proxy's watch")
    before = proxy.metrics()
    with agent_for(fleet, job):
        kn.run_in_netns(
            fleet.node_ns, ["ip", "route", "add", f"{RESOLVER}/32", "dev", "sbx0", "src", SANDBOX]
        )
        # A name no rule names: the default refusal rcode; a refused type: REFUSED.
        for name in ("evil.test", "exfil.evil.test"):
            assert ask(fleet, name).rcode() == dns.rcode.NXDOMAIN
        assert ask(fleet, "api.allowed.test", "TXT").rcode() == dns.rcode.REFUSED
        metrics = proxy.metrics()
        assert denials(metrics, job) == {
            ("dns", "no_matching_rule"): 2.0,
            ("dns", "qtype_not_allowed"): 1.0,
        }
        node_wide = ("egressd_dns_queries_total", (("verdict", "deny"),))
        assert metrics[node_wide] - before.get(node_wide, 0.0) == 3.0

        # The job ends: deleted at the control plane. Its series go with its policy.
        deleted = time.monotonic()
        assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204
        wait_for(lambda: not denials(proxy.metrics(), job), 5, "the job's series removed")
        assert time.monotonic() - deleted < 5
        after = proxy.metrics()
        assert after[node_wide] == metrics[node_wide]  # node-wide counts stay
        assert not any(
            name == "egressd_job_denials_total" and dict(labels)["job_id"] == str(job)
            for name, labels in after
        )


def test_connection_denials_are_labelled_by_job(fleet: Fleet, proxy: ProxyProcess) -> None:
    job = uuid.uuid4()
    only_443 = {"cidr": f"{SITE}/32", "ports": [443]}
    assert control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, only_443))[0] == 200
    wait_for(lambda: watch_up(proxy), 10, "the proxy's watch")
    with agent_for(fleet, job):
        assert not try_connect(fleet)  # port 80: no rule allows it
        assert not try_connect(fleet)
        wait_for(lambda: bool(denials(proxy.metrics(), job)), 5, "the job's connection denials")
        got = denials(proxy.metrics(), job)
        assert set(got) == {("connection", "port_not_allowed")}, got
        assert got[("connection", "port_not_allowed")] == 2.0
