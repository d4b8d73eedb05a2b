"""`KernelDatapath.lookup` (tier 2's `FlowLookup` on the kernel path) when its kernel cannot
answer: logged once per lookup with the kernel's reason, and no flow (fail closed). The
lookup through a real px_flows is in tests/integration/test_flow_lookup.py and
test_proxy_kernel_prog."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from egressd.proxy.kernel import KernelDatapath, KernelError, ProxyKernel

A = ipaddress.IPv4Address


def unloaded(tmp_path: Path) -> ProxyKernel:
    return ProxyKernel(
        state_dir=tmp_path,
        underlay_ifname="u0",
        tun_ifname="t0",
        underlay=A("198.18.0.21"),
        port=6081,
        vni=1,
    )


def test_a_kernel_not_loaded_has_no_flow_to_give(tmp_path: Path) -> None:
    kernel = unloaded(tmp_path)
    with pytest.raises(KernelError) as err:
        kernel.flow(int(A("100.96.1.5")), 41000, int(A("203.0.113.10")), 443, 6)
    assert err.value.reason == "not_loaded"
    datapath = KernelDatapath(kernel, nodes=list, cached=lambda _job: None)
    with capture_logs() as logs:
        assert datapath.lookup(A("100.96.1.5"), 41000, A("203.0.113.10"), 443, 6) is None
        assert datapath.lookup("100.96.1.5", 41001, "203.0.113.10", 443, 6) is None
    assert [(e["event"], e["reason"]) for e in logs] == [("flow_lookup_failed", "not_loaded")] * 2


def test_what_is_no_address_is_refused_before_the_kernel_is_asked(tmp_path: Path) -> None:
    datapath = KernelDatapath(unloaded(tmp_path), nodes=list, cached=lambda _job: None)
    with pytest.raises(ipaddress.AddressValueError):
        datapath.lookup("100.96.1", 41000, "203.0.113.10", 443, 6)
