"""The three measured paths: set up, describe, tear down.

Every path ends at the same server, the fleet's "internet" (`egd-inet`,
`api.allowed.test` = 203.0.113.10:80), and gives a `Target`: the namespace
the load generators run in, the address and the Host header.

    kernel   {prefix}direct  eth0 203.0.113.200/24 --veth-- br-inet ({prefix}net)
    squid    {prefix}sqcl    eth0 198.51.100.2/24, 203.0.113.0/24 via .1
                |
             {prefix}squid   cl0 198.51.100.1/24, inet0 203.0.113.201/24 -- br-inet
                             nft: iifname cl0 tcp dport 80 redirect to :3129
                             squid -N: http_port 3129 intercept
    egressd  {prefix}sbx-*   a sandbox registered with node1's agent: tier 1,
                             GENEVE to a proxy, tier 2, relay from the proxy's
                             egress address

198.51.100.0/24 (TEST-NET-2) exists only on the veth between the Squid
client and the Squid namespace. The Squid namespace keeps ip_forward=0: only
what nftables redirects to Squid gets through, everything else from the
client dies there. No bench namespace has a default route.

Setup is idempotent and starts by removing what a crashed run may have left
(namespaces of these names, and the processes inside them); teardown removes
namespaces, nftables tables, Squid and its temporary directory, and is safe to
call after a failed or partial setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import pwd
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from egressd.agent.client import AgentClient, AgentClientError, SandboxInfo
from egressd.errors import EgressdError
from egressd.layout import INET_BRIDGE, INET_DNS, INTERNET, NET_NS, RESOLVER, Layout
from egressd.net import netns as kn
from egressd_harness.bench.load import LoadError, Target, get_status, hosts_line, resolve_a
from egressd_harness.bench.report import EGRESSD, EGRESSD_INTERCEPT, KERNEL, SQUID, SQUID_BUMP
from egressd_harness.topology import interception, network, procs
from egressd_harness.topology.fleet import Fleet, FleetError
from egressd_harness.topology.probe import ProbeError, http_request

IPv4Address = ipaddress.IPv4Address
IPv4Interface = ipaddress.IPv4Interface
IPv4Network = ipaddress.IPv4Network

log = structlog.get_logger("egressd_harness.bench")

SITE = "api.allowed.test"
HTTP_PORT = 80
LOOPBACK = "lo"

DIRECT_PART = "direct"
DIRECT_PORT = "i-bdirect"  # bridge side, inside {prefix}net
DIRECT_ADDR = IPv4Interface("203.0.113.200/24")

SQUID_PART = "squid"
SQUID_CLIENT_PART = "sqcl"
SQUID_BRIDGE_PORT = "i-bsquid"
SQUID_INET_IF = "inet0"
SQUID_CLIENT_SIDE_IF = "cl0"
CLIENT_IF = "eth0"
SQUID_INET_ADDR = IPv4Interface("203.0.113.201/24")
SQUID_CLIENT_NET = IPv4Network("198.51.100.0/24")
SQUID_GATEWAY = IPv4Interface("198.51.100.1/24")
SQUID_CLIENT_ADDR = IPv4Interface("198.51.100.2/24")
SQUID_INTERCEPT_PORT = 3129
SQUID_FORWARD_PORT = 3128  # Squid wants one plain forward port; loopback only
SQUID_USER = "proxy"  # Debian's cache_effective_user
HTTPS_PORT = 443

# The interception rows (issue 12): a second Squid, bumping HTTPS, in its own
# pair of namespaces (same client network, its own address on br-inet).
SQUID_BUMP_PART = "sqtls"
SQUID_BUMP_CLIENT_PART = "sqtlscl"
SQUID_BUMP_BRIDGE_PORT = "i-bsqtls"
SQUID_BUMP_INET_ADDR = IPv4Interface("203.0.113.202/24")
SQUID_BUMP_PORT = 3130
SQUID_CERTGEN = "/usr/lib/squid/security_file_certgen"
BUMP_CA_CERT = "bump-ca.pem"
BUMP_CA_KEY = "bump-ca.key"
UPSTREAM_CA = "upstream-ca.pem"
HOSTS_FILE = "hosts"
# What the intercepting rule allows: `GET /` (wrk) and `GET /bytes/N` (bulk).
INTERCEPT_HTTP_ALLOW: tuple[dict[str, list[str]], ...] = (
    {"methods": ["GET"], "paths": ["/", "/bytes/*"]},
)
SQUID_NOFILE = 65536  # wanted; capped at this process's hard limit (no CAP_SYS_RESOURCE here)
NFT_TABLE = "egressd_bench"

# Every client namespace (the sandbox's too) gets these before it is measured.
# wrk closes first, so the client keeps each closed connection in TIME_WAIT
# for 60 s; connect() uses the even half of 32768-60999, so without reuse a
# client runs out of ports after ~14,000 connections to one server and the
# conn/s measure collapses to ~240/s (ports / 60 s) until they expire.
CLIENT_SYSCTLS: tuple[tuple[str, str], ...] = (("net.ipv4.tcp_tw_reuse", "1"),)

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0

# The bench job's policy: the one site on port 80, limits out of the way.
POLICY_LIMITS: dict[str, int] = {
    "max_connections": 65_536,
    "max_new_connections_per_s": 100_000,
    "ports_per_destination": 64_512,
    "bandwidth_bps": 100_000_000_000,
}


class PathError(EgressdError):
    """A path that could not be set up."""


class BenchPath(Protocol):
    name: str
    description: str

    def setup(self) -> Target: ...

    def teardown(self) -> None: ...

    def refresh(self) -> None:
        """Called before each measure (the egressd path resolves its name again)."""
        ...

    def processes(self) -> dict[str, int]:
        """The proxy processes of this path (name -> PID), for memory figures."""
        ...

    def cpu_roots(self) -> dict[str, int]:
        """The processes whose trees' CPU time the path costs (name -> PID), issue 10."""
        ...


def bench_ns(prefix: str, part: str) -> str:
    return kn.check_netns_name(f"{prefix}{part}")


def tune_client(ns: str) -> None:
    """Apply CLIENT_SYSCTLS inside a client namespace."""
    for key, value in CLIENT_SYSCTLS:
        kn.set_sysctl(ns, key, value)


def _site_address(layout: Layout) -> IPv4Address:
    return layout.site(SITE).address


def _check_http(target: Target, *, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll `GET /` through the path until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        try:
            if target.tls:  # curl, verifying the proxy's leaf against `target.ca_file`
                status = get_status(target)
            else:
                status = http_request(
                    target.netns,
                    "GET",
                    str(target.address),
                    target.port,
                    "/",
                    headers={"Host": target.host},
                    timeout_s=2.0,
                ).status
            if status == 200:
                return
            last = f"HTTP {status}"
        except ProbeError as exc:
            last = exc.detail
        except LoadError as exc:
            last = f"{exc.reason}: {exc.detail}"
        if time.monotonic() > deadline:
            raise PathError("path_not_working", f"GET / from {target.netns}: {last}")
        time.sleep(0.2)


# --- leftovers ----------------------------------------------------------------------


def _netns_inode(ns: str) -> int | None:
    try:
        return os.stat(kn.netns_path(ns)).st_ino
    except OSError:
        return None


def pids_in_netns(ns: str) -> list[int]:
    """PIDs of the processes whose network namespace is `ns`."""
    inode = _netns_inode(ns)
    if inode is None:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            link = os.readlink(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if link == f"net:[{inode}]":
            out.append(int(entry))
    return out


def _stop_pids(pids: list[int], timeout_s: float = STOP_TIMEOUT_S) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def remove_bench_netns(ns: str) -> bool:
    """Stop whatever runs inside `ns` (a bench namespace only) and delete it."""
    _stop_pids(pids_in_netns(ns))
    return kn.delete_netns(ns)


# --- kernel path ----------------------------------------------------------------------


class DirectPath:
    """A client bridged onto br-inet: kernel forwarding only, no proxy."""

    name = KERNEL
    description = "kernel: client veth on br-inet, straight to the server"

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.ns = bench_ns(layout.prefix, DIRECT_PART)
        self.net_ns = network.netns_name(NET_NS, layout.prefix)

    def setup(self) -> Target:
        remove_bench_netns(self.ns)
        kn.ensure_netns(self.ns)
        kn.set_link_up(self.ns, LOOPBACK)
        kn.ensure_veth(self.net_ns, DIRECT_PORT, self.ns, CLIENT_IF)
        kn.enslave(self.net_ns, DIRECT_PORT, INET_BRIDGE)
        kn.set_link_up(self.net_ns, DIRECT_PORT)
        kn.set_link_up(self.ns, CLIENT_IF)
        kn.ensure_addr(self.ns, CLIENT_IF, DIRECT_ADDR)
        tune_client(self.ns)
        target = Target(self.ns, _site_address(self.layout), HTTP_PORT, SITE)
        _check_http(target)
        return target

    def teardown(self) -> None:
        remove_bench_netns(self.ns)

    def refresh(self) -> None:
        pass

    def processes(self) -> dict[str, int]:
        return {}

    def cpu_roots(self) -> dict[str, int]:
        return {}


# --- Squid ------------------------------------------------------------------------------


def squid_conf(
    workdir: Path,
    *,
    client_net: IPv4Network = SQUID_CLIENT_NET,
    dns: IPv4Address = INET_DNS,
    max_fds: int = SQUID_NOFILE,
) -> str:
    """A minimal transparent-proxy squid.conf: no cache, logs and PID in `workdir`.

    `server_persistent_connections off`: every client connection costs one
    upstream connection, as it does through egressd (an L4 relay cannot pool
    upstream connections); with pooling Squid would measure the server's
    keep-alive, not new connections.
    """
    return "\n".join(
        [
            f"http_port 127.0.0.1:{SQUID_FORWARD_PORT}",
            f"http_port {SQUID_INTERCEPT_PORT} intercept",
            f"acl bench_clients src {client_net}",
            "http_access allow bench_clients",
            "http_access deny all",
            "cache deny all",
            "workers 1",
            f"pid_filename {workdir / 'squid.pid'}",
            f"cache_log {workdir / 'cache.log'}",
            f"access_log stdio:{workdir / 'access.log'}",
            "cache_store_log none",
            f"coredump_dir {workdir}",
            "netdb_filename none",
            "pinger_enable off",
            f"dns_nameservers {dns}",
            "visible_hostname egressd-bench-squid",
            "server_persistent_connections off",
            "client_persistent_connections on",
            "shutdown_lifetime 1 seconds",
            f"max_filedescriptors {max_fds}",
            "",
        ]
    )


def squid_ruleset(
    client_if: str = SQUID_CLIENT_SIDE_IF, port: int = SQUID_INTERCEPT_PORT, dport: int = HTTP_PORT
) -> str:
    """`nft -f` script: TCP to `dport` from the client side goes to Squid (atomic replace)."""
    return "\n".join(
        [
            f"table ip {NFT_TABLE}",
            f"delete table ip {NFT_TABLE}",
            f"table ip {NFT_TABLE} {{",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f'    iifname "{client_if}" tcp dport {dport} redirect to :{port}',
            "  }",
            "}",
            "",
        ]
    )


def squid_nofile() -> int:
    """The descriptor limit Squid gets: SQUID_NOFILE, or the hard limit if lower."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return SQUID_NOFILE if hard == resource.RLIM_INFINITY else min(SQUID_NOFILE, hard)


def _raise_nofile() -> None:  # runs in the child before exec
    limit = squid_nofile()
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class SquidPath:
    """Debian's Squid intercepting port 80 between a client namespace and br-inet."""

    name = SQUID
    description = "squid: nft redirect to Squid's intercept port, Squid connects upstream"
    # Where this Squid lives (`SquidBumpPath` runs a second one beside it).
    part, client_part, bridge_port = SQUID_PART, SQUID_CLIENT_PART, SQUID_BRIDGE_PORT
    inet_addr, listen_port, site_port = SQUID_INET_ADDR, SQUID_INTERCEPT_PORT, HTTP_PORT

    def __init__(self, layout: Layout, *, squid: str = "squid") -> None:
        self.layout = layout
        self.squid = squid
        self.ns = bench_ns(layout.prefix, self.part)
        self.client_ns = bench_ns(layout.prefix, self.client_part)
        self.net_ns = network.netns_name(NET_NS, layout.prefix)
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _target(self) -> Target:
        return Target(self.client_ns, _site_address(self.layout), self.site_port, SITE)

    def _conf(self, workdir: Path) -> str:
        return squid_conf(workdir, max_fds=squid_nofile())

    def setup(self) -> Target:
        self.teardown()
        self._plumb()
        self._start_squid()
        target = self._target()
        try:
            _check_http(target)
        except PathError as exc:
            raise PathError(exc.reason, f"{exc.detail}; squid: {self.log_tail()}") from exc
        return target

    def _plumb(self) -> None:
        for ns in (self.ns, self.client_ns):
            kn.ensure_netns(ns)
            kn.set_link_up(ns, LOOPBACK)
        kn.set_sysctl(self.ns, "net.ipv4.ip_forward", "0")
        kn.ensure_veth(self.net_ns, self.bridge_port, self.ns, SQUID_INET_IF)
        kn.enslave(self.net_ns, self.bridge_port, INET_BRIDGE)
        kn.set_link_up(self.net_ns, self.bridge_port)
        kn.set_link_up(self.ns, SQUID_INET_IF)
        kn.ensure_addr(self.ns, SQUID_INET_IF, self.inet_addr)
        kn.ensure_veth(self.ns, SQUID_CLIENT_SIDE_IF, self.client_ns, CLIENT_IF)
        kn.set_link_up(self.ns, SQUID_CLIENT_SIDE_IF)
        kn.set_link_up(self.client_ns, CLIENT_IF)
        kn.ensure_addr(self.ns, SQUID_CLIENT_SIDE_IF, SQUID_GATEWAY)
        kn.ensure_addr(self.client_ns, CLIENT_IF, SQUID_CLIENT_ADDR)
        kn.ensure_route(self.client_ns, INTERNET, via=SQUID_GATEWAY.ip, dev=CLIENT_IF)
        tune_client(self.client_ns)
        try:
            ruleset = squid_ruleset(port=self.listen_port, dport=self.site_port)
            kn.run_in_netns(self.ns, ["nft", "-f", "-"], stdin_text=ruleset)
        except kn.NetError as exc:
            raise PathError("nft_failed", exc.detail) from exc

    def _start_squid(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="egressd-bench-squid-"))
        self.workdir.chmod(0o755)
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(SQUID_USER)
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
        conf = self.workdir / "squid.conf"
        conf.write_text(self._conf(self.workdir))
        # Squid checks its configuration first; a bad one fails here, with its message.
        try:
            kn.run_in_netns(self.ns, [self.squid, "-k", "parse", "-f", str(conf)])
        except kn.NetError as exc:
            raise PathError("squid_config", exc.detail) from exc
        out = open(self.workdir / "squid.out", "wb")  # noqa: SIM115 - the child owns it
        with out:
            try:
                self._proc = kn.popen_in_netns(
                    self.ns,
                    [self.squid, "-N", "-f", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    preexec_fn=_raise_nofile,
                )
            except kn.NetError as exc:
                raise PathError("squid_start_failed", exc.detail) from exc
            except subprocess.SubprocessError as exc:  # the preexec_fn failed
                raise PathError("squid_start_failed", str(exc)) from exc
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._listening():
            if self._proc.poll() is not None:
                raise PathError("squid_exited", f"exit {self._proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise PathError("squid_not_ready", self.log_tail())
            time.sleep(0.1)
        log.info("squid_started", pid=self._proc.pid, netns=self.ns, workdir=str(self.workdir))

    def _listening(self) -> bool:
        try:
            sock = kn.netns_socket(self.ns)
        except kn.NetError:
            return False
        with sock:
            sock.settimeout(0.5)
            try:
                sock.connect((str(SQUID_GATEWAY.ip), self.listen_port))
            except OSError:
                return False
        return True

    def log_tail(self, lines: int = 5) -> str:
        if self.workdir is None:
            return ""
        out = []
        for name in ("squid.out", "cache.log"):
            with contextlib.suppress(OSError):
                out += (self.workdir / name).read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(out)

    def refresh(self) -> None:
        pass

    def processes(self) -> dict[str, int]:
        proc = self._proc
        return {"squid": proc.pid} if proc is not None and proc.poll() is None else {}

    def cpu_roots(self) -> dict[str, int]:
        """Squid and its children (helpers such as security_file_certgen)."""
        return self.processes()

    def teardown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if kn.netns_exists(self.ns):
            with contextlib.suppress(kn.NetError):
                kn.run_in_netns(self.ns, ["nft", "delete", "table", "ip", NFT_TABLE], check=False)
        for ns in (self.client_ns, self.ns):
            remove_bench_netns(ns)
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


# --- Squid bumping HTTPS (issue 12) --------------------------------------------------------


def squid_bump_conf(
    workdir: Path,
    *,
    client_net: IPv4Network = SQUID_CLIENT_NET,
    dns: IPv4Address = INET_DNS,
    max_fds: int = SQUID_NOFILE,
    certgen: str = SQUID_CERTGEN,
) -> str:
    """squid.conf for `https_port ... intercept ssl-bump` with `ssl_bump bump all`.

    Squid peeks at the ClientHello (step 1, for the SNI), then bumps: it mints a
    leaf for the name from `BUMP_CA_*` (security_file_certgen, its database in
    `workdir`), and verifies the server against `UPSTREAM_CA` (the test CA).
    Unlike the plain row, `server_persistent_connections on`: Squid may keep
    and reuse its upstream TLS connections, which egressd (one upstream
    connection per client connection) cannot; without it every keep-alive
    request would cost Squid a new upstream handshake. The comparison is
    conservative for egressd.
    """
    return "\n".join(
        [
            f"http_port 127.0.0.1:{SQUID_FORWARD_PORT}",
            (
                f"https_port {SQUID_BUMP_PORT} intercept ssl-bump generate-host-certificates=on "
                f"dynamic_cert_mem_cache_size=16MB tls-cert={workdir / BUMP_CA_CERT} "
                f"tls-key={workdir / BUMP_CA_KEY}"
            ),
            f"sslcrtd_program {certgen} -s {workdir / 'ssl_db'} -M 16MB",
            "sslcrtd_children 4 startup=1 idle=1",
            "acl step1 at_step SslBump1",
            "ssl_bump peek step1",
            "ssl_bump bump all",
            f"tls_outgoing_options cafile={workdir / UPSTREAM_CA}",
            f"acl bench_clients src {client_net}",
            "http_access allow bench_clients",
            "http_access deny all",
            "cache deny all",
            "workers 1",
            f"pid_filename {workdir / 'squid.pid'}",
            f"cache_log {workdir / 'cache.log'}",
            f"access_log stdio:{workdir / 'access.log'}",
            "cache_store_log none",
            f"coredump_dir {workdir}",
            "netdb_filename none",
            "pinger_enable off",
            f"dns_nameservers {dns}",
            "visible_hostname egressd-bench-squid-bump",
            "server_persistent_connections on",
            "client_persistent_connections on",
            "shutdown_lifetime 1 seconds",
            f"max_filedescriptors {max_fds}",
            "",
        ]
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


def write_bump_ca(workdir: Path) -> Path:
    """A CA for this run's Squid (ECDSA P-256, as egressd's leaves): cert and key in `workdir`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egressd bench Squid bump CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = workdir / BUMP_CA_CERT
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = workdir / BUMP_CA_KEY
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path


class SquidBumpPath(SquidPath):
    """A second Squid, bumping HTTPS intercepted on port 443 (`ssl_bump bump`)."""

    name = SQUID_BUMP
    description = "squid-bump: nft redirect of :443 to Squid's https_port intercept ssl-bump"
    part, client_part, bridge_port = SQUID_BUMP_PART, SQUID_BUMP_CLIENT_PART, SQUID_BUMP_BRIDGE_PORT
    inet_addr, listen_port, site_port = SQUID_BUMP_INET_ADDR, SQUID_BUMP_PORT, HTTPS_PORT

    def _target(self) -> Target:
        assert self.workdir is not None
        target = Target(
            self.client_ns,
            _site_address(self.layout),
            HTTPS_PORT,
            SITE,
            tls=True,
            ca_file=self.workdir / BUMP_CA_CERT,
            hosts_file=self.workdir / HOSTS_FILE,
        )
        target.hosts_file.write_text(hosts_line(target))  # type: ignore[union-attr]
        return target

    def _conf(self, workdir: Path) -> str:
        write_bump_ca(workdir)
        shutil.copyfile(self.layout.run_dir / "ca" / "ca.pem", workdir / UPSTREAM_CA)
        db = workdir / "ssl_db"
        try:
            subprocess.run(
                [SQUID_CERTGEN, "-c", "-s", str(db), "-M", "16MB"],
                check=True,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PathError("squid_certgen_failed", str(exc)) from exc
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(SQUID_USER)
            for path in (workdir / BUMP_CA_KEY, workdir / BUMP_CA_CERT, db, *db.rglob("*")):
                os.chown(path, user.pw_uid, user.pw_gid)
        return squid_bump_conf(workdir, max_fds=squid_nofile())


# --- egressd ------------------------------------------------------------------------------


def bench_policy(job_id: str, node: str, *, intercept: bool = False) -> dict[str, object]:
    """The bench job's policy payload (the control plane adds iat/nbf/exp and signs).

    `intercept`: the interception row's job instead, HTTPS with `tls: intercept`
    and the requests the bench makes allowed by `http`.
    """
    rule: dict[str, object] = {"host": SITE, "ports": [HTTP_PORT]}
    if intercept:
        rule = {
            "host": SITE,
            "ports": [HTTPS_PORT],
            "tls": "intercept",
            "http": {"allow": [dict(a) for a in INTERCEPT_HTTP_ALLOW]},
        }
    return {
        "v": 1,
        "job_id": job_id,
        "account": "bench",
        "nodes": [node],
        "mode": "enforce",
        "egress": [rule],
        "limits": dict(POLICY_LIMITS),
    }


class EgressdPath:
    """A sandbox namespace registered with an agent; the load runs as a normal
    process in it (the network path, not gVisor's netstack)."""

    name = EGRESSD
    description = "egressd: sandbox netns -> tier 1 -> agent GENEVE -> proxy tier 2 -> relay"

    def __init__(self, fleet: Fleet, *, node: str = "node1") -> None:
        self.fleet = fleet
        self.node = node
        self.sandbox_id = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
        self.info: SandboxInfo | None = None

    def setup(self) -> Target:
        try:
            jws = self.fleet.sign_policy(self.policy(str(uuid.uuid4())))
        except (FleetError, ProbeError) as exc:
            raise PathError("policy_not_signed", f"{exc.reason}: {exc.detail}") from exc
        try:
            self.info = asyncio.run(self._register(jws))
        except AgentClientError as exc:
            raise PathError("sandbox_not_registered", f"{exc.reason}: {exc.detail}") from exc
        try:
            tune_client(self.info.netns)
        except kn.NetError as exc:
            raise PathError("sandbox_not_tunable", f"{exc.reason}: {exc.detail}") from exc
        target = self._resolve()
        _check_http(target)
        return target

    def _resolve(self) -> Target:
        """Ask the proxy's DNS for the site from the sandbox, as a UDF would."""
        assert self.info is not None
        try:
            answers = resolve_a(self.info.netns, RESOLVER, SITE)
        except LoadError as exc:
            raise PathError("sandbox_dns_failed", f"{exc.reason}: {exc.detail}") from exc
        expected = _site_address(self.fleet.layout)
        address = expected if expected in answers else answers[0]
        return self._target(self.info.netns, address)

    def policy(self, job_id: str) -> dict[str, object]:
        return bench_policy(job_id, self.node)

    def _target(self, netns: str, address: IPv4Address) -> Target:
        return Target(netns, address, HTTP_PORT, SITE)

    def refresh(self) -> None:
        """Resolve again (the proxy keeps DNS-learned names for their TTL, 60 s)."""
        with contextlib.suppress(PathError):
            self._resolve()

    async def _register(self, jws: str) -> SandboxInfo:
        async with AgentClient(self.fleet.agent_socket(self.node)) as agent:
            return await agent.register(self.sandbox_id, jws)

    async def _unregister(self) -> None:
        async with AgentClient(self.fleet.agent_socket(self.node)) as agent:
            await agent.unregister(self.sandbox_id)

    def processes(self) -> dict[str, int]:
        out = {}
        for proxy in self.fleet.layout.proxies:
            pid = procs.running_pid(self.fleet.run_dir, proxy.name)
            if pid is not None:
                out[proxy.name] = pid
        return out

    def cpu_roots(self) -> dict[str, int]:
        """Every proxy and the node's agent (tier 1's user-space half, the tunnel)."""
        out = EgressdPath.processes(self)
        if (pid := procs.running_pid(self.fleet.run_dir, self.node)) is not None:
            out[self.node] = pid
        return out

    def teardown(self) -> None:
        info, self.info = self.info, None
        if info is None:
            return
        try:
            asyncio.run(self._unregister())
        except AgentClientError as exc:
            log.warning(
                "sandbox_unregister_failed",
                sandbox_id=self.sandbox_id,
                reason=exc.reason,
                detail=exc.detail,
            )
            # The agent is gone or refused: do not leave its namespace behind.
            with contextlib.suppress(kn.NetError):
                kn.delete_netns(info.netns)


class EgressdInterceptPath(EgressdPath):
    """The egressd path with HTTPS to the site under `tls: intercept` (its own sandbox and job)."""

    name = EGRESSD_INTERCEPT
    description = (
        "egressd-intercept: sandbox netns -> ... -> proxy tier 2 -> TLS interception "
        "(leaf from the fleet's interception CA, verified upstream TLS)"
    )

    def __init__(self, fleet: Fleet, *, node: str = "node1") -> None:
        super().__init__(fleet, node=node)
        self.workdir: Path | None = None

    def policy(self, job_id: str) -> dict[str, object]:
        return bench_policy(job_id, self.node, intercept=True)

    def _target(self, netns: str, address: IPv4Address) -> Target:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="egressd-bench-intercept-"))
        target = Target(
            netns,
            address,
            HTTPS_PORT,
            SITE,
            tls=True,
            ca_file=interception.public_cert(self.fleet.run_dir),
            hosts_file=self.workdir / HOSTS_FILE,
        )
        target.hosts_file.write_text(hosts_line(target))  # type: ignore[union-attr]
        return target

    def teardown(self) -> None:
        super().teardown()
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
