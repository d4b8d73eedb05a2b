"""The fleet's TLS interception CA: made by the control plane, its key only on proxies.

A rule with ``"tls": "intercept"`` makes the proxy terminate the sandbox's TLS
with a leaf certificate for the SNI that this CA signs
(`egressd.proxy.tls_intercept`). The CA is its own: not the policy signing
key, not the test internet's CA, so trusting it (sandboxes do) grants nothing
else, and rotating either never touches the other.

`ensure_interception_ca(directory)` keeps, in the control plane's state
directory (``<state-dir>/interception-ca/``):

| file | what | who gets it |
|---|---|---|
| `ca.pem` | the CA certificate | everyone: sandboxes' trust store, `GET /v1/interception-ca.pem` |
| `ca.key` | its private key, mode 0600 | proxies only (config `interception_ca.key`) |

The control plane calls it at start (the first start makes the CA; later
ones keep it, so sandboxes that already trust it keep working). How the key
reaches proxies is the deployment's job, as a file path in the proxy's
configuration: the local topology points proxies at this directory (one
host), compose copies it into the proxies' shared volume, Kubernetes mounts
it from a Secret. The key never travels over the control plane's API.

ECDSA P-256 (every TLS stack accepts it; leaves are minted fast), ten years,
``pathLenConstraint`` 0 (it signs leaves only). A CA that is missing,
unreadable, not a CA, not matching its key or within a day of expiry is
made anew (files written atomically, the key first, under a lock).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from egressd.atomicfile import write_atomic
from egressd.errors import EgressdError
from egressd.x509build import ca_certificate

DIR_NAME = "interception-ca"
CERT_FILE = "ca.pem"
KEY_FILE = "ca.key"
LOCK_FILE = ".lock"
COMMON_NAME = "egressd interception CA"
VALIDITY = dt.timedelta(days=3650)
BACKDATE = dt.timedelta(hours=1)
RENEW_BEFORE = dt.timedelta(days=1)


class InterceptionCaError(EgressdError):
    """The CA directory cannot be read or written (`reason`: ``interception_ca_io_failed``)."""


@dataclass(frozen=True, slots=True)
class InterceptionCaFiles:
    cert: Path
    key: Path


def ca_dir(state_dir: Path) -> Path:
    """Where the control plane keeps the CA under its state directory."""
    return Path(state_dir) / DIR_NAME


def ensure_interception_ca(
    directory: Path, *, now: dt.datetime | None = None
) -> InterceptionCaFiles:
    """The CA in `directory`, made when it is missing or no longer usable."""
    directory = Path(directory)
    moment = now or dt.datetime.now(dt.UTC)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        with _locked(directory / LOCK_FILE):
            if not usable(directory, moment):
                _new_ca(directory, moment)
    except OSError as exc:
        raise InterceptionCaError("interception_ca_io_failed", f"{directory}: {exc}") from exc
    return InterceptionCaFiles(directory / CERT_FILE, directory / KEY_FILE)


def usable(directory: Path, moment: dt.datetime) -> bool:
    """The CA files in `directory` hold a CA certificate, valid for a day more, and its key."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), password=None)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (FileNotFoundError, ValueError, TypeError, x509.ExtensionNotFound):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not constraints.ca:
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        return False
    return cert.not_valid_before_utc <= moment and moment + RENEW_BEFORE < cert.not_valid_after_utc


def read_cert_pem(directory: Path) -> bytes:
    """The CA certificate (PEM), what `GET /v1/interception-ca.pem` serves."""
    return (Path(directory) / CERT_FILE).read_bytes()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _new_ca(directory: Path, moment: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca_certificate(key, COMMON_NAME, moment - BACKDATE, moment + VALIDITY)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a certificate without its key is rejected by `usable`
    # and made anew, never a trusted certificate whose key is lost.
    write_atomic(directory / KEY_FILE, key_pem, mode=0o600)
    write_atomic(directory / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
