"""The "internet" daemon: one asyncio (uvloop) process inside `egd-inet`.

It serves, on the addresses the topology gives `egd-inet`:

- HTTP (:80) and HTTPS (:443, the test CA's server certificate) on every site
  address of the layout, with the same routes for every site:
  - `GET /`, `GET /data`: JSON `{"site": <Host header without port>, "path",
    "query", "client": <peer IP>, "local": <address it arrived on>, "scheme",
    "method"}`;
  - `GET /bytes/{n}`: `n` bytes (0..200 MiB) of deterministic data, streamed,
    with their SHA-256 in `X-Content-SHA256` (see `content_chunks`);
  - `GET /echo-headers`: the JSON above plus `"headers": [[name, value], ...]`;
  - `POST /upload`: reads the body, answers `{"bytes": n, "sha256": hex}`;
  keep-alive on (75 s).
- HTTPS with a certificate nobody trusts (:8443, same routes): a server
  certificate for the same names from a CA of its own (`untrusted-ca/` in
  the run directory, never in any trust store), so that a client (or an
  intercepting proxy) can be shown refusing a server it cannot verify.
- HTTP/2 (:9443, h2 by ALPN only, the test CA's certificate;
  `egressd_harness.topology.h2site`): JSON about each request, `/bytes/{n}`.
- DNS on 203.0.113.53:53, UDP and TCP, authoritative for `test.`
  (`egressd_harness.topology.dnsserver`).
- a fake cloud metadata service on 169.254.169.254:80 that hands out a fake
  credential (`FAKE_CREDENTIAL`), so tests can show sandboxes never reach it.

Each site address is bound explicitly (not 0.0.0.0), because the metadata
service needs port 80 on its own address in the same namespace.

Logs are structlog JSON lines; the event `ready` is logged once every
listener is bound. SIGTERM or SIGINT stops it cleanly.

Entry points: `serve(config)` (async, for embedding and tests), `run(config)`
(blocking, uvloop, signal handling; returns an exit code), `main(argv)` (the
`python -m egressd_harness.topology.inet --run-dir DIR` command line; the CLI's
`egressd inet serve` uses `add_arguments` + `config_from_args` + `run`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import ipaddress
import resource
import ssl
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import uvloop
from aiohttp import hdrs, web

from egressd import logs
from egressd.errors import EgressdError
from egressd.layout import DEFAULT_RUN_DIR, INET_DNS, METADATA, Layout, default_layout
from egressd.signals import install_stop_handlers
from egressd_harness.topology import h2site
from egressd_harness.topology.ca import CaError, CaFiles, ensure_ca
from egressd_harness.topology.dnsserver import DnsServer, Zone

MAX_BYTES = 200 * 1024 * 1024
BLOCK_SIZE = 64 * 1024
KEEPALIVE_S = 75.0
BACKLOG = 1024
CONTENT_SHA256_HEADER = "X-Content-SHA256"
#: Under the run directory: the CA of the :8443 servers, which nothing trusts.
UNTRUSTED_CA_DIR = "untrusted-ca"
FAKE_ROLE = "egressd-fake-role"
FAKE_CREDENTIAL: dict[str, str] = {
    "Code": "Success",
    "Type": "AWS-HMAC",
    "AccessKeyId": "ASIAEGRESSDFAKE00000",
    "SecretAccessKey": "egressd-fake-secret-never-valid",
    "Token": "egressd-fake-session-token",
    "Expiration": "2099-01-01T00:00:00Z",
    "marker": "egressd-fake-metadata",
}

_log = structlog.get_logger("egressd.inet")


class InetError(EgressdError):
    """The daemon cannot start (`reason`: `bind_failed`, `tls_failed`, ...)."""


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} {port} is not a port")


def _check_host(name: str, host: str) -> None:
    try:
        ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise ValueError(f"{name} {host!r} is not an IPv4 address") from exc


@dataclass(frozen=True, slots=True)
class InetConfig:
    """Where the "internet" listens; `for_layout` fills in the topology's addresses."""

    run_dir: Path
    layout: Layout
    http_hosts: tuple[str, ...]
    http_port: int = 80
    https_port: int = 443
    untrusted_https_port: int = 8443
    h2_port: int = 9443
    dns_host: str = str(INET_DNS)
    dns_port: int = 53
    metadata_host: str = str(METADATA)
    metadata_port: int = 80
    ca_dir: Path | None = None  # default: run_dir / "ca"

    def __post_init__(self) -> None:
        if not self.http_hosts:
            raise ValueError("no HTTP host to bind")
        for host in self.http_hosts:
            _check_host("http host", host)
        _check_host("dns host", self.dns_host)
        _check_host("metadata host", self.metadata_host)
        for name in (
            "http_port",
            "https_port",
            "untrusted_https_port",
            "h2_port",
            "dns_port",
            "metadata_port",
        ):
            _check_port(name, getattr(self, name))

    @property
    def ca_path(self) -> Path:
        return self.ca_dir if self.ca_dir is not None else self.run_dir / "ca"

    @classmethod
    def for_layout(cls, layout: Layout | None = None, run_dir: Path | None = None) -> InetConfig:
        layout = layout or default_layout(run_dir or DEFAULT_RUN_DIR)
        run_dir = run_dir or layout.run_dir
        hosts = tuple(str(a) for a in sorted({site.address for site in layout.sites}))
        return cls(run_dir=Path(run_dir), layout=layout, http_hosts=hosts)


# --- deterministic content ---------------------------------------------------


@functools.lru_cache(maxsize=64)
def content_block(n: int) -> bytes:
    """The 64 KiB block that `/bytes/{n}` repeats: a SHA-256 chain seeded by `n`."""
    digest = hashlib.sha256(b"egressd-bytes:%d" % n).digest()
    parts = []
    for _ in range(BLOCK_SIZE // len(digest)):
        parts.append(digest)
        digest = hashlib.sha256(digest).digest()
    return b"".join(parts)


def content_chunks(n: int) -> Iterator[memoryview]:
    """The body of `/bytes/{n}`: `content_block(n)` repeated, cut at `n` bytes."""
    block = memoryview(content_block(n))
    remaining = n
    while remaining > 0:
        chunk = block[: min(len(block), remaining)]
        remaining -= len(chunk)
        yield chunk


@functools.lru_cache(maxsize=64)
def content_sha256(n: int) -> str:
    """Hex SHA-256 of the body of `/bytes/{n}` (cached: up to 200 MiB to hash)."""
    h = hashlib.sha256()
    for chunk in content_chunks(n):
        h.update(chunk)
    return h.hexdigest()


# --- the site app --------------------------------------------------------------


def _about(request: web.Request) -> dict[str, Any]:
    host = request.headers.get(hdrs.HOST, "")
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return {
        "site": host.rsplit(":", 1)[0].lower() if host else "",
        "path": request.path,
        "query": request.query_string,
        "client": request.remote,
        "local": sockname[0] if sockname else None,
        "scheme": request.scheme,
        "method": request.method,
    }


async def _hello(request: web.Request) -> web.Response:
    return web.json_response(_about(request))


async def _echo_headers(request: web.Request) -> web.Response:
    body = _about(request)
    body["headers"] = [[name, value] for name, value in request.headers.items()]
    return web.json_response(body)


async def _bytes(request: web.Request) -> web.StreamResponse:
    text = request.match_info["n"]
    if not text.isdigit() or int(text) > MAX_BYTES:
        return web.json_response({"error": f"n must be 0..{MAX_BYTES}"}, status=400)
    n = int(text)
    digest = await asyncio.to_thread(content_sha256, n)
    response = web.StreamResponse(
        headers={hdrs.CONTENT_TYPE: "application/octet-stream", CONTENT_SHA256_HEADER: digest}
    )
    response.content_length = n
    await response.prepare(request)
    for chunk in content_chunks(n):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(BLOCK_SIZE):
        h.update(chunk)
        size += len(chunk)
    return web.json_response({"bytes": size, "sha256": h.hexdigest()})


def site_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _hello, name="root")
    app.router.add_get("/data", _hello, name="data")
    app.router.add_get("/echo-headers", _echo_headers, name="echo_headers")
    app.router.add_get("/bytes/{n}", _bytes, name="bytes", allow_head=False)
    app.router.add_post("/upload", _upload, name="upload")
    return app


# --- the metadata app ------------------------------------------------------------


async def _metadata_roles(_request: web.Request) -> web.Response:
    return web.Response(text=FAKE_ROLE)


async def _metadata_credential(request: web.Request) -> web.Response:
    _log.warning("metadata_served", client=request.remote, path=request.path)
    return web.json_response(FAKE_CREDENTIAL)


def metadata_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/latest/meta-data/iam/security-credentials/", _metadata_roles)
    app.router.add_get("/{tail:.*}", _metadata_credential)
    return app


# --- lifecycle ----------------------------------------------------------------------


def server_ssl_context(files: CaFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.server_cert, files.server_key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class InetServer:
    """All listeners of the "internet"; `start()` binds them, `stop()` releases them."""

    def __init__(self, config: InetConfig) -> None:
        self.config = config
        self.dns = DnsServer(
            Zone.from_layout(config.layout, config.dns_host), config.dns_host, config.dns_port
        )
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.Server] = []
        self.listeners: dict[str, list[str]] = {}

    async def start(self) -> None:
        cfg = self.config
        try:
            files = await asyncio.to_thread(ensure_ca, cfg.ca_path, cfg.layout)
            tls = server_ssl_context(files)
            untrusted_files = await asyncio.to_thread(
                ensure_ca, cfg.run_dir / UNTRUSTED_CA_DIR, cfg.layout
            )
            untrusted = server_ssl_context(untrusted_files)
            h2_tls = h2site.h2_ssl_context(str(files.server_cert), str(files.server_key))
        except (CaError, OSError, ssl.SSLError) as exc:
            raise InetError("tls_failed", str(exc)) from exc
        try:
            sites = await self._runner(site_app())
            for host in cfg.http_hosts:
                await self._site(sites, "http", host, cfg.http_port, None)
                await self._site(sites, "https", host, cfg.https_port, tls)
                await self._site(
                    sites, "https_untrusted", host, cfg.untrusted_https_port, untrusted
                )
            for host in cfg.http_hosts:
                server = await asyncio.start_server(
                    h2site.serve_h2,
                    host,
                    cfg.h2_port,
                    ssl=h2_tls,
                    backlog=BACKLOG,
                    reuse_address=True,
                )
                self._servers.append(server)
                bound = server.sockets[0].getsockname()
                self.listeners.setdefault("h2", []).append(f"{bound[0]}:{bound[1]}")
            metadata = await self._runner(metadata_app())
            await self._site(metadata, "metadata", cfg.metadata_host, cfg.metadata_port, None)
            await self.dns.start()
        except OSError as exc:
            await self.stop()
            raise InetError("bind_failed", str(exc)) from exc
        self.listeners["dns"] = [
            f"udp:{self.dns.udp_address[0]}:{self.dns.udp_address[1]}",
            f"tcp:{self.dns.tcp_address[0]}:{self.dns.tcp_address[1]}",
        ]

    async def _runner(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_S
        )
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def _site(
        self, runner: web.AppRunner, kind: str, host: str, port: int, tls: ssl.SSLContext | None
    ) -> None:
        site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=BACKLOG, reuse_address=True)
        before = set(runner.addresses)
        await site.start()
        # The runner's new address is this site's (the bound port when `port` is 0).
        for bound in runner.addresses:
            if bound not in before:
                self.listeners.setdefault(kind, []).append(f"{bound[0]}:{bound[1]}")

    async def stop(self) -> None:
        await self.dns.stop()
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers.clear()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()


async def serve(config: InetConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or the task is cancelled); log `ready` once bound."""
    server = InetServer(config)
    await server.start()
    try:
        _log.info("ready", listeners=server.listeners)
        await (stop or asyncio.Event()).wait()
    finally:
        await server.stop()
        _log.info(
            "stopped",
            dns_answered=dict(server.dns.stats.answered),
            dns_dropped=dict(server.dns.stats.dropped),
        )


def _raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve_until_signal(config: InetConfig) -> None:
    task = asyncio.current_task()
    if task is not None:
        task.set_name("inet-serve")
    stop = asyncio.Event()
    uninstall = install_stop_handlers(asyncio.get_running_loop(), stop.set)
    try:
        await serve(config, stop)
    finally:
        uninstall()


def run(config: InetConfig) -> int:
    """Run the daemon in the foreground on uvloop; the process's exit code."""
    _raise_nofile_limit()
    try:
        uvloop.run(_serve_until_signal(config))
    except InetError as exc:
        _log.error("start_failed", reason=exc.reason, detail=exc.detail)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="run directory (ca/ lives here)"
    )


def config_from_args(args: argparse.Namespace) -> InetConfig:
    return InetConfig.for_layout(default_layout(args.run_dir), args.run_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="egressd-inet", description="the local topology's internet"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure(json=True)
    return run(config_from_args(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
