"""Running the control plane: keys, admin token, state, then serve until SIGTERM/SIGINT.

Lifecycle (aiohttp `web_runner`, set-up apart from serving):

1. `prepare_*`: load the signing key and the trusted keys, read or create the
   admin token file, load the state directory. Each failure is an
   `EgressdError` with one line of detail (the CLI exits 2 with it).
2. `ControlService.start()`: `AppRunner.setup()`, bind a `TCPSite`, read the
   bound address back from the runner (port 0 -> an ephemeral port), write it
   to `--port-file` (atomically), log `listening` with host and port.
3. `ControlService.stop()` unwinds what `start()` pushed on its exit stack
   (`egressd.lifecycle`; also after a failed start): `AppRunner.cleanup()`
   (stops accepting, lets in-flight requests finish, at most
   `SHUTDOWN_TIMEOUT_S`), then removes the port file.

`run()` drives this on uvloop and stops on SIGTERM or SIGINT
(`egressd.lifecycle.serve_until_stopped`, with `egressd.signals`' handlers).

Admin token file: if it does not exist, a random token
(`secrets.token_urlsafe(32)`) is written to it with mode 0600 (parents
created 0700); `O_EXCL` makes two starting processes agree on one token. An
existing file is read as is (surrounding whitespace stripped; empty is an
error); a file readable by group or others is logged as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import uvloop
from aiohttp import web

from egressd.control import interception_ca
from egressd.control.app import Clock, ControlApi, build_app
from egressd.control.config import ControlConfig
from egressd.control.store import StateStore, atomic_write
from egressd.errors import EgressdError
from egressd.lifecycle import Lifecycle, serve_until_stopped
from egressd.policy.errors import KeyFileError
from egressd.policy.keys import SigningKey, TrustedKeys, load_signing_key, load_trusted_keys

SHUTDOWN_TIMEOUT_S = 5.0
MAX_TOKEN_FILE_BYTES = 4096

log = structlog.get_logger("egressd.control")


class ControlStartupError(EgressdError):
    """The control plane cannot start (token file, bind); `detail` is one line."""


def ensure_admin_token(path: Path) -> str:
    """The admin token in `path`, created (0600) with a random token if missing."""
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_admin_token(path)
    except OSError as exc:
        raise ControlStartupError(
            "admin_token", f"admin token file {path}: {exc.strerror or exc}"
        ) from exc
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
        out.flush()
        os.fsync(out.fileno())
    log.info("admin_token_created", path=str(path))
    return token


def _read_admin_token(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = fh.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ControlStartupError(
            "admin_token", f"admin token file {path}: {exc.strerror or exc}"
        ) from exc
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ControlStartupError("admin_token", f"admin token file {path}: too large")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ControlStartupError("admin_token", f"admin token file {path}: not UTF-8") from exc
    if not token or any(c.isspace() for c in token):
        raise ControlStartupError(
            "admin_token", f"admin token file {path}: empty or contains whitespace"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("admin_token_file_permissive", path=str(path), mode=oct(mode & 0o777))
    return token


def load_keys(config: ControlConfig) -> tuple[SigningKey, TrustedKeys]:
    """The signing key and the keys published next to it.

    The signing key's own public key is always published, so a key directory
    holding only `signing.key` is fine (`no_keys` is not an error here).
    Raises KeyFileError.
    """
    signing = load_signing_key(config.key_file)
    try:
        trusted = load_trusted_keys(config.trusted_keys_dir)
    except KeyFileError as exc:
        if exc.reason != "no_keys":
            raise
        trusted = TrustedKeys({})
    return signing, trusted


@dataclass(frozen=True, slots=True)
class BoundAddress:
    host: str
    port: int


class ControlService(Lifecycle):
    """One control plane: its app, runner and bound address."""

    def __init__(self, config: ControlConfig, *, clock: Clock = time.time) -> None:
        super().__init__()
        self.config = config
        self.clock = clock
        self.api: ControlApi | None = None
        self.bound: BoundAddress | None = None

    async def _start(self) -> None:
        config = self.config
        stack = self._stack
        signing, trusted = await asyncio.to_thread(load_keys, config)
        token = await asyncio.to_thread(ensure_admin_token, config.admin_token_file)
        store = StateStore(config.state_dir)
        await asyncio.to_thread(store.load)
        interception = await asyncio.to_thread(
            interception_ca.ensure_interception_ca, interception_ca.ca_dir(config.state_dir)
        )
        self.api = ControlApi(
            store=store,
            signing_key=signing,
            trusted=trusted,
            admin_token=token,
            policy_ttl_s=config.policy_ttl_s,
            clock=self.clock,
            sandbox_pool=config.sandbox_pool,
        )
        self.api.interception_ca_pem = await asyncio.to_thread(interception.cert.read_bytes)
        runner = web.AppRunner(
            build_app(self.api), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        # The port file goes after the runner: while it exists, the port may answer.
        stack.callback(self._remove_port_file)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ControlStartupError(
                "bind_failed", f"cannot listen on {config.listen}: {exc.strerror or exc}"
            ) from exc
        host, port = runner.addresses[0][:2]
        self.bound = BoundAddress(host=host, port=port)
        log.info(
            "listening",
            host=host,
            port=port,
            state_dir=str(config.state_dir),
            kid=signing.kid,
            published_kids=sorted(self.api.published.keys),
            policy_ttl_s=config.policy_ttl_s,
            sandbox_pool=str(config.sandbox_pool.network),
            sandbox_prefix=config.sandbox_pool.prefixlen,
            jobs=len(store.jobs),
            nodes=len(store.nodes),
            proxies=len(store.proxies),
        )
        # The port file is the readiness signal for scripts and tests: written
        # after the listening event, so whoever reads it finds the event logged.
        if config.port_file is not None:
            await asyncio.to_thread(
                atomic_write, config.port_file, f"{port}\n".encode(), mode=0o644
            )

    def _remove_port_file(self) -> None:
        if self.bound is not None and self.config.port_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.config.port_file.unlink()
        self.bound = None


async def serve(config: ControlConfig, *, stop: asyncio.Event | None = None) -> None:
    """Start the control plane and serve until `stop` is set or SIGTERM/SIGINT arrives."""
    await serve_until_stopped(ControlService(config), stop, stopping=lambda: log.info("stopping"))
    log.info("stopped")


def run(config: ControlConfig) -> int:
    """`egressd control serve`: serve on uvloop until SIGTERM/SIGINT; exit code 0."""
    uvloop.run(serve(config))
    return 0
