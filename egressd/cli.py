"""The `egressd` command: one entry point, each subsystem registers its verbs.

A bad argument exits 2 with one line on stderr, never a usage dump.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from egressd.errors import EgressdError

Handler = Callable[[argparse.Namespace], int]


class CliError(EgressdError):
    """A CLI invocation that cannot proceed; printed as one line, exit code 2."""

    def __init__(self, detail: str) -> None:
        super().__init__("cli_error", detail)


def serve_daemon(
    config_path: Path,
    load: Callable[[Path], Any],
    config_error: type[EgressdError],
    run: Callable[[Any], int],
) -> int:
    """Load a daemon's config (one line naming the field on error), switch
    logs to JSON, run it; a start-up failure is one line and exit code 2."""
    try:
        config = load(config_path)
    except config_error as exc:
        raise CliError(f"{config_path}: {exc.detail}") from exc
    from egressd import logs

    logs.configure(json=True)
    try:
        return run(config)
    except EgressdError as exc:
        raise CliError(" ".join(f"{exc.reason}: {exc.detail}".split())) from exc


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from egressd import demo
    from egressd.agent import cli as agent_cli
    from egressd.audit import cli as audit_cli
    from egressd.bench import cli as bench_cli
    from egressd.control import cli as control_cli
    from egressd.control import jobcli
    from egressd.loadtest import cli as loadtest_cli
    from egressd.policy import cli as policy_cli
    from egressd.proxy import cli as proxy_cli
    from egressd.sandbox import cli as sandbox_cli
    from egressd.topology import cli as topology_cli

    parser = OneLineParser(prog="egressd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    policy_cli.register(sub)
    control_cli.register(sub)
    jobcli.register(sub)
    proxy_cli.register(sub)
    agent_cli.register(sub)
    topology_cli.register(sub)
    sandbox_cli.register(sub)
    bench_cli.register(sub)
    loadtest_cli.register(sub)
    audit_cli.register(sub)
    demo.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CliError as exc:
        print(f"egressd: error: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
