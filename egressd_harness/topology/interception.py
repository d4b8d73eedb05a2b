"""The interception CA in the local fleet: one host, so files are handed over by path.

* The control plane keeps the CA in its state directory
  (`<run-dir>/control/interception-ca/`, `egressd.control.interception_ca`)
  and makes it at its first start. `Fleet.prepare_run_dir` calls the same
  (idempotent, locked) function before any daemon starts, so that proxies
  and sandboxes never wait for the control plane to have run once.
* Proxies get the CA's certificate and key as paths in their configuration
  (`interception_ca`), and the test CA as the trust store that upstream
  servers are verified against (`upstream_ca_file`): the internet's servers
  present certificates of the test CA.
* Sandboxes get the certificate only: a public copy at
  `<run-dir>/ca/interception-ca.pem`, which `egressd sandbox run` appends to
  the sandbox's CA bundle next to the test CA (the same bytes the control
  plane serves at `GET /v1/interception-ca.pem`).
"""

from __future__ import annotations

from pathlib import Path

from egressd.atomicfile import write_atomic
from egressd.control.interception_ca import (
    InterceptionCaFiles,
    ca_dir,
    ensure_interception_ca,
    read_cert_pem,
)

#: The public copy of the certificate, beside the test CA's `ca.pem`.
PUBLIC_CERT = "interception-ca.pem"


def control_ca_dir(run_dir: Path) -> Path:
    """Where the control plane of a fleet in `run_dir` keeps the CA (its `--state-dir`)."""
    return ca_dir(Path(run_dir) / "control")


def public_cert(run_dir: Path) -> Path:
    return Path(run_dir) / "ca" / PUBLIC_CERT


def ensure(run_dir: Path) -> InterceptionCaFiles:
    """The CA (made if needed) and its public copy for sandboxes."""
    files = ensure_interception_ca(control_ca_dir(run_dir))
    pem = read_cert_pem(files.cert.parent)
    target = public_cert(run_dir)
    if not target.exists() or target.read_bytes() != pem:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, pem, mode=0o644)
    return files


def proxy_settings(run_dir: Path) -> dict[str, object]:
    """The proxy configuration keys for interception (`egressd.proxy.config`)."""
    directory = control_ca_dir(run_dir)
    return {
        "interception_ca": {"cert": str(directory / "ca.pem"), "key": str(directory / "ca.key")},
        "upstream_ca_file": str(Path(run_dir) / "ca" / "ca.pem"),
    }
