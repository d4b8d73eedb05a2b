"""The local fleet's interception CA files: made once, published for sandboxes, named
in every proxy's configuration; the sandbox bundle trusts both extra CAs."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from egressd.control.interception_ca import ensure_interception_ca
from egressd.layout import default_layout
from egressd.proxy.config import config_from_mapping
from egressd.sandbox.cli import extra_ca_pem
from egressd_harness.topology import ca, interception
from egressd_harness.topology.fleet import Fleet


def test_ensure_publishes_the_certificate(tmp_path: Path) -> None:
    files = interception.ensure(tmp_path)
    assert files.cert.parent == tmp_path / "control" / "interception-ca"
    public = interception.public_cert(tmp_path)
    assert public.read_bytes() == files.cert.read_bytes()
    assert public.stat().st_mode & 0o777 == 0o644
    # The control plane's own call at start (same directory) keeps it.
    again = ensure_interception_ca(tmp_path / "control" / "interception-ca")
    assert again.cert.read_bytes() == public.read_bytes()
    interception.ensure(tmp_path)
    assert public.read_bytes() == files.cert.read_bytes()


def test_proxy_config_names_the_files(tmp_path: Path) -> None:
    fleet = Fleet(default_layout(tmp_path, "egd-x-"))
    config = config_from_mapping(fleet.proxy_config(fleet.layout.proxies[0]))
    assert config.interception_ca is not None
    assert config.interception_ca.cert == tmp_path / "control" / "interception-ca" / "ca.pem"
    assert config.interception_ca.key == tmp_path / "control" / "interception-ca" / "ca.key"
    assert config.upstream_ca_file == tmp_path / "ca" / "ca.pem"


def test_sandbox_trusts_the_test_ca_and_the_interception_ca(tmp_path: Path) -> None:
    assert extra_ca_pem(tmp_path) is None
    ca.ensure_ca(tmp_path / "ca")
    only_test = extra_ca_pem(tmp_path)
    assert only_test is not None and len(x509.load_pem_x509_certificates(only_test)) == 1
    interception.ensure(tmp_path)
    both = extra_ca_pem(tmp_path)
    assert both is not None
    names = [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(both)]
    assert len(names) == 2
    assert any("egressd test CA" in n for n in names)
    assert any("egressd interception CA" in n for n in names)
