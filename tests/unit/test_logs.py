"""The daemons' JSON log chain writes what structlog's stock chain wrote, byte for byte."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from egressd import logs
from egressd.proxy import audit

_TIME = re.compile(r'"time": "[^"]*"')


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _stock(out: io.StringIO) -> None:
    """The chain `logs.configure(json=True)` set up before it had its own steps."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(20),
        logger_factory=structlog.PrintLoggerFactory(file=out),
    )


class _Custom:
    def __structlog__(self) -> str:
        return "custom"


def _log_all(out: io.StringIO) -> None:
    event = audit.connection_event(
        job_id=uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"),
        account="acme",
        node="node1",
        proxy="proxy1",
        src="100.96.1.2",
        sport=40000,
        dst="203.0.113.10",
        port=80,
        host="api.allowed.test",
        verdict="deny",
        reason="host_not_allowed",
        mode="enforce",
        bytes_up=70,
        bytes_down=185,
        duration_ms=1.23456,
        end="idle_timeout",
    )
    audit.emit(structlog.get_logger("egressd.proxy.audit").bind(component="proxy"), event)
    allowed = {**event, "verdict": "allow", "host": "ünïcode.test", "end": None}
    audit.emit(structlog.get_logger("egressd.proxy.audit").bind(component="proxy"), allowed)
    log = structlog.get_logger("egressd.test")
    log.info("started", path=dt.date(2026, 12, 7), obj=_Custom(), items=[1, 2.5, None])
    log.debug("not shown at info", x=1)
    structlog.contextvars.bind_contextvars(request="r1")
    try:
        log.warning("with context", quote='say "hi"\n')
    finally:
        structlog.contextvars.clear_contextvars()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", step=3)


def _lines(configure: Any) -> list[str]:
    out = io.StringIO()
    configure(out)
    _log_all(out)
    return out.getvalue().splitlines()


def test_json_lines_match_structlog_stock_chain_but_for_the_time() -> None:
    ours = _lines(lambda out: logs.configure(json=True, stream=out))
    stock = _lines(_stock)
    assert len(ours) == len(stock) == 5
    for mine, theirs in zip(ours, stock, strict=True):
        assert _TIME.sub('"time": T', mine) == _TIME.sub('"time": T', theirs)
        assert list(json.loads(mine)) == list(json.loads(theirs))
    first = json.loads(ours[0])
    assert list(first)[:3] == ["component", "time", "job_id"]
    assert first["level"] == "warning" and first["event"] == "connection"
    assert json.loads(ours[1])["level"] == "info"
    assert "ValueError: boom" in json.loads(ours[4])["exception"]


@pytest.mark.parametrize("micros", [0, 1, 826_123, 999_999])
def test_time_text_is_timestampers(micros: int, monkeypatch: pytest.MonkeyPatch) -> None:
    second = 1_796_614_395  # 2026-12-07T03:33:15Z
    for whole in (second, second + 1):  # the cached second's text is renewed
        nanos = whole * 1_000_000_000 + micros * 1000 + 999  # floored to the microsecond
        monkeypatch.setattr("egressd.logs.time_ns", lambda nanos=nanos: nanos)
        got = logs.utc_time(None, "info", {})["time"]
        stamp = dt.datetime.fromtimestamp(whole, dt.UTC).replace(microsecond=micros)
        assert got == stamp.isoformat().replace("+00:00", "Z")
    assert got.startswith("2026-12-07T03:33:16")


def test_time_keeps_the_keys_place() -> None:
    event = logs.utc_time(None, "info", {"a": 1, "time": "old", "b": 2})
    assert list(event) == ["a", "time", "b"] and event["time"] != "old"


# The audit lines through `logs.json_lines` (the path `audit.emit` and
# `audit.HttpRequests` take to the daemons' JSON log).

_NANOS = 1_796_614_395_826_123_999  # 2026-12-07T03:33:15.826123Z, floored
_JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
_CONN: dict[str, Any] = {
    "job_id": _JOB,
    "account": "acme",
    "node": "node1",
    "proxy": "proxy1",
    "src": "100.96.1.2",
    "dst": "203.0.113.10",
    "port": 80,
}
#: What the proxy wrote before `json_lines` (the tree at 2866230, same calls),
#: pinned: a fast path that drifts from structlog's line fails here.
_PINNED = [
    '{"component": "proxy", "worker": 1, "time": "2026-12-07T03:33:15.826123Z", "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2", "account": "acme", "node": "node1", "proxy": "proxy1", "source": "100.96.1.2:40000", "dst": "203.0.113.10", "port": 80, "host": "api.allowed.test", "method": "GET", "path": "/", "status": 200, "verdict": "allow", "reason": "allowed_request", "mode": "enforce", "would_deny": false, "bytes_up": 70, "bytes_down": 185, "event": "http_request", "request": "r1", "level": "info"}',
    '{"component": "proxy", "worker": 1, "time": "2026-12-07T03:33:15.826123Z", "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2", "account": "acme", "node": "node1", "proxy": "proxy1", "source": "100.96.1.2:40000", "dst": "203.0.113.10", "port": 80, "host": "\\u00fcn\\u00ef.test", "method": "POST", "path": "/up", "status": 403, "verdict": "deny", "reason": "credential_exfiltration", "mode": "enforce", "would_deny": false, "bytes_up": 90, "bytes_down": 0, "injected": ["Authorization"], "credential": {"secret": "tok"}, "event": "http_request", "request": "r1", "level": "warning"}',
    '{"component": "proxy", "worker": 1, "time": "2026-12-07T03:33:15.826123Z", "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2", "account": "acme", "node": "node1", "proxy": "proxy1", "source": "100.96.1.2:40000", "dst": "203.0.113.10", "port": 80, "host": "api.allowed.test", "verdict": "allow", "reason": "allowed_request", "mode": "enforce", "would_deny": false, "bytes_up": 70, "bytes_down": 185, "duration_ms": 1.235, "event": "connection", "request": "r1", "level": "info"}',
    '{"component": "proxy", "worker": 1, "time": "2026-12-07T03:33:15.826123Z", "job_id": null, "account": null, "node": null, "proxy": "proxy1", "source": "100.96.1.2:40001", "dst": "203.0.113.10", "port": 80, "host": null, "verdict": "deny", "reason": "unknown_flow", "mode": null, "would_deny": false, "bytes_up": 0, "bytes_down": 0, "duration_ms": 0.5, "end": "idle_timeout", "event": "connection", "request": "r1", "level": "warning"}',
]  # fmt: skip


@pytest.fixture
def _pinned_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr("egressd.logs.time_ns", lambda: _NANOS)
    structlog.contextvars.bind_contextvars(worker=1, request="r1")
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()


def _proxy_lines(logger: Any) -> None:
    """A worker's audit calls, as intercept.py makes them."""
    requests = audit.HttpRequests(logger, **_CONN, sport=40000, mode="enforce")
    requests.emit(
        host="api.allowed.test",
        method="GET",
        path="/",
        status=200,
        verdict="allow",
        reason="allowed_request",
        bytes_up=70,
        bytes_down=185,
    )
    requests.emit(host="ünï.test", method="POST", path="/up", status=403, verdict="deny",
                  reason="credential_exfiltration", bytes_up=90, injected=("Authorization",),
                  credential={"secret": "tok"})  # fmt: skip
    audit.emit(logger, audit.connection_event(
        **_CONN, sport=40000, host="api.allowed.test", verdict="allow", reason="allowed_request",
        mode="enforce", bytes_up=70, bytes_down=185, duration_ms=1.2345678))  # fmt: skip
    audit.emit(logger, audit.connection_event(
        **{**_CONN, "job_id": None, "account": None, "node": None}, sport=40001, host=None,
        verdict="deny", reason="unknown_flow", mode=None, duration_ms=0.5, end="idle_timeout"))  # fmt: skip


@pytest.mark.usefixtures("_pinned_time")
def test_audit_lines_are_the_pinned_bytes(tmp_path: Any) -> None:
    path = tmp_path / "proxy.log"
    with path.open("w") as out:
        logs.configure(json=True, stream=out)
        logger = structlog.get_logger("egressd.proxy.audit").bind(component="proxy", worker=1)
        assert logs.json_lines(logger) is not None  # the fast path is the one tested
        _proxy_lines(logger)
        # Each line is in the file when its call returns (a reader tails it).
        assert path.read_text().splitlines() == _PINNED
    assert path.read_bytes() == ("\n".join(_PINNED) + "\n").encode()


@pytest.mark.usefixtures("_pinned_time")
def test_audit_lines_through_structlogs_own_call_path_are_the_same_bytes() -> None:
    """The pinned lines are structlog's: the same chain, called the usual way."""
    out = io.StringIO()
    logs.configure(json=True, stream=out)
    logger = structlog.get_logger("egressd.proxy.audit").bind(component="proxy", worker=1)
    _proxy_lines(_NoFastPath(logger))
    assert out.getvalue().splitlines() == _PINNED


class _NoFastPath:
    """`logger` behind a wrapper `json_lines` does not know (the structlog path)."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def info(self, event: str, **kw: Any) -> Any:
        return self._logger.info(event, **kw)

    def warning(self, event: str, **kw: Any) -> Any:
        return self._logger.warning(event, **kw)

    def bind(self, **kw: Any) -> Any:
        return _NoFastPath(self._logger.bind(**kw))


_EDGES: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    # (bound context, contextvars, fields)
    ({}, {}, {"a": 1}),
    ({"component": "proxy"}, {"component": "cv", "x": 2}, {"host": "h"}),
    ({"host": "bound"}, {}, {"a": 1, "host": "field", "b": [1, {"c": None}]}),
    ({"component": "proxy"}, {"host": "cv", "level": "cv", "time": "cv"}, {"host": "h"}),
    ({}, {"y": ...}, {"f": 1.5, "nan": float("nan"), "big": 10**30, "u": 'é\n"', "t": True}),
    ({}, {}, {"obj": _Custom(), "day": dt.date(2026, 12, 7)}),
    ({}, {}, {"exc_info": False, "z": 0}),
]


@pytest.mark.usefixtures("_pinned_time")
@pytest.mark.parametrize(("context", "cvars", "fields"), _EDGES)
@pytest.mark.parametrize("method", ["info", "warning"])
def test_json_lines_writes_what_the_bound_logger_writes(
    context: dict[str, Any], cvars: dict[str, Any], fields: dict[str, Any], method: str
) -> None:
    structlog.contextvars.bind_contextvars(**cvars)
    out = io.StringIO()
    logs.configure(json=True, stream=out)
    logger = structlog.get_logger("x").bind(**context)
    getattr(logger, method)("ev", **fields)
    lines = logs.json_lines(logger)
    assert lines is not None
    lines.write(method, "ev", {"event": "dropped", **fields})  # type: ignore[arg-type]
    theirs, mine = out.getvalue().splitlines()
    assert mine == theirs


def test_json_lines_keeps_the_level_filter() -> None:
    out = io.StringIO()
    logs.configure(json=True, stream=out, level=logging.WARNING)
    logger = structlog.get_logger("egressd.proxy.audit").bind(component="proxy")
    ok = audit.connection_event(**_CONN, sport=1, host=None, verdict="allow", reason="r", mode=None)
    audit.emit(logger, ok)
    audit.emit(logger, {**ok, "verdict": "deny"})
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["level"] == "warning"


def test_json_lines_only_for_a_bound_logger_of_the_json_chain() -> None:
    out = io.StringIO()
    logs.configure(json=False, stream=out)
    assert logs.json_lines(structlog.get_logger("a").bind(b=1)) is None  # console lines
    logs.configure(json=True, stream=out)
    bound = structlog.get_logger("a").bind(b=1)
    assert logs.json_lines(bound) is not None
    assert logs.json_lines(structlog.get_logger("a")) is None  # a lazy proxy
    assert logs.json_lines(structlog.get_logger("a").bind(event="x")) is None
    assert logs.json_lines(object()) is None
    logs.configure(json=True, stream=out)  # a new chain: `bound` holds the old one
    assert logs.json_lines(bound) is None
    with structlog.testing.capture_logs() as captured:
        audit.emit(structlog.get_logger("a").bind(b=1), {"event": "e", "verdict": "deny"})
    assert captured == [{"b": 1, "verdict": "deny", "event": "e", "log_level": "warning"}]
