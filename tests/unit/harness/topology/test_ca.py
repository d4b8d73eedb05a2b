"""The test CA: files, names, validity, chain verification and reuse across runs."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from egressd.layout import default_layout
from egressd_harness.topology.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    CaError,
    ensure_ca,
    server_names,
)

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _files(directory: Path) -> dict[str, bytes]:
    return {
        name: (directory / name).read_bytes()
        for name in (CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)
    }


def _verify(
    ca: x509.Certificate, leaf: x509.Certificate, name: str, when: dt.datetime = NOW
) -> None:
    verifier = (
        PolicyBuilder().store(Store([ca])).time(when).build_server_verifier(x509.DNSName(name))
    )
    verifier.verify(leaf, [])


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "ca"


def test_creates_pem_files_with_private_keys_0600(ca_dir: Path) -> None:
    files = ensure_ca(ca_dir, now=NOW)
    assert files.ca_cert == ca_dir / CA_CERT_FILE
    assert files.server_cert == ca_dir / SERVER_CERT_FILE
    assert files.server_key == ca_dir / SERVER_KEY_FILE
    for name, data in _files(ca_dir).items():
        assert data.startswith(b"-----BEGIN "), name
    for key in (CA_KEY_FILE, SERVER_KEY_FILE):
        assert stat.S_IMODE((ca_dir / key).stat().st_mode) == 0o600


def test_server_names_cover_every_site_and_the_wildcard(ca_dir: Path) -> None:
    files = ensure_ca(ca_dir, now=NOW)
    san = (
        _cert(files.server_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    names = set(san.get_values_for_type(x509.DNSName))
    assert {site.name for site in default_layout().sites} <= names
    assert "*.data.allowed.test" in names
    assert names == set(server_names())


def test_validity_is_now_minus_one_hour_for_thirty_days(ca_dir: Path) -> None:
    files = ensure_ca(ca_dir, now=NOW)
    leaf = _cert(files.server_cert)
    assert leaf.not_valid_before_utc == NOW - dt.timedelta(hours=1)
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(days=30)
    ca = _cert(files.ca_cert)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3000)


@pytest.mark.parametrize(
    "name",
    ["api.allowed.test", "eu.data.allowed.test", "x.data.allowed.test", "evil.test", "raw.test"],
)
def test_chain_verifies_for_site_names(ca_dir: Path, name: str) -> None:
    files = ensure_ca(ca_dir, now=NOW)
    _verify(_cert(files.ca_cert), _cert(files.server_cert), name)


@pytest.mark.parametrize(
    "name", ["data.allowed.test", "a.b.data.allowed.test", "example.com", "allowed.test"]
)
def test_chain_does_not_verify_for_other_names(ca_dir: Path, name: str) -> None:
    files = ensure_ca(ca_dir, now=NOW)
    with pytest.raises(VerificationError):
        _verify(_cert(files.ca_cert), _cert(files.server_cert), name)


def test_chain_does_not_verify_after_expiry(ca_dir: Path) -> None:
    files = ensure_ca(ca_dir, now=NOW)
    with pytest.raises(VerificationError):
        _verify(
            _cert(files.ca_cert),
            _cert(files.server_cert),
            "api.allowed.test",
            NOW + dt.timedelta(days=31),
        )


def test_python_ssl_handshake_verifies_against_the_ca(ca_dir: Path) -> None:
    """A TLS handshake in memory: what `requests` in a sandbox will do."""
    files = ensure_ca(ca_dir)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="eu.data.allowed.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = client.getpeercert()
    assert peer is not None and peer["subjectAltName"]


def test_second_call_reuses_every_file(ca_dir: Path) -> None:
    ensure_ca(ca_dir, now=NOW)
    before = _files(ca_dir)
    ensure_ca(ca_dir, now=NOW + dt.timedelta(days=3))
    assert _files(ca_dir) == before


def test_server_cert_near_expiry_is_reissued_by_the_same_ca(ca_dir: Path) -> None:
    ensure_ca(ca_dir, now=NOW)
    before = _files(ca_dir)
    later = NOW + dt.timedelta(days=29, hours=12)
    files = ensure_ca(ca_dir, now=later)
    after = _files(ca_dir)
    assert after[CA_CERT_FILE] == before[CA_CERT_FILE]
    assert after[CA_KEY_FILE] == before[CA_KEY_FILE]
    assert after[SERVER_CERT_FILE] != before[SERVER_CERT_FILE]
    _verify(_cert(files.ca_cert), _cert(files.server_cert), "api.allowed.test", later)


def test_missing_server_key_is_reissued_and_ca_kept(ca_dir: Path) -> None:
    ensure_ca(ca_dir, now=NOW)
    before = _files(ca_dir)
    (ca_dir / SERVER_KEY_FILE).unlink()
    files = ensure_ca(ca_dir, now=NOW)
    assert (ca_dir / CA_CERT_FILE).read_bytes() == before[CA_CERT_FILE]
    _verify(_cert(files.ca_cert), _cert(files.server_cert), "api.allowed.test")


def test_new_names_reissue_the_server_cert(ca_dir: Path) -> None:
    ensure_ca(ca_dir, now=NOW)
    files = ensure_ca(ca_dir, names=[*server_names(), "new.allowed.test"], now=NOW)
    _verify(_cert(files.ca_cert), _cert(files.server_cert), "new.allowed.test")


def test_corrupt_ca_is_replaced_and_server_reissued(ca_dir: Path) -> None:
    ensure_ca(ca_dir, now=NOW)
    before = _files(ca_dir)
    (ca_dir / CA_CERT_FILE).write_bytes(b"not a certificate")
    files = ensure_ca(ca_dir, now=NOW)
    after = _files(ca_dir)
    assert after[CA_KEY_FILE] != before[CA_KEY_FILE]
    assert after[SERVER_CERT_FILE] != before[SERVER_CERT_FILE]
    _verify(_cert(files.ca_cert), _cert(files.server_cert), "api.allowed.test")


def test_server_cert_from_another_ca_is_reissued(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ensure_ca(a, now=NOW)
    ensure_ca(b, now=NOW)
    for name in (SERVER_CERT_FILE, SERVER_KEY_FILE):
        (a / name).write_bytes((b / name).read_bytes())
    files = ensure_ca(a, now=NOW)
    _verify(_cert(files.ca_cert), _cert(files.server_cert), "api.allowed.test")


def test_unwritable_directory_is_a_ca_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CaError) as info:
        ensure_ca(blocker / "ca")
    assert info.value.reason == "ca_io_failed"
