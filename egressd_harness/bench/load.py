"""Load generators of `egressd bench`, each run inside a client namespace.

- `run_wrk`: wrk (Debian's `wrk`), one run; keep-alive latency
  (`connections=1`, `latency=True`) or new connections per second
  (`close=True`: every request carries `Connection: close`, so each one is a
  new TCP connection through the whole path);
- `run_bulk`: one `GET /bytes/N` with curl into /dev/null (one flow);
- `IdleHolder`: a child process (`python -m egressd_harness.bench.load idle ...`)
  in the client namespace that opens N keep-alive connections, makes one
  request on each so that every hop has set the connection up (tier 2 has
  decided, the proxy has connected upstream), then holds them idle until told
  to close them;
- `resolve_a`: one DNS query from a namespace (the sandbox asks the proxy's
  responder, so that tier 2 knows the name it connects to);
- `rss_kib`, `fd_count`: a process's VmRSS and open descriptors from /proc.

Every failure is a `LoadError` with a reason token.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from egressd.errors import EgressdError
from egressd.net import netns as kn
from egressd_harness.bench.report import (
    CURL_WRITE_OUT,
    BulkResult,
    ParseError,
    WrkResult,
    parse_curl,
    parse_wrk,
)

IPv4Address = ipaddress.IPv4Address

WRK_GRACE_S = 30.0
IDLE_CONCURRENCY = 256
IDLE_CONNECT_TIMEOUT_S = 10.0
IDLE_NOFILE_SLACK = 1024
IDLE_MODULE = "egressd_harness.bench.load"


class LoadError(EgressdError):
    """A load generator that failed or printed something unexpected."""


Runner = Callable[[list[str], float], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a path's client runs and what it asks for."""

    netns: str
    address: IPv4Address
    port: int
    host: str  # the Host header (the site's name)
    # HTTPS (the interception rows): the URL names the host, so that the client
    # sends it as SNI; `hosts_file` maps it to `address` for wrk (bind-mounted
    # on /etc/hosts in a private mount namespace), curl gets `--resolve`, and
    # `ca_file` is what curl trusts (the proxies' interception CAs).
    tls: bool = False
    ca_file: Path | None = None
    hosts_file: Path | None = None
    # Runs a command where the client lives instead of `netns` (the gVisor row:
    # inside a runsc sandbox); (argv, timeout) -> the finished process.
    runner: Runner | None = field(default=None, compare=False)

    def url(self, path: str = "/") -> str:
        if self.tls:
            return f"https://{self.host}:{self.port}{path}"
        return f"http://{self.address}:{self.port}{path}"


def run_client(target: Target, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a load command where `target`'s client lives (its netns, or its runner)."""
    if target.runner is not None:
        return target.runner(argv, timeout)
    return kn.run_in_netns(target.netns, argv, check=False, timeout=timeout)


def hosts_line(target: Target) -> str:
    """The /etc/hosts line that sends `target.host` to `target.address`."""
    return f"{target.address} {target.host}\n"


def with_hosts(target: Target, argv: list[str]) -> list[str]:
    """`argv` run with `target.hosts_file` as /etc/hosts (for HTTPS targets that have one)."""
    if not target.tls or target.hosts_file is None:
        return argv
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        str(target.hosts_file),
        *argv,
    ]


# --- wrk ----------------------------------------------------------------------------


def wrk_argv(
    target: Target,
    *,
    seconds: float,
    connections: int,
    threads: int,
    close: bool = False,
    latency: bool = False,
    path: str = "/",
) -> list[str]:
    threads = min(threads, connections)  # wrk refuses fewer connections than threads
    argv = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        f"--timeout={max(2, round(seconds))}s",
        "--header",
        f"Host: {target.host}",
    ]
    if close:
        argv += ["--header", "Connection: close"]
    if latency:
        argv.append("--latency")
    argv.append(target.url(path))
    return argv


def run_wrk(
    target: Target,
    *,
    seconds: float,
    connections: int,
    threads: int,
    close: bool = False,
    latency: bool = False,
) -> WrkResult:
    argv = wrk_argv(
        target,
        seconds=seconds,
        connections=connections,
        threads=threads,
        close=close,
        latency=latency,
    )
    argv = with_hosts(target, argv)
    try:
        done = run_client(target, argv, seconds + WRK_GRACE_S)
    except kn.NetError as exc:
        raise LoadError("wrk_failed", exc.detail) from exc
    if done.returncode != 0:
        out = (done.stderr + done.stdout).strip().replace("\n", " | ")
        raise LoadError("wrk_failed", f"exit {done.returncode}: {out[:300]}")
    try:
        return parse_wrk(done.stdout)
    except ParseError as exc:
        raise LoadError(exc.reason, exc.detail) from exc


# --- bulk ---------------------------------------------------------------------------


def curl_argv(
    target: Target, nbytes: int, max_time_s: float, *, path: str | None = None
) -> list[str]:
    argv = [
        "curl",
        "--silent",
        "--show-error",
        "--output",
        "/dev/null",
        "--max-time",
        f"{max_time_s:.0f}",
        "--header",
        f"Host: {target.host}",
        "--write-out",
        CURL_WRITE_OUT,
    ]
    if target.tls:
        argv += ["--resolve", f"{target.host}:{target.port}:{target.address}"]
        if target.ca_file is not None:
            argv += ["--cacert", str(target.ca_file)]
    argv.append(target.url(path if path is not None else f"/bytes/{nbytes}"))
    return argv


def get_status(target: Target, path: str = "/", *, max_time_s: float = 3.0) -> int:
    """The HTTP status of one `GET path` with curl (HTTPS verified against `ca_file`)."""
    argv = curl_argv(target, 0, max_time_s, path=path)
    try:
        done = run_client(target, argv, max_time_s + 5)
    except kn.NetError as exc:
        raise LoadError("curl_failed", exc.detail) from exc
    if done.returncode != 0:
        raise LoadError("curl_failed", f"exit {done.returncode}: {done.stderr.strip()[:300]}")
    try:
        return int(done.stdout.split()[0])
    except (IndexError, ValueError) as exc:
        raise LoadError("curl_output", f"unexpected curl output {done.stdout.strip()!r}") from exc


def run_bulk(target: Target, nbytes: int, *, max_time_s: float = 120.0) -> BulkResult:
    try:
        done = run_client(target, curl_argv(target, nbytes, max_time_s), max_time_s + 10)
    except kn.NetError as exc:
        raise LoadError("curl_failed", exc.detail) from exc
    if done.returncode != 0:
        raise LoadError("curl_failed", f"exit {done.returncode}: {done.stderr.strip()[:300]}")
    try:
        return parse_curl(done.stdout, expect_bytes=nbytes)
    except ParseError as exc:
        raise LoadError(exc.reason, exc.detail) from exc


# --- DNS ----------------------------------------------------------------------------


def resolve_a(
    ns: str, server: IPv4Address, name: str, *, timeout_s: float = 3.0
) -> list[IPv4Address]:
    """The A records for `name`, asked of `server` from inside `ns`."""
    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        sock = kn.netns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
    except kn.NetError as exc:
        raise LoadError("dns_failed", exc.detail) from exc
    with sock:
        try:
            reply = dns.query.udp(query, str(server), timeout=timeout_s, sock=sock)
        except (dns.exception.DNSException, OSError) as exc:
            raise LoadError("dns_failed", f"{name} @{server} from {ns}: {exc!r}") from exc
    if reply.rcode() != dns.rcode.NOERROR:
        raise LoadError("dns_refused", f"{name} @{server}: {dns.rcode.to_text(reply.rcode())}")
    out = [
        IPv4Address(rdata.address)
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.A
        for rdata in rrset
    ]
    if not out:
        raise LoadError("dns_empty", f"{name} @{server}: no A record")
    return out


# --- /proc --------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError) as exc:
        raise LoadError("proc_failed", f"VmRSS of {pid}: {exc}") from exc
    raise LoadError("proc_failed", f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        raise LoadError("proc_failed", f"fds of {pid}: {exc}") from exc


# --- idle connections: the parent side -----------------------------------------------


@dataclass(frozen=True, slots=True)
class IdleOpened:
    opened: int
    failed: int
    seconds: float
    first_error: str | None


class IdleHolder:
    """A child process in `target.netns` holding `count` idle keep-alive connections.

    with IdleHolder(target, 10_000) as holder:
        opened = holder.open()      # blocks until all are open (or failed)
        ... measure ...
        alive = holder.alive()      # how many are still open
    # leaving the block closes them and reaps the child
    """

    def __init__(
        self,
        target: Target,
        count: int,
        *,
        python: str = sys.executable,
        open_timeout_s: float = 180.0,
    ) -> None:
        self.target = target
        self.count = count
        self.python = python
        self.open_timeout_s = open_timeout_s
        self._proc: subprocess.Popen[str] | None = None

    def argv(self) -> list[str]:
        return [
            self.python,
            "-m",
            IDLE_MODULE,
            "idle",
            "--address",
            str(self.target.address),
            "--port",
            str(self.target.port),
            "--host",
            self.target.host,
            "--count",
            str(self.count),
        ]

    def __enter__(self) -> Self:
        try:
            self._proc = kn.popen_in_netns(
                self.target.netns,
                self.argv(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except kn.NetError as exc:
            raise LoadError("idle_start_failed", exc.detail) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _proc_or_raise(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise LoadError("idle_not_started", "IdleHolder used outside its with-block")
        return self._proc

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        proc = self._proc_or_raise()
        assert proc.stdout is not None
        line = _readline(proc.stdout, timeout_s)
        if not line:
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            raise LoadError("idle_failed", f"holder gave no answer: {err.strip()[-300:]}")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise LoadError("idle_failed", f"holder said {line.strip()[:200]!r}") from exc
        if not isinstance(reply, dict):
            raise LoadError("idle_failed", f"holder said {line.strip()[:200]!r}")
        return reply

    def _send(self, command: str) -> None:
        proc = self._proc_or_raise()
        assert proc.stdin is not None
        try:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        except OSError as exc:
            raise LoadError("idle_failed", f"holder is gone: {exc}") from exc

    def open(self) -> IdleOpened:
        reply = self._reply(self.open_timeout_s)
        if reply.get("event") != "ready":
            raise LoadError("idle_failed", f"holder said {reply}")
        return IdleOpened(
            opened=int(reply["opened"]),
            failed=int(reply["failed"]),
            seconds=float(reply["seconds"]),
            first_error=reply.get("first_error"),
        )

    def alive(self) -> int:
        self._send("check")
        reply = self._reply(30.0)
        return int(reply.get("alive", 0))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: close every connection and exit
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _readline(stream: IO[str], timeout_s: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        raise LoadError("idle_timeout", f"no answer from the holder within {timeout_s:.0f}s")
    return stream.readline()


# --- idle connections: the child -------------------------------------------------------


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _read_response(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError("closed before the response headers")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise ConnectionError(f"status line {status[:60]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError("closed inside the response body")
        body += chunk


async def _open_one(
    address: str, port: int, request: bytes, gate: asyncio.Semaphore
) -> socket.socket:
    loop = asyncio.get_running_loop()
    async with gate:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(IDLE_CONNECT_TIMEOUT_S):
                await loop.sock_connect(sock, (address, port))
                await loop.sock_sendall(sock, request)
                await _read_response(loop, sock)
        except BaseException:
            sock.close()
            raise
        return sock


def _is_open(sock: socket.socket) -> bool:
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _hold(address: str, port: int, host: str, count: int) -> int:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode()
    gate = asyncio.Semaphore(IDLE_CONCURRENCY)
    start = time.monotonic()
    results = await asyncio.gather(
        *(_open_one(address, port, request, gate) for _ in range(count)), return_exceptions=True
    )
    socks = [r for r in results if isinstance(r, socket.socket)]
    failures = [r for r in results if not isinstance(r, socket.socket)]
    _emit(
        {
            "event": "ready",
            "opened": len(socks),
            "failed": len(failures),
            "seconds": time.monotonic() - start,
            "first_error": repr(failures[0]) if failures else None,
        }
    )
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "close":
                break
            if line.strip() == "check":
                _emit({"event": "alive", "alive": sum(map(_is_open, socks))})
    finally:
        for sock in socks:
            sock.close()
    return 0


def idle_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egressd-bench-idle")
    sub = parser.add_subparsers(dest="verb", required=True)
    idle = sub.add_parser("idle", help="hold N idle keep-alive connections (stdin: check|close)")
    idle.add_argument("--address", required=True)
    idle.add_argument("--port", type=int, default=80)
    idle.add_argument("--host", required=True)
    idle.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    _raise_nofile(args.count + IDLE_NOFILE_SLACK)
    return asyncio.run(_hold(args.address, args.port, args.host, args.count))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(idle_main())
