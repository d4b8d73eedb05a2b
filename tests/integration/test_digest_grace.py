"""The digest grace period through a real control plane and a real proxy process.

After a replacement gives the job a new digest, the proxy accepts GENEVE
datagrams with the new digest and, for `digest_grace_s`, with the old one
(counted in `egressd_geneve_digest_grace_total`); then the old one is dropped
as `stale_digest` while the new one keeps working. The datagrams are crafted
by a simulated node (`NodeSim` of tests/support/proxy_fleet.py) on node1's address.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from egressd.layout import CONTROL_ADDR
from egressd.policy.jws import policy_digest
from tests.support.proxy_fleet import JOB, SITE, Fleet, NodeSim, ProxyProcess, dropped, http
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*NETNS_TOOLS)

GRACE_S = 2.0


@pytest.fixture(scope="module")
def fleet(proxy_fleet: Fleet) -> Fleet:
    return proxy_fleet


@pytest.fixture
def grace_proxy(fleet: Fleet) -> Iterator[ProxyProcess]:
    p = ProxyProcess(fleet, digest_grace_s=GRACE_S)
    try:
        p.wait_ready()
        yield p
    finally:
        p.kill()


def verified_digests(proxy: ProxyProcess) -> set[str]:
    out = set()
    for line in proxy.log().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if item.get("event") == "policy_verified" and item.get("job_id") == str(JOB):
            out.add(str(item.get("digest")))
    return out


def grace_count(proxy: ProxyProcess) -> float:
    return proxy.metrics().get(("egressd_geneve_digest_grace_total", ()), 0.0)


def test_the_old_digest_is_accepted_for_the_grace_period_then_dropped(
    fleet: Fleet, grace_proxy: ProxyProcess
) -> None:
    _, body = http(fleet.ctl, "GET", str(CONTROL_ADDR), 8080, f"/v1/jobs/{JOB}/policy")
    old = policy_digest(json.loads(body)["jws"])
    node = NodeSim(fleet, old)
    try:
        node.send_syn(43000)
        node.expect_syn_ack(43000)  # the proxy fetched and holds the first policy

        replaced = fleet.put(
            f"/v1/jobs/{JOB}/policy",
            {
                "v": 1,
                "account": "acme",
                "nodes": ["node1"],
                "egress": [
                    {"cidr": f"{SITE}/32", "ports": [80, 8080]},
                    {"host": "api.allowed.test", "ports": [80, 443]},
                ],
            },
        )
        new = bytes.fromhex(replaced["digest"])
        assert new != old
        wait_for(lambda: new.hex() in verified_digests(grace_proxy), 5.0, "the new policy")
        learnt = time.monotonic()
        stale_before = dropped(grace_proxy.metrics(), "stale_digest")

        # In the grace period: both digests get through.
        node.send_syn(43001)
        node.expect_syn_ack(43001)
        assert time.monotonic() - learnt < GRACE_S, "too slow to test the grace period"
        wait_for(lambda: grace_count(grace_proxy) >= 1, 2.0, "the grace counter")
        node.digest = new
        node.send_syn(43002)
        node.expect_syn_ack(43002)

        # After it: the old digest is dropped and counted, the new one still passes.
        time.sleep(max(0.0, learnt + GRACE_S + 0.5 - time.monotonic()))
        node.digest = old
        node.send_syn(43003)
        with pytest.raises(AssertionError, match="no SYN-ACK"):
            node.expect_syn_ack(43003, timeout=1.0)
        metrics = grace_proxy.metrics()
        assert dropped(metrics, "stale_digest") == stale_before + 1
        node.digest = new
        node.send_syn(43004)
        node.expect_syn_ack(43004)
    finally:
        node.close()
