"""The `agent` verb of the `egressd` command.

    egressd agent serve --config FILE

Runs the node agent in the calling process's network namespace (the node's:
``nsenter --net=/run/netns/egd-node1 egressd agent serve --config ...``).
The configuration is described in `egressd.agent.config` and
`node-agent/agent.example.json`. Logs are JSON lines on stderr. A bad
configuration or a start-up failure (TUN, tier 1, bind) is one line on stderr
and exit code 2; SIGTERM/SIGINT stop it cleanly (every sandbox unregistered)
with exit code 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from egressd.cliutil import serve_daemon


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the node agent (in the node's network namespace)")
    serve.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="agent configuration (JSON; see node-agent/agent.example.json)",
    )
    serve.set_defaults(handler=_serve)


def register(sub: Any) -> None:
    """Add the `agent` verb to the top-level subparsers `sub`."""
    agent = sub.add_parser(
        "agent", help="the node agent: sandbox veths, tier-1 eBPF, GENEVE to the proxies"
    )
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    add_serve_parser(agent_sub)


def _serve(args: argparse.Namespace) -> int:
    from egressd.agent import service  # aiohttp, uvloop, pyroute2 only when serving
    from egressd.agent.config import ConfigError, load_config

    return serve_daemon(args.config, load_config, ConfigError, service.run)
