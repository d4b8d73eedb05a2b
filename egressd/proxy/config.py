"""`egressd proxy serve` configuration: one JSON file, parsed once, then frozen.

Example (every key but `name`, `underlay` and `egress` has a default)::

    {
      "name": "proxy1",
      "underlay": "198.18.0.21",
      "egress": "203.0.113.21",
      "vni": 1,
      "control_url": "http://198.18.0.2:8080",
      "keys_dir": "/run/egressd/keys",
      "admin_port": 9090,
      "geneve_port": 6081,
      "tun": "gnv0",
      "tproxy_tcp_port": 15001,
      "tproxy_dns_port": 15053,
      "resolver": "100.100.100.53",
      "upstream_resolver": "203.0.113.53",
      "sandbox_supernet": "100.96.0.0/16",
      "fleet_ranges": ["198.18.0.0/24", "100.96.0.0/16", "100.100.100.53/32"],
      "flow_idle_s": 300,
      "max_flows": 262144,
      "node_refresh_s": 2,
      "mtu": 1436,
      "offload": false,
      "max_connections": 65536,
      "bandwidth_bps": 0,
      "egress_addresses": ["203.0.113.21"],
      "source_ports": "16384-32767",
      "min_ports_per_job": 64,
      "reserved_newcomers": 4,
      "port_reuse_delay_s": 60,
      "idle_timeout_s": 300,
      "max_lifetime_s": 86400,
      "pacing_horizon_s": 0.05,
      "dns_refusal_rcode": "NXDOMAIN",
      "digest_grace_s": 5,
      "datapath": "userspace"
    }

Decisions:

* Unknown keys are refused: a misspelt key would otherwise silently fall back
  to its default (e.g. a proxy trusting the wrong key directory).
* Every error is `ConfigError(reason="invalid_config", detail="FIELD: ...")`,
  one line that names the field.
* `keys_dir` holds the *public* keys this proxy trusts (`*.jwk`, `jwks.json`).
  The proxy never fetches keys from the network: a key served by the control
  plane's `/v1/keys` is only as trustworthy as the network path to it.
* The admin listener (`/metrics`, `/healthz`, `/readyz`) binds
  `underlay:admin_port` (DESIGN.md: TCP 9090 on the underlay address).
* `mtu` is the TUN's MTU, i.e. the largest inner packet: the underlay MTU
  minus the GENEVE overhead (1500 - 64 = 1436), so that every return packet
  plus its 64 bytes of encapsulation fits in one underlay frame.
* `datapath`: ``"userspace"`` (the default) carries every packet through
  `egressd.proxy.tunnel`; ``"kernel"`` loads `bpf/proxy.c` (`egressd.proxy.kernel`):
  tc validates and decapsulates on the underlay and encapsulates the return
  traffic, the Python endpoint is the slow path. Its bpffs and compiled object
  live in `state_dir` (default ``/run/egressd/proxy/NAME``).
* `workers` (kernel data path only): how many worker processes serve tier 2 (the
  interceptor, DNS, limits), 1..256, or ``"auto"``: the CPUs the proxy may run on
  (``len(os.sched_getaffinity(0))``, at most 256, and no more than the source ports
  can be split into while every slice keeps `min_ports_per_job` for
  `reserved_newcomers` + 1 jobs). Unset: `DEFAULT_KERNEL_WORKERS` on
  the kernel path, 1 on the userspace one. 1 is one process exactly as before; more starts a supervisor (`egressd.proxy.workers`) that keeps the host's
  parts once and a job's connections and DNS queries on one worker (`bpf/reuseport.c`).
  Proxy-wide `max_connections` and `bandwidth_bps` are split, ``value // N`` or one more
  per worker (adding up to the value; at least 1), and worker i takes the source ports p with ``p % N == i``. The userspace data
  path has one flow table in one process: only 1 is valid there.
* `nodes_decap_in_kernel` (kernel data path only; default false): the operator's
  statement that every node of the fleet decapsulates the proxy's GENEVE in the kernel
  (the node agents' ``"datapath": "kernel"``: tc decapsulates and redirects to the
  sandbox veth, whose receiver accepts a partial checksum). Then the proxy leaves its
  underlay's transmit checksum offload (and so TSO) as it finds it; otherwise it turns
  it off so that tc-encapsulated packets leave with finished inner checksums, which a
  node reading GENEVE from a UDP socket (the userspace agent) needs. Wrongly true, a
  userspace node drops the proxy's TCP segments (bad checksum): the safe default is
  false (`egressd.proxy.kernel._set_tx_checksum`).
* `offload` opens the TUN with a virtio-net header and TSO/checksum offloads
  and carries GSO super-packets in GENEVE with the offload option (see
  `egressd.proxy.tunnel`). Every node agent of the fleet must have the same
  setting: a node without it drops such datagrams (`offload_disabled`).
* Limits (`egressd.limits`): `max_connections` caps the proxy's concurrent
  connections; `bandwidth_bps` is the proxy-wide rate per direction (0: none);
  upstream sockets bind a source (address, port) from `egress_addresses` x
  `source_ports` (default: `egress` alone, 16384-32767, which lies below the
  kernel's ephemeral range 32768-60999 so that the proxy's own client sockets
  never take a port the allocator hands out); `min_ports_per_job` per
  destination are guaranteed to each job, with room kept for
  `reserved_newcomers` more; a port waits `port_reuse_delay_s` (TIME_WAIT)
  before it is used toward the same destination again. Relayed connections end
  after `idle_timeout_s` without traffic or `max_lifetime_s` in all.
  `egress_addresses` must contain `egress` (the address registered with the
  control plane); the others must be configured on the egress interface too.
* `dns_refusal_rcode` is the rcode of the DNS responder's refusals of a name
  (`egressd.proxy.dns.refusal_rcode`): "NXDOMAIN" (the default: glibc and musl
  fail at once with EAI_NONAME) or "REFUSED" (glibc retries and reports
  EAI_AGAIN; musl waits out its timeout).
* `digest_grace_s`: after a job's policy is replaced with other content, GENEVE
  datagrams with the old policy's digest are still accepted (and counted in
  `egressd_geneve_digest_grace_total`) for this long, then dropped
  (`stale_digest`): nodes get that long to follow the change
  (`egressd.proxy.digests`). 0..300 seconds.
* `interception_ca` (`{"cert": PATH, "key": PATH}`): the fleet's TLS
  interception CA (`egressd.control.interception_ca`; the key is the one
  secret a proxy holds for it), needed by rules with ``"tls": "intercept"``:
  without it such a rule's connections are denied
  (``tls_interception_unavailable``). Read at start; a bad pair stops the
  proxy. `upstream_ca_file`: the CA bundle that intercepted connections'
  servers are verified against (default: the system's trust store).
* `secrets_dir`: the directory of the secrets behind policies'
  ``http.credentials``, one file per secret named by it (a Kubernetes
  Secret volume, compose ``secrets:``; `egressd.proxy.secrets`). Read when a
  request needs a secret, re-read when its file changes; not checked at
  start (a secret missing then denies its requests,
  ``credential_unavailable``). Without it, every credential is unavailable.
* `fleet_ranges` defaults to the layout's (underlay, sandbox supernet,
  resolver): always denied by tier 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from egressd import layout
from egressd.config_reader import ConfigError as ConfigError  # re-exported
from egressd.config_reader import (
    as_address,
    as_bool,
    as_int,
    as_list,
    as_network,
    as_number,
    as_object,
    as_one_of,
    as_path,
    as_str,
    convert,
    read_json_file,
)
from egressd.limits.pacing import DEFAULT_HORIZON_S
from egressd.limits.ports import (
    DEFAULT_MIN_PER_JOB,
    DEFAULT_RESERVED_NEWCOMERS,
    DEFAULT_REUSE_DELAY_S,
    DEFAULT_SOURCE_PORTS,
    PortPoolConfig,
)
from egressd.limits.timeouts import DEFAULT_IDLE_S, DEFAULT_LIFETIME_S, Timeouts
from egressd.proxy.digests import DEFAULT_GRACE_S
from egressd.proxy.dns import DEFAULT_REFUSAL_RCODE, REFUSAL_RCODES
from egressd.proxy.limiting import DEFAULT_MAX_CONNECTIONS, LimitsConfig

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DEFAULT_CONTROL_URL = f"http://{layout.CONTROL_ADDR}:{layout.CONTROL_PORT}"
DEFAULT_KEYS_DIR = layout.DEFAULT_RUN_DIR / "keys"
DEFAULT_FLEET_RANGES: tuple[IPv4Network, ...] = (
    layout.UNDERLAY,
    layout.SANDBOX_SUPERNET,
    IPv4Network(f"{layout.RESOLVER}/32"),
)
MAX_CONFIG_BYTES = 64 * 1024
MIN_MTU = 576  # the smallest datagram every IPv4 host must accept
MAX_MTU = 65535 - layout.GENEVE_OVERHEAD


DATAPATHS = ("userspace", "kernel")
AUTO_WORKERS = "auto"
#: `workers` when unset on the kernel data path (docs/decisions.md, "Proxy workers").
DEFAULT_KERNEL_WORKERS: int | str = AUTO_WORKERS  # the e2e suite passed with it
MAX_WORKERS = 256  # egressd.proxy.reuseport.MAX_WORKERS (RP_MAX_WORKERS)
DEFAULT_STATE_ROOT = Path("/run/egressd/proxy")


@dataclass(frozen=True, slots=True)
class InterceptionCaPaths:
    """Where the interception CA's certificate and key are (`interception_ca`)."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything `egressd proxy serve` needs; `__post_init__` validates each field."""

    name: str
    underlay: IPv4Address
    egress: IPv4Address
    vni: int = layout.DEFAULT_VNI
    control_url: str = DEFAULT_CONTROL_URL
    keys_dir: Path = DEFAULT_KEYS_DIR
    admin_port: int = layout.ADMIN_PORT
    geneve_port: int = layout.GENEVE_PORT
    tun: str = layout.PROXY_TUN
    tproxy_tcp_port: int = 15001
    tproxy_dns_port: int = 15053
    resolver: IPv4Address = layout.RESOLVER
    upstream_resolver: IPv4Address = layout.INET_DNS
    sandbox_supernet: IPv4Network = layout.SANDBOX_SUPERNET
    fleet_ranges: tuple[IPv4Network, ...] = field(default=DEFAULT_FLEET_RANGES)
    flow_idle_s: float = 300.0
    max_flows: int = 262_144
    node_refresh_s: float = 2.0
    mtu: int = layout.SANDBOX_MTU
    offload: bool = False
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    bandwidth_bps: int = 0
    egress_addresses: tuple[IPv4Address, ...] = ()
    source_ports: tuple[int, int] = DEFAULT_SOURCE_PORTS
    min_ports_per_job: int = DEFAULT_MIN_PER_JOB
    reserved_newcomers: int = DEFAULT_RESERVED_NEWCOMERS
    port_reuse_delay_s: float = DEFAULT_REUSE_DELAY_S
    idle_timeout_s: float = DEFAULT_IDLE_S
    max_lifetime_s: float = DEFAULT_LIFETIME_S
    pacing_horizon_s: float = DEFAULT_HORIZON_S
    interception_ca: InterceptionCaPaths | None = None
    upstream_ca_file: Path | None = None
    secrets_dir: Path | None = None
    dns_refusal_rcode: str = DEFAULT_REFUSAL_RCODE
    digest_grace_s: float = DEFAULT_GRACE_S
    datapath: str = "userspace"
    state_dir: Path | None = None
    workers: int | str | None = None  # None: the data path's default (`worker_count`)
    nodes_decap_in_kernel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _is_name(self.name):
            raise ConfigError("name", "must match [a-z0-9][a-z0-9-]{0,62}")
        for name in ("underlay", "egress", "resolver", "upstream_resolver"):
            if not isinstance(getattr(self, name), IPv4Address):
                raise ConfigError(name, "must be an IPv4 address")
        if not isinstance(self.sandbox_supernet, IPv4Network):
            raise ConfigError("sandbox_supernet", "must be an IPv4 network")
        if not all(isinstance(n, IPv4Network) for n in self.fleet_ranges):
            raise ConfigError("fleet_ranges", "must be IPv4 networks")
        as_int("vni", self.vni, 0, 0xFFFFFF)
        for name in ("admin_port", "geneve_port", "tproxy_tcp_port", "tproxy_dns_port"):
            as_int(name, getattr(self, name), 1, 65535)
        ports = [self.tproxy_tcp_port, self.tproxy_dns_port]
        if len(set(ports)) != len(ports):
            raise ConfigError("tproxy_dns_port", "must differ from tproxy_tcp_port")
        as_int("mtu", self.mtu, MIN_MTU, MAX_MTU)
        if not isinstance(self.offload, bool):
            raise ConfigError("offload", "must be true or false")
        as_int("max_flows", self.max_flows, 1, 16_777_216)
        as_number("flow_idle_s", self.flow_idle_s, 1.0, 86_400.0, unit="seconds")
        as_number("node_refresh_s", self.node_refresh_s, 0.05, 3_600.0, unit="seconds")
        as_number("digest_grace_s", self.digest_grace_s, 0.0, 300.0, unit="seconds")
        if not isinstance(self.tun, str) or not _is_ifname(self.tun):
            raise ConfigError("tun", "must be an interface name of 1..15 characters [A-Za-z0-9_.-]")
        if not isinstance(self.keys_dir, Path):
            raise ConfigError("keys_dir", "must be a path")
        _check_url(self.control_url)
        if self.interception_ca is not None and not isinstance(
            self.interception_ca, InterceptionCaPaths
        ):
            raise ConfigError("interception_ca", 'must be {"cert": PATH, "key": PATH}')
        if self.upstream_ca_file is not None and not isinstance(self.upstream_ca_file, Path):
            raise ConfigError("upstream_ca_file", "must be a path")
        if self.secrets_dir is not None and not isinstance(self.secrets_dir, Path):
            raise ConfigError("secrets_dir", "must be a path")
        as_one_of("dns_refusal_rcode", self.dns_refusal_rcode, REFUSAL_RCODES)
        as_one_of("datapath", self.datapath, DATAPATHS)
        if self.state_dir is not None and not isinstance(self.state_dir, Path):
            raise ConfigError("state_dir", "must be a path")
        if not isinstance(self.nodes_decap_in_kernel, bool):
            raise ConfigError("nodes_decap_in_kernel", "must be true or false")
        if self.nodes_decap_in_kernel and self.datapath != "kernel":
            # The userspace path writes finished packets from Python: nothing to keep.
            raise ConfigError("nodes_decap_in_kernel", 'is only valid with "datapath": "kernel"')
        self._check_limits()
        self._check_workers()  # after the limits: a worker count must fit max_connections
        if self.resolver not in self.sandbox_supernet and not any(
            self.resolver in net for net in self.fleet_ranges
        ):
            # The resolver address is answered by the proxy itself; tier 2 must
            # never treat it as an internet destination.
            raise ConfigError("resolver", "must be inside sandbox_supernet or one of fleet_ranges")

    def _check_workers(self) -> None:
        if self.workers is None:
            pass
        elif isinstance(self.workers, str):
            if self.workers != AUTO_WORKERS:
                raise ConfigError("workers", f'must be an integer in 1..{MAX_WORKERS} or "auto"')
        else:
            as_int("workers", self.workers, 1, MAX_WORKERS)
        if self.datapath != "kernel" and self.workers not in (None, 1):
            raise ConfigError(
                "workers",
                'must be 1 with "datapath": "userspace" (its flow table lives in one process)',
            )
        count = self.worker_count
        if count > self.max_connections:
            # Each worker admits at least one connection: more workers than
            # max_connections would let the proxy hold more than it allows.
            raise ConfigError(
                "workers", f"{count} workers exceed max_connections ({self.max_connections})"
            )
        for index in range(count if count > 1 else 0):
            try:
                self.worker_port_pool(index)
            except ValueError as exc:
                raise ConfigError("workers", f"source_ports split {count} ways: {exc}") from None

    @property
    def worker_count(self) -> int:
        """`workers` as a number (``"auto"``: the CPUs this process may run on; unset: 1 on
        the userspace data path, `DEFAULT_KERNEL_WORKERS` on the kernel one)."""
        workers = self.workers
        if workers is None:
            workers = DEFAULT_KERNEL_WORKERS if self.datapath == "kernel" else 1
        if isinstance(workers, int):
            return workers
        # "auto" never splits the source ports so thin that a slice misses its guarantees.
        count = max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)), self.max_connections))
        while count > 1 and not self._slices_hold(count):
            count -= 1
        return count

    def _slices_hold(self, count: int) -> bool:
        try:
            for index in range(count):
                dataclasses.replace(self.port_pool, stride=count, offset=index)
        except ValueError:
            return False
        return True

    def worker_port_pool(self, index: int) -> PortPoolConfig:
        """Worker `index`'s slice of the source ports (the ports p with p % N == index)."""
        return dataclasses.replace(self.port_pool, stride=self.worker_count, offset=index)

    def _check_limits(self) -> None:
        as_int("max_connections", self.max_connections, 1, 1_048_576)
        as_int("bandwidth_bps", self.bandwidth_bps, 0, 100_000_000_000)
        if not all(isinstance(a, IPv4Address) for a in self.egress_addresses):
            raise ConfigError("egress_addresses", "must be IPv4 addresses")
        if self.egress_addresses and self.egress not in self.egress_addresses:
            raise ConfigError("egress_addresses", f"must contain egress {self.egress}")
        for name in ("min_ports_per_job", "reserved_newcomers"):
            as_int(name, getattr(self, name), 0, 65_535)
        as_number("port_reuse_delay_s", self.port_reuse_delay_s, 0.0, 3_600.0, unit="seconds")
        as_number("idle_timeout_s", self.idle_timeout_s, 0.1, 604_800.0, unit="seconds")
        as_number("max_lifetime_s", self.max_lifetime_s, 0.1, 2_592_000.0, unit="seconds")
        as_number("pacing_horizon_s", self.pacing_horizon_s, 0.001, 10.0, unit="seconds")
        try:
            self.port_pool  # noqa: B018 - building it validates it
        except ValueError as exc:
            raise ConfigError("source_ports", str(exc)) from None

    @property
    def port_pool(self) -> PortPoolConfig:
        """The source-port allocator's configuration; ValueError if it is inconsistent."""
        first, last = self.source_ports
        return PortPoolConfig(
            addresses=self.egress_addresses or (self.egress,),
            first_port=first,
            last_port=last,
            min_per_job=self.min_ports_per_job,
            reserved_newcomers=self.reserved_newcomers,
            reuse_delay_s=self.port_reuse_delay_s,
        )

    @property
    def limits(self) -> LimitsConfig:
        """The proxy-wide limits (`egressd.proxy.limiting`)."""
        return LimitsConfig(
            max_connections=self.max_connections,
            bandwidth_bps=self.bandwidth_bps,
            port_pool=self.port_pool,
            timeouts=Timeouts(idle_s=self.idle_timeout_s, lifetime_s=self.max_lifetime_s),
            pacing_horizon_s=self.pacing_horizon_s,
        )

    @property
    def kernel_state_dir(self) -> Path:
        """Where the kernel data path mounts its bpffs and builds its object."""
        return self.state_dir if self.state_dir is not None else DEFAULT_STATE_ROOT / self.name

    @property
    def admin_host(self) -> str:
        return str(self.underlay)


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


def _is_name(value: str) -> bool:
    return _NAME_RE.fullmatch(value) is not None


def _is_ifname(value: str) -> bool:
    return _IFNAME_RE.fullmatch(value) is not None


def _check_url(url: object) -> None:
    if not isinstance(url, str):
        raise ConfigError("control_url", "must be a string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("control_url", f"must be an http(s) URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError("control_url", "must not have a query or fragment")


# --- parsing the JSON file ------------------------------------------------------------


def _as_networks(name: str, value: object) -> tuple[IPv4Network, ...]:
    return as_list(name, value, as_network, what="IPv4 CIDR strings")


def _as_addresses(name: str, value: object) -> tuple[IPv4Address, ...]:
    return as_list(
        name, value, as_address, what="IPv4 address strings", nonempty=True, distinct=True
    )


def _as_port_range(name: str, value: object) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,5})-(\d{1,5})", value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(name, 'must be a port range string "FIRST-LAST"')
    first, last = int(match[1]), int(match[2])
    if not 1024 <= first <= last <= 65535:
        raise ConfigError(name, "must be a range FIRST <= LAST within 1024-65535")
    return first, last


def _as_interception_ca(name: str, value: object) -> InterceptionCaPaths:
    if not isinstance(value, Mapping) or set(value) != {"cert", "key"}:
        raise ConfigError(name, 'must be {"cert": PATH, "key": PATH}')
    return InterceptionCaPaths(
        cert=as_path(f"{name}.cert", value["cert"]), key=as_path(f"{name}.key", value["key"])
    )


def _as_workers(name: str, value: object) -> int | str:
    if value == AUTO_WORKERS:
        return AUTO_WORKERS
    return as_int(name, value, 1, MAX_WORKERS)


_CONVERTERS: Mapping[str, Callable[[str, object], Any]] = {
    "name": as_str,
    "underlay": as_address,
    "egress": as_address,
    "vni": as_int,
    "control_url": as_str,
    "keys_dir": as_path,
    "admin_port": as_int,
    "geneve_port": as_int,
    "tun": as_str,
    "tproxy_tcp_port": as_int,
    "tproxy_dns_port": as_int,
    "resolver": as_address,
    "upstream_resolver": as_address,
    "sandbox_supernet": as_network,
    "fleet_ranges": _as_networks,
    "flow_idle_s": as_number,
    "max_flows": as_int,
    "node_refresh_s": as_number,
    "mtu": as_int,
    "offload": as_bool,
    "max_connections": as_int,
    "bandwidth_bps": as_int,
    "egress_addresses": _as_addresses,
    "source_ports": _as_port_range,
    "min_ports_per_job": as_int,
    "reserved_newcomers": as_int,
    "port_reuse_delay_s": as_number,
    "idle_timeout_s": as_number,
    "max_lifetime_s": as_number,
    "pacing_horizon_s": as_number,
    "interception_ca": _as_interception_ca,
    "upstream_ca_file": as_path,
    "secrets_dir": as_path,
    "dns_refusal_rcode": as_str,
    "digest_grace_s": as_number,
    "datapath": as_str,
    "state_dir": as_path,
    "workers": _as_workers,
    "nodes_decap_in_kernel": as_bool,
}
_REQUIRED = ("name", "underlay", "egress")


def config_from_mapping(obj: object) -> ProxyConfig:
    """A `ProxyConfig` from a decoded JSON object; raises ConfigError."""
    known = {f.name for f in fields(ProxyConfig)}
    assert known == set(_CONVERTERS), "every field needs a converter"
    doc = as_object("", obj, known, required=_REQUIRED, what="a JSON object")
    return ProxyConfig(**convert("", doc, _CONVERTERS))


def config_to_mapping(config: ProxyConfig) -> dict[str, Any]:
    """The JSON object `config_from_mapping` reads back into an equal `ProxyConfig` (a
    supervisor hands its workers their configuration this way)."""
    out: dict[str, Any] = {}
    for f in fields(ProxyConfig):
        value = getattr(config, f.name)
        if value is None or value == f.default:
            continue
        if f.name == "source_ports":
            value = f"{value[0]}-{value[1]}"
        elif isinstance(value, InterceptionCaPaths):
            value = {"cert": str(value.cert), "key": str(value.key)}
        elif isinstance(value, tuple):
            value = [str(v) for v in value]
        elif isinstance(value, IPv4Address | IPv4Network | Path):
            value = str(value)
        out[f.name] = value
    return out


def load_config(path: Path | str) -> ProxyConfig:
    """Read and validate the JSON configuration file at `path`."""
    return config_from_mapping(read_json_file(path, MAX_CONFIG_BYTES))
