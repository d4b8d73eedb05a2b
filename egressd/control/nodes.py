"""The control plane's node names, for tools (`egressd policy check`).

`fetch_node_names` asks a control plane by URL from this process's network
namespace (the local fleet's is asked from inside its namespace by
`egressd_harness.topology.nodes.fleet_node_names`). Both raise `NodesUnavailable` with one line of detail when there is no answer.
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
