"""The control plane makes the interception CA at its first start, keeps it across
restarts, and publishes its certificate (never its key) at `/v1/interception-ca.pem`."""

from __future__ import annotations

from pathlib import Path

import requests
from cryptography import x509

from egressd.control.interception_ca import CERT_FILE, KEY_FILE, ca_dir
from tests.support.control_process import ControlProcess, Paths, start


def test_interception_ca_published_and_kept(
    paths: Paths,
    spawn: list[ControlProcess],
) -> None:
    first = start(spawn, paths)
    answer = requests.get(f"{first.base}/v1/interception-ca.pem", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/x-pem-file")
    directory = ca_dir(paths.state)
    assert answer.content == (directory / CERT_FILE).read_bytes()
    assert b"PRIVATE KEY" not in answer.content
    assert (directory / KEY_FILE).stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(answer.content)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "egressd interception CA" in cert.subject.rfc4514_string()
    assert first.terminate() == 0

    second = start(spawn, paths)
    again = requests.get(f"{second.base}/v1/interception-ca.pem", timeout=5)
    assert again.content == answer.content  # sandboxes that trust it keep working
    assert Path(directory / KEY_FILE).exists()
