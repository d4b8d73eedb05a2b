"""What every `egressd` verb shares: the error type, the one-line parser, converters.

Subcommand modules import this module, never `egressd.cli`: `egressd.cli`
imports the subcommand modules (only the one a command runs), so importing it
back would make a cycle. A handler fails by raising: a `CliError` (its detail
is the line) or any other `EgressdError` (`reason: detail`); `egressd.cli.main`
prints `egressd: error: <line>` on stderr, once, and exits with the error's
code (2 unless the error says otherwise).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from egressd.errors import EgressdError

#: Exit code of a failed invocation (argparse's for a usage error).
EXIT_USAGE = 2


class CliError(EgressdError):
    """A CLI invocation that cannot proceed; printed as one line, exit code `exit_code`."""

    def __init__(self, detail: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__("cli_error", detail)
        self.exit_code = exit_code


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def error_line(exc: EgressdError) -> str:
    """The one line `main` prints for `exc` (after `egressd: error: `)."""
    if isinstance(exc, CliError):
        return exc.detail
    return one_line(f"{exc.reason}: {exc.detail}")


def exit_code(exc: EgressdError) -> int:
    return exc.exit_code if isinstance(exc, CliError) else EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line on stderr and exit code 2, never a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# --- argument converters (argparse `type=`) -------------------------------------------


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


# --- daemons --------------------------------------------------------------------------


def serve_daemon(
    config_path: Path,
    load: Callable[[Path], Any],
    config_error: type[EgressdError],
    run: Callable[[Any], int],
) -> int:
    """Load a daemon's config (one line naming the field on error), switch
    logs to JSON, run it; a start-up failure (an `EgressdError`) reaches `main`,
    which prints it as one line with exit code 2."""
    try:
        config = load(config_path)
    except config_error as exc:
        raise CliError(f"{config_path}: {exc.detail}") from exc
    from egressd import logs

    logs.configure(json=True)
    return run(config)
