"""The daemons' JSON log chain writes what structlog's stock chain wrote, byte for byte."""

from __future__ import annotations

import datetime as dt
import io
import json
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
