"""Upstream TLS sessions kept for resumption: by job, name, address, port and offer; bounded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from egressd.control.interception_ca import ensure_interception_ca
from egressd.proxy import tls_intercept


class FakeSession:
    def __init__(self, ticket: bool = True) -> None:
        self.has_ticket = ticket


def end(session: Any, reused: bool = False) -> Any:
    return SimpleNamespace(obj=SimpleNamespace(session=session, session_reused=reused))


@pytest.fixture
def interception(tmp_path: Path) -> tls_intercept.Interception:
    icpt = ensure_interception_ca(tmp_path / "icpt")
    return tls_intercept.Interception.load(icpt.cert, icpt.key, sessions=2)


def key(job: str = "job-a", host: str = "a.test", port: int = 443) -> Any:
    return (job, host, "203.0.113.10", port, ("http/1.1",))


def test_a_session_is_for_its_own_job_name_and_port_only(
    interception: tls_intercept.Interception,
) -> None:
    session = FakeSession()
    interception.keep_session(key(), end(session))
    assert interception.session(key()) is session
    assert interception.session(key(job="job-b")) is None
    assert interception.session(key(host="b.test")) is None
    assert interception.session(key(port=8443)) is None


def test_no_ticket_nothing_kept_and_the_cache_is_bounded(
    interception: tls_intercept.Interception,
) -> None:
    interception.keep_session(key(), end(FakeSession(ticket=False)))
    interception.keep_session(key(), end(None))
    assert interception.session(key()) is None
    for job in ("j1", "j2", "j3"):
        interception.keep_session(key(job), end(FakeSession()))
    assert interception.session(key("j1")) is None  # the oldest went
    assert interception.session(key("j2")) is not None
    assert interception.session(key("j3")) is not None


def test_resumed_handshakes_counted(interception: tls_intercept.Interception) -> None:
    interception.keep_session(key(), end(FakeSession(), reused=True))
    interception.keep_session(key(), end(FakeSession(), reused=False))
    assert interception.resumed == 1
