"""Ed25519 signing keys, kids (RFC 7638 thumbprints), JWKs and key directories."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from egressd.policy.errors import KeyFileError
from egressd.policy.keys import (
    MAX_KEY_FILE_BYTES,
    SigningKey,
    TrustedKeys,
    b64url_decode,
    b64url_encode,
    generate_signing_key,
    jwks,
    kid_for,
    load_signing_key,
    load_trusted_keys,
    public_jwk,
    trusted_from_jwks,
    write_key_dir,
)

# RFC 8037 appendix A.1-A.3: an Ed25519 key and its JWK thumbprint.
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_KID = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"

running_as_root = os.geteuid() == 0


def rfc8037_key() -> SigningKey:
    return SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC8037_D)))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- kid ------------------------------------------------------------------------------


def test_kid_matches_rfc8037_thumbprint_vector() -> None:
    key = rfc8037_key()
    assert public_jwk(key.public)["x"] == RFC8037_X
    assert kid_for(key.public) == RFC8037_KID
    assert key.kid == RFC8037_KID


def test_kid_is_thumbprint_computed_by_hand_from_pyjwt_jwk() -> None:
    key = generate_signing_key()
    # PyJWT's own JWK of the key, reduced to RFC 7638's required members.
    pyjwt_jwk = OKPAlgorithm.to_jwk(key.public, as_dict=True)
    required = {name: pyjwt_jwk[name] for name in ("crv", "kty", "x")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    by_hand = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    raw = key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert required["x"] == base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert kid_for(key.public) == by_hand == key.kid
    assert len(key.kid) == 43 and "=" not in key.kid


def test_public_jwk_members() -> None:
    key = rfc8037_key()
    assert public_jwk(key.public) == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": RFC8037_X,
        "kid": RFC8037_KID,
        "alg": "EdDSA",
        "use": "sig",
    }


def test_signing_key_refuses_a_kid_that_is_not_its_thumbprint() -> None:
    private = Ed25519PrivateKey.generate()
    with pytest.raises(KeyFileError) as caught:
        SigningKey(kid="my-key", private=private)
    assert caught.value.reason == "kid_mismatch"


def test_signing_key_repr_hides_private_key() -> None:
    key = generate_signing_key()
    assert repr(key) == f"SigningKey(kid={key.kid!r})"


def test_trusted_keys_checks_kids_and_is_read_only() -> None:
    a, b = generate_signing_key(), generate_signing_key()
    with pytest.raises(KeyFileError) as caught:
        TrustedKeys({a.kid: b.public})
    assert caught.value.reason == "kid_mismatch"
    source = {a.kid: a.public}
    trusted = TrustedKeys(source)
    source[b.kid] = b.public
    assert list(trusted.keys) == [a.kid]
    with pytest.raises(TypeError):
        trusted.keys[b.kid] = b.public  # type: ignore[index]
    assert TrustedKeys.of(a.public, b.public).keys.keys() == {a.kid, b.kid}


# --- base64url ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"\xff\xfe\xfd\xfc", bytes(range(64))])
def test_b64url_round_trip(data: bytes) -> None:
    encoded = b64url_encode(data)
    assert "=" not in encoded and "+" not in encoded and "/" not in encoded
    assert b64url_decode(encoded) == data


@pytest.mark.parametrize(
    "text",
    [
        "Zg==",  # padding
        "a+b/",  # standard alphabet
        "Zm9v\n",  # whitespace
        "Z",  # impossible length
        "Zh",  # non-canonical: trailing bits set ("Zg" is canonical for b"f")
        "Zm9v!",
    ],
)
def test_b64url_decode_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


# --- JWK sets -------------------------------------------------------------------------


def test_jwks_round_trip_with_several_keys() -> None:
    a, b = generate_signing_key(), generate_signing_key()
    trusted = TrustedKeys.of(a.public, b.public)
    doc = jwks(trusted)
    assert [jwk["kid"] for jwk in doc["keys"]] == sorted([a.kid, b.kid])
    again = trusted_from_jwks(json.loads(json.dumps(doc)))
    assert again.keys == trusted.keys


def test_empty_jwks_trusts_nothing() -> None:
    assert len(trusted_from_jwks({"keys": []})) == 0


def _jwk(**changes: object) -> dict[str, object]:
    jwk: dict[str, object] = dict(public_jwk(rfc8037_key().public))
    for name, value in changes.items():
        if value is None:
            del jwk[name]
        else:
            jwk[name] = value
    return jwk


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([], "bad_jwk"),
        ({}, "bad_jwk"),
        ({"keys": {}}, "bad_jwk"),
        ({"keys": ["x"]}, "bad_jwk"),
        ({"keys": [_jwk(kty="EC")]}, "bad_jwk"),
        ({"keys": [_jwk(kty=None)]}, "bad_jwk"),
        ({"keys": [_jwk(crv="Ed448")]}, "bad_jwk"),
        ({"keys": [_jwk(crv="X25519")]}, "bad_jwk"),
        ({"keys": [_jwk(d=RFC8037_D)]}, "bad_jwk"),
        ({"keys": [_jwk(alg="ES256")]}, "bad_jwk"),
        ({"keys": [_jwk(use="enc")]}, "bad_jwk"),
        ({"keys": [_jwk(key_ops=["sign"])]}, "bad_jwk"),
        ({"keys": [_jwk(x=None)]}, "bad_jwk"),
        ({"keys": [_jwk(x=RFC8037_X + "=")]}, "bad_jwk"),
        ({"keys": [_jwk(x=RFC8037_X[:-4])]}, "bad_jwk"),
        ({"keys": [_jwk(x=12)]}, "bad_jwk"),
        ({"keys": [_jwk(kid=None)]}, "bad_jwk"),
        ({"keys": [_jwk(kid="")]}, "bad_jwk"),
        ({"keys": [_jwk(kid="key-2024")]}, "kid_mismatch"),
        (
            {"keys": [_jwk(), _jwk(kid=kid_for(Ed25519PrivateKey.generate().public_key()))]},
            "kid_mismatch",
        ),
    ],
)
def test_trusted_from_jwks_is_strict(doc: object, reason: str) -> None:
    with pytest.raises(KeyFileError) as caught:
        trusted_from_jwks(doc)
    assert caught.value.reason == reason


def test_trusted_from_jwks_accepts_optional_members_absent_and_unknown_ones() -> None:
    doc = {"keys": [_jwk(alg=None, use=None, key_ops=["verify"], x5t="ignored")], "extra": 1}
    assert list(trusted_from_jwks(doc).keys) == [RFC8037_KID]


# --- key directories ------------------------------------------------------------------


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "keys"
    key = generate_signing_key()
    write_key_dir(directory, key)

    loaded = load_signing_key(directory / "signing.key")
    assert loaded.kid == key.kid
    raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw
    assert loaded.private.private_bytes(*raw, serialization.NoEncryption()) == (
        key.private.private_bytes(*raw, serialization.NoEncryption())
    )
    trusted = load_trusted_keys(directory)
    assert list(trusted.keys) == [key.kid]
    assert json.loads((directory / f"{key.kid}.jwk").read_text()) == public_jwk(key.public)
    assert sorted(p.name for p in directory.iterdir()) == sorted(["signing.key", f"{key.kid}.jwk"])


def test_file_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        directory = tmp_path / "keys"
        key = generate_signing_key()
        write_key_dir(directory, key)
    finally:
        os.umask(old_umask)
    assert mode_of(directory) == 0o700
    assert mode_of(directory / "signing.key") == 0o600
    assert mode_of(directory / f"{key.kid}.jwk") == 0o644
    pem = (directory / "signing.key").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o750)
    directory.chmod(0o750)
    write_key_dir(directory, generate_signing_key())
    assert mode_of(directory) == 0o750


def test_refuses_to_overwrite_signing_key(tmp_path: Path) -> None:
    first, second = generate_signing_key(), generate_signing_key()
    write_key_dir(tmp_path, first)
    before = (tmp_path / "signing.key").read_bytes()
    with pytest.raises(KeyFileError) as caught:
        write_key_dir(tmp_path, second)
    assert caught.value.reason == "exists"
    assert (tmp_path / "signing.key").read_bytes() == before
    assert load_signing_key(tmp_path / "signing.key").kid == first.kid
    # No temporary files and no public key of the refused key are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["signing.key", f"{first.kid}.jwk"])


def test_refuses_to_overwrite_through_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "signing.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyFileError) as caught:
        write_key_dir(tmp_path, generate_signing_key())
    assert caught.value.reason == "exists"
    assert not (tmp_path / "elsewhere").exists()


def test_write_into_a_file_path_is_unwritable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError) as caught:
        write_key_dir(tmp_path / "file", generate_signing_key())
    assert caught.value.reason == "unwritable"
    with pytest.raises(KeyFileError) as caught:
        write_key_dir(tmp_path / "file" / "keys", generate_signing_key())
    assert caught.value.reason == "unwritable"


def _pem(private: object) -> bytes:
    return private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_load_signing_key_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(tmp_path / "signing.key")
    assert caught.value.reason == "missing"


def test_load_signing_key_unreadable_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(tmp_path)
    assert caught.value.reason == "unreadable"


@pytest.mark.skipif(running_as_root, reason="root reads files whatever their mode")
def test_load_signing_key_unreadable_permissions(tmp_path: Path) -> None:
    write_key_dir(tmp_path, generate_signing_key())
    (tmp_path / "signing.key").chmod(0)
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(tmp_path / "signing.key")
    assert caught.value.reason == "unreadable"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"\xff\xfe" * 10,
        b"A" * (MAX_KEY_FILE_BYTES + 1),
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
        # a public key is not a signing key
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
    ids=["empty", "text", "bad-der", "binary", "too-large", "encrypted", "public-key"],
)
def test_load_signing_key_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path)
    assert caught.value.reason == "malformed"


def test_load_signing_key_not_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path)
    assert caught.value.reason == "not_ed25519"


def test_load_trusted_keys_rotation_jwk_files_and_jwks(tmp_path: Path) -> None:
    old, new, published = generate_signing_key(), generate_signing_key(), generate_signing_key()
    for key in (old, new):
        (tmp_path / f"{key.kid}.jwk").write_text(json.dumps(public_jwk(key.public)))
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(TrustedKeys.of(published.public))))
    (tmp_path / "signing.key").write_bytes(_pem(old.private))  # ignored
    (tmp_path / "README").write_text("ignored")
    (tmp_path / ".editor-swap.jwk").write_text("not json")  # dot-files are skipped
    trusted = load_trusted_keys(tmp_path)
    assert set(trusted.keys) == {old.kid, new.kid, published.kid}


def test_load_trusted_keys_file_names_are_free(tmp_path: Path) -> None:
    key = generate_signing_key()
    (tmp_path / "control-plane-2025.jwk").write_text(json.dumps(public_jwk(key.public)))
    assert list(load_trusted_keys(tmp_path).keys) == [key.kid]


def test_load_trusted_keys_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_trusted_keys(tmp_path / "nope")
    assert caught.value.reason == "missing"


def test_load_trusted_keys_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError) as caught:
        load_trusted_keys(tmp_path / "file")
    assert caught.value.reason == "unreadable"


def test_load_trusted_keys_no_keys(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_trusted_keys(tmp_path)
    assert caught.value.reason == "no_keys"
    (tmp_path / "signing.key").write_bytes(_pem(Ed25519PrivateKey.generate()))
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    with pytest.raises(KeyFileError) as caught:
        load_trusted_keys(tmp_path)
    assert caught.value.reason == "no_keys"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("a.jwk", "not json", "malformed"),
        ("a.jwk", '{"kty": "OKP", "kty": "OKP"}', "malformed"),
        ("a.jwk", "\udcff", "malformed"),
        ("a.jwk", '{"keys": []}', "bad_jwk"),
        ("a.jwk", json.dumps(_jwk(d=RFC8037_D)), "bad_jwk"),
        ("a.jwk", json.dumps(_jwk(kid="other")), "kid_mismatch"),
        ("jwks.json", "[]", "bad_jwk"),
        ("jwks.json", json.dumps({"keys": [_jwk(crv="P-256")]}), "bad_jwk"),
    ],
)
def test_one_bad_file_fails_the_load(tmp_path: Path, name: str, content: str, reason: str) -> None:
    good = generate_signing_key()
    (tmp_path / f"{good.kid}.jwk").write_text(json.dumps(public_jwk(good.public)))
    (tmp_path / name).write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(KeyFileError) as caught:
        load_trusted_keys(tmp_path)
    assert caught.value.reason == reason
    assert name in caught.value.detail
