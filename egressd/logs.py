"""structlog set-up: JSON lines for daemons, readable console lines for the CLI.

The JSON chain is structlog's usual one (context variables, level, an ISO UTC
``time``, exceptions, JSON) with three of its steps replaced by cheaper ones
writing the same bytes (tests/unit/test_logs.py holds them to the stock chain):
the proxy logs two audit lines per plain-HTTP connection, which cost ~60 µs of
CPU each with the stock steps (a `datetime` and its `isoformat` per line, a
`JSONEncoder` built per line by `json.dumps`, `print`'s two writes), ~30 µs now.
The JSON text stays the standard library's (no orjson: not a dependency).
"""

from __future__ import annotations

import datetime as dt
import json as _json
import logging
import sys
import threading
from time import time_ns
from typing import Any, TextIO

import structlog

TIME_KEY = "time"


class _Second:
    """The last whole second and its text (`utc_time`)."""

    whole = -1
    text = ""


def utc_time(_logger: object, _name: str, event_dict: structlog.typing.EventDict) -> Any:
    """Set ``time`` to now, exactly as ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-12-07T03:33:15.826123Z``; no fraction when it is 0), with the text of
    the second made once per second rather than a `datetime` per line."""
    whole, nanos = divmod(time_ns(), 1_000_000_000)
    if whole != _Second.whole:
        # `datetime.now` floors to the microsecond too.
        _Second.text = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _Second.whole = whole
    micros = nanos // 1000
    event_dict[TIME_KEY] = f"{_Second.text}.{micros:06d}Z" if micros else f"{_Second.text}Z"
    return event_dict


def _fallback(obj: Any) -> Any:
    # structlog's JSONRenderer's default: an object's __structlog__, else its repr.
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


#: One encoder for every line (`json.dumps` with a `default` builds one per call);
#: `json.dumps`'s defaults otherwise, so the text is what `JSONRenderer` wrote.
_ENCODER = _json.JSONEncoder(default=_fallback)


def render_json(_logger: object, _name: str, event_dict: structlog.typing.EventDict) -> str:
    """The line's JSON text (as ``structlog.processors.JSONRenderer()``)."""
    return _ENCODER.encode(event_dict)


class LineLogger:
    """Writes each rendered line and a newline to `file` in one write, then flushes
    (`structlog.PrintLogger` prints the line and the newline as two writes)."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._logger = LineLogger(file)

    def __call__(self, *args: Any) -> LineLogger:
        return self._logger


def configure(*, json: bool, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once per process (called from the CLI entry point only)."""
    out = stream if stream is not None else sys.stderr
    logger_factory: Any
    if json:
        processors: list[structlog.typing.Processor] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            utc_time,
            structlog.processors.format_exc_info,
            render_json,
        ]
        logger_factory = LineLoggerFactory(out)
    else:
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key=TIME_KEY),
            structlog.dev.ConsoleRenderer(colors=False),
        ]
        logger_factory = structlog.PrintLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
