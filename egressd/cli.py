"""The `egressd` command: one entry point, each subsystem registers its verbs.

A bad argument exits 2 with one line on stderr, never a usage dump.

`COMMANDS` names, for each verb, the module whose `register(sub)` adds it;
`main` imports only the module of the verb it runs (`egressd policy verify`
loads no daemon, aiohttp or pyroute2), and every module only for `egressd
--help`, a missing or an unknown verb. Shared helpers (`CliError`, the
one-line parser, converters) live in `egressd.cliutil`, which the verbs'
modules import; nothing imports this module but its entry points.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from egressd.cliutil import CliError, OneLineParser, error_line, exit_code
from egressd.errors import EgressdError

__all__ = ["COMMANDS", "CliError", "Handler", "OneLineParser", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]

DESCRIPTION = (
    "The `egressd` command: one entry point, each subsystem registers its verbs. "
    "A bad argument exits 2 with one line on stderr, never a usage dump."
)

#: verb -> the module that registers it, in `egressd --help`'s order. A module
#: registering several verbs registers all of them whichever one runs.
COMMANDS: dict[str, str] = {
    "keys": "egressd.policy.cli",
    "policy": "egressd.policy.cli",
    "control": "egressd.control.cli",
    "job": "egressd.control.jobcli",
    "proxy": "egressd.proxy.cli",
    "agent": "egressd.agent.cli",
    "topology": "egressd_harness.topology.cli",
    "inet": "egressd_harness.topology.cli",
    "sandbox": "egressd.sandbox.cli",
    "bench": "egressd_harness.bench.cli",
    "loadtest": "egressd_harness.loadtest.cli",
    "audit": "egressd.audit.cli",
    "demo": "egressd_harness.demo.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command`'s module only, or (None, unknown) of every verb."""
    if command in COMMANDS:
        modules = [COMMANDS[command]]
    else:
        modules = list(dict.fromkeys(COMMANDS.values()))
    parser = OneLineParser(prog="egressd", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except EgressdError as exc:  # CliError included: every failure is one line, here
        print(f"egressd: error: {error_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
