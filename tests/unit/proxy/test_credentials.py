"""Credentials (pure): the headers set, the head rewrite, exfiltration decisions."""

from __future__ import annotations

import h11
import pytest

from egressd.policy.model import Policy, parse_policy
from egressd.proxy import credentials as creds
from egressd.proxy.credentials import (
    CREDENTIAL_EXFILTRATION,
    CREDENTIAL_UNAVAILABLE,
    BodyScanner,
    Missing,
    RequestCredentials,
    build_index,
    credential_headers,
    find_foreign,
    rewrite_head,
    with_values,
)

SECRETS = {"api-token": "s3cr3t-api-token-value", "gh-token": "ghp_0123456789abcdef", "tiny": "abc"}
API_CRED = {
    "header": "Authorization",
    "secret": "api-token",
    "format": "Bearer {}",
    "placeholder": "PLACEHOLDER-API",
}


def policy(*, mode: str = "enforce", extra: list[dict[str, object]] | None = None) -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "mode": mode,
            "egress": [
                {
                    "host": "api.allowed.test",
                    "ports": [80],
                    "http": {
                        "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}],
                        "credentials": [API_CRED],
                    },
                },
                {
                    "host": "gh.allowed.test",
                    "ports": [80],
                    "http": {
                        "allow": [{"methods": ["GET"], "paths": ["/**"]}],
                        "credentials": [{"header": "X-Token", "secret": "gh-token"}],
                    },
                },
                {"host": "*.data.allowed.test", "ports": [80]},
                *(extra or []),
            ],
        },
        require_timestamps=False,
    )


def lookup(name: str) -> str | None:
    return SECRETS.get(name)


P = policy()
API, GH, DATA = P.egress[0], P.egress[1], P.egress[2]


def head(target: str = "/", headers: str = "", host: str = "api.allowed.test") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode()


def parsed(raw: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


def prepare(rule: object, raw: bytes, p: Policy = P) -> creds.Prepared:
    rc = RequestCredentials.of(p, lookup)
    assert rc is not None
    event = parsed(raw)
    return rc.prepare(rule, raw, event.target, event.headers)  # type: ignore[arg-type]


# --- the index -----------------------------------------------------------------------


def test_index_markers_and_homes() -> None:
    index = build_index(P)
    assert index is not None
    texts = {m.text: (m.secret, m.homes) for m in index.markers}
    assert texts == {
        b"egressd:api-token": ("api-token", frozenset({id(API)})),
        b"PLACEHOLDER-API": ("api-token", frozenset({id(API)})),
        b"egressd:gh-token": ("gh-token", frozenset({id(GH)})),
    }
    values = with_values(index, lookup)
    assert {m.text for m in values if m.kind == creds.VALUE} == {
        b"s3cr3t-api-token-value",
        b"ghp_0123456789abcdef",
    }


def test_no_credentials_no_index() -> None:
    bare = parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "a",
            "nodes": ["n"],
            "egress": [{"host": "a.test"}],
        },
        require_timestamps=False,
    )
    assert build_index(bare) is None
    assert RequestCredentials.of(bare, lookup) is None


def test_short_values_are_not_searched() -> None:
    p = policy(
        extra=[
            {
                "host": "t.test",
                "ports": [80],
                "http": {
                    "allow": [{"methods": ["GET"], "paths": ["/"]}],
                    "credentials": [{"header": "X-T", "secret": "tiny"}],
                },
            }
        ]
    )
    index = build_index(p)
    assert index is not None
    assert b"abc" not in {m.text for m in with_values(index, lookup)}
    assert b"egressd:tiny" in {m.text for m in with_values(index, lookup)}


# --- exfiltration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "data", "found"),
    [
        (DATA, b"X-A: egressd:api-token", "api-token"),
        (DATA, b"X-A: PLACEHOLDER-API", "api-token"),
        (DATA, b"X-A: Bearer s3cr3t-api-token-value", "api-token"),
        (DATA, b"x=ghp_0123456789abcdef", "gh-token"),
        (None, b"egressd:gh-token", "gh-token"),  # no deciding rule: no home at all
        (API, b"Authorization: Bearer PLACEHOLDER-API", None),  # at home
        (API, b"X-Other: s3cr3t-api-token-value", None),
        (API, b"X-Token: egressd:gh-token", "gh-token"),  # another API's credential
        (GH, b"Authorization: PLACEHOLDER-API", "api-token"),
        (DATA, b"egressd:api-tokens are described in the docs", "api-token"),
        (DATA, b"nothing here, egressd: or api-token", None),
    ],
)
def test_find_foreign(rule: object, data: bytes, found: str | None) -> None:
    index = build_index(P)
    assert index is not None
    marker = find_foreign(with_values(index, lookup), rule, data)  # type: ignore[arg-type]
    assert (None if marker is None else marker.secret) == found


def test_a_longer_marker_at_home_covers_a_shorter_one() -> None:
    p = policy(
        extra=[
            {
                "host": "two.test",
                "ports": [80],
                "http": {
                    "allow": [{"methods": ["GET"], "paths": ["/"]}],
                    "credentials": [{"header": "X-T", "secret": "api-token-2"}],
                },
            }
        ]
    )
    two = p.egress[3]
    index = build_index(p)
    assert index is not None
    markers = with_values(index, lambda name: None)
    assert find_foreign(markers, two, b"X-T: egressd:api-token-2") is None
    found = find_foreign(markers, two, b"X-T: egressd:api-token-2 egressd:api-token")
    assert found is not None and found.secret == "api-token"
    found = find_foreign(markers, p.egress[0], b"X-T: egressd:api-token-2")
    assert found is not None and found.secret == "api-token-2"


def test_exfiltration_in_the_head_and_percent_encoded_target() -> None:
    for raw in (
        head(host="eu.data.allowed.test", headers="X-Leak: egressd:api-token\r\n"),
        head("/?k=egressd%3Aapi-token", host="eu.data.allowed.test"),
        head("/s3cr3t-api-token-value", host="eu.data.allowed.test"),
        head(host="eu.data.allowed.test", headers="Authorization: Bearer PLACEHOLDER-API\r\n"),
    ):
        prepared = prepare(DATA, raw)
        assert prepared.reason == CREDENTIAL_EXFILTRATION, raw
        assert prepared.credential is not None
        assert prepared.credential["secret"] == "api-token"
        assert prepared.credential["in"] == "head"
        assert "s3cr3t" not in repr(prepared.credential)
        assert prepared.head == raw and not prepared.report


def test_report_mode_flags_and_lets_the_request_go_unchanged() -> None:
    p = policy(mode="report")
    raw = head(host="eu.data.allowed.test", headers="X-Leak: egressd:api-token\r\n")
    prepared = prepare(p.egress[2], raw, p)
    assert (prepared.reason, prepared.report, prepared.head) == (CREDENTIAL_EXFILTRATION, True, raw)


# --- injection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ([], b"Bearer s3cr3t-api-token-value"),
        ([(b"authorization", b"Bearer mine")], b"Bearer s3cr3t-api-token-value"),  # overwritten
        ([(b"authorization", b"Bearer PLACEHOLDER-API")], b"Bearer s3cr3t-api-token-value"),
        ([(b"authorization", b"Token PLACEHOLDER-API")], b"Token s3cr3t-api-token-value"),
        ([(b"x-other", b"PLACEHOLDER-API")], b"Bearer s3cr3t-api-token-value"),
    ],
)
def test_credential_headers(client: list[tuple[bytes, bytes]], expected: bytes) -> None:
    assert credential_headers(API, client, lookup) == ((b"Authorization", expected),)


def test_bare_secret_and_no_credentials() -> None:
    assert credential_headers(GH, [], lookup) == ((b"X-Token", b"ghp_0123456789abcdef"),)
    assert credential_headers(DATA, [], lookup) == ()
    assert credential_headers(None, [], lookup) == ()


def test_missing_secret() -> None:
    assert credential_headers(API, [], lambda name: None) == Missing("api-token")
    rc = RequestCredentials.of(P, lambda name: None)
    assert rc is not None
    raw = head(headers="Authorization: Bearer PLACEHOLDER-API\r\n")
    event = parsed(raw)
    prepared = rc.prepare(API, raw, event.target, event.headers)
    assert prepared.reason == CREDENTIAL_UNAVAILABLE
    assert prepared.credential == {"secret": "api-token"}
    assert prepared.head == raw


def test_rewrite_head_replaces_every_client_line_and_keeps_the_framing() -> None:
    raw = (
        b"POST /upload?x=1 HTTP/1.1\r\nHost: api.allowed.test\r\n"
        b"authorization: Bearer one\r\nContent-Length: 5\r\nX-Keep:  a b \r\n"
        b"AUTHORIZATION: Bearer two\r\n\r\n"
    )
    new = rewrite_head(raw, [(b"Authorization", b"Bearer s3cr3t")])
    assert new == (
        b"POST /upload?x=1 HTTP/1.1\r\nHost: api.allowed.test\r\n"
        b"Content-Length: 5\r\nX-Keep:  a b \r\nAuthorization: Bearer s3cr3t\r\n\r\n"
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(new + b"hello")
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert [v for n, v in event.headers if n == b"authorization"] == [b"Bearer s3cr3t"]
    data = conn.next_event()
    assert isinstance(data, h11.Data) and data.data == b"hello"
    assert rewrite_head(raw, []) is raw


def test_prepare_injects_and_names_the_headers() -> None:
    raw = head("/data", headers="Authorization: Bearer PLACEHOLDER-API\r\nAccept: */*\r\n")
    prepared = prepare(API, raw)
    assert prepared.reason is None
    assert prepared.injected == ("Authorization",)
    assert prepared.head == head(
        "/data", headers="Accept: */*\r\nAuthorization: Bearer s3cr3t-api-token-value\r\n"
    )
    # Another API's credential could still arrive in the body: scanned.
    assert prepared.scanner is not None


def test_no_scanner_when_every_marker_belongs() -> None:
    p = parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "a",
            "nodes": ["n"],
            "egress": [
                {
                    "host": "a.test",
                    "ports": [80],
                    "http": {
                        "allow": [{"methods": ["GET"], "paths": ["/"]}],
                        "credentials": [{"header": "X-T", "secret": "api-token"}],
                    },
                }
            ],
        },
        require_timestamps=False,
    )
    assert prepare(p.egress[0], head(host="a.test"), p).scanner is None


# --- the body ------------------------------------------------------------------------


def test_body_scanner_finds_markers_across_chunks() -> None:
    index = build_index(P)
    assert index is not None
    markers = with_values(index, lookup)
    scanner = BodyScanner(markers, DATA)
    assert scanner.feed(b"a harmless start, then egress") is None
    assert scanner.feed(b"d:api-") is None
    found = scanner.feed(b"token and more")
    assert found is not None and found.secret == "api-token"
    scanner = BodyScanner(markers, DATA)
    assert scanner.feed(b"s3cr3t-api-tok") is None
    found = scanner.feed(b"en-value")
    assert found is not None and found.kind == creds.VALUE
    at_home = BodyScanner(markers, API)
    assert at_home.feed(b"PLACEHOLDER-API s3cr3t-api-token-value") is None
