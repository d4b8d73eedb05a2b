"""The local fleet's proxy secrets: the directory behind ``http.credentials``.

`ensure` makes ``RUN/secrets/`` (mode 0700, root's) with one test secret,
`TEST_SECRET`, a random value made once per run directory and kept (like
the keys and the CA); `proxy_settings` points the proxies' `secrets_dir` at
it. Sandboxes never see it: a sandbox's root holds only /usr, the Python
installation and the mounts its launcher names (`egressd.sandbox.bundle`).
A policy names the secret, never its value:

    {"host": "api.allowed.test", "ports": [80], "http": {
       "allow": [{"methods": ["GET"], "paths": ["/**"]}],
       "credentials": [{"header": "Authorization", "secret": "allowed-api-token",
                        "format": "Bearer {}", "placeholder": "egressd:allowed-api-token"}]}}
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRETS_DIR = "secrets"
#: The test secret every local fleet has (the inet's sites echo what they get).
TEST_SECRET = "allowed-api-token"


def secrets_dir(run_dir: Path) -> Path:
    return run_dir / SECRETS_DIR


def ensure(run_dir: Path) -> Path:
    """Create the secrets directory and its test secret if absent; its path."""
    directory = secrets_dir(run_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = directory / TEST_SECRET
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"egd-test-{secrets.token_urlsafe(24)}\n")
    return directory


def proxy_settings(run_dir: Path) -> dict[str, object]:
    """The proxy configuration keys for the secrets (`ProxyConfig.secrets_dir`)."""
    return {"secrets_dir": str(secrets_dir(run_dir))}
