"""structlog set-up: JSON lines for daemons, readable console lines for the CLI.

The JSON chain is structlog's usual one (context variables, level, an ISO UTC
``time``, exceptions, JSON) with three of its steps replaced by cheaper ones
writing the same bytes (tests/unit/test_logs.py holds them to the stock chain):
the proxy logs two audit lines per plain-HTTP connection, which cost ~60 µs of
CPU each with the stock steps (a `datetime` and its `isoformat` per line, a
`JSONEncoder` built per line by `json.dumps`, `print`'s two writes), ~30 µs now.
The JSON text stays the standard library's (no orjson: not a dependency).

`json_lines` goes one step further for the audit lines: it runs the same steps
for a bound logger made under this chain without structlog's generic call path
(the event's fields copied three times as keyword dicts, the processor loop, a
C encoder made per line): `audit.emit` of a ``connection`` event, ~14.5 ->
~9 µs of CPU, 2 of them the write and its flush (benchmarks/audit_lines.py).
"""

from __future__ import annotations

import datetime as dt
import json as _json
import json.encoder as _json_encoder
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from time import time_ns
from typing import Any, ClassVar, Literal, TextIO

import structlog

TIME_KEY = "time"


class _Second:
    """The last whole second and its text (`utc_time`)."""

    whole = -1
    text = ""


def _now_text() -> str:
    whole, nanos = divmod(time_ns(), 1_000_000_000)
    if whole != _Second.whole:
        # `datetime.now` floors to the microsecond too.
        _Second.text = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _Second.whole = whole
    micros = nanos // 1000
    return f"{_Second.text}.{micros:06d}Z" if micros else f"{_Second.text}Z"


def utc_time(_logger: object, _name: str, event_dict: structlog.typing.EventDict) -> Any:
    """Set ``time`` to now, exactly as ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-12-07T03:33:15.826123Z``; no fraction when it is 0), with the text of
    the second made once per second rather than a `datetime` per line."""
    event_dict[TIME_KEY] = _now_text()
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


def _dict_encoder() -> Callable[[structlog.typing.EventDict], str]:
    """`_ENCODER.encode` for a dict without its per-call set-up (~1 µs of 4: the
    C encoder `encode` makes per call, made once here with `_ENCODER`'s settings,
    so the text is the same). It skips the circular-reference check: a line that
    contains itself fails with RecursionError rather than ValueError (the audit
    events, its one user, are plain data)."""
    make = getattr(_json_encoder, "c_make_encoder", None)  # not in the stubs
    if make is None:  # no C accelerator: `encode`'s own path
        return _ENCODER.encode
    enc = _ENCODER
    tree = make(
        None,  # markers: no circular check
        enc.default,
        _json_encoder.encode_basestring_ascii,  # ensure_ascii
        enc.indent,
        enc.key_separator,
        enc.item_separator,
        enc.sort_keys,
        enc.skipkeys,
        enc.allow_nan,
    )

    def encode(obj: structlog.typing.EventDict) -> str:
        return "".join(tree(obj, 0))

    return encode


_encode_dict = _dict_encoder()


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


#: The methods `JsonLines.write` takes and their levels (`logging`'s numbers, which
#: `make_filtering_bound_logger` compares with).
_LEVELS: Mapping[str, int] = {"info": logging.INFO, "warning": logging.WARNING}


class JsonLines:
    """The lines one structlog bound logger made under `configure(json=True)`
    writes, written without structlog's generic call path: `write` runs the
    chain's steps (`merge_contextvars`, `add_log_level`, `utc_time`,
    `format_exc_info`, `render_json`) on one dict built in structlog's order
    (the bound context, then the fields, then ``event``) and hands the text to
    the same `LineLogger`: the same bytes, in the same write, flushed at once.
    Made by `json_lines`."""

    __slots__ = ("_context", "_level", "_out")

    def __init__(self, context: Mapping[str, Any], out: LineLogger, level: int) -> None:
        self._context = dict(context)
        self._out = out
        self._level = level

    def write(
        self,
        method: Literal["info", "warning"],
        event: str,
        fields: Mapping[str, Any],
        more: Mapping[str, Any] | None = None,
    ) -> None:
        """What ``logger.<method>(event, **fields, **more)`` writes. An ``event``
        key in the fields is left out (`event` is the line's event), as a caller
        passing an event dict would pop it."""
        if _LEVELS[method] < self._level:
            return  # the filtering bound logger's no-op
        line: structlog.typing.EventDict = self._context.copy()
        line.update(fields)
        if more is not None:
            line.update(more)
        line.pop("event", None)  # not in the context (`json_lines`): the fields' own
        line["event"] = event
        structlog.contextvars.merge_contextvars(None, method, line)
        line["level"] = method  # add_log_level (no alias among `_LEVELS`)
        line[TIME_KEY] = _now_text()
        if "exc_info" in line:
            line = structlog.processors.format_exc_info(None, method, line)
        self._out.msg(_encode_dict(line))


class _Json:
    """What the last `configure(json=True)` made: the processor list every bound
    logger made under it holds (that very list: structlog passes it on), a copy
    of its steps (`structlog.testing.capture_logs` swaps the list's contents in
    place), its wrapper class (the level filter) and level."""

    processors: list[structlog.typing.Processor] | None = None
    steps: ClassVar[list[structlog.typing.Processor]] = []
    wrapper: type | None = None
    level = logging.INFO


class _LastLogger:
    """`json_lines`'s answer for the last logger asked, as (logger, answer): the
    proxy asks for the same long-lived logger each time. One tuple, swapped
    whole (a reader never pairs one logger with another's answer); the logger
    is held, so its id is not reused."""

    pair: tuple[object, JsonLines | None] = (None, None)


def json_lines(logger: object) -> JsonLines | None:
    """A `JsonLines` for `logger` when it is a structlog bound logger made under
    the JSON chain `configure` set up (a bound context without an ``event`` key),
    else None: log through the logger itself. A bound logger's context, logger
    and processor list do not change (``bind`` makes a new one), so the answer
    for the last logger asked is kept; the list's contents are checked each time."""
    if _Json.processors != _Json.steps:
        return None  # the chain's list was changed in place
    last, answer = _LastLogger.pair
    if logger is last:
        return answer
    lines = None
    out = getattr(logger, "_logger", None)
    context = getattr(logger, "_context", None)
    if (
        _Json.processors is not None
        and getattr(logger, "_processors", None) is _Json.processors
        and type(logger) is _Json.wrapper
        and isinstance(out, LineLogger)
        and type(context) is dict
        and "event" not in context
    ):
        lines = JsonLines(context, out, _Json.level)
    _LastLogger.pair = (logger, lines)
    return lines


def configure(*, json: bool, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once per process (called from the CLI entry point only)."""
    out = stream if stream is not None else sys.stderr
    logger_factory: Any
    wrapper = structlog.make_filtering_bound_logger(level)
    if json:
        processors: list[structlog.typing.Processor] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            utc_time,
            structlog.processors.format_exc_info,
            render_json,
        ]
        logger_factory = LineLoggerFactory(out)
        _Json.processors, _Json.steps = processors, list(processors)
        _Json.wrapper, _Json.level = wrapper, level
    else:
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key=TIME_KEY),
            structlog.dev.ConsoleRenderer(colors=False),
        ]
        logger_factory = structlog.PrintLoggerFactory(file=out)
        _Json.processors, _Json.steps, _Json.wrapper = None, [], None
    _LastLogger.pair = (None, None)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
