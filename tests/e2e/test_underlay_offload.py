"""The fleet's proxies and `nodes_decap_in_kernel`: on the kernel data path every node
decapsulates in tc, so the proxies keep their underlay's checksum offload (and TSO); on the
userspace one the statement is absent. test_egress.py's downloads check the bytes."""

from __future__ import annotations

import json
import sys

from egressd.net import netns as kn
from egressd.proxy.config import load_config
from egressd_harness.topology.fleet import Fleet
from egressd_harness.topology.network import UNDERLAY_IF

FEATURE = (
    "from pyroute2 import Ethtool; import sys; "
    "print(Ethtool().get_features(sys.argv[1]).features['tx-checksum-ip-generic'].enable)"
)


def test_proxies_keep_the_offload_exactly_when_every_node_decapsulates_in_the_kernel(
    fleet: Fleet,
) -> None:
    kernel = fleet.datapath == "kernel"
    for proxy in fleet.layout.proxies:
        config = load_config(fleet.config_path(proxy.name))
        assert config.nodes_decap_in_kernel is kernel
        out = kn.run_in_netns(
            fleet.ns(proxy.netns), [sys.executable, "-c", FEATURE, UNDERLAY_IF], check=True
        )
        # Kernel path: left on as the veth starts; userspace: never touched (on as well).
        assert json.loads(out.stdout.strip().lower()) is True, (proxy.name, out.stdout)
