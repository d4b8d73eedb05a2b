"""The local fleet's daemon configurations: what `topology up` writes for each member."""

from __future__ import annotations

from pathlib import Path

from egressd.agent.config import parse_config
from egressd.layout import default_layout
from egressd_harness.topology.fleet import Fleet


def test_the_local_fleets_agents_follow_the_control_plane(tmp_path: Path) -> None:
    fleet = Fleet(default_layout(tmp_path, "egd-x-"))
    for node in fleet.layout.nodes:
        config = parse_config(fleet.agent_config(node))
        # Live policies: registrations checked against the control plane, its watch followed.
        assert config.discovery is not None
        assert config.discovery.control_url == fleet.control_url == "http://198.18.0.2:8080"
        assert [p.name for p in config.proxies] == [p.name for p in fleet.layout.proxies]
