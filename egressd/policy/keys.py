"""Ed25519 keys that sign job policies, and the public keys that verify them.

A key's id (`kid`) is its RFC 7638 JWK thumbprint, so a kid names exactly one
key: a verifier that trusts a kid trusts exactly that public key, and a kid can
never silently come to mean another key. `SigningKey` and `TrustedKeys` check
this when they are built.

On disk (the run directory's `keys/`, see DESIGN.md):

- `signing.key`: the private key, PEM PKCS#8 without encryption, mode 0600,
  written atomically and never overwritten;
- `<kid>.jwk`: one public key as a JWK (RFC 7517/8037) JSON object;
- optionally `jwks.json`: a JWK set `{"keys": [...]}`, as the control plane
  publishes it.

Several public keys may be trusted at once (rotation): `load_trusted_keys`
trusts every `*.jwk` in the directory plus the keys of `jwks.json`. Every file
must be valid; one bad file fails the whole load (fail closed, and loudly).

Everything here raises `KeyFileError` with a `reason` token; nothing else
escapes for bad input.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from egressd import strictjson
from egressd.atomicfile import fsync_dir, temp_name, write_atomic
from egressd.policy.errors import KeyFileError

SIGNING_KEY_FILE = "signing.key"
JWK_SUFFIX = ".jwk"
JWKS_FILE = "jwks.json"

KTY = "OKP"
CRV = "Ed25519"
ALG = "EdDSA"

#: Key files are tiny; anything larger is not one of ours.
MAX_KEY_FILE_BYTES = 64 * 1024

_ED25519_RAW_LEN = 32
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


# --- base64url (RFC 7515 section 2: no padding) --------------------------------------


def b64url_encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding: only the URL-safe alphabet, no `=`, no
    whitespace, and canonical (unused trailing bits zero), so each byte string
    has exactly one accepted encoding. Raises ValueError."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex already checked
        raise ValueError("not base64url") from exc
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url (trailing bits set)")
    return data


# --- key identity ---------------------------------------------------------------------


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid_for(public: Ed25519PublicKey) -> str:
    """The RFC 7638 JWK thumbprint of `public`: base64url (no padding) of the
    SHA-256 of `{"crv":"Ed25519","kty":"OKP","x":...}` (required members only,
    lexicographic order, no whitespace)."""
    x = b64url_encode(_raw_public(public))
    canonical = f'{{"crv":"{CRV}","kty":"{KTY}","x":"{x}"}}'
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclass(frozen=True)
class SigningKey:
    """A private signing key and its kid (the thumbprint of its public key)."""

    kid: str
    private: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.private, Ed25519PrivateKey):
            raise KeyFileError("not_ed25519", f"signing key is {type(self.private).__name__}")
        expected = kid_for(self.private.public_key())
        if self.kid != expected:
            raise KeyFileError("kid_mismatch", f"kid {self.kid!r} is not the key's thumbprint")

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey) -> SigningKey:
        return cls(kid=kid_for(private.public_key()), private=private)

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a verifier trusts, by kid. Several at once during rotation.

    The mapping is copied into a read-only view; each kid must be the thumbprint
    of its key (`KeyFileError("kid_mismatch")` otherwise).
    """

    keys: Mapping[str, Ed25519PublicKey]

    def __post_init__(self) -> None:
        frozen: dict[str, Ed25519PublicKey] = {}
        for kid, key in self.keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFileError("not_ed25519", f"key {kid!r} is {type(key).__name__}")
            if kid != kid_for(key):
                raise KeyFileError("kid_mismatch", f"kid {kid!r} is not the key's thumbprint")
            frozen[kid] = key
        object.__setattr__(self, "keys", MappingProxyType(frozen))

    @classmethod
    def of(cls, *publics: Ed25519PublicKey) -> TrustedKeys:
        return cls({kid_for(key): key for key in publics})

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self.keys.get(kid)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.keys))


def generate_signing_key() -> SigningKey:
    return SigningKey.from_private(Ed25519PrivateKey.generate())


# --- JWK / JWKS -----------------------------------------------------------------------


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    """The public JWK of `key` (RFC 8037), with its kid, alg and use."""
    return {
        "kty": KTY,
        "crv": CRV,
        "x": b64url_encode(_raw_public(key)),
        "kid": kid_for(key),
        "alg": ALG,
        "use": "sig",
    }


def jwks(trusted: TrustedKeys) -> dict[str, list[dict[str, str]]]:
    """A JWK set of every trusted key, in kid order."""
    return {"keys": [public_jwk(trusted.keys[kid]) for kid in sorted(trusted.keys)]}


def _bad_jwk(where: str, detail: str) -> KeyFileError:
    return KeyFileError("bad_jwk", f"{where}: {detail}")


def _public_from_jwk(jwk: object, where: str) -> tuple[str, Ed25519PublicKey]:
    """One public JWK, strictly: an Ed25519 OKP key with a kid that is its
    thumbprint; `alg`, `use` and `key_ops` must agree when present; private
    material (`d`) is refused. Other members are ignored (RFC 7517 section 4)."""
    if not isinstance(jwk, dict):
        raise _bad_jwk(where, "not a JSON object")
    if jwk.get("kty") != KTY:
        raise _bad_jwk(where, f"kty must be {KTY!r}, got {jwk.get('kty')!r}")
    if jwk.get("crv") != CRV:
        raise _bad_jwk(where, f"crv must be {CRV!r}, got {jwk.get('crv')!r}")
    if "d" in jwk:
        raise _bad_jwk(where, "contains private key material (d)")
    if "alg" in jwk and jwk["alg"] != ALG:
        raise _bad_jwk(where, f"alg must be {ALG!r}, got {jwk['alg']!r}")
    if "use" in jwk and jwk["use"] != "sig":
        raise _bad_jwk(where, f"use must be 'sig', got {jwk['use']!r}")
    if "key_ops" in jwk:
        ops = jwk["key_ops"]
        if not isinstance(ops, list) or "verify" not in ops:
            raise _bad_jwk(where, "key_ops must be a list that includes 'verify'")
    x = jwk.get("x")
    if not isinstance(x, str):
        raise _bad_jwk(where, "x missing or not a string")
    try:
        raw = b64url_decode(x)
    except ValueError as exc:
        raise _bad_jwk(where, f"x: {exc}") from exc
    if len(raw) != _ED25519_RAW_LEN:
        raise _bad_jwk(where, f"x must be {_ED25519_RAW_LEN} bytes, got {len(raw)}")
    key = Ed25519PublicKey.from_public_bytes(raw)
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _bad_jwk(where, "kid missing or not a string")
    expected = kid_for(key)
    if kid != expected:
        raise KeyFileError(
            "kid_mismatch", f"{where}: kid {kid!r} is not the key's thumbprint {expected!r}"
        )
    return kid, key


def trusted_from_jwks(doc: object) -> TrustedKeys:
    """Trusted keys from a parsed JWK set `{"keys": [...]}`. Strict: any
    malformed member fails the whole set (`KeyFileError`, reason `bad_jwk` or
    `kid_mismatch`). An empty set is valid and trusts nothing."""
    if not isinstance(doc, dict):
        raise KeyFileError("bad_jwk", "JWK set is not a JSON object")
    members = doc.get("keys")
    if not isinstance(members, list):
        raise KeyFileError("bad_jwk", "JWK set has no 'keys' list")
    found: dict[str, Ed25519PublicKey] = {}
    for index, jwk in enumerate(members):
        kid, key = _public_from_jwk(jwk, f"keys[{index}]")
        found[kid] = key
    return TrustedKeys(found)


# --- files ----------------------------------------------------------------------------


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise KeyFileError("missing", f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise KeyFileError("unreadable", f"{what} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError("malformed", f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    return data


def load_signing_key(path: Path) -> SigningKey:
    """The signing key in `path` (PEM PKCS#8, unencrypted).

    Reasons: `missing`, `unreadable` (permissions, a directory, I/O),
    `malformed` (not a PEM private key, encrypted, too large), `not_ed25519`.
    """
    path = Path(path)
    data = _read_small(path, "signing key")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted, no password given
        raise KeyFileError("malformed", f"signing key {path} is encrypted") from exc
    except (ValueError, UnicodeError) as exc:
        raise KeyFileError("malformed", f"signing key {path} is not a PEM private key") from exc
    except UnsupportedAlgorithm as exc:
        raise KeyFileError(
            "not_ed25519", f"signing key {path} uses an unsupported algorithm"
        ) from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(
            "not_ed25519", f"signing key {path} is {type(private).__name__}, not Ed25519"
        )
    return SigningKey.from_private(private)


def _load_json(path: Path, what: str) -> object:
    data = _read_small(path, what)
    try:
        return strictjson.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFileError("malformed", f"{what} {path} is not JSON: {exc}") from exc


def load_trusted_keys(directory: Path) -> TrustedKeys:
    """Every key in `directory`: each `*.jwk` file (one JWK object; file names
    are free, dot-files are skipped) and `jwks.json` if present. Fails closed:
    one bad file fails the load. Reasons: `missing`, `unreadable`, `malformed`
    (not JSON), `bad_jwk`, `kid_mismatch`, `no_keys` (nothing to trust)."""
    directory = Path(directory)
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except FileNotFoundError as exc:
        raise KeyFileError("missing", f"key directory {directory} does not exist") from exc
    except OSError as exc:
        raise KeyFileError(
            "unreadable", f"key directory {directory}: {exc.strerror or exc}"
        ) from exc
    found: dict[str, Ed25519PublicKey] = {}
    for name in names:
        if name.startswith(".") or not name.endswith(JWK_SUFFIX):
            continue
        path = directory / name
        kid, key = _public_from_jwk(_load_json(path, "public key"), str(path))
        found[kid] = key
    if JWKS_FILE in names:
        path = directory / JWKS_FILE
        doc = _load_json(path, "JWK set")
        try:
            found.update(trusted_from_jwks(doc).keys)
        except KeyFileError as exc:
            raise KeyFileError(exc.reason, f"{path}: {exc.detail}") from exc
    if not found:
        raise KeyFileError("no_keys", f"no public keys (*.jwk or {JWKS_FILE}) in {directory}")
    return TrustedKeys(found)


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically, never replacing an existing file: a
    temporary file in the same directory, fsynced, then hard-linked into place
    (link fails if the target exists). Falls back to an existence check and
    rename where the filesystem has no hard links."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # FileExistsError if the target exists
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(path)) from exc
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_key_dir(directory: Path, key: SigningKey) -> None:
    """Write `key` into `directory`: `signing.key` (PEM PKCS#8, mode 0600) and
    `<kid>.jwk` (the public JWK, mode 0644).

    Creates `directory` (and parents) if needed, the directory itself with mode
    0700; an existing directory keeps its mode. Refuses to replace an existing
    `signing.key` (`KeyFileError("exists")`), so a second `keys generate` cannot
    destroy the key that signs live policies. Other OS errors: `unwritable`.
    """
    directory = Path(directory)
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    jwk = (json.dumps(public_jwk(key.public), indent=2, sort_keys=True) + "\n").encode("ascii")
    try:
        try:
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)  # mkdir's mode is subject to the umask
        except FileExistsError:
            if not directory.is_dir():
                raise KeyFileError("unwritable", f"{directory} is not a directory") from None
        _write_exclusive(directory / SIGNING_KEY_FILE, pem, 0o600)
        write_atomic(directory / f"{key.kid}{JWK_SUFFIX}", jwk, mode=0o644)
    except FileExistsError as exc:
        raise KeyFileError(
            "exists", f"{directory / SIGNING_KEY_FILE} already exists; refusing to overwrite"
        ) from exc
    except OSError as exc:
        raise KeyFileError("unwritable", f"{directory}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):
        fsync_dir(directory)
