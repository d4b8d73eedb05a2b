"""`Fleet(datapath=...)`: the whole fleet, agents and proxies, on one data path."""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd.agent.config import parse_config
from egressd.layout import default_layout
from egressd.proxy.config import config_from_mapping
from egressd_harness.bench.cli import Options
from egressd_harness.topology.fleet import Fleet


@pytest.mark.parametrize("datapath", ["userspace", "kernel"])
def test_every_member_of_the_fleet_takes_the_fleets_datapath(tmp_path: Path, datapath: str) -> None:
    fleet = Fleet(default_layout(tmp_path, "egd-x-"), datapath=datapath)
    for node in fleet.layout.nodes:
        agent = parse_config(fleet.agent_config(node))
        assert agent.datapath == datapath
        assert agent.offload is (datapath == "userspace")
    for proxy in fleet.layout.proxies:
        config = config_from_mapping(fleet.proxy_config(proxy))
        assert config.datapath == datapath
        assert config.offload is (datapath == "userspace")
        # Every node decapsulates in tc on the kernel path: the proxy keeps its offload.
        assert config.nodes_decap_in_kernel is (datapath == "kernel")


def test_the_default_fleet_runs_on_the_kernel_path(tmp_path: Path) -> None:
    fleet = Fleet(default_layout(tmp_path, "egd-x-"))
    assert {parse_config(fleet.agent_config(n)).datapath for n in fleet.layout.nodes} == {"kernel"}
    assert {config_from_mapping(fleet.proxy_config(p)).datapath for p in fleet.layout.proxies} == {
        "kernel"
    }


def test_the_bench_takes_a_datapath_and_refuses_an_unknown_one() -> None:
    assert Options().datapath == "kernel"
    assert Options(datapath="userspace").datapath == "userspace"
    assert Options(datapath="kernel").datapath == "kernel"
    with pytest.raises(ValueError, match="--datapath"):
        Options(datapath="ebpf")
