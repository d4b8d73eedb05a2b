"""The local fleet's node names, asked from inside its control namespace (``{prefix}ctl``: the
host has no route into the fleet), for `egressd policy check` without `--control`."""

from __future__ import annotations

from egressd.control.nodes import NODES_PATH, TIMEOUT_S, NodesUnavailable, node_names
from egressd.errors import EgressdError
from egressd.layout import CONTROL_ADDR, CONTROL_PORT, CTL_NS
from egressd.net import netns as kn
from egressd_harness.topology import network
from egressd_harness.topology.probe import ProbeError, http_request


def fleet_node_names(prefix: str = "egd-") -> list[str]:
    try:
        ns = network.netns_name(CTL_NS, prefix)
    except (ValueError, EgressdError) as exc:
        raise NodesUnavailable(f"bad namespace prefix {prefix!r}: {exc}") from exc
    try:
        present = kn.netns_exists(ns)
    except OSError:
        present = False
    if not present:
        raise NodesUnavailable(f"no local fleet (no namespace {ns})")
    try:
        reply = http_request(
            ns, "GET", str(CONTROL_ADDR), CONTROL_PORT, NODES_PATH, timeout_s=TIMEOUT_S
        )
    except ProbeError as exc:
        raise NodesUnavailable(" ".join(exc.detail.split())) from exc
    if reply.status != 200:
        raise NodesUnavailable(f"GET {NODES_PATH} in {ns}: HTTP {reply.status}")
    try:
        return node_names(reply.json())
    except ValueError as exc:
        raise NodesUnavailable(f"GET {NODES_PATH} in {ns}: not JSON") from exc
