"""The proxy's audit events: one line per connection, per DNS query, per HTTP request.

Field names are constants (DESIGN.md fixes ``event``, ``job_id``, ``verdict``,
``reason``, ``host``, ``dst``, ``port``); the builders are pure and return
plain dicts of JSON-able values; `emit` is the one place that logs, at a
level chosen by the outcome: info for an allow, warning for a deny, a report-mode
``would_deny`` or a dropped query. To the daemons' JSON log (`logs.configure`)
it writes through `logs.json_lines`: the line the structlog logger would write,
without its generic call path (two lines per plain-HTTP connection).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time as _time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from egressd import logs

EVENT = "event"
TIME = "time"
JOB_ID = "job_id"
ACCOUNT = "account"
NODE = "node"
PROXY = "proxy"
SOURCE = "source"
DST = "dst"
PORT = "port"
HOST = "host"
VERDICT = "verdict"
REASON = "reason"
MODE = "mode"
WOULD_DENY = "would_deny"
BYTES_UP = "bytes_up"
BYTES_DOWN = "bytes_down"
INJECTED = "injected"
CREDENTIAL = "credential"
DURATION_MS = "duration_ms"
#: Why a relayed connection was ended by the proxy ("idle_timeout",
#: "max_lifetime"); absent when the peers ended it.
END = "end"
QNAME = "qname"
QTYPE = "qtype"
ANSWERS = "answers"
#: Answer addresses the proxy kept from the client, each with its reason
#: (``fleet_address``, ``deny_private`` ...); absent when none was dropped.
DROPPED = "dropped"
RCODE = "rcode"

METHOD = "method"
#: A request's path without its query (a query may carry data the job's
#: owner would not want in a log).
PATH = "path"
#: The response's status (the proxy's 403 for a denied request); None when
#: the connection ended before a response.
STATUS = "status"

EVENT_CONNECTION = "connection"
EVENT_DNS = "dns"
EVENT_HTTP_REQUEST = "http_request"

VERDICT_ALLOW = "allow"
VERDICT_DENY = "deny"
#: A DNS datagram that was not answered at all (malformed, overload).
VERDICT_DROP = "drop"


class AuditLogger(Protocol):
    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...


class _Second:
    """The last whole second and its text (`_now_iso`)."""

    whole = -1
    text = ""


def _now_iso() -> str:
    """Now, UTC, to the millisecond (``2026-12-07T03:33:15.826Z``); the text of
    the second is made once per second, not per event."""
    now = _time.time()
    whole = int(now)
    if whole != _Second.whole:
        _Second.text = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _Second.whole = whole
    return f"{_Second.text}.{min(int((now - whole) * 1000), 999):03d}Z"


def _endpoint(ip: ipaddress.IPv4Address | str | None, port: int | None) -> str | None:
    if ip is None:
        return None
    return f"{ip}:{port}" if port is not None else str(ip)


class _LastJob:
    """The last job id `_job` formatted, as (its 128-bit number, its text): one
    tuple, swapped whole, so a reader never pairs one job's number with
    another's text."""

    pair: tuple[int, str] = (-1, "")


def _job(job_id: uuid.UUID | str | None) -> str | None:
    # A UUID's text is ~0.5 µs to make and a job's connections come in runs.
    if job_id.__class__ is uuid.UUID:
        number, text = _LastJob.pair
        if job_id.int == number:
            return text
        text = str(job_id)
        _LastJob.pair = (job_id.int, text)
        return text
    return None if job_id is None else str(job_id)


def connection_event(
    *,
    job_id: uuid.UUID | str | None,
    account: str | None,
    node: str | None,
    proxy: str,
    src: ipaddress.IPv4Address | str,
    sport: int,
    dst: ipaddress.IPv4Address | str,
    port: int,
    host: str | None,
    verdict: str,
    reason: str,
    mode: str | None,
    would_deny: bool = False,
    bytes_up: int = 0,
    bytes_down: int = 0,
    duration_ms: float = 0.0,
    time: str | None = None,
    end: str | None = None,
) -> dict[str, object]:
    """The ``connection`` event, logged once when a connection closes."""
    event: dict[str, object] = {
        EVENT: EVENT_CONNECTION,
        TIME: time if time is not None else _now_iso(),
        JOB_ID: _job(job_id),
        ACCOUNT: account,
        NODE: node,
        PROXY: proxy,
        SOURCE: _endpoint(src, sport),
        DST: str(dst),
        PORT: port,
        HOST: host,
        VERDICT: str(verdict),
        REASON: reason,
        MODE: mode,
        WOULD_DENY: would_deny,
        BYTES_UP: bytes_up,
        BYTES_DOWN: bytes_down,
        DURATION_MS: round(duration_ms, 3),
    }
    if end is not None:
        event[END] = end
    return event


def dns_event(
    *,
    job_id: uuid.UUID | str | None,
    account: str | None,
    node: str | None,
    proxy: str,
    src: ipaddress.IPv4Address | str,
    sport: int,
    dst: ipaddress.IPv4Address | str | None,
    qname: str | None,
    qtype: str | None,
    verdict: str,
    reason: str,
    rcode: str | None = None,
    answers: Sequence[str] = (),
    mode: str | None = None,
    would_deny: bool = False,
    time: str | None = None,
    dropped: Sequence[tuple[str, str]] = (),
) -> dict[str, object]:
    """The ``dns`` event, logged once per query (``dst`` is the resolver address asked)."""
    event: dict[str, object] = {
        EVENT: EVENT_DNS,
        TIME: time if time is not None else _now_iso(),
        JOB_ID: _job(job_id),
        ACCOUNT: account,
        NODE: node,
        PROXY: proxy,
        SOURCE: _endpoint(src, sport),
        DST: None if dst is None else str(dst),
        PORT: 53,
        HOST: qname,
        QNAME: qname,
        QTYPE: qtype,
        VERDICT: str(verdict),
        REASON: reason,
        RCODE: rcode,
        ANSWERS: list(answers),
        MODE: mode,
        WOULD_DENY: would_deny,
    }
    if dropped:
        event[DROPPED] = [{"address": ip, "reason": reason} for ip, reason in dropped]
    return event


def http_request_event(
    *,
    job_id: uuid.UUID | str | None,
    account: str | None,
    node: str | None,
    proxy: str,
    src: ipaddress.IPv4Address | str,
    sport: int,
    dst: ipaddress.IPv4Address | str,
    port: int,
    host: str | None,
    method: str,
    path: str,
    status: int | None,
    verdict: str,
    reason: str,
    mode: str | None,
    would_deny: bool = False,
    bytes_up: int = 0,
    bytes_down: int = 0,
    time: str | None = None,
    injected: Sequence[str] = (),
    credential: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The ``http_request`` event, logged once per request of a plain-HTTP
    connection when its response is complete (or it was denied). `injected`:
    the headers the proxy set from credentials (names, never values);
    `credential`: which secret a ``credential_*`` reason is about. Both are
    left out when empty."""
    event: dict[str, object] = {
        EVENT: EVENT_HTTP_REQUEST,
        TIME: time if time is not None else _now_iso(),
        JOB_ID: _job(job_id),
        ACCOUNT: account,
        NODE: node,
        PROXY: proxy,
        SOURCE: _endpoint(src, sport),
        DST: str(dst),
        PORT: port,
    }
    event.update(
        _request_fields(
            host,
            method,
            path,
            status,
            verdict,
            reason,
            mode,
            would_deny,
            bytes_up,
            bytes_down,
            injected,
            credential,
        )
    )
    return event


class HttpRequests:
    """The ``http_request`` events of one connection, logged as `emit` logs
    `http_request_event`'s dict (the same fields, in the same order, at the same
    level), with the fields fixed for the connection (job, account, node,
    proxy, source, destination, port, mode) formatted once per connection
    rather than per request, and no intermediate event dict to copy. A
    structlog logger gets them bound once (`bind`: its context comes first in
    a line, so the order is unchanged: ``time`` is bound as a placeholder in
    its place and set per request); another logger gets them per call. The
    daemons' JSON logger (`logs.json_lines`) gets neither: its line is built
    from the same fields in the same order, ``time`` set by the chain's step
    (it replaces any value here, so none is made)."""

    __slots__ = ("_bound", "_fixed", "_lines", "_logger", "_mode")

    def __init__(
        self,
        logger: AuditLogger,
        *,
        job_id: uuid.UUID | str | None,
        account: str | None,
        node: str | None,
        proxy: str,
        src: ipaddress.IPv4Address | str,
        sport: int,
        dst: ipaddress.IPv4Address | str,
        port: int,
        mode: str | None,
    ) -> None:
        self._logger = logger
        self._mode = mode
        # TIME first, set per request: the order is `http_request_event`'s.
        self._fixed: dict[str, object] = {
            TIME: None,
            JOB_ID: _job(job_id),
            ACCOUNT: account,
            NODE: node,
            PROXY: proxy,
            SOURCE: _endpoint(src, sport),
            DST: str(dst),
            PORT: port,
        }
        self._lines = logs.json_lines(logger)
        bind = None if self._lines is not None else getattr(logger, "bind", None)
        self._bound: AuditLogger | None = None if bind is None else bind(**self._fixed)

    def emit(
        self,
        *,
        host: str | None,
        method: str,
        path: str,
        status: int | None,
        verdict: str,
        reason: str,
        would_deny: bool = False,
        bytes_up: int = 0,
        bytes_down: int = 0,
        injected: Sequence[str] = (),
        credential: Mapping[str, str] | None = None,
    ) -> None:
        quiet = verdict == VERDICT_ALLOW and not would_deny  # `is_quiet`
        request = _request_fields(
            host,
            method,
            path,
            status,
            verdict,
            reason,
            self._mode,
            would_deny,
            bytes_up,
            bytes_down,
            injected,
            credential,
        )
        lines = self._lines
        if lines is not None:
            lines.write("info" if quiet else "warning", EVENT_HTTP_REQUEST, self._fixed, request)
            return
        bound = self._bound
        if bound is not None:
            log = bound.info if quiet else bound.warning
            log(EVENT_HTTP_REQUEST, time=_now_iso(), **request)
            return
        fields = self._fixed.copy()
        fields[TIME] = _now_iso()
        fields.update(request)
        if quiet:
            self._logger.info(EVENT_HTTP_REQUEST, **fields)
        else:
            self._logger.warning(EVENT_HTTP_REQUEST, **fields)


def _request_fields(
    host: str | None,
    method: str,
    path: str,
    status: int | None,
    verdict: str,
    reason: str,
    mode: str | None,
    would_deny: bool,
    bytes_up: int,
    bytes_down: int,
    injected: Sequence[str],
    credential: Mapping[str, str] | None,
) -> dict[str, object]:
    """An ``http_request`` event's own fields, in the event's order (after ``port``)."""
    request: dict[str, object] = {
        HOST: host,
        METHOD: method,
        PATH: path,
        STATUS: status,
        VERDICT: str(verdict),
        REASON: reason,
        MODE: mode,
        WOULD_DENY: would_deny,
        BYTES_UP: bytes_up,
        BYTES_DOWN: bytes_down,
    }
    if injected:
        request[INJECTED] = list(injected)
    if credential:
        request[CREDENTIAL] = dict(credential)
    return request


def is_quiet(event: Mapping[str, object]) -> bool:
    """True for an event logged at info (a plain allow)."""
    return event.get(VERDICT) == VERDICT_ALLOW and not event.get(WOULD_DENY)


def emit(logger: AuditLogger, event: Mapping[str, object]) -> None:
    """Log `event` as one line: info for an allow, warning otherwise."""
    lines = logs.json_lines(logger)
    if lines is not None:
        method: Literal["info", "warning"] = "info" if is_quiet(event) else "warning"
        lines.write(method, str(event.get(EVENT, "audit")), event)
        return
    fields = dict(event)
    name = str(fields.pop(EVENT, "audit"))
    if is_quiet(event):
        logger.info(name, **fields)
    else:
        logger.warning(name, **fields)
