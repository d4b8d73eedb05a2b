"""Signed job policies: JWS compact serialisation (RFC 7515) with EdDSA over
Ed25519 (RFC 8037).

A policy token is `BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(sig)`
with the header `{"alg":"EdDSA","kid":<kid>,"typ":"egress-policy+jws"}` and the
payload the policy JSON (compact, sorted keys). Any standard JWS library
(PyJWT, jose) verifies what `sign_payload` makes.

`verify_policy` is the only way a token becomes a `Policy`. It checks, in this
order, and fails with `JwsError` whose `reason` is distinct per step:

1. `malformed`: not ASCII, larger than 64 KiB, not three base64url parts
   (header and payload non-empty) (strict: URL-safe alphabet, no padding, canonical), a
   header that is not a JSON object (duplicate members refused), or a header
   with `crit` (we understand no extensions, so none can be critical; this
   also refuses RFC 7797 `b64: false`).
2. `alg_not_allowed`: `alg` is not exactly `EdDSA` (so `none`, HS*, RS*, a
   missing alg, and also RFC 9864's fully-specified `Ed25519`, which DESIGN.md
   does not name). The allowed algorithm is fixed here, never taken from the
   token, and the signature is never looked at before this check.
3. `bad_typ`: `typ` is present and is not `egress-policy+jws` (compared as
   RFC 7515 section 4.1.9 says: case-insensitive, with or without the
   `application/` prefix). A token without `typ` is accepted: explicit typing
   (RFC 8725 section 3.11) guards against a token of another kind, and those
   carry their own `typ` (PyJWT writes `JWT` by default, which is refused);
   the payload must in any case parse as a complete policy.
4. `unknown_kid`: no `kid`, or a kid that is not trusted. Keys are only ever
   chosen by kid among the trusted keys; `jwk`, `jku`, `x5u`, `x5c` headers
   are ignored.
5. `bad_signature`: the signature is not 64 bytes (an empty one included)
   or does not verify under the trusted key of that kid. Because a kid is
   the thumbprint of its key, a token signed by any other key under a
   trusted kid ends here.
6. `invalid_payload`: the signed payload is not a UTF-8 JSON object, or
   `parse_policy(..., require_timestamps=True)` refuses it; the detail starts
   with the offending field. The payload is only parsed once the signature
   has verified.
7. `not_yet_valid`: `now + leeway < nbf`.
8. `expired`: `now - leeway >= exp`.

Times in the details are ISO 8601 UTC with a relative phrase
(``expired 2026-12-06T16:00:00Z, 2 h ago``; `egressd.policy.times`).

Surrounding whitespace (space, tab, CR, LF) is stripped before anything else,
in `verify_policy` and `policy_digest` alike, so a token read from a file with
a trailing newline has the same digest everywhere. Nothing else is tolerated.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from egressd import strictjson
from egressd.policy import times
from egressd.policy.errors import JwsError, PolicyError
from egressd.policy.keys import SigningKey, TrustedKeys, b64url_decode, b64url_encode
from egressd.policy.model import Policy, parse_policy, policy_to_payload

TYP = "egress-policy+jws"
ALG = "EdDSA"
DEFAULT_LEEWAY_S = 30

#: Largest token accepted or produced, in bytes (a policy is a few KiB at most).
MAX_TOKEN_BYTES = 64 * 1024
#: Length of `policy_digest`, as carried in the GENEVE job option.
DIGEST_LEN = 8

_WHITESPACE = " \t\r\n"
_ED25519_SIG_LEN = 64


def _json_compact(obj: object) -> bytes:
    return json.dumps(
        obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sign_payload(payload: Mapping[str, object], key: SigningKey) -> str:
    """Sign `payload` as a compact JWS: header `{"alg","kid","typ"}`, payload
    compact JSON with sorted keys (UTF-8). The payload is not validated here;
    use `sign_policy` for policies. Raises ValueError/TypeError for payloads
    that are not JSON-serialisable, JwsError("malformed") past 64 KiB."""
    header = {"alg": ALG, "kid": key.kid, "typ": TYP}
    signing_input = (
        b64url_encode(_json_compact(header)) + "." + b64url_encode(_json_compact(dict(payload)))
    )
    signature = key.private.sign(signing_input.encode("ascii"))
    token = signing_input + "." + b64url_encode(signature)
    if len(token) > MAX_TOKEN_BYTES:
        raise JwsError(
            "malformed", f"token would be {len(token)} bytes, verifiers accept {MAX_TOKEN_BYTES}"
        )
    return token


def sign_policy(policy: Policy, key: SigningKey) -> str:
    """Sign the canonical payload of `policy`."""
    return sign_payload(policy_to_payload(policy), key)


def _normalise(token: str | bytes) -> str:
    if isinstance(token, bytes | bytearray):
        try:
            text = bytes(token).decode("ascii")
        except UnicodeDecodeError as exc:
            raise JwsError("malformed", "token is not ASCII") from exc
    elif isinstance(token, str):
        if not token.isascii():
            raise JwsError("malformed", "token is not ASCII")
        text = token
    else:
        raise JwsError("malformed", f"token is {type(token).__name__}, not str or bytes")
    return text.strip(_WHITESPACE)


def policy_digest(token: str | bytes) -> bytes:
    """The first 8 bytes of SHA-256 of the ASCII token (surrounding whitespace
    stripped), as carried in GENEVE next to the job id."""
    return hashlib.sha256(_normalise(token).encode("ascii")).digest()[:DIGEST_LEN]


@dataclass(frozen=True)
class VerifiedPolicy:
    """A policy whose signature, kid and validity window have been checked."""

    policy: Policy
    token: str
    kid: str
    digest: bytes


def _loads(data: bytes) -> object:
    return strictjson.loads(data)


def _typ_matches(typ: object) -> bool:
    if not isinstance(typ, str):
        return False
    typ = typ.lower()
    typ = typ.removeprefix("application/")
    return typ == TYP


def verify_policy(
    token: str | bytes,
    trusted: TrustedKeys,
    *,
    now: float | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
) -> VerifiedPolicy:
    """Verify `token` against `trusted` and return its policy; see the module
    docstring for the order of checks and the `JwsError` reasons. `now`
    defaults to the wall clock; `leeway_s` (>= 0) absorbs clock skew at both
    ends of the validity window."""
    if leeway_s < 0:
        raise ValueError("leeway_s must be >= 0")

    # 1. structure
    text = _normalise(token)
    if len(text) > MAX_TOKEN_BYTES:
        raise JwsError("malformed", f"token is larger than {MAX_TOKEN_BYTES} bytes")
    parts = text.split(".")
    if len(parts) != 3:
        raise JwsError("malformed", f"expected 3 dot-separated parts, got {len(parts)}")
    if not parts[0] or not parts[1]:
        # An empty signature part is left to the signature check, so that the
        # classic unsigned token (`alg: none`, empty signature) reports its alg.
        raise JwsError("malformed", "empty header" if not parts[0] else "empty payload")
    try:
        header_raw, payload_raw, signature = (b64url_decode(part) for part in parts)
    except ValueError as exc:
        raise JwsError("malformed", str(exc)) from exc
    try:
        header = _loads(header_raw)
    except ValueError as exc:  # includes UnicodeDecodeError, JSONDecodeError
        raise JwsError("malformed", f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise JwsError("malformed", "header is not a JSON object")
    if "crit" in header:
        raise JwsError("malformed", "crit header: no extensions are understood")

    # 2. algorithm, fixed by us
    alg = header.get("alg")
    if alg != ALG:
        raise JwsError("alg_not_allowed", f"alg {alg!r} is not allowed, only {ALG!r}")

    # 3. explicit type
    if "typ" in header and not _typ_matches(header["typ"]):
        raise JwsError("bad_typ", f"typ {header['typ']!r} is not {TYP!r}")

    # 4. key
    kid = header.get("kid")
    public = trusted.get(kid) if isinstance(kid, str) else None
    if public is None or not isinstance(kid, str):  # (the isinstance narrows kid for mypy)
        raise JwsError("unknown_kid", f"kid {kid!r} is not trusted")

    # 5. signature
    if len(signature) != _ED25519_SIG_LEN:
        raise JwsError("bad_signature", f"signature is {len(signature)} bytes, not 64")
    signing_input = text[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
    try:
        public.verify(signature, signing_input)
    except InvalidSignature as exc:
        raise JwsError("bad_signature", f"signature does not verify under kid {kid!r}") from exc

    # 6. payload, only now that it is authentic
    try:
        obj = _loads(payload_raw)
    except ValueError as exc:
        raise JwsError("invalid_payload", f"payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise JwsError("invalid_payload", "payload is not a JSON object")
    try:
        policy = parse_policy(obj, require_timestamps=True)
    except PolicyError as exc:
        raise JwsError("invalid_payload", exc.detail) from exc
    if policy.nbf is None or policy.exp is None:  # parse_policy guarantees; fail closed anyway
        raise JwsError("invalid_payload", "nbf and exp are required")

    # 7, 8. validity window
    at = time.time() if now is None else now
    if at + leeway_s < policy.nbf:
        raise JwsError(
            "not_yet_valid",
            f"not valid before {times.when(policy.nbf, at)} (nbf; leeway {leeway_s} s)",
        )
    if at - leeway_s >= policy.exp:
        raise JwsError(
            "expired", f"expired {times.when(policy.exp, at)} (exp; leeway {leeway_s} s)"
        )

    return VerifiedPolicy(
        policy=policy,
        token=text,
        kid=kid,
        digest=hashlib.sha256(text.encode("ascii")).digest()[:DIGEST_LEN],
    )
