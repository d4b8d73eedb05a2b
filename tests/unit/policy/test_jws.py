"""JWS signing and verification of job policies: each rejection has its own reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.policy.errors import JwsError, PolicyError
from egressd.policy.jws import (
    ALG,
    DEFAULT_LEEWAY_S,
    MAX_TOKEN_BYTES,
    TYP,
    policy_digest,
    sign_payload,
    sign_policy,
    verify_policy,
)
from egressd.policy.keys import SigningKey, TrustedKeys, generate_signing_key
from egressd.policy.model import parse_policy, policy_to_payload

NOW = 1_795_392_000
NBF = NOW
EXP = NOW + 3600

KEY = generate_signing_key()
OTHER = generate_signing_key()
TRUSTED = TrustedKeys.of(KEY.public)


def payload(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "v": 1,
        "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
        "account": "acme",
        "nodes": ["node1"],
        "mode": "enforce",
        "iat": NOW,
        "nbf": NBF,
        "exp": EXP,
        "egress": [
            {"host": "api.allowed.test", "ports": [443, 80]},
            {"host": "*.data.allowed.test", "ports": [443]},
            {"cidr": "203.0.113.64/28", "ports": [5432]},
        ],
        "limits": {
            "max_connections": 256,
            "max_new_connections_per_s": 200,
            "ports_per_destination": 512,
            "bandwidth_bps": 100000000,
        },
    }
    for name, value in changes.items():
        if value is None:
            del doc[name]
        else:
            doc[name] = value
    return doc


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_token(
    header: object,
    body: object,
    key: SigningKey | None = KEY,
    *,
    header_bytes: bytes | None = None,
    body_bytes: bytes | None = None,
) -> str:
    """A token built by hand, so that tests can make any header or payload."""
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    p = body_bytes if body_bytes is not None else json.dumps(body).encode()
    signing_input = f"{b64(h)}.{b64(p)}"
    signature = key.private.sign(signing_input.encode()) if key is not None else b""
    return f"{signing_input}.{b64(signature)}"


def good_header(**changes: object) -> dict[str, object]:
    header: dict[str, object] = {"alg": ALG, "kid": KEY.kid, "typ": TYP}
    for name, value in changes.items():
        if value is None:
            del header[name]
        else:
            header[name] = value
    return header


def reason_of(token: str | bytes, trusted: TrustedKeys = TRUSTED, **kwargs: object) -> str:
    with pytest.raises(JwsError) as caught:
        verify_policy(token, trusted, now=NOW, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


# --- signing --------------------------------------------------------------------------


def test_sign_then_verify_round_trip() -> None:
    policy = parse_policy(payload())
    token = sign_policy(policy, KEY)
    verified = verify_policy(token, TRUSTED, now=NOW)
    assert verified.policy == policy
    assert verified.kid == KEY.kid
    assert verified.token == token
    assert verified.digest == hashlib.sha256(token.encode("ascii")).digest()[:8]


def test_header_and_payload_encoding() -> None:
    token = sign_policy(parse_policy(payload()), KEY)
    header, body, signature = token.split(".")
    assert unb64(header) == (
        b'{"alg":"EdDSA","kid":"' + KEY.kid.encode() + b'","typ":"egress-policy+jws"}'
    )
    expected = json.dumps(
        policy_to_payload(parse_policy(payload())), separators=(",", ":"), sort_keys=True
    )
    assert unb64(body) == expected.encode()
    assert len(unb64(signature)) == 64
    assert "=" not in token and token.isascii()


def test_sign_payload_is_deterministic() -> None:
    # Ed25519 signatures are deterministic, and the JSON is canonical.
    assert sign_payload(payload(), KEY) == sign_payload(dict(reversed(payload().items())), KEY)


def test_sign_payload_refuses_oversize_tokens() -> None:
    with pytest.raises(JwsError) as caught:
        sign_payload({"pad": "x" * MAX_TOKEN_BYTES}, KEY)
    assert caught.value.reason == "malformed"


# --- rejections, each with its own reason ---------------------------------------------


def _tamper_payload() -> str:
    header, body, signature = sign_payload(payload(), KEY).split(".")
    doc = json.loads(unb64(body))
    doc["egress"].append({"cidr": "10.0.0.0/8", "ports": ["1-65535"]})
    return f"{header}.{b64(json.dumps(doc).encode())}.{signature}"


def _tamper_signature() -> str:
    header, body, signature = sign_payload(payload(), KEY).split(".")
    sig = bytearray(unb64(signature))
    sig[0] ^= 1
    return f"{header}.{body}.{b64(bytes(sig))}"


def _forged_kid() -> str:
    # Signed by an untrusted key, but claiming the trusted kid.
    return raw_token(good_header(), payload(), OTHER)


def _hs256_with_public_key() -> str:
    # The classic confusion: HMAC keyed with the (public) verification key.
    header = b64(json.dumps({"alg": "HS256", "kid": KEY.kid, "typ": TYP}).encode())
    body = b64(json.dumps(payload()).encode())
    secret = KEY.public.public_bytes_raw()
    mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"


REJECTIONS: dict[str, tuple[str, Callable[[], str | bytes]]] = {
    # malformed
    "empty": ("malformed", lambda: ""),
    "whitespace only": ("malformed", lambda: " \n"),
    "two parts": ("malformed", lambda: ".".join(sign_payload(payload(), KEY).split(".")[:2])),
    "four parts": ("malformed", lambda: sign_payload(payload(), KEY) + ".AAAA"),
    "empty header": ("malformed", lambda: "." + sign_payload(payload(), KEY).split(".", 1)[1]),
    "empty payload": (
        "malformed",
        lambda: raw_token(good_header(), None, body_bytes=b""),
    ),
    "padding": ("malformed", lambda: sign_payload(payload(), KEY) + "=="),
    "std alphabet": ("malformed", lambda: sign_payload(payload(), KEY)[:-1] + "+"),
    "inner whitespace": ("malformed", lambda: sign_payload(payload(), KEY).replace(".", ". ", 1)),
    "non-ascii str": ("malformed", lambda: sign_payload(payload(), KEY) + "\u00e9"),
    "non-ascii bytes": ("malformed", lambda: sign_payload(payload(), KEY).encode() + b"\xff"),
    "header not json": ("malformed", lambda: raw_token(None, payload(), header_bytes=b"{alg")),
    "header not utf-8": ("malformed", lambda: raw_token(None, payload(), header_bytes=b"\xff")),
    "header array": ("malformed", lambda: raw_token([ALG, KEY.kid], payload())),
    "header duplicate alg": (
        "malformed",
        lambda: raw_token(
            None,
            payload(),
            header_bytes=b'{"alg":"none","alg":"EdDSA","kid":"' + KEY.kid.encode() + b'"}',
        ),
    ),
    "crit": ("malformed", lambda: raw_token(good_header(crit=["exp"], exp=1), payload())),
    "b64 false": ("malformed", lambda: raw_token(good_header(crit=["b64"], b64=False), payload())),
    "oversize": (
        "malformed",
        lambda: raw_token(good_header(pad="x" * MAX_TOKEN_BYTES), payload()),
    ),
    # alg_not_allowed
    "alg none unsigned": (
        "alg_not_allowed",
        lambda: raw_token(good_header(alg="none"), payload(), None),
    ),
    "alg none signed": ("alg_not_allowed", lambda: raw_token(good_header(alg="none"), payload())),
    "alg HS256": ("alg_not_allowed", _hs256_with_public_key),
    "alg RS256": ("alg_not_allowed", lambda: raw_token(good_header(alg="RS256"), payload())),
    "alg lower case": ("alg_not_allowed", lambda: raw_token(good_header(alg="eddsa"), payload())),
    "alg Ed25519": ("alg_not_allowed", lambda: raw_token(good_header(alg="Ed25519"), payload())),
    "alg missing": ("alg_not_allowed", lambda: raw_token(good_header(alg=None), payload())),
    "alg list": ("alg_not_allowed", lambda: raw_token(good_header(alg=[ALG]), payload())),
    # bad_typ
    "typ JWT": ("bad_typ", lambda: raw_token(good_header(typ="JWT"), payload())),
    "typ other": ("bad_typ", lambda: raw_token(good_header(typ="egress-policy"), payload())),
    "typ not a string": ("bad_typ", lambda: raw_token(good_header(typ=1), payload())),
    # unknown_kid
    "kid unknown": ("unknown_kid", lambda: raw_token(good_header(kid=OTHER.kid), payload(), OTHER)),
    "kid missing": ("unknown_kid", lambda: raw_token(good_header(kid=None), payload())),
    "kid not a string": ("unknown_kid", lambda: raw_token(good_header(kid=[KEY.kid]), payload())),
    # bad_signature
    "tampered payload": ("bad_signature", _tamper_payload),
    "tampered signature": ("bad_signature", _tamper_signature),
    "forged kid": ("bad_signature", _forged_kid),
    "unsigned EdDSA": ("bad_signature", lambda: raw_token(good_header(), payload(), None)),
    "short signature": (
        "bad_signature",
        lambda: sign_payload(payload(), KEY).rsplit(".", 1)[0] + "." + b64(b"\0" * 63),
    ),
    # invalid_payload
    "payload not json": (
        "invalid_payload",
        lambda: raw_token(good_header(), None, body_bytes=b"not json"),
    ),
    "payload array": ("invalid_payload", lambda: raw_token(good_header(), [payload()])),
    "payload NaN": (
        "invalid_payload",
        lambda: raw_token(good_header(), None, body_bytes=b'{"v": NaN}'),
    ),
    "payload duplicate exp": (
        "invalid_payload",
        lambda: raw_token(
            good_header(),
            None,
            body_bytes=json.dumps(payload()).encode()[:-1] + b', "exp": 9999999999}',
        ),
    ),
    "no exp": ("invalid_payload", lambda: raw_token(good_header(), payload(exp=None))),
    "no nbf": ("invalid_payload", lambda: raw_token(good_header(), payload(nbf=None))),
    "unknown member": ("invalid_payload", lambda: raw_token(good_header(), payload(extra=1))),
    # validity window
    "expired": (
        "expired",
        lambda: raw_token(good_header(), payload(iat=NOW - 7200, nbf=NOW - 7200, exp=NOW - 60)),
    ),
    "not yet valid": (
        "not_yet_valid",
        lambda: raw_token(good_header(), payload(iat=NOW, nbf=NOW + 60, exp=NOW + 3600)),
    ),
}


@pytest.mark.parametrize(("reason", "make"), REJECTIONS.values(), ids=REJECTIONS.keys())
def test_rejections(reason: str, make: Callable[[], str | bytes]) -> None:
    assert reason_of(make()) == reason


def test_every_documented_reason_is_reached() -> None:
    reasons = {reason for reason, _ in REJECTIONS.values()}
    assert reasons == {
        "malformed",
        "alg_not_allowed",
        "bad_typ",
        "unknown_kid",
        "bad_signature",
        "invalid_payload",
        "not_yet_valid",
        "expired",
    }


def test_invalid_payload_names_the_field_and_chains_the_policy_error() -> None:
    token = raw_token(good_header(), payload(egress=[{"host": "api.allowed.test", "ports": [0]}]))
    with pytest.raises(JwsError) as caught:
        verify_policy(token, TRUSTED, now=NOW)
    assert caught.value.reason == "invalid_payload"
    assert caught.value.detail.startswith("egress[0].ports[0]:")
    assert isinstance(caught.value.__cause__, PolicyError)


def test_checks_run_in_order() -> None:
    # An unsigned token with alg none from an unknown kid with a bad typ: the
    # algorithm is refused first, the signature is never looked at.
    token = raw_token(good_header(alg="none", typ="JWT", kid="nobody"), payload(), None)
    assert reason_of(token) == "alg_not_allowed"
    # Good alg, bad typ, unknown kid: typ first.
    assert reason_of(raw_token(good_header(typ="JWT", kid="nobody"), payload())) == "bad_typ"
    # Expired and tampered: the signature first.
    header, body, _ = raw_token(
        good_header(), payload(exp=NOW - 3600, nbf=NOW - 7200, iat=NOW - 7200)
    ).split(".")
    assert reason_of(f"{header}.{body}.{b64(bytes(64))}") == "bad_signature"


@pytest.mark.parametrize("typ", [None, TYP, "application/egress-policy+jws", "Egress-Policy+JWS"])
def test_accepted_typ(typ: str | None) -> None:
    token = raw_token(good_header(typ=typ) if typ else good_header(typ=None), payload())
    assert verify_policy(token, TRUSTED, now=NOW).kid == KEY.kid


def test_unknown_header_members_are_ignored_and_never_pick_the_key() -> None:
    # A `jwk` header naming the attacker's key must not be used for verification.
    header = good_header(kid=KEY.kid, jwk={"kty": "OKP", "crv": "Ed25519", "x": "AAAA"})
    assert reason_of(raw_token(header, payload(), OTHER)) == "bad_signature"
    assert verify_policy(raw_token(header, payload()), TRUSTED, now=NOW).kid == KEY.kid


# --- keys: rotation and revocation ----------------------------------------------------


def test_two_trusted_keys_at_once() -> None:
    old, new = generate_signing_key(), generate_signing_key()
    both = TrustedKeys.of(old.public, new.public)
    for key in (old, new):
        verified = verify_policy(sign_payload(payload(), key), both, now=NOW)
        assert verified.kid == key.kid
    # Once the old key is retired, its tokens stop verifying.
    only_new = TrustedKeys.of(new.public)
    assert reason_of(sign_payload(payload(), old), only_new) == "unknown_kid"
    assert verify_policy(sign_payload(payload(), new), only_new, now=NOW).kid == new.kid


def test_no_trusted_keys_trusts_nothing() -> None:
    assert reason_of(sign_payload(payload(), KEY), TrustedKeys({})) == "unknown_kid"


# --- validity window and leeway -------------------------------------------------------


def _at(now: float, leeway: int = DEFAULT_LEEWAY_S) -> str:
    token = sign_payload(payload(), KEY)
    try:
        verify_policy(token, TRUSTED, now=now, leeway_s=leeway)
    except JwsError as exc:
        return exc.reason
    return "ok"


@pytest.mark.parametrize(
    ("now", "leeway", "outcome"),
    [
        (NBF - 30, 30, "ok"),
        (NBF - 30.5, 30, "not_yet_valid"),
        (NBF - 31, 30, "not_yet_valid"),
        (NBF, 0, "ok"),
        (NBF - 0.001, 0, "not_yet_valid"),
        (EXP - 1, 0, "ok"),
        (EXP - 0.001, 0, "ok"),
        (EXP, 0, "expired"),
        (EXP + 29, 30, "ok"),
        (EXP + 29.999, 30, "ok"),
        (EXP + 30, 30, "expired"),
        (EXP + 10_000, 30, "expired"),
    ],
)
def test_leeway_boundaries(now: float, leeway: int, outcome: str) -> None:
    assert _at(now, leeway) == outcome


def test_default_leeway_is_30s() -> None:
    assert DEFAULT_LEEWAY_S == 30
    token = sign_payload(payload(), KEY)
    verify_policy(token, TRUSTED, now=EXP + 29)
    with pytest.raises(JwsError):
        verify_policy(token, TRUSTED, now=EXP + 30)


def test_negative_leeway_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        verify_policy(sign_payload(payload(), KEY), TRUSTED, now=NOW, leeway_s=-1)


def test_now_defaults_to_the_wall_clock() -> None:
    # NOW is in the future or the past of the real clock; either way, a token
    # valid only around NOW is judged by the real time when `now` is omitted.
    import time

    real = time.time()
    expected = (
        "ok" if NBF - 30 <= real < EXP + 30 else ("expired" if real >= EXP else "not_yet_valid")
    )
    token = sign_payload(payload(), KEY)
    try:
        verify_policy(token, TRUSTED)
        outcome = "ok"
    except JwsError as exc:
        outcome = exc.reason
    assert outcome == expected


@settings(max_examples=200, deadline=None)
@given(
    now=st.floats(min_value=NBF - 1000, max_value=EXP + 1000, allow_nan=False),
    leeway=st.integers(min_value=0, max_value=300),
)
def test_window_property(now: float, leeway: int) -> None:
    expected = (
        "ok"
        if NBF - leeway <= now < EXP + leeway
        else ("not_yet_valid" if now < NBF - leeway else "expired")
    )
    assert _at(now, leeway) == expected


# --- any change to a token breaks it --------------------------------------------------

GOOD = sign_payload(payload(), KEY)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=300, deadline=None)
@given(index=st.integers(min_value=0, max_value=len(GOOD) - 1), data=st.data())
def test_any_single_character_change_is_rejected(index: int, data: st.DataObject) -> None:
    replacement = data.draw(st.sampled_from([c for c in B64URL + "." if c != GOOD[index]]))
    mutated = GOOD[:index] + replacement + GOOD[index + 1 :]
    with pytest.raises(JwsError):
        verify_policy(mutated, TRUSTED, now=NOW)


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=300) | st.text(max_size=300))
def test_junk_never_raises_anything_but_jws_error(junk: str | bytes) -> None:
    with pytest.raises(JwsError):
        verify_policy(junk, TRUSTED, now=NOW)


# --- digest ---------------------------------------------------------------------------


def test_digest_is_first_8_bytes_of_sha256_of_the_token() -> None:
    digest = policy_digest(GOOD)
    assert digest == hashlib.sha256(GOOD.encode("ascii")).digest()[:8]
    assert len(digest) == 8
    assert verify_policy(GOOD, TRUSTED, now=NOW).digest == digest


def test_surrounding_whitespace_is_stripped_consistently() -> None:
    for variant in (GOOD + "\n", f"  {GOOD}\r\n", f"\t{GOOD}", (GOOD + "\n").encode()):
        assert policy_digest(variant) == policy_digest(GOOD)
        verified = verify_policy(variant, TRUSTED, now=NOW)
        assert verified.token == GOOD
        assert verified.digest == policy_digest(GOOD)


def test_digest_differs_per_token() -> None:
    other = sign_payload(payload(account="other"), KEY)
    assert policy_digest(other) != policy_digest(GOOD)


def test_digest_of_non_ascii_is_malformed() -> None:
    with pytest.raises(JwsError) as caught:
        policy_digest(GOOD + "\u00e9")
    assert caught.value.reason == "malformed"
