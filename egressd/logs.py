"""structlog set-up: JSON lines for daemons, readable console lines for the CLI."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(*, json: bool, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once per process (called from the CLI entry point only)."""
    out = stream if stream is not None else sys.stderr
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
