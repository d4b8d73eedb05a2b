"""The `agent` verb of the `egressd` command.

    egressd agent serve --config FILE

Runs the node agent in the calling process's network namespace (the node's:
``nsenter --net=/run/netns/egd-node1 egressd agent serve --config ...``).
The configuration is described in `egressd.agent.config` and
`node-agent/agent.example.json`. Logs are JSON lines on stderr. A bad
configuration or a start-up failure (TUN, tier 1, bind) is one line on stderr
and exit code 2; SIGTERM/SIGINT stop it cleanly (every sandbox unregistered)
with exit code 0.

`python -m egressd.agent.cli serve --config FILE` does the same without the
top-level command (for tests and for images that only ship the agent).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egressd import logs
from egressd.cli import CliError
from egressd.errors import EgressdError


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the node agent (in the node's network namespace)")
    serve.add_argument(
        "--config", type=Path, required=True, metavar="FILE",
        help="agent configuration (JSON; see node-agent/agent.example.json)",
    )  # fmt: skip
    serve.set_defaults(handler=_serve)


def register(sub: Any) -> None:
    """Add the `agent` verb to the top-level subparsers `sub`."""
    agent = sub.add_parser(
        "agent", help="the node agent: sandbox veths, tier-1 eBPF, GENEVE to the proxies"
    )
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    add_serve_parser(agent_sub)


def _serve(args: argparse.Namespace) -> int:
    from egressd.agent.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(f"{args.config}: {exc.detail}") from exc
    logs.configure(json=True)
    from egressd.agent import service  # aiohttp, uvloop, pyroute2 only when serving

    try:
        return service.run(config)
    except EgressdError as exc:
        raise CliError(" ".join(f"{exc.reason}: {exc.detail}".split())) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m egressd.agent.cli serve --config FILE`."""
    parser = argparse.ArgumentParser(prog="egressd agent")
    sub = parser.add_subparsers(dest="agent_command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except EgressdError as exc:
        print(f"egressd: error: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
