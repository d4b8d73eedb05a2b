"""`egressd demo --offline`: the foundation's checks in one process, without root or
namespaces.

Signs two job policies with a fresh Ed25519 key, verifies them (and shows a
tampered, an expired and a foreign-key token rejected with distinct reasons),
asks each job's policy about a few destinations, and carries a sandbox packet
through egressd's GENEVE encoder and scapy's decoder (and back), plus a forged
datagram that the decoder drops with a reason. Exits 0 only if every outcome
is the expected one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from egressd.geneve import codec
from egressd.layout import default_layout
from egressd.policy import jws, keys
from egressd.policy.errors import JwsError
from egressd.policy.matcher import decide


@dataclass(frozen=True)
class Attempt:
    what: str
    expected: str
    got: str

    @property
    def ok(self) -> bool:
        return self.expected == self.got


def _policy(job: uuid.UUID, hosts: list[str], now: int) -> dict[str, object]:
    return {
        "v": 1,
        "job_id": str(job),
        "account": "acme",
        "nodes": ["node1"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "egress": [{"host": h, "ports": [443, 80]} for h in hosts],
    }


def _verify(token: str, trusted: keys.TrustedKeys, now: float) -> str:
    try:
        jws.verify_policy(token, trusted, now=now)
    except JwsError as exc:
        return f"rejected:{exc.reason}"
    return "verified"


def _tamper(token: str) -> str:
    head, payload, sig = token.split(".")
    body = keys.b64url_decode(payload).replace(b'"acme"', b'"evil"')
    return ".".join((head, keys.b64url_encode(body), sig))


def policy_attempts(now: int) -> list[Attempt]:
    key, other = keys.generate_signing_key(), keys.generate_signing_key()
    trusted = keys.TrustedKeys.of(key.public)
    job_a, job_b = uuid.uuid4(), uuid.uuid4()
    token_a = jws.sign_payload(
        _policy(job_a, ["api.allowed.test", "*.data.allowed.test"], now), key
    )
    token_b = jws.sign_payload(_policy(job_b, ["evil.test"], now), key)
    policy_a = jws.verify_policy(token_a, trusted, now=now).policy
    policy_b = jws.verify_policy(token_b, trusted, now=now).policy
    layout = default_layout()
    fleet = layout.fleet_ranges

    def verdict(policy: object, host: str | None, ip: str, port: int) -> str:
        decision = decide(policy, host=host, ip=ip, port=port, fleet_ranges=fleet)  # type: ignore[arg-type]
        return f"{decision.verdict}:{decision.reason}"

    api = str(layout.site("api.allowed.test").address)
    evil = str(layout.site("evil.test").address)
    return [
        Attempt("job A token verifies", "verified", _verify(token_a, trusted, now)),
        Attempt(
            "tampered token", "rejected:bad_signature", _verify(_tamper(token_a), trusted, now)
        ),
        Attempt("expired token", "rejected:expired", _verify(token_a, trusted, now + 7200)),
        Attempt(
            "token from an untrusted key",
            "rejected:unknown_kid",
            _verify(jws.sign_payload(_policy(job_a, [], now), other), trusted, now),
        ),
        Attempt(
            "A -> api.allowed.test:443",
            "allow:allowed_host",
            verdict(policy_a, "api.allowed.test", api, 443),
        ),
        Attempt(
            "A -> eu.data.allowed.test:443",
            "allow:allowed_host",
            verdict(policy_a, "eu.data.allowed.test", "203.0.113.11", 443),
        ),
        Attempt(
            "A -> evil.test:443", "deny:no_matching_rule", verdict(policy_a, "evil.test", evil, 443)
        ),
        Attempt(
            "A -> api.allowed.test:22",
            "deny:port_not_allowed",
            verdict(policy_a, "api.allowed.test", api, 22),
        ),
        Attempt(
            "A -> 169.254.169.254:80",
            "deny:deny_link_local",
            verdict(policy_a, None, "169.254.169.254", 80),
        ),
        Attempt(
            "A -> 100.96.2.10:443 (other sandbox)",
            "deny:deny_fleet_range",
            verdict(policy_a, None, "100.96.2.10", 443),
        ),
        Attempt(
            "B -> evil.test:443", "allow:allowed_host", verdict(policy_b, "evil.test", evil, 443)
        ),
        Attempt(
            "B -> api.allowed.test:443",
            "deny:no_matching_rule",
            verdict(policy_b, "api.allowed.test", api, 443),
        ),
    ]


def geneve_attempts() -> list[Attempt]:
    from scapy.contrib.geneve import GENEVE
    from scapy.layers.inet import IP, TCP

    inner = bytes(
        IP(src="100.96.1.10", dst="203.0.113.10") / TCP(sport=40000, dport=443, flags="S")
    )
    job = codec.JobOption(uuid.uuid4().bytes, b"\x01" * 8)
    wire = codec.encode(1, job, inner)
    parsed = GENEVE(wire)
    scapy_ok = (
        parsed.vni == 1
        and bytes(parsed[IP]) == inner
        and bytes(parsed.options[0].data) == job.job_id + job.digest
    )
    back = codec.decode(bytes(parsed))
    forged = bytearray(wire)
    forged[0] = (1 << 6) | (forged[0] & 0x3F)  # version 1
    try:
        codec.decode(bytes(forged))
        forged_got = "accepted"
    except codec.GeneveError as exc:
        forged_got = f"dropped:{exc.reason}"
    try:
        codec.decode(wire[:6])
        short_got = "accepted"
    except codec.GeneveError as exc:
        short_got = f"dropped:{exc.reason}"
    return [
        Attempt("egressd encode -> scapy decode", "ok", "ok" if scapy_ok else "mismatch"),
        Attempt(
            "scapy -> egressd decode",
            "ok",
            "ok" if bytes(back.inner) == inner and back.job == job else "mismatch",
        ),
        Attempt("GENEVE version 1 datagram", "dropped:bad_version", forged_got),
        Attempt("truncated datagram", "dropped:truncated", short_got),
    ]


def run_offline() -> int:
    attempts = policy_attempts(int(time.time())) + geneve_attempts()
    width = max(len(a.what) for a in attempts)
    print(f"{'attempt':<{width}}  {'expected':<26} {'got':<26} ok")
    for a in attempts:
        print(f"{a.what:<{width}}  {a.expected:<26} {a.got:<26} {'yes' if a.ok else 'NO'}")
    failed = [a for a in attempts if not a.ok]
    print(f"\n{len(attempts) - len(failed)} of {len(attempts)} outcomes as expected")
    return 0 if not failed else 1
