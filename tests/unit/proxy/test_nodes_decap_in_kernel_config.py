"""`nodes_decap_in_kernel`: the operator's statement that keeps the proxy's underlay
checksum offload on (pure; the device itself is tests/integration/test_proxy_kernel_csum.py)."""

from __future__ import annotations

from typing import Any

import pytest

from egressd.proxy.config import ConfigError, config_from_mapping, config_to_mapping

MINIMAL: dict[str, Any] = {"name": "proxy1", "underlay": "198.18.0.21", "egress": "203.0.113.21"}
KERNEL: dict[str, Any] = {**MINIMAL, "datapath": "kernel"}


def test_unset_is_the_safe_default_on_either_data_path() -> None:
    assert config_from_mapping(MINIMAL).nodes_decap_in_kernel is False
    assert config_from_mapping(KERNEL).nodes_decap_in_kernel is False


def test_true_is_read_on_the_kernel_data_path_and_survives_the_worker_handoff() -> None:
    config = config_from_mapping({**KERNEL, "nodes_decap_in_kernel": True})
    assert config.nodes_decap_in_kernel is True
    assert config_from_mapping(config_to_mapping(config)) == config
    assert config_to_mapping(config)["nodes_decap_in_kernel"] is True


def test_false_is_accepted_everywhere() -> None:
    assert config_from_mapping({**MINIMAL, "nodes_decap_in_kernel": False}).datapath == "userspace"


@pytest.mark.parametrize("datapath", [None, "userspace"])
def test_true_off_the_kernel_data_path_names_the_field(datapath: str | None) -> None:
    doc = {**MINIMAL, "nodes_decap_in_kernel": True}
    if datapath is not None:
        doc["datapath"] = datapath
    with pytest.raises(ConfigError) as info:
        config_from_mapping(doc)
    assert info.value.detail.startswith("nodes_decap_in_kernel: ")
    assert '"datapath": "kernel"' in info.value.detail


@pytest.mark.parametrize("value", ["true", 1, "partial", None])
def test_only_a_json_boolean_is_accepted(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({**KERNEL, "nodes_decap_in_kernel": value})
    assert "nodes_decap_in_kernel" in info.value.detail
