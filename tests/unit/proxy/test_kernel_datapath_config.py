"""The kernel data path's configuration and nftables rules (pure; the programs themselves are
tests/integration/test_proxy_kernel_prog.py and test_proxy_kernel_datapath.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from egressd.proxy.config import ConfigError, config_from_mapping
from egressd.proxy.kernel import DECAP_MARK
from egressd.proxy.nft import FWMARK, NftSpec

MINIMAL: dict[str, Any] = {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"}


def spec(**kw: Any) -> NftSpec:
    return NftSpec(
        tun="gnv0",
        resolver=ipaddress.IPv4Address("100.100.100.53"),
        tproxy_tcp_port=15001,
        tproxy_dns_port=15053,
        sandbox_supernet=ipaddress.IPv4Network("100.96.0.0/16"),
        **kw,
    )


def test_the_userspace_data_path_is_the_default() -> None:
    config = config_from_mapping(MINIMAL)
    assert config.datapath == "userspace"
    assert config.kernel_state_dir == Path("/run/egressd/proxy/proxy1")


def test_the_kernel_data_path_and_its_state_dir_are_read() -> None:
    config = config_from_mapping({**MINIMAL, "datapath": "kernel", "state_dir": "/tmp/k"})
    assert (config.datapath, config.kernel_state_dir) == ("kernel", Path("/tmp/k"))


@pytest.mark.parametrize("value", ["ebpf", "", 1, None])
def test_an_unknown_data_path_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="datapath"):
        config_from_mapping({**MINIMAL, "datapath": value})


def test_userspace_rules_are_unchanged() -> None:
    rules = spec().ruleset()
    assert rules.count("tproxy ip to") == 3
    assert "meta mark 0x" not in rules.replace("meta mark set", "")


def test_kernel_rules_tproxy_decapsulated_packets_by_their_mark_only() -> None:
    rules = spec(decap_mark=DECAP_MARK, underlay="under0").ruleset()
    lines = [line.strip() for line in rules.splitlines()]
    marked = [line for line in lines if line.startswith(f"meta mark 0x{DECAP_MARK:x} ")]
    assert len(marked) == 4  # DNS over UDP and TCP, TCP, and the input backstop
    assert all("tproxy" in line for line in marked[:3])
    assert marked[3] == f"meta mark 0x{DECAP_MARK:x} counter drop"
    # The TUN's rules stay for what the slow path injects.
    assert sum(line.startswith('iifname "gnv0"') for line in lines) == 4
    # Nothing keys on the underlay's name: a plain packet arriving there has mark 0.
    assert "under0" not in rules
    assert DECAP_MARK != FWMARK
