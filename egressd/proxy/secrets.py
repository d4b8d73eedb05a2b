"""The secrets behind a policy's ``http.credentials``: files only proxies hold.

A proxy's configuration names a directory (`ProxyConfig.secrets_dir`) holding
one file per secret, named by the secret: what a Kubernetes Secret volume and
compose ``secrets:`` provide. `SecretStore.get` returns a secret's value, or
None when it cannot be used; the caller then denies the request
(``credential_unavailable``: fail closed, never a request without its
credential).

* Read when first needed, and re-read when the file changes: `get` stats the
  path (following symlinks: a Kubernetes volume's files are links through
  ``..data``, swapped atomically on an update) at most once per `recheck_s`
  and reads it again when its device, inode, size or mtime differ. No thread
  polls; a secret no request uses is never read.
* Names are checked against the policy's grammar (`SECRET_NAME`: no ``/``,
  no leading ``.``) and the resolved file must lie inside the directory: a
  name can never reach another file.
* One trailing newline sequence is removed (files written with ``echo``);
  the rest must be printable ASCII without leading or trailing spaces (a
  header value: no CR/LF that could inject a header), 1..`MAX_SECRET_BYTES`
  bytes. Anything else is unavailable, with its own error in the log.
* A value is never logged, and never leaves this process except in the
  header the proxy sets: log lines name the secret and the error only.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from egressd.policy.model import SECRET_NAME

log = structlog.get_logger(__name__)

MAX_SECRET_BYTES = 16 * 1024
DEFAULT_RECHECK_S = 1.0

# Why a secret is unavailable (log field `error`).
NO_SECRETS_DIR = "no_secrets_dir"
INVALID_NAME = "invalid_name"
MISSING = "missing"
NOT_A_FILE = "not_a_file"
OUTSIDE_DIR = "outside_dir"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
EMPTY = "empty"
BAD_VALUE = "bad_value"


@dataclass(slots=True)
class _Entry:
    value: str | None
    error: str | None
    key: tuple[int, int, int, int] | None  # (st_dev, st_ino, st_size, st_mtime_ns) read
    checked: float


def parse_secret(data: bytes) -> str | tuple[str]:
    """A file's content as a secret value, or ``(error,)`` (pure)."""
    if len(data) > MAX_SECRET_BYTES:
        return (TOO_LARGE,)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return (EMPTY,)
    if any(b < 0x20 or b > 0x7E for b in data) or data[:1] == b" " or data[-1:] == b" ":
        return (BAD_VALUE,)
    return data.decode("ascii")


class SecretStore:
    """Secrets by name from `directory` (None: no secrets at all)."""

    def __init__(
        self,
        directory: Path | None,
        *,
        recheck_s: float = DEFAULT_RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.recheck_s = recheck_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._root: str | None = None

    def get(self, name: str) -> str | None:
        """The secret's current value, or None (see `error`)."""
        entry = self._entries.get(name)
        now = self._clock()
        if entry is not None and now - entry.checked < self.recheck_s:
            return entry.value
        return self._refresh(name, entry, now).value

    def error(self, name: str) -> str | None:
        """Why `get(name)` last returned None (None when it did not)."""
        entry = self._entries.get(name)
        return None if entry is None else entry.error

    def _refresh(self, name: str, entry: _Entry | None, now: float) -> _Entry:
        if self.directory is None:
            return self._set(name, entry, _Entry(None, NO_SECRETS_DIR, None, now))
        if not SECRET_NAME.fullmatch(name):
            return self._set(name, entry, _Entry(None, INVALID_NAME, None, now))
        path = os.path.join(self.directory, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self._set(name, entry, _Entry(None, MISSING, None, now))
        except OSError:
            return self._set(name, entry, _Entry(None, UNREADABLE, None, now))
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if entry is not None and entry.key == key:
            entry.checked = now
            return entry
        return self._set(name, entry, self._read(path, now))

    def _read(self, path: str, now: float) -> _Entry:
        if self._root is None:
            self._root = os.path.realpath(self.directory)  # type: ignore[arg-type]
        if not os.path.realpath(path).startswith(self._root + os.sep):
            # A link out of the directory (a Kubernetes volume's links stay
            # inside: NAME -> ..data/NAME, ..data -> ..TIMESTAMP).
            return _Entry(None, OUTSIDE_DIR, None, now)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return _Entry(None, MISSING, None, now)
        except OSError:
            return _Entry(None, UNREADABLE, None, now)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if not stat.S_ISREG(st.st_mode):
                return _Entry(None, NOT_A_FILE, key, now)
            data = os.read(fd, MAX_SECRET_BYTES + 1)
        except OSError:
            return _Entry(None, UNREADABLE, None, now)
        finally:
            os.close(fd)
        parsed = parse_secret(data)
        if isinstance(parsed, tuple):
            return _Entry(None, parsed[0], key, now)
        return _Entry(parsed, None, key, now)

    def _set(self, name: str, old: _Entry | None, new: _Entry) -> _Entry:
        self._entries[name] = new
        if new.value is None:
            if old is None or old.error != new.error:
                log.warning("secret_unavailable", secret=name, error=new.error)
        elif old is None or old.key != new.key:
            log.info("secret_loaded", secret=name, reloaded=old is not None)
        return new
