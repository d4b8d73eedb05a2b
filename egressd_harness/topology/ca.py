"""The test CA that the "internet" serves HTTPS with and that sandboxes trust.

`ensure_ca(directory)` keeps, in the run directory's `ca/`:

| file | what |
|---|---|
| `ca.pem` | the CA certificate (what a sandbox or `curl --cacert` trusts) |
| `ca.key` | the CA's private key, mode 0600 |
| `server.pem` | server certificate: SANs for the layout's sites and `*.data.allowed.test` |
| `server.key` | its private key, mode 0600 |

The CA is made once and kept across runs (ten years, so a sandbox image that
baked `ca.pem` in keeps working); the server certificate is reissued when it
is missing, unreadable, not issued by this CA, lacking a required name, or
within a day of expiry. Keys are ECDSA P-256, which every TLS stack accepts.
Files are written atomically; a lock file serialises concurrent callers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from egressd.atomicfile import write_atomic
from egressd.errors import EgressdError
from egressd.layout import Layout, default_layout
from egressd.x509build import ca_certificate, leaf_certificate
from egressd_harness.topology.dnsserver import WILDCARD_SITES

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
LOCK_FILE = ".lock"

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=30)
BACKDATE = dt.timedelta(hours=1)
RENEW_BEFORE = dt.timedelta(days=1)
CA_COMMON_NAME = "egressd test CA"

PrivateKey = ec.EllipticCurvePrivateKey


class CaError(EgressdError):
    """The CA directory cannot be read or written (`reason`: `ca_io_failed`)."""


@dataclass(frozen=True, slots=True)
class CaFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def server_names(layout: Layout | None = None) -> tuple[str, ...]:
    """DNS names the server certificate must cover: the layout's sites and the wildcards."""
    sites = (layout or default_layout()).sites
    return tuple(sorted({site.name.lower() for site in sites} | set(WILDCARD_SITES)))


def ensure_ca(
    directory: Path,
    layout: Layout | None = None,
    *,
    names: Iterable[str] | None = None,
    now: dt.datetime | None = None,
) -> CaFiles:
    """The CA and server certificate in `directory`, made or renewed as needed.

    `names` overrides the server names (default: `server_names(layout)`).
    """
    wanted = tuple(sorted(set(names))) if names is not None else server_names(layout)
    moment = now or dt.datetime.now(dt.UTC)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        with _locked(directory / LOCK_FILE):
            ca_cert, ca_key = _load_ca(directory, moment) or _new_ca(directory, moment)
            if not _server_ok(directory, ca_cert, wanted, moment):
                _new_server(directory, ca_cert, ca_key, wanted, moment)
    except OSError as exc:
        raise CaError("ca_io_failed", f"{directory}: {exc}") from exc
    return CaFiles(
        ca_cert=directory / CA_CERT_FILE,
        server_cert=directory / SERVER_CERT_FILE,
        server_key=directory / SERVER_KEY_FILE,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- loading and checking ----------------------------------------------------


def _read_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def _read_key(path: Path) -> PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _valid_at(cert: x509.Certificate, moment: dt.datetime, margin: dt.timedelta) -> bool:
    return cert.not_valid_before_utc <= moment and moment + margin < cert.not_valid_after_utc


def _load_ca(directory: Path, moment: dt.datetime) -> tuple[x509.Certificate, PrivateKey] | None:
    cert = _read_cert(directory / CA_CERT_FILE)
    key = _read_key(directory / CA_KEY_FILE)
    if cert is None or key is None or not _same_key(cert, key):
        return None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    if not constraints.ca or not _valid_at(cert, moment, RENEW_BEFORE):
        return None
    return cert, key


def _server_ok(
    directory: Path, ca_cert: x509.Certificate, names: tuple[str, ...], moment: dt.datetime
) -> bool:
    cert = _read_cert(directory / SERVER_CERT_FILE)
    key = _read_key(directory / SERVER_KEY_FILE)
    if cert is None or key is None or not _same_key(cert, key):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (InvalidSignature, ValueError, TypeError, x509.ExtensionNotFound):
        return False
    have = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    return set(names) <= have and _valid_at(cert, moment, RENEW_BEFORE)


# --- issuing -----------------------------------------------------------------


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(directory: Path, moment: dt.datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca_certificate(key, CA_COMMON_NAME, moment - BACKDATE, moment + CA_VALIDITY)
    # The key first: a crash between the two leaves a cert without its key,
    # which `_load_ca` rejects, rather than a trusted cert whose key is lost.
    write_atomic(directory / CA_KEY_FILE, _key_pem(key), mode=0o600)
    write_atomic(directory / CA_CERT_FILE, _cert_pem(cert), mode=0o644)
    return cert, key


def _new_server(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    names: tuple[str, ...],
    moment: dt.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = leaf_certificate(
        key.public_key(), names, ca_cert, ca_key, moment - BACKDATE, moment + SERVER_VALIDITY
    )
    write_atomic(directory / SERVER_KEY_FILE, _key_pem(key), mode=0o600)
    write_atomic(directory / SERVER_CERT_FILE, _cert_pem(cert), mode=0o644)
