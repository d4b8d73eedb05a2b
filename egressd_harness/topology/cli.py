"""CLI verbs of the local fleet: `topology up|down|status` and `inet serve`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from egressd import logs
from egressd.layout import DEFAULT_RUN_DIR, default_layout
from egressd_harness.topology import inet
from egressd_harness.topology.fleet import DEFAULT_DATAPATH, ComponentStatus, Fleet


def _fleet(args: argparse.Namespace) -> Fleet:
    datapath = getattr(args, "datapath", DEFAULT_DATAPATH)
    return Fleet(default_layout(Path(args.run_dir), args.prefix), datapath=datapath)


def _up(args: argparse.Namespace) -> int:
    logs.configure(json=False)
    statuses = _fleet(args).up()  # an EgressdError: one line from egressd.cli.main
    _print_status(statuses)
    return 0


def _down(args: argparse.Namespace) -> int:
    logs.configure(json=False)
    removed = _fleet(args).down()
    for item in removed:
        print(f"removed {item}")
    return 0


def _status(args: argparse.Namespace) -> int:
    statuses = _fleet(args).status()
    if args.json:
        print(json.dumps([s.to_dict() for s in statuses], indent=2))
    else:
        _print_status(statuses)
    return 0 if all(s.ready for s in statuses) else 1


def _print_status(statuses: list[ComponentStatus]) -> None:
    print(f"{'component':<10} {'netns':<12} {'pid':>8}  state")
    for s in statuses:
        state = "down" if s.pid is None else ("ready" if s.ready else "not ready")
        print(f"{s.name:<10} {s.netns:<12} {s.pid or '-':>8}  {state}")


def _inet_serve(args: argparse.Namespace) -> int:
    logs.configure(json=True)
    return inet.run(inet.config_from_args(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    topo = sub.add_parser("topology", help="the local fleet in network namespaces")
    verbs = topo.add_subparsers(dest="verb", required=True)
    for name, handler, text in (
        ("up", _up, "build the fleet and start every daemon (idempotent)"),
        ("down", _down, "stop every daemon and remove every namespace"),
        ("status", _status, "show each component's health"),
    ):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
        verb.add_argument("--prefix", default="egd-", help="namespace name prefix (default egd-)")
        verb.set_defaults(handler=handler)
        if name == "status":
            verb.add_argument("--json", action="store_true")
        if name == "up":
            verb.add_argument(
                "--datapath",
                choices=("userspace", "kernel"),
                default=DEFAULT_DATAPATH,
                help=f"the data path of agents and proxies (default {DEFAULT_DATAPATH})",
            )
    inet_parser = sub.add_parser("inet", help="the test internet (runs inside egd-inet)")
    inet_verbs = inet_parser.add_subparsers(dest="verb", required=True)
    serve = inet_verbs.add_parser("serve", help="HTTP/HTTPS sites, DNS, metadata service")
    inet.add_arguments(serve)
    serve.set_defaults(handler=_inet_serve)
