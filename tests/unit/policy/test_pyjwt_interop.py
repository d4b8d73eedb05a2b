"""Interop with PyJWT: a standard JWS library verifies what egressd signs, and
egressd verifies EdDSA tokens that PyJWT makes (DESIGN.md, "Wire formats")."""

from __future__ import annotations

import time

import jwt
import pytest

from egressd.policy.errors import JwsError
from egressd.policy.jws import TYP, sign_payload, sign_policy, verify_policy
from egressd.policy.keys import TrustedKeys, generate_signing_key, jwks, public_jwk
from egressd.policy.model import parse_policy, policy_to_payload

KEY = generate_signing_key()
TRUSTED = TrustedKeys.of(KEY.public)


def payload() -> dict[str, object]:
    # Real timestamps: PyJWT checks exp, nbf and iat against the wall clock.
    now = int(time.time())
    return {
        "v": 1,
        "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
        "account": "acme",
        "nodes": ["node1", "node2"],
        "mode": "report",
        "iat": now - 10,
        "nbf": now - 10,
        "exp": now + 3600,
        "egress": [
            {"host": "api.allowed.test", "ports": [443, 80]},
            {"host": "*.data.allowed.test", "ports": ["8000-8099"]},
            {"cidr": "203.0.113.64/28", "ports": [5432]},
        ],
        "limits": {"max_connections": 16, "bandwidth_bps": 1_000_000},
    }


def test_pyjwt_verifies_what_egressd_signs() -> None:
    policy = parse_policy(payload())
    token = sign_policy(policy, KEY)
    decoded = jwt.decode(token, key=KEY.public, algorithms=["EdDSA"])
    assert decoded == policy_to_payload(policy)
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": KEY.kid, "typ": TYP}


def test_pyjwt_verifies_with_our_published_jwk_and_jwks() -> None:
    token = sign_policy(parse_policy(payload()), KEY)
    pyjwk = jwt.PyJWK(public_jwk(KEY.public))
    assert pyjwk.key_id == KEY.kid
    assert jwt.decode(token, key=pyjwk, algorithms=["EdDSA"])["account"] == "acme"
    keyset = jwt.PyJWKSet.from_dict(jwks(TrustedKeys.of(KEY.public, generate_signing_key().public)))
    assert jwt.decode(token, key=keyset[KEY.kid], algorithms=["EdDSA"])["account"] == "acme"


def test_pyjwt_rejects_egressd_token_under_another_key() -> None:
    token = sign_payload(payload(), KEY)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, key=generate_signing_key().public, algorithms=["EdDSA"])


def test_egressd_verifies_what_pyjwt_signs() -> None:
    doc = payload()
    token = jwt.encode(doc, KEY.private, algorithm="EdDSA", headers={"kid": KEY.kid, "typ": TYP})
    verified = verify_policy(token, TRUSTED)
    assert verified.kid == KEY.kid
    assert verified.policy == parse_policy(doc)


def test_pyjwt_token_without_our_typ_is_refused() -> None:
    # PyJWT writes typ "JWT" unless told otherwise: a generic JWT is not a policy.
    token = jwt.encode(payload(), KEY.private, algorithm="EdDSA", headers={"kid": KEY.kid})
    with pytest.raises(JwsError) as caught:
        verify_policy(token, TRUSTED)
    assert caught.value.reason == "bad_typ"


def test_pyjwt_token_from_an_untrusted_key_is_rejected() -> None:
    attacker = generate_signing_key()
    headers = {"kid": attacker.kid, "typ": TYP}
    token = jwt.encode(payload(), attacker.private, algorithm="EdDSA", headers=headers)
    with pytest.raises(JwsError) as caught:
        verify_policy(token, TRUSTED)
    assert caught.value.reason == "unknown_kid"
    # The same, claiming the trusted kid.
    headers = {"kid": KEY.kid, "typ": TYP}
    token = jwt.encode(payload(), attacker.private, algorithm="EdDSA", headers=headers)
    with pytest.raises(JwsError) as caught:
        verify_policy(token, TRUSTED)
    assert caught.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [(None, "none"), (b"0123456789abcdef0123456789abcdef", "HS256")],
)
def test_pyjwt_tokens_with_other_algorithms_are_refused(key: bytes | None, algorithm: str) -> None:
    headers = {"kid": KEY.kid, "typ": TYP}
    token = jwt.encode(
        payload(),
        key,  # type: ignore[arg-type]
        algorithm=algorithm,
        headers=headers,
    )
    with pytest.raises(JwsError) as caught:
        verify_policy(token, TRUSTED)
    assert caught.value.reason == "alg_not_allowed"


def test_pyjwt_expired_token_is_refused_by_both() -> None:
    doc = payload()
    doc.update(iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200, exp=int(time.time()) - 60)
    token = jwt.encode(doc, KEY.private, algorithm="EdDSA", headers={"kid": KEY.kid, "typ": TYP})
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, key=KEY.public, algorithms=["EdDSA"])
    with pytest.raises(JwsError) as caught:
        verify_policy(token, TRUSTED)
    assert caught.value.reason == "expired"
