"""The control plane's node names, for tools (`egressd policy check`).

`fetch_node_names` asks a control plane by URL from this process's network
namespace; `fleet_node_names` asks the local fleet's control plane from
inside its namespace (``{prefix}ctl``: the host has no route into the fleet).
Both raise `NodesUnavailable` with one line of detail when there is no answer.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from egressd.errors import EgressdError

NODES_PATH = "/v1/nodes"
TIMEOUT_S = 3.0


class NodesUnavailable(EgressdError):
    def __init__(self, detail: str) -> None:
        super().__init__("nodes_unavailable", detail)


def node_names(body: object) -> list[str]:
    """Names from a `GET /v1/nodes` answer (`{"nodes": [{"name": ...}, ...]}`)."""
    if not isinstance(body, dict) or not isinstance(body.get("nodes"), list):
        raise NodesUnavailable('answer is not {"nodes": [...]}')
    names = [n.get("name") for n in body["nodes"] if isinstance(n, dict)]
    return sorted(n for n in names if isinstance(n, str))


def fetch_node_names(base_url: str) -> list[str]:
    url = base_url.rstrip("/") + NODES_PATH
    if not url.startswith(("http://", "https://")):
        raise NodesUnavailable(f"{base_url!r} is not an http:// or https:// URL")
    # No proxy settings from the environment: the control plane is on the underlay.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise NodesUnavailable(f"GET {url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NodesUnavailable(f"GET {url}: {' '.join(str(reason).split())}") from exc
    return node_names(body)


def fleet_node_names(prefix: str = "egd-") -> list[str]:
    from egressd.net import netns as kn
    from egressd.topology import network
    from egressd.topology.layout import CONTROL_ADDR, CONTROL_PORT, CTL_NS
    from egressd.topology.probe import ProbeError, http_request

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
