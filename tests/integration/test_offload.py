"""TUN offloads end to end: bulk TCP both ways through a real fleet with `offload: true`.

A fleet of its own (a fresh `egd-oXXXX-` prefix, its own run dir) with both agents and
both proxies configured for offload; one sandbox namespace registered with
node1 (the bench's `EgressdPath`: the client is a plain process in it, whose
kernel TCP sends TSO super-packets). A download and an upload of several MiB
must arrive intact (SHA-256), and super-packets must actually have crossed
the tunnel in each direction (`egressd_tun_superpackets_total`), with no
offload-related drops.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd.layout import ADMIN_PORT, NodeSpec, ProxySpec, default_layout
from egressd.metrics_text import Scrape, metric_value, parse
from egressd_harness.bench.load import Target
from egressd_harness.bench.paths import EgressdPath
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.inet import content_sha256
from egressd_harness.topology.probe import http_request
from tests.support.netns import fresh_prefix

pytestmark = pytest.mark.root("ip", "/dev/net/tun")

NBYTES = 24 << 20
TIMEOUT_S = 60.0


class OffloadFleet(Fleet):
    """The topology's fleet on the userspace path with offload forced on (whatever the
    topology's default)."""

    def proxy_config(self, proxy: ProxySpec) -> dict[str, object]:
        return {**super().proxy_config(proxy), "offload": True}

    def agent_config(self, node: NodeSpec) -> dict[str, object]:
        return {**super().agent_config(node), "offload": True}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OffloadFleet]:
    run_dir = tmp_path_factory.mktemp("offload-run")
    # Offload is a userspace data path option (the kernel path refuses it).
    fleet = OffloadFleet(default_layout(Path(run_dir), fresh_prefix("egd-o")), datapath="userspace")
    try:
        fleet.up()
        yield fleet
    finally:
        fleet.down()


@pytest.fixture(scope="module")
def target(fleet: OffloadFleet) -> Iterator[Target]:
    path = EgressdPath(fleet)
    try:
        yield path.setup()
    finally:
        path.teardown()


def metrics(fleet: Fleet, member: str) -> Scrape:
    spec: NodeSpec | ProxySpec
    try:
        spec = fleet.layout.node(member)
    except KeyError:
        spec = fleet.layout.proxy(member)
    reply = http_request(fleet.ns(spec.netns), "GET", str(spec.underlay), ADMIN_PORT, "/metrics")
    return parse(reply.body.decode())


def supers(fleet: Fleet, member: str, direction: str) -> float:
    samples = metrics(fleet, member)
    return metric_value(samples, "egressd_tun_superpackets_total", direction=direction) or 0.0


def proxies_supers(fleet: Fleet, direction: str) -> float:
    return sum(supers(fleet, p.name, direction) for p in fleet.layout.proxies)


def offload_drops(fleet: Fleet) -> dict[str, float]:
    out = {}
    for member in [n.name for n in fleet.layout.nodes] + [p.name for p in fleet.layout.proxies]:
        for s in metrics(fleet, member):
            if (
                s.value
                and s.labels
                and s.name.endswith("_total")
                and any(
                    r in s.key
                    for r in ("offload", "unsupported_gso", "too_big", "inner_bad_checksum")
                )
            ):
                out[f"{member} {s.key}"] = s.value
    return out


def test_the_fleet_runs_with_offload(fleet: OffloadFleet) -> None:
    for name in [n.name for n in fleet.layout.nodes] + [p.name for p in fleet.layout.proxies]:
        assert json.loads(fleet.config_path(name).read_text())["offload"] is True


def test_a_bulk_download_arrives_whole_as_super_packets(
    fleet: OffloadFleet, target: Target
) -> None:
    before = supers(fleet, "node1", "to_tun"), proxies_supers(fleet, "from_tun")
    reply = http_request(
        target.netns,
        "GET",
        str(target.address),
        target.port,
        f"/bytes/{NBYTES}",
        headers={"Host": target.host},
        timeout_s=TIMEOUT_S,
    )
    assert reply.status == 200
    assert len(reply.body) == NBYTES
    assert hashlib.sha256(reply.body).hexdigest() == content_sha256(NBYTES)
    after = supers(fleet, "node1", "to_tun"), proxies_supers(fleet, "from_tun")
    # The proxy's TCP sent super-packets to gnv0; node1 wrote them to egr0 whole.
    assert after[1] - before[1] > 10
    assert after[0] - before[0] > 10
    assert offload_drops(fleet) == {}


def test_a_bulk_upload_arrives_whole_as_super_packets(fleet: OffloadFleet, target: Target) -> None:
    body = os.urandom(NBYTES)
    before = supers(fleet, "node1", "from_tun"), proxies_supers(fleet, "to_tun")
    reply = http_request(
        target.netns,
        "POST",
        str(target.address),
        target.port,
        "/upload",
        body=body,
        headers={"Host": target.host, "Content-Type": "application/octet-stream"},
        timeout_s=TIMEOUT_S,
    )
    assert reply.status == 200
    answer = json.loads(reply.body)
    assert answer == {"bytes": NBYTES, "sha256": hashlib.sha256(body).hexdigest()}
    after = supers(fleet, "node1", "from_tun"), proxies_supers(fleet, "to_tun")
    # The sandbox's TSO bursts reached egr0 whole, crossed the underlay as one
    # (IP-fragmented) datagram each and were written to gnv0 whole.
    assert after[0] - before[0] > 10
    assert after[1] - before[1] > 10
    assert offload_drops(fleet) == {}
