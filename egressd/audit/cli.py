"""`egressd audit`: the fleet's audit events as a table (or JSON lines).

    egressd audit [--job J] [--since T] [--until T] [--verdict V]
                  [--run-dir DIR | --logs DIR] [--json]

Reads every member's log in ``RUN/logs`` (``<member>.log`` and rotated
``<member>.log.N``; ``--logs DIR`` for another directory, e.g. the compose
fleet's ``logs`` volume), keeps the audit events that match, oldest first.
Exit 0 (also when nothing matches: a line on stderr says so), 2 for a bad
argument or a missing log directory. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from pathlib import Path
from typing import Any

from egressd.audit.events import (
    VERDICTS,
    AuditEvent,
    AuditParseError,
    Filter,
    parse_line,
    parse_time,
    select,
    table,
    to_json,
)
from egressd.cliutil import CliError
from egressd.layout import DEFAULT_RUN_DIR

_LOG_NAME = re.compile(r"(?P<member>[^/]+)\.log(?:\.[0-9]+)?")


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the fleet's audit events (tier 1 and tier 2) as a table")
    audit.add_argument("--job", metavar="J", help="a job id (or a prefix of one)")
    audit.add_argument(
        "--since",
        metavar="T",
        help="from time T: ISO 8601 (2026-12-06T16:00:00Z) or 90s, 15m, 2h, 1d ago",
    )
    audit.add_argument("--until", metavar="T", help="up to time T (same forms as --since)")
    audit.add_argument("--verdict", choices=VERDICTS, help="deny = every refusal (tier 1 included)")
    where = audit.add_mutually_exclusive_group()
    where.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="the fleet's run directory")
    where.add_argument(
        "--logs", metavar="DIR", default=None, help="a directory of <member>.log files"
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per event")
    audit.set_defaults(handler=_audit)


def log_files(directory: Path) -> list[tuple[str, Path]]:
    """(member, path) of every log in `directory`, rotated ones included."""
    out = []
    for path in sorted(directory.iterdir()):
        found = _LOG_NAME.fullmatch(path.name)
        if found and path.is_file():
            out.append((found.group("member"), path))
    return out


def read_events(directory: Path) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    for member, path in log_files(directory):
        try:
            with path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    event = parse_line(line, member)
                    if event is not None:
                        events.append(event)
        except OSError as exc:
            print(f"egressd: warning: {path}: {exc.strerror or exc}", file=sys.stderr)
    return events


def _audit(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    try:
        keep = Filter(
            job=args.job,
            since=None if args.since is None else parse_time(args.since, now=now),
            until=None if args.until is None else parse_time(args.until, now=now),
            verdict=args.verdict,
        )
    except AuditParseError as exc:
        raise CliError(str(exc)) from exc
    directory = Path(args.logs) if args.logs is not None else Path(args.run_dir) / "logs"
    if not directory.is_dir():
        hint = "" if args.logs is not None else "; is the fleet up? (egressd topology up)"
        raise CliError(f"no log directory {directory}{hint}")
    events = select(read_events(directory), keep)
    try:
        if args.json:
            for event in events:
                sys.stdout.write(to_json(event) + "\n")
        else:
            sys.stdout.write(table(events))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wants
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if not events:
        print(f"no audit events match (logs in {directory})", file=sys.stderr)
    return 0
