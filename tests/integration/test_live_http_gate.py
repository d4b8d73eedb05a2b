"""A live policy change reaches an OPEN keep-alive connection's request gate (issue 12).

Real processes only: the control plane (`egressd control serve`, which signs each
policy and announces it on its watch), the proxy (`egressd proxy serve`,
subscribed to that watch, with the interception CA and a secrets directory), the
topology's "internet" (`egressd_harness.topology.inet`: keep-alive HTTP on :80
and HTTPS on :443 with the test CA, `/echo-headers`, `POST /upload`, DNS) and a
mini node agent (tests/support/proxy_fleet.py) that carries the sandbox
address's packets to the proxy in GENEVE. The sandbox side is a plain socket.

Each test opens one keep-alive connection, has a request allowed, replaces the
job's policy through the control plane (PUT: a new signed policy that still
allows the connection, so `live.redecide` keeps it open and hands the policy to
its gate through the relay's retune hook, `_Conn.repolicy`), waits until a NEW
connection is decided under the replacement (the proxy holds it), then sends
the next request on the SAME connection: it is decided under the new rules and
credentials, and its http_request audit line says so. Without the hand-over
the open connection keeps the methods and credentials the new policy took away.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from egressd.control.interception_ca import ca_dir
from egressd.net import netns as kn
from tests.support.intercept_world import Reader, SourcePorts, request
from tests.support.proxy_fleet import (
    REPO,
    SANDBOX,
    SITE,
    Fleet,
    ProxyProcess,
    agent_for,
    control,
    policy,
    running_fleet,
    running_proxy,
    watch_up,
)
from tests.support.root import NETNS_TOOLS
from tests.support.waits import wait_for

pytestmark = [pytest.mark.root(*NETNS_TOOLS, "/dev/net/tun"), pytest.mark.timeout(240)]

API = "api.allowed.test"  # SITE in the layout's zone; the job never resolves it, the proxy does
READY_TIMEOUT_S = 30.0
UPLOAD = b"12345"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("live-http-gate")
    with running_fleet(root) as f:  # its control plane makes the interception CA at start
        inet_log = root / "inet.log"
        f.inet_http = kn.popen_in_netns(
            f.inet,
            [sys.executable, "-m", "egressd_harness.topology.inet", "--run-dir", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=inet_log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        wait_for(lambda: b'"event": "ready"' in inet_log.read_bytes(), READY_TIMEOUT_S, "inet")
        yield f


@pytest.fixture(scope="module")
def proxy(fleet: Fleet) -> Iterator[ProxyProcess]:
    interception = ca_dir(fleet.root / "ctl-state")
    secrets_dir = fleet.root / "secrets"
    secrets_dir.mkdir(mode=0o700)
    with running_proxy(
        fleet,
        interception_ca={"cert": str(interception / "ca.pem"), "key": str(interception / "ca.key")},
        upstream_ca_file=str(fleet.root / "ca" / "ca.pem"),
        secrets_dir=str(secrets_dir),
    ) as p:
        wait_for(lambda: watch_up(p), 10, "the proxy's watch")
        yield p


def http_rule(port: int, methods: list[str], **extra: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "host": API,
        "ports": [port],
        "http": {"allow": [{"methods": methods, "paths": ["/upload", "/echo-headers"]}]},
    }
    if port == 443:
        rule["tls"] = "intercept"
    rule["http"].update(extra)
    return rule


def put_policy(fleet: Fleet, job: uuid.UUID, rule: dict[str, Any]) -> str:
    status, answer = control(fleet, "PUT", f"/v1/jobs/{job}/policy", policy(job, rule))
    assert status == 200, answer
    return str(answer["digest"])


#: The module's proxy logs every test's requests; they are told apart by source.
SOURCES = SourcePorts()


def open_conn(fleet: Fleet, port: int) -> socket.socket:
    """A keep-alive connection from the sandbox address to the site (TLS on 443, trusting the
    interception CA: the proxy answers with a leaf of it)."""
    sock = SOURCES.bind(lambda: kn.netns_socket(fleet.node_ns), SANDBOX)
    sock.settimeout(10)
    sock.connect((SITE, port))
    if port != 443:
        return sock
    ctx = ssl.create_default_context(cafile=str(ca_dir(fleet.root / "ctl-state") / "ca.pem"))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(sock, server_hostname=API)


def first_status(fleet: Fleet, port: int, method: str, path: str, body: bytes = b"") -> int:
    with contextlib.closing(open_conn(fleet, port)) as sock:
        sock.sendall(request(method, API, path, body))
        return Reader(sock).response()[0]


def until_new_connections_see(fleet: Fleet, check: Callable[[], bool]) -> None:
    """The proxy holds the replacement once a new connection is decided under it; the listener
    that retunes open connections has run by then (same store update)."""
    wait_for(check, 10, "a new connection decided under the replacement")


def requests_on(
    proxy: ProxyProcess, sock_name: tuple[str, int], count: int
) -> list[dict[str, Any]]:
    source = "{}:{}".format(*sock_name)

    def found() -> list[dict[str, Any]]:
        events = [json.loads(x) for x in proxy.log().splitlines() if x.startswith("{")]
        return [e for e in events if e.get("event") == "http_request" and e["source"] == source]

    wait_for(lambda: len(found()) >= count, 8, f"{count} http_request lines")
    return found()


@pytest.mark.parametrize("port", [80, 443], ids=["http", "intercepted_https"])
def test_a_method_taken_away_is_refused_on_the_open_connection(
    fleet: Fleet, proxy: ProxyProcess, port: int
) -> None:
    job = uuid.uuid4()
    first = put_policy(fleet, job, http_rule(port, ["GET", "POST"]))
    with agent_for(fleet, job), contextlib.closing(open_conn(fleet, port)) as sock:
        name = sock.getsockname()
        reader = Reader(sock)
        sock.sendall(request("POST", API, "/upload", UPLOAD))
        status, body = reader.response()
        assert (status, json.loads(body)["bytes"]) == (200, len(UPLOAD))

        assert put_policy(fleet, job, http_rule(port, ["GET"])) != first
        until_new_connections_see(
            fleet, lambda: first_status(fleet, port, "POST", "/upload", UPLOAD) == 403
        )
        sock.sendall(request("POST", API, "/upload", UPLOAD))
        status, body = reader.response()
        assert (status, json.loads(body).get("error")) == (403, "method_not_allowed"), body
        assert reader.closed()
    events = requests_on(proxy, name, 2)
    assert [(e["method"], e["status"], e["verdict"], e["reason"]) for e in events[:2]] == [
        ("POST", 200, "allow", "allowed_request"),
        ("POST", 403, "deny", "method_not_allowed"),
    ]
    assert events[1]["job_id"] == str(job) and events[1]["level"] == "warning"
    assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204


@pytest.mark.parametrize("port", [80, 443], ids=["http", "intercepted_https"])
def test_a_credential_taken_away_is_no_longer_injected_on_the_open_connection(
    fleet: Fleet, proxy: ProxyProcess, port: int
) -> None:
    value = secrets.token_urlsafe(24)
    name = f"api-token-{port}"  # one per test: the proxy's store keeps a secret it has read
    (fleet.root / "secrets" / name).write_text(value + "\n")
    credential = {"header": "Authorization", "secret": name, "format": "Bearer {}"}
    job = uuid.uuid4()
    put_policy(fleet, job, http_rule(port, ["GET"], credentials=[credential]))

    def authorization(reader: Reader) -> str | None:
        status, body = reader.response()
        assert status == 200, body
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        return headers.get("authorization")

    def injected_on_a_new_connection() -> bool:
        with contextlib.closing(open_conn(fleet, port)) as probe:
            probe.sendall(request("GET", API, "/echo-headers"))
            return authorization(Reader(probe)) is not None

    with agent_for(fleet, job), contextlib.closing(open_conn(fleet, port)) as sock:
        sock_name = sock.getsockname()
        reader = Reader(sock)
        sock.sendall(request("GET", API, "/echo-headers"))
        assert authorization(reader) == f"Bearer {value}"

        put_policy(fleet, job, http_rule(port, ["GET"]))
        until_new_connections_see(fleet, lambda: not injected_on_a_new_connection())
        sock.sendall(request("GET", API, "/echo-headers"))
        assert authorization(reader) is None
    events = requests_on(proxy, sock_name, 2)
    assert [(e["status"], e["reason"], e.get("injected")) for e in events[:2]] == [
        (200, "allowed_request", ["Authorization"]),
        (200, "allowed_request", None),
    ]
    assert value not in proxy.log()
    assert control(fleet, "DELETE", f"/v1/jobs/{job}/policy")[0] == 204
