"""The `proxy` verb of the `egressd` command.

    egressd proxy serve --config FILE

The configuration file is JSON (see `egressd.proxy.config`). Logs, the audit
events included, are JSON lines on stderr. A bad configuration or a start-up
failure (keys, TUN, nftables, a bind) is one line on stderr and exit code 2,
after undoing whatever had been set up; SIGTERM/SIGINT stop it cleanly with
exit code 0, leaving no nftables table, policy-routing rule or TUN behind.

Needs root (CAP_NET_ADMIN for the TUN, nftables, routes and IP_TRANSPARENT).
It acts on the network namespace it is started in: run it inside the proxy's namespace
(`nsenter --net=/run/netns/egd-proxy1 egressd proxy serve --config ...`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from egressd.cliutil import serve_daemon
from egressd.proxy.config import ConfigError, load_config


def register(sub: Any) -> None:
    """Add the `proxy` verb to the top-level subparsers `sub`."""
    proxy = sub.add_parser("proxy", help="the egress proxy: GENEVE endpoint, TUN, tier 2")
    proxy_sub = proxy.add_subparsers(dest="proxy_command", required=True, metavar="{serve}")
    serve = proxy_sub.add_parser(
        "serve", help="run the proxy in this network namespace until SIGTERM/SIGINT"
    )
    serve.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="JSON configuration (name, underlay, egress, ...; see egressd.proxy.config)",
    )
    serve.set_defaults(handler=_serve)
    # One worker of a supervisor (`"workers"` > 1): started by `proxy serve`, not by hand.
    worker = proxy_sub.add_parser("worker", help="(internal) one worker of `proxy serve`")
    worker.add_argument("--config", type=Path, required=True, metavar="FILE")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--fds", required=True, help="the inherited TCP, UDP DNS, TCP DNS fds")
    worker.set_defaults(handler=_worker)


def _serve(args: argparse.Namespace) -> int:
    from egressd.proxy import service  # uvloop, aiohttp, tier 2 only when serving

    return serve_daemon(args.config, load_config, ConfigError, service.run)


def _worker(args: argparse.Namespace) -> int:
    from egressd.proxy import worker

    fds = [int(fd) for fd in args.fds.split(",")]
    return serve_daemon(
        args.config,
        load_config,
        ConfigError,
        lambda config: worker.run_worker(config, args.index, fds),
    )
