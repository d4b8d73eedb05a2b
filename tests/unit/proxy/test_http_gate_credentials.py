"""The request gate with credentials (sans I/O): heads rewritten, bodies scanned."""

from __future__ import annotations

import json

from egressd.policy.matcher import Decision, Verdict
from egressd.policy.model import Policy, parse_policy
from egressd.proxy.credentials import RequestCredentials
from egressd.proxy.http_gate import HttpGate, RequestRecord
from egressd.proxy.http_rules import RequestTarget

TOKEN = "s3cr3t-api-token-value"


def policy(mode: str = "enforce") -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "mode": mode,
            "egress": [
                {
                    "host": "api.test",
                    "ports": [80],
                    "http": {
                        "allow": [{"methods": ["GET", "POST"], "paths": ["/**"]}],
                        "credentials": [
                            {
                                "header": "Authorization",
                                "secret": "api-token",
                                "format": "Bearer {}",
                                "placeholder": "egressd:api",
                            }
                        ],
                    },
                },
                {"host": "other.test", "ports": [80]},
            ],
        },
        require_timestamps=False,
    )


def gate(
    mode: str = "enforce", secrets: dict[str, str] | None = None
) -> tuple[HttpGate, list[RequestRecord]]:
    p = policy(mode)
    known = {"api-token": TOKEN} if secrets is None else secrets

    def decide(method: str, request: RequestTarget, upgrade: str | None) -> Decision:
        rule = {"api.test": p.egress[0], "other.test": p.egress[1]}.get(request.host or "")
        if rule is None:
            return Decision(Verdict.DENY, "host_not_allowed", None)
        return Decision(Verdict.ALLOW, "allowed_request", rule)

    records: list[RequestRecord] = []
    rc = RequestCredentials.of(p, known.get)
    return HttpGate(decide, records.append, credentials=rc), records


def req(host: str, path: str = "/", extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def error_of(final: bytes | None) -> str:
    assert final is not None and final.startswith(b"HTTP/1.1 403 ")
    return str(json.loads(final.split(b"\r\n\r\n", 1)[1])["error"])


def test_credential_set_on_every_request_of_the_connection() -> None:
    g, records = gate()
    g.from_client(req("api.test", "/a", "Authorization: Bearer mine\r\n"))
    up = b"".join(g.take_up())
    assert up == req("api.test", "/a", f"Authorization: Bearer {TOKEN}\r\n")
    g.from_upstream(RESP)
    g.from_client(req("api.test", "/b", "Authorization: Bearer egressd:api\r\n"))
    assert b"".join(g.take_up()) == req("api.test", "/b", f"Authorization: Bearer {TOKEN}\r\n")
    g.from_upstream(RESP)
    assert [(r.path, r.status, r.injected, r.credential) for r in records] == [
        ("/a", 200, ("Authorization",), None),
        ("/b", 200, ("Authorization",), None),
    ]
    assert records[0].bytes_up == len(up)


def test_body_framing_kept_when_the_head_is_rewritten() -> None:
    g, _ = gate()
    body = b"5\r\nhello\r\n0\r\n\r\n"
    g.from_client(req("api.test", "/u", "Transfer-Encoding: chunked\r\n", "POST") + body)
    up = b"".join(g.take_up())
    assert (
        up
        == req(
            "api.test",
            "/u",
            f"Transfer-Encoding: chunked\r\nAuthorization: Bearer {TOKEN}\r\n",
            "POST",
        )
        + body
    )


def test_placeholder_to_another_host_is_exfiltration() -> None:
    g, records = gate()
    g.from_client(req("other.test", "/x", "X-Key: egressd:api\r\n"))
    assert g.take_up() == []
    assert error_of(g.final) == "credential_exfiltration"
    record = records[0]
    assert (record.status, record.decision.reason) == (403, "credential_exfiltration")
    assert record.credential == {"secret": "api-token", "kind": "placeholder", "in": "head"}
    assert record.injected == ()


def test_secret_value_replayed_to_another_host_is_exfiltration() -> None:
    g, records = gate()
    g.from_client(req("other.test", f"/x?t={TOKEN}"))
    assert g.take_up() == []
    assert error_of(g.final) == "credential_exfiltration"
    assert records[0].credential == {"secret": "api-token", "kind": "value", "in": "head"}


def test_marker_in_a_streamed_body_stops_the_request() -> None:
    g, records = gate()
    head = req("other.test", "/upload", "Content-Length: 40\r\n", "POST")
    g.from_client(head + b"first part, harmless ")
    assert b"".join(g.take_up()) == head + b"first part, harmless "
    g.from_client(b"then egressd:api ...")  # the chunk that completes it never goes up
    assert g.take_up() == []
    assert error_of(g.final) == "credential_exfiltration"
    assert g.ended
    assert [(r.status, r.decision.reason, r.credential) for r in records] == [
        (
            403,
            "credential_exfiltration",
            {"secret": "api-token", "kind": "placeholder", "in": "body"},
        )
    ]
    assert g.pending_records() == []  # logged once


def test_marker_split_by_chunked_framing_is_found() -> None:
    g, records = gate()
    head = req("other.test", "/upload", "Transfer-Encoding: chunked\r\n", "POST")
    g.from_client(head + b"a\r\nxx egressd\r\n")
    # (h11 has not consumed the chunk's CRLF yet: it goes with the next event)
    assert b"".join(g.take_up()) == head + b"a\r\nxx egressd"
    g.from_client(b"4\r\n:api\r\n0\r\n\r\n")
    assert g.take_up() == []
    assert error_of(g.final) == "credential_exfiltration"
    assert records[0].credential is not None and records[0].credential["in"] == "body"


def test_marker_in_a_body_after_the_response_began_just_ends() -> None:
    g, records = gate()
    g.from_client(req("other.test", "/upload", "Content-Length: 40\r\n", "POST") + b"x")
    g.take_up()
    g.from_upstream(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\n")  # early, incomplete
    g.from_client(b"egressd:api")
    assert g.take_up() == []
    assert g.final == b""  # no 403 inside a response: the client just gets the end
    assert records[-1].decision.reason == "credential_exfiltration"
    assert records[-1].status == 413


def test_body_at_home_is_not_scanned_for_its_own_credential() -> None:
    g, records = gate()
    head = req("api.test", "/upload", "Content-Length: 11\r\n", "POST")
    g.from_client(head + b"egressd:api")
    up = b"".join(g.take_up())
    assert up.endswith(b"\r\n\r\negressd:api") and g.final is None
    g.from_upstream(RESP)
    assert records[0].status == 200


def test_missing_secret_denies() -> None:
    g, records = gate(secrets={})
    g.from_client(req("api.test"))
    assert g.take_up() == []
    assert error_of(g.final) == "credential_unavailable"
    assert records[0].credential == {"secret": "api-token"}
    # A host without credentials needs no secret.
    g, _ = gate(secrets={})
    g.from_client(req("other.test"))
    assert b"".join(g.take_up()) == req("other.test")


def test_report_mode_flags_and_forwards() -> None:
    g, records = gate("report")
    raw = req("other.test", "/x", "X-Key: egressd:api\r\n")
    g.from_client(raw)
    assert b"".join(g.take_up()) == raw
    g.from_upstream(RESP)
    record = records[0]
    assert (record.status, record.decision.reason, record.would_deny) == (
        200,
        "credential_exfiltration",
        True,
    )
    g2, records2 = gate("report")
    body_req = req("other.test", "/u", "Content-Length: 11\r\n", "POST") + b"egressd:api"
    g2.from_client(body_req)
    assert b"".join(g2.take_up()) == body_req and g2.final is None
    g2.from_upstream(RESP)
    assert records2[0].would_deny and records2[0].credential is not None
