"""What the deploy entry points (`python -m egressd_harness.deploy proxy|node`) take from
the environment: read once, checked, frozen.

Every variable has the compose fleet's value as its default (DESIGN.md's
address plan), so deploy/compose.yaml sets none of them beyond what it always
set (the node's name and sandbox CIDR). A cluster sets them
(deploy/kubernetes): addresses from the downward API, names from the pod and
node, the control plane's URL and the cluster's ranges from a ConfigMap.

    EGRESSD_CONTROL_URL       http(s)://HOST[:PORT] of the control plane
    EGRESSD_UNDERLAY_ADDRESS  this member's underlay address (unset: the one
                              address in 198.18.0.0/24 on this container's interfaces)
    EGRESSD_EGRESS_ADDRESS    a proxy's egress address (unset: the one in 203.0.113.0/24)
    EGRESSD_PROXY_NAME        a proxy's name (unset: proxy-N, N the underlay's last byte)
    EGRESSD_NODE_NAME         a node's name (unset: node1)
    EGRESSD_SANDBOX_CIDR      a node's sandbox CIDR inside 100.96.0.0/16 (unset: 100.96.1.0/24),
                              or `auto`: the node's agent registers itself and the
                              control plane allocates one from its pool (a DaemonSet,
                              whose pods all get the same environment, sets `auto`)
    EGRESSD_UNDERLAY_RANGES   comma-separated networks the fleet and its hosts live on,
                              always denied to sandboxes (unset: 198.18.0.0/24); the
                              sandbox supernet and the resolver are added to them
    EGRESSD_DATAPATH          `kernel` (unset) or `userspace`: the data path of the
                              proxies and node agents (their configs' `datapath`; the
                              whole fleet must take one: a kernel node drops the
                              offloaded GENEVE of a userspace proxy). `kernel` needs
                              CAP_NET_ADMIN and CAP_SYS_ADMIN (bpffs, bpf(2)), and sets
                              the proxies' `nodes_decap_in_kernel` (their underlay
                              keeps its checksum offload and TSO)

A proxy's secrets (`proxy_secret_keys` maps them to its configuration):

    EGRESSD_SECRETS_DIR       the directory of credentials behind policies'
                              `http.credentials`, one file per secret (unset:
                              /run/secrets/egressd-credentials, the compose secret;
                              a Kubernetes Secret volume)
    EGRESSD_INTERCEPTION_CA_CERT, EGRESSD_INTERCEPTION_CA_KEY
                              the TLS interception CA (unset: /interception-ca/ca.pem
                              and ca.key, the compose volume only the control plane and
                              proxies mount); either file absent at start: no
                              interception (`tls_interception_unavailable`)
    EGRESSD_UPSTREAM_CA_FILE  what intercepted connections' servers are verified
                              against (unset: /fleet/ca/ca.pem, the test internet's
                              CA), or `system`: the system's trust store

Where things live in the container (the images' paths by default; deploy/kubernetes
leaves all but EGRESSD_FLEET_DIR unset):

    EGRESSD_RUN_DIR           the member's run directory (unset: /run/egressd)
    EGRESSD_FLEET_DIR         the shared `fleet` volume (unset: /fleet)
    EGRESSD_LOG_DIR           where each daemon's log lines are copied (unset:
                              /var/log/egressd, the `logs` volume)
    EGRESSD_UDFS              the UDFs a node's job API runs (unset:
                              /opt/egressd/app/sandbox/udfs, in the egressd-node image)

The compose load generator's run (`loadgen`, compose profile `load` only):

    EGRESSD_LOCUSTFILE        unset: /opt/egressd/loadtests/locustfile.py
    EGRESSD_LOAD_USERS        locust users, 1-1000 (unset: 10)
    EGRESSD_LOAD_RUN_TIME     locust's bounded run time, like 60s, 5m or 1h30m (unset: 60s)
    EGRESSD_LOAD_CLASS        the locustfile's user class (unset: Steady)

A value that does not parse is one `SettingsError` naming every bad variable,
raised before anything is written, registered or started.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from egressd.agent.config import DATAPATH_KERNEL, DATAPATHS
from egressd.errors import EgressdError
from egressd.layout import (
    CONTROL_ADDR,
    CONTROL_PORT,
    RESOLVER,
    SANDBOX_SUPERNET,
    UNDERLAY,
)

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

CONTROL_URL = "EGRESSD_CONTROL_URL"
UNDERLAY_ADDRESS = "EGRESSD_UNDERLAY_ADDRESS"
EGRESS_ADDRESS = "EGRESSD_EGRESS_ADDRESS"
PROXY_NAME = "EGRESSD_PROXY_NAME"
NODE_NAME = "EGRESSD_NODE_NAME"
SANDBOX_CIDR = "EGRESSD_SANDBOX_CIDR"
UNDERLAY_RANGES = "EGRESSD_UNDERLAY_RANGES"
DATAPATH = "EGRESSD_DATAPATH"
SECRETS_DIR = "EGRESSD_SECRETS_DIR"
INTERCEPTION_CA_CERT = "EGRESSD_INTERCEPTION_CA_CERT"
INTERCEPTION_CA_KEY = "EGRESSD_INTERCEPTION_CA_KEY"
UPSTREAM_CA_FILE = "EGRESSD_UPSTREAM_CA_FILE"
RUN_DIR = "EGRESSD_RUN_DIR"
FLEET_DIR = "EGRESSD_FLEET_DIR"
LOG_DIR = "EGRESSD_LOG_DIR"
UDFS = "EGRESSD_UDFS"
LOCUSTFILE = "EGRESSD_LOCUSTFILE"
LOAD_USERS = "EGRESSD_LOAD_USERS"
LOAD_RUN_TIME = "EGRESSD_LOAD_RUN_TIME"
LOAD_CLASS = "EGRESSD_LOAD_CLASS"
PROXY_SECRETS = (SECRETS_DIR, INTERCEPTION_CA_CERT, INTERCEPTION_CA_KEY, UPSTREAM_CA_FILE)
VARIABLES = (
    CONTROL_URL,
    UNDERLAY_ADDRESS,
    EGRESS_ADDRESS,
    PROXY_NAME,
    NODE_NAME,
    SANDBOX_CIDR,
    UNDERLAY_RANGES,
    DATAPATH,
    *PROXY_SECRETS,
)
# Paths inside the container: the images' own are right on compose and on a cluster.
DIRECTORIES = (RUN_DIR, FLEET_DIR, LOG_DIR, UDFS)
# Read by the compose-only `loadgen` role.
LOAD = (LOCUSTFILE, LOAD_USERS, LOAD_RUN_TIME, LOAD_CLASS)

# What each role reads; off the compose network each one needs a value (the
# compose defaults are DESIGN.md's addresses). deploy/kubernetes sets them all.
_PROXY_ADDRESSES = (CONTROL_URL, UNDERLAY_ADDRESS, EGRESS_ADDRESS, PROXY_NAME, UNDERLAY_RANGES)
ROLE_VARIABLES: dict[str, tuple[str, ...]] = {
    "proxy": (*_PROXY_ADDRESSES, *PROXY_SECRETS),
    "node": (CONTROL_URL, UNDERLAY_ADDRESS, NODE_NAME, SANDBOX_CIDR, UNDERLAY_RANGES),
}

COMPOSE_CONTROL_URL = f"http://{CONTROL_ADDR}:{CONTROL_PORT}"
COMPOSE_NODE_NAME = "node1"
COMPOSE_SANDBOX_CIDR = IPv4Network("100.96.1.0/24")
SANDBOX_CIDR_AUTO = "auto"
# The compose fleet's data path (issue 10): tc eBPF moves the packets, Python decides per
# connection. "userspace" (TUN and GENEVE in Python) stays selectable, fleet-wide.
DEFAULT_DATAPATH = DATAPATH_KERNEL
# The compose fleet's secrets: a file-based compose secret (a directory) mounted
# by proxies only, and the interception CA in a volume that only the control
# plane (which makes it) and proxies mount: never nodes, hence never sandboxes.
COMPOSE_SECRETS_DIR = Path("/run/secrets/egressd-credentials")
COMPOSE_INTERCEPTION_CA_DIR = Path("/interception-ca")
COMPOSE_UPSTREAM_CA_FILE = Path("/fleet/ca/ca.pem")
UPSTREAM_CA_SYSTEM = "system"
IMAGE_RUN_DIR = Path("/run/egressd")
IMAGE_FLEET_DIR = Path("/fleet")
IMAGE_LOG_DIR = Path("/var/log/egressd")
IMAGE_UDFS = Path("/opt/egressd/app/sandbox/udfs")
IMAGE_LOCUSTFILE = Path("/opt/egressd/loadtests/locustfile.py")
MAX_LOAD_USERS = 1000
# locust's `-t`: seconds, or hours/minutes/seconds in that order (each run is bounded).
_RUN_TIME = re.compile(r"[0-9]+|(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9]+s)?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
# The daemons' own name rule (control plane registry, agent and proxy configs).
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class SettingsError(EgressdError):
    """One or more EGRESSD_* variables have values the entry points cannot use."""


@dataclass(frozen=True, slots=True)
class DeploySettings:
    control_url: str = COMPOSE_CONTROL_URL
    underlay: IPv4Address | None = None
    egress: IPv4Address | None = None
    proxy_name: str | None = None
    node_name: str = COMPOSE_NODE_NAME
    # None: `auto` (the control plane allocates it when the agent registers).
    sandbox_cidr: IPv4Network | None = COMPOSE_SANDBOX_CIDR
    underlay_ranges: tuple[IPv4Network, ...] = (UNDERLAY,)
    datapath: str = DEFAULT_DATAPATH
    secrets_dir: Path = COMPOSE_SECRETS_DIR
    interception_ca_cert: Path = COMPOSE_INTERCEPTION_CA_DIR / "ca.pem"
    interception_ca_key: Path = COMPOSE_INTERCEPTION_CA_DIR / "ca.key"
    # None: `system` (the proxy's default trust store).
    upstream_ca_file: Path | None = COMPOSE_UPSTREAM_CA_FILE
    run_dir: Path = IMAGE_RUN_DIR
    fleet_dir: Path = IMAGE_FLEET_DIR
    log_dir: Path = IMAGE_LOG_DIR
    udfs: Path = IMAGE_UDFS
    locustfile: Path = IMAGE_LOCUSTFILE
    load_users: int = 10
    load_run_time: str = "60s"
    load_class: str = "Steady"
    # Which EGRESSD_* variables were set at all: a second node (loadgen) must name
    # itself and its CIDR, never fall back to node1's. Not part of the value.
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def fleet_ranges(self) -> tuple[IPv4Network, ...]:
        """What proxies (tier 2) and agents (tier 1) deny to every sandbox: the compose
        fleet's `Layout.fleet_ranges` by default."""
        fixed = (SANDBOX_SUPERNET, IPv4Network(f"{RESOLVER}/32"))
        return (*self.underlay_ranges, *(n for n in fixed if n not in self.underlay_ranges))


def from_env(env: Mapping[str, str]) -> DeploySettings:
    """The settings in `env` (os.environ); SettingsError naming each bad variable."""
    problems: list[str] = []
    values: dict[str, object] = {}

    def take(var: str, field: str, parse: Callable[[str], object]) -> None:
        raw = env.get(var)
        if raw is None:
            return
        try:
            if not raw.strip():
                raise ValueError("is set but empty")
            values[field] = parse(raw.strip())
        except ValueError as exc:
            problems.append(f"{var}={raw!r}: {exc}")

    take(CONTROL_URL, "control_url", _control_url)
    take(UNDERLAY_ADDRESS, "underlay", _address)
    take(EGRESS_ADDRESS, "egress", _address)
    take(PROXY_NAME, "proxy_name", _name)
    take(NODE_NAME, "node_name", _name)
    take(SANDBOX_CIDR, "sandbox_cidr", _sandbox_cidr)
    take(UNDERLAY_RANGES, "underlay_ranges", _ranges)
    take(DATAPATH, "datapath", _datapath)
    take(SECRETS_DIR, "secrets_dir", _path)
    take(INTERCEPTION_CA_CERT, "interception_ca_cert", _path)
    take(INTERCEPTION_CA_KEY, "interception_ca_key", _path)
    take(UPSTREAM_CA_FILE, "upstream_ca_file", _upstream_ca)
    take(RUN_DIR, "run_dir", _path)
    take(FLEET_DIR, "fleet_dir", _path)
    take(LOG_DIR, "log_dir", _path)
    take(UDFS, "udfs", _path)
    take(LOCUSTFILE, "locustfile", _path)
    take(LOAD_USERS, "load_users", _load_users)
    take(LOAD_RUN_TIME, "load_run_time", _run_time)
    take(LOAD_CLASS, "load_class", _identifier)
    if problems:
        raise SettingsError("bad_environment", "; ".join(problems))
    values["given"] = frozenset(v for v in (*VARIABLES, *DIRECTORIES, *LOAD) if v in env)
    return DeploySettings(**values)  # type: ignore[arg-type]


def _control_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host, like http://egressd-control:8080")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError("must not have a path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (the admin token is a file)")
    if ":" in parts.hostname:
        raise ValueError("must name an IPv4 address or a host name (the fleet is IPv4)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"bad port ({exc})") from None
    return raw.rstrip("/")


def proxy_secret_keys(
    s: DeploySettings, exists: Callable[[Path], bool] = Path.exists
) -> dict[str, object]:
    """A proxy's configuration keys for its secrets (`egressd.proxy.config`), replacing
    the local topology's (`Fleet.proxy_config`).

    `secrets_dir` is always set: its files are read when a request needs one
    (a Secret created later still works). `interception_ca` only when both
    files exist now, since the proxy reads the pair once at start and a missing
    one would stop it: without them intercepted rules are denied
    (``tls_interception_unavailable``), which is fail closed. `upstream_ca_file`
    is left out for `system`.
    """
    keys: dict[str, object] = {"secrets_dir": str(s.secrets_dir)}
    if exists(s.interception_ca_cert) and exists(s.interception_ca_key):
        keys["interception_ca"] = {
            "cert": str(s.interception_ca_cert),
            "key": str(s.interception_ca_key),
        }
    if s.upstream_ca_file is not None:
        keys["upstream_ca_file"] = str(s.upstream_ca_file)
    return keys


def by_address(url: str, resolve: Callable[[str], IPv4Address]) -> str:
    """`url` with its host name replaced by `resolve(host)`: what a proxy's config gets.

    A proxy counts the control plane among the fleet's addresses (denied to
    sandboxes) only when its `control_url` names it by address
    (`egressd.proxy.registry.static_members`; a name is logged as
    `control_plane_address_unknown`). A Kubernetes Service's cluster IP is
    fixed for the Service's life, so the name is resolved once, at start.
    https keeps its name: the certificate is checked against it.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme != "http" or host is None or _is_ipv4(host):
        return url
    address = resolve(host)
    netloc = f"{address}:{parts.port}" if parts.port is not None else str(address)
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_ipv4(text: str) -> bool:
    try:
        IPv4Address(text)
    except ValueError:
        return False
    return True


def _address(raw: str) -> IPv4Address:
    try:
        return IPv4Address(raw)
    except ValueError:
        raise ValueError("must be an IPv4 address") from None


def _name(raw: str) -> str:
    if not _NAME.fullmatch(raw):
        raise ValueError(
            "must be 1-63 characters [a-z0-9-], starting with a letter or digit "
            "(a Kubernetes node name with dots is not one)"
        )
    return raw


def _network(raw: str) -> IPv4Network:
    try:
        return IPv4Network(raw)
    except ValueError as exc:
        raise ValueError(f"{raw!r} is not an IPv4 network ({exc})") from None


def _sandbox_cidr(raw: str) -> IPv4Network | None:
    if raw == SANDBOX_CIDR_AUTO:
        return None
    net = _network(raw)
    if not net.subnet_of(SANDBOX_SUPERNET):
        raise ValueError(f"must lie inside the sandbox supernet {SANDBOX_SUPERNET}")
    if net.prefixlen > 29:
        raise ValueError("needs room for a gateway and sandboxes (/29 or more)")
    return net


def _path(raw: str) -> Path:
    if not raw.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\0" in raw:
        raise ValueError("must not contain NUL")
    return Path(raw)


def _upstream_ca(raw: str) -> Path | None:
    if raw == UPSTREAM_CA_SYSTEM:
        return None
    try:
        return _path(raw)
    except ValueError:
        raise ValueError(f"must be an absolute path or {UPSTREAM_CA_SYSTEM!r}") from None


def _load_users(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LOAD_USERS:
        raise ValueError(f"must be a whole number of users from 1 to {MAX_LOAD_USERS}")
    return int(raw)


def _run_time(raw: str) -> str:
    if not _RUN_TIME.fullmatch(raw) or not any(c in "123456789" for c in raw):
        raise ValueError("must be a run time above zero, like 60, 60s, 5m or 1h30m")
    return raw


def _datapath(raw: str) -> str:
    if raw not in DATAPATHS:
        raise ValueError(f"must be one of {', '.join(sorted(DATAPATHS))}")
    return raw


def _identifier(raw: str) -> str:
    if not _IDENTIFIER.fullmatch(raw):
        raise ValueError("must be a Python class name")
    return raw


def _ranges(raw: str) -> tuple[IPv4Network, ...]:
    nets = tuple(_network(part.strip()) for part in raw.split(",") if part.strip())
    if not nets:
        raise ValueError("names no network")
    return nets
