"""Credentials the sandbox never sees, through the real interceptor (issue 12).

The world of `test_intercept`: the proxy process reads its secrets from the
world's `secrets_dir`; the keep-alive server on port 8080 answers
``/echo-headers`` with the request head exactly as it arrived.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.intercept_world import (
    API,
    DATA,
    EU,
    KEEPALIVE_PORT,
    Reader,
    World,
    make_world,
    request,
    requests_of,
    source,
)
from tests.support.root import NETNS_TOOLS

pytestmark = [pytest.mark.root(*NETNS_TOOLS), pytest.mark.timeout(180)]

PORT = KEEPALIVE_PORT
API_HOST = "api.allowed.test"
PLACEHOLDER = "egressd:api-token"


def rules(secret: str = "api-token") -> list[dict[str, Any]]:
    return [
        {
            "host": API_HOST,
            "ports": [PORT],
            "http": {
                "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}],
                "credentials": [
                    {
                        "header": "Authorization",
                        "secret": secret,
                        "format": "Bearer {}",
                        "placeholder": PLACEHOLDER,
                    }
                ],
            },
        },
        {"host": EU, "ports": [PORT]},
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("httpcred")) as w:
        yield w


@pytest.fixture
def cred(world: World) -> Iterator[tuple[World, str]]:
    value = secrets.token_urlsafe(24)
    write_secret(world.secrets_dir, "api-token", value)
    world.set_policy(egress=rules())
    time.sleep(0.1)
    yield world, value
    world.set_policy()


def write_secret(directory: Path, name: str, value: str) -> None:
    tmp = directory / f".{name}.tmp"
    tmp.write_text(value + "\n")
    tmp.replace(directory / name)


def echoed(reader: Reader) -> dict[str, str]:
    status, body = reader.response()
    assert status == 200, body
    lines = body.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}


def test_credential_set_replacing_placeholder_and_overwriting(cred: tuple[World, str]) -> None:
    world, value = cred
    with world.connect(API, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        for extra in (
            "",
            f"Authorization: Bearer {PLACEHOLDER}\r\n",
            "authorization: Bearer mine\r\n",
        ):
            sock.sendall(request("GET", API_HOST, "/echo-headers", extra=extra + "X-Keep: 1\r\n"))
            got = echoed(reader)
            assert got["authorization"] == f"Bearer {value}", got
            assert got["x-keep"] == "1"
    events = requests_of(world, src, 3)
    assert [(e["status"], e["reason"], e.get("injected")) for e in events] == [
        (200, "allowed_request", ["Authorization"])
    ] * 3
    # The secret is in no log line (audit, proxy), whatever happened.
    assert value not in world.audit_log.read_text()
    assert value not in world.proxy_stderr()


def test_placeholder_to_another_host_is_exfiltration(cred: tuple[World, str]) -> None:
    world, _ = cred
    with world.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(request("GET", EU, "/data"))
        assert reader.response()[0] == 200
        sock.sendall(request("GET", EU, "/data", extra=f"X-Api-Key: {PLACEHOLDER}\r\n"))
        status, body = reader.response()
        assert (status, json.loads(body)["error"]) == (403, "credential_exfiltration")
        assert reader.closed()
    events = requests_of(world, src, 2)
    assert [(e["status"], e["reason"]) for e in events] == [
        (200, "allowed_host"),
        (403, "credential_exfiltration"),
    ]
    denied = events[1]
    assert denied["level"] == "warning" and denied["verdict"] == "deny"
    assert denied["credential"] == {"secret": "api-token", "kind": "placeholder", "in": "head"}
    assert "injected" not in denied


def test_replayed_secret_in_a_body_is_stopped(cred: tuple[World, str]) -> None:
    world, value = cred
    # The API echoes the credential back: the UDF now holds the value ...
    with world.connect(API, PORT) as sock:
        reader = Reader(sock)
        sock.sendall(request("GET", API_HOST, "/echo-headers"))
        leaked = echoed(reader)["authorization"].split(" ", 1)[1]
    assert leaked == value
    # ... and cannot send it elsewhere, not even in pieces of a streamed body.
    body = f"harmless start, then {leaked} and more".encode()
    with world.connect(DATA, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        head = request("POST", EU, "/upload")  # Content-Length: 0 from the helper
        head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body))
        sock.sendall(head + body[:30])
        time.sleep(0.2)
        sock.sendall(body[30:])
        status, reply = reader.response()
        assert (status, json.loads(reply)["error"]) == (403, "credential_exfiltration")
        assert reader.closed()
    (event,) = requests_of(world, src, 1)
    assert event["credential"] == {"secret": "api-token", "kind": "value", "in": "body"}
    assert 0 < event["bytes_up"] < len(head) + len(body)
    assert value not in world.audit_log.read_text()


def test_secret_rotated_on_disk_is_used_next_request(cred: tuple[World, str]) -> None:
    world, value = cred
    with world.connect(API, PORT) as sock:
        reader = Reader(sock)
        sock.sendall(request("GET", API_HOST, "/echo-headers"))
        assert echoed(reader)["authorization"] == f"Bearer {value}"
        rotated = secrets.token_urlsafe(24)
        write_secret(world.secrets_dir, "api-token", rotated)
        sock.sendall(request("GET", API_HOST, "/echo-headers"))
        assert echoed(reader)["authorization"] == f"Bearer {rotated}"


def test_missing_secret_denies_the_request(cred: tuple[World, str]) -> None:
    world, _ = cred
    world.set_policy(egress=rules(secret="not-provisioned"))
    time.sleep(0.1)
    with world.connect(API, PORT) as sock:
        src = source(sock)
        reader = Reader(sock)
        sock.sendall(
            request("GET", API_HOST, "/echo-headers", extra=f"Authorization: {PLACEHOLDER}\r\n")
        )
        status, body = reader.response()
        assert (status, json.loads(body)["error"]) == (403, "credential_unavailable")
        assert reader.closed()
    (event,) = requests_of(world, src, 1)
    assert (event["reason"], event["credential"]) == (
        "credential_unavailable",
        {"secret": "not-provisioned"},
    )
