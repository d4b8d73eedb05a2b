"""`audit.HttpRequests` logs what `emit(http_request_event(...))` logs: the same
fields in the same order at the same level, with the connection's fixed fields
formatted (and, for a structlog logger, bound) once per connection."""

from __future__ import annotations

import io
import ipaddress
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
JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
FIXED: dict[str, Any] = {
    "job_id": JOB,
    "account": "acme",
    "node": "node1",
    "proxy": "proxy1",
    "src": ipaddress.IPv4Address("100.96.1.2"),
    "sport": 40000,
    "dst": ipaddress.IPv4Address("203.0.113.10"),
    "port": 443,
}
REQUESTS: list[dict[str, Any]] = [
    {"host": "api.allowed.test", "method": "GET", "path": "/data", "status": 200,
     "verdict": "allow", "reason": "allowed_request", "bytes_up": 70, "bytes_down": 185},
    {"host": "api.allowed.test", "method": "POST", "path": "/up", "status": 403,
     "verdict": "deny", "reason": "method_not_allowed", "bytes_up": 90},
    {"host": "api.allowed.test", "method": "GET", "path": "/x", "status": 200,
     "verdict": "allow", "reason": "path_not_allowed", "would_deny": True},
    {"host": "api.allowed.test", "method": "GET", "path": "/data", "status": 200,
     "verdict": "allow", "reason": "allowed_request", "injected": ("Authorization",)},
    {"host": "other.test", "method": "GET", "path": "/", "status": 403, "verdict": "deny",
     "reason": "credential_exfiltration", "credential": {"secret": "allowed-api-token"}},
    {"host": None, "method": "GET", "path": "/", "status": None, "verdict": "allow",
     "reason": "allowed_request"},
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class Recorder:
    """A logger without `bind` (the fields per call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.calls.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.calls.append(("warning", event, kw))


def _old(logger: Any, mode: str | None) -> None:
    for request in REQUESTS:
        audit.emit(logger, audit.http_request_event(**FIXED, mode=mode, **request))


def _new(logger: Any, mode: str | None) -> None:
    requests = audit.HttpRequests(logger, **FIXED, mode=mode)
    for request in REQUESTS:
        requests.emit(**request)


def test_same_calls_as_the_event_dict_on_a_plain_logger() -> None:
    old, new = Recorder(), Recorder()
    _old(old, "enforce")
    _new(new, "enforce")
    assert len(new.calls) == len(REQUESTS)
    for (level, event, kw), (old_level, old_event, old_kw) in zip(
        new.calls, old.calls, strict=True
    ):
        assert (level, event) == (old_level, old_event)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", kw["time"])
        assert list(kw) == list(old_kw)
        assert {**kw, "time": 0} == {**old_kw, "time": 0}
    assert [c[0] for c in new.calls] == ["info", "warning", "warning", "info", "warning", "info"]


@pytest.mark.parametrize("mode", ["enforce", "report", None])
def test_same_json_lines_through_the_daemon_chain_and_a_bound_logger(mode: str | None) -> None:
    lines = {}
    for name, log in (("old", _old), ("new", _new)):
        out = io.StringIO()
        logs.configure(json=True, stream=out)
        log(structlog.get_logger("egressd.proxy.audit").bind(component="proxy"), mode)
        lines[name] = out.getvalue().splitlines()
    assert len(lines["new"]) == len(REQUESTS)
    for mine, theirs in zip(lines["new"], lines["old"], strict=True):
        assert _TIME.sub('"time": T', mine) == _TIME.sub('"time": T', theirs)
    first, last = json.loads(lines["new"][0]), json.loads(lines["new"][-1])
    assert list(first)[:4] == ["component", "time", "job_id", "account"]
    assert first["host"] == "api.allowed.test" and last["host"] is None  # nothing carried over
    assert "injected" not in first and json.loads(lines["new"][3])["injected"] == ["Authorization"]
