"""The node agent's configuration: one JSON file, parsed once into frozen dataclasses.

Example (`node-agent/agent.example.json`)::

    {
      "name": "node1",
      "underlay": "198.18.0.11",
      "sandbox_cidr": "100.96.1.0/24",
      "vni": 1,
      "proxies": [
        {"name": "proxy1", "underlay": "198.18.0.21"},
        {"name": "proxy2", "underlay": "198.18.0.22"}
      ],
      "keys_dir": "/run/egressd/keys"
    }

Every other key has a default (see `AgentConfig`). Unknown keys are
rejected: a misspelt key would otherwise silently keep its default. Every
error is a `ConfigError` whose `field` is the JSON path of the first thing
wrong (``"proxies[1].underlay"``, ``"health.down_after"``).

`datapath` (default "userspace") picks who carries packets: "userspace" is the
TUN read by Python (`egressd.agent.datapath`), "kernel" is tc eBPF
(`egressd.agent.kernel_datapath`, bpf/node.c: GENEVE encapsulation, Maglev proxy
choice, return decapsulation); "kernel" excludes `offload`.

`offload` (default false) opens the TUN with a virtio-net header and TSO /
checksum offloads (`egressd.agent.datapath`); every proxy of the fleet must
have the same setting.

The proxy list is static by default: it comes from this file, not from the
control plane's registry, so that the data path does not depend on the control
plane being up. Adding a proxy then means editing the file and restarting the
agent.

With `discovery` (``{"control_url": "http://198.18.0.2:8080", "interval_s": 5}``)
the agent also learns proxies from the control plane's ``GET /v1/proxies``
(`egressd.agent.discovery`): the proxies it uses are the static ones plus the
registered ones, refreshed every `interval_s`; `proxies` may then be empty.
A failed refresh keeps the last list, so the data path still does not depend
on the control plane being up. The same `control_url` turns on live policies
(`egressd.agent.policy_watch`): registrations are checked against the control
plane (fail closed) and its watch is followed.

`"sandbox_cidr": "auto"` (needs `discovery`) has the control plane pick this
node's sandbox CIDR: at start, before any networking is set up, the agent
registers itself (`PUT /v1/nodes/<name>` with `"sandbox_cidr": "auto"`, the
admin token from `registration.admin_token_file`, default
`/run/egressd/admin-token`) and uses the CIDR of the answer
(`egressd.agent.registration`). The same name gets the same CIDR back across
restarts. No answer within `registration.wait_s` (default 30; the control
plane may be starting), or a refusal (pool exhausted, unauthorized, conflict),
stops the start with one line: the agent never guesses a CIDR. "auto" is
spelt out, not implied by an absent `sandbox_cidr`: a config that forgot it
stays an error rather than silently depending on the control plane.
`registration` is accepted only with "auto". Until it is resolved,
`AgentConfig.sandbox_cidr` is None; `resolved()` gives the config to run.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from egressd import layout
from egressd.config_reader import ConfigError as ConfigError  # re-exported
from egressd.config_reader import (
    Converter,
    as_address,
    as_bool,
    as_int,
    as_list,
    as_network,
    as_number,
    as_object,
    as_path,
    as_str,
    child,
    convert,
    read_json_file,
)

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DEFAULT_AGENTS_DIR = layout.DEFAULT_RUN_DIR / "agents"
DEFAULT_KEYS_DIR = layout.DEFAULT_RUN_DIR / "keys"
DEFAULT_SANDBOX_NETNS_PREFIX = "egd-sbx-"
DEFAULT_ADMIN_TOKEN_FILE = layout.DEFAULT_RUN_DIR / "admin-token"
SANDBOX_CIDR_AUTO = "auto"
DATAPATH_USERSPACE = "userspace"
DATAPATH_KERNEL = "kernel"
DATAPATHS = (DATAPATH_USERSPACE, DATAPATH_KERNEL)
MAX_CONFIG_BYTES = 1 << 20

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_NETNS_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True, slots=True)
class ProxyEndpoint:
    """One egress proxy: its GENEVE endpoint and admin server live on `underlay`."""

    name: str
    underlay: IPv4Address


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Proxy health probing: GET http://<underlay>:<port>/healthz every `interval_s`."""

    interval_s: float = 1.0
    timeout_s: float = 0.5
    down_after: int = 3  # consecutive misses
    up_after: int = 2  # consecutive successes
    port: int = layout.ADMIN_PORT
    path: str = "/healthz"

    def __post_init__(self) -> None:
        if not 0.05 <= self.interval_s <= 60:
            raise ConfigError("health.interval_s", "must be in 0.05..60")
        if not 0.01 <= self.timeout_s <= self.interval_s:
            raise ConfigError("health.timeout_s", "must be in 0.01..interval_s")
        for name in ("down_after", "up_after"):
            if not 1 <= getattr(self, name) <= 100:
                raise ConfigError(f"health.{name}", "must be in 1..100")
        if not 1 <= self.port <= 65535:
            raise ConfigError("health.port", "must be in 1..65535")
        if not self.path.startswith("/"):
            raise ConfigError("health.path", "must start with /")


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """Proxy discovery: GET `control_url`/v1/proxies every `interval_s`."""

    control_url: str
    interval_s: float = 5.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.control_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("discovery.control_url", "must be an http(s) URL with a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("discovery.control_url", "must not have a path, query or fragment")
        if not 0.5 <= self.interval_s <= 3600:
            raise ConfigError("discovery.interval_s", "must be in 0.5..3600")
        if not 0.1 <= self.timeout_s <= 60:
            raise ConfigError("discovery.timeout_s", "must be in 0.1..60")

    @property
    def proxies_url(self) -> str:
        return self.control_url.rstrip("/") + "/v1/proxies"


@dataclass(frozen=True, slots=True)
class RegistrationSettings:
    """`"sandbox_cidr": "auto"`: how the agent registers itself to get its CIDR."""

    admin_token_file: Path = DEFAULT_ADMIN_TOKEN_FILE
    wait_s: float = 30.0  # retry an unreachable or failing (5xx) control plane this long

    def __post_init__(self) -> None:
        if not 0 <= self.wait_s <= 600:
            raise ConfigError("registration.wait_s", "must be in 0..600")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs; built by `load_config` or `parse_config`."""

    name: str
    underlay: IPv4Address
    # None: "auto", allocated by the control plane at start (`registration`).
    sandbox_cidr: IPv4Network | None
    proxies: tuple[ProxyEndpoint, ...]
    vni: int = layout.DEFAULT_VNI
    keys_dir: Path = DEFAULT_KEYS_DIR
    # Default: <run dir>/agents/<name>.sock (filled in by __post_init__).
    api_socket: Path = Path()
    admin_port: int = layout.ADMIN_PORT
    geneve_port: int = layout.GENEVE_PORT
    tun: str = layout.NODE_TUN
    resolver: IPv4Address = layout.RESOLVER
    fleet_ranges: tuple[IPv4Network, ...] = field(
        default=(layout.UNDERLAY, layout.SANDBOX_SUPERNET, IPv4Network(f"{layout.RESOLVER}/32"))
    )
    # The agent's own directory (default <run dir>/agents/<name>/): tier 1 mounts
    # its bpffs on `bpffs/` and caches the compiled object in `cache/`; the
    # per-sandbox records (for clean-up after a crash) are in `sandboxes/`.
    state_dir: Path = Path()
    sandbox_netns_prefix: str = DEFAULT_SANDBOX_NETNS_PREFIX
    sandbox_mtu: int = layout.SANDBOX_MTU
    health: HealthSettings = field(default_factory=HealthSettings)
    flow_idle_s: float = 300.0
    # TUN offloads (virtio-net header, TSO, GSO super-packets in GENEVE with the
    # offload option): every proxy of the fleet must have the same setting.
    offload: bool = False
    # "userspace": the TUN and GENEVE in Python; "kernel": bpf/node.c (egressd.agent.node).
    datapath: str = DATAPATH_USERSPACE
    # Learn proxies from the control plane too (None: the static list only).
    discovery: DiscoverySettings | None = None
    # Set when sandbox_cidr is "auto" (kept after it is resolved).
    registration: RegistrationSettings | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError("name", "must match [a-z0-9][a-z0-9-]{0,62}")
        if self.api_socket == Path():
            object.__setattr__(self, "api_socket", DEFAULT_AGENTS_DIR / f"{self.name}.sock")
        if self.state_dir == Path():
            object.__setattr__(self, "state_dir", DEFAULT_AGENTS_DIR / self.name)
        if "." in str(self.state_dir):
            # libbpf rewrites every "." in a pin path to "_", so tier 1's pins would land elsewhere.
            raise ConfigError(
                "state_dir", "must not contain '.' (libbpf rewrites dots in pin paths)"
            )
        if not 0 <= self.vni <= 0xFFFFFF:
            raise ConfigError("vni", "must be in 0..16777215")
        if self.sandbox_cidr is None:
            if self.discovery is None or self.registration is None:
                raise ConfigError(
                    "sandbox_cidr",
                    '"auto" needs discovery.control_url: the control plane allocates it',
                )
        elif self.sandbox_cidr.prefixlen > 29:
            raise ConfigError(
                "sandbox_cidr", "needs room for a gateway and sandboxes (/29 or more)"
            )
        if not self.proxies and self.discovery is None:
            raise ConfigError("proxies", "must not be empty (unless discovery is set)")
        names = [p.name for p in self.proxies]
        if len(set(names)) != len(names):
            raise ConfigError("proxies", "proxy names must be distinct")
        addrs = [p.underlay for p in self.proxies]
        if len(set(addrs)) != len(addrs):
            raise ConfigError("proxies", "proxy addresses must be distinct")
        if self.underlay in addrs:
            raise ConfigError("underlay", "is also a proxy's address")
        for key in ("admin_port", "geneve_port"):
            if not 1 <= getattr(self, key) <= 65535:
                raise ConfigError(key, "must be in 1..65535")
        if not _IFNAME.fullmatch(self.tun):
            raise ConfigError("tun", "must be an interface name of at most 15 characters")
        if not _NETNS_PREFIX.fullmatch(self.sandbox_netns_prefix):
            raise ConfigError("sandbox_netns_prefix", "must be 1..32 of [A-Za-z0-9_.-]")
        if not 576 <= self.sandbox_mtu <= layout.SANDBOX_MTU:
            raise ConfigError("sandbox_mtu", f"must be in 576..{layout.SANDBOX_MTU}")
        if not 1 <= self.flow_idle_s <= 3600:
            raise ConfigError("flow_idle_s", "must be in 1..3600")
        if not isinstance(self.offload, bool):
            raise ConfigError("offload", "must be true or false")
        if self.datapath not in DATAPATHS:
            raise ConfigError("datapath", f"must be one of {', '.join(DATAPATHS)}")
        if self.datapath == DATAPATH_KERNEL and self.offload:
            # The kernel path keeps GSO packets whole itself; offload is the TUN's option,
            # and its fragmented GENEVE from proxies is dropped by the kernel path.
            raise ConfigError("offload", 'is for "datapath": "userspace" only')

    @property
    def gateway(self) -> IPv4Address:
        """The sandboxes' default gateway: the first address of the sandbox CIDR."""
        return self.cidr.network_address + 1

    @property
    def cidr(self) -> IPv4Network:
        """The sandbox CIDR; ValueError while it is still "auto" (not resolved)."""
        if self.sandbox_cidr is None:
            raise ValueError('sandbox_cidr is "auto" and not resolved yet')
        return self.sandbox_cidr

    def resolved(self, cidr: IPv4Network) -> AgentConfig:
        """This config with the sandbox CIDR the control plane allocated (checked again)."""
        return replace(self, sandbox_cidr=cidr)

    def proxy(self, name: str) -> ProxyEndpoint:
        for proxy in self.proxies:
            if proxy.name == name:
                return proxy
        raise KeyError(name)


def _str(field: str, value: object) -> str:
    return as_str(field, value, nonempty=True)


def _abs_path(field: str, value: object) -> Path:
    return as_path(field, value, absolute=True)


def _fleet_ranges(field: str, value: object) -> tuple[IPv4Network, ...]:
    return as_list(field, value, as_network, what="IPv4 CIDR strings")


def _object(
    field: str, value: object, known: frozenset[str], what: str, required: tuple[str, ...] = ()
) -> Mapping[str, object]:
    return as_object(
        field,
        value,
        known,
        required=required,
        what=what,
        unknown="unknown key",
        missing="is required",
    )


def _sandbox_cidr(field: str, value: object) -> IPv4Network | None:
    if value == SANDBOX_CIDR_AUTO:
        return None
    try:
        return as_network(field, value)
    except ConfigError as exc:
        raise ConfigError(field, f'{exc.problem} (or "auto")') from exc


def _proxy(field: str, value: object) -> ProxyEndpoint:
    item = _object(field, value, _PROXY_KEYS, "an object {name, underlay}", ("name", "underlay"))
    name = _str(child(field, "name"), item["name"])
    if not _NAME.fullmatch(name):
        raise ConfigError(child(field, "name"), "must match [a-z0-9][a-z0-9-]{0,62}")
    return ProxyEndpoint(name, as_address(child(field, "underlay"), item["underlay"]))


def _proxies(field: str, value: object) -> tuple[ProxyEndpoint, ...]:
    return as_list(field, value, _proxy, what="{name, underlay} objects")


def _discovery(field: str, value: object) -> DiscoverySettings:
    doc = _object(
        field,
        value,
        frozenset(_DISCOVERY),
        "an object {control_url, interval_s, timeout_s}",
        ("control_url",),
    )
    return DiscoverySettings(**convert(field, doc, _DISCOVERY))


def _registration(field: str, value: object) -> RegistrationSettings:
    doc = _object(field, value, frozenset(_REGISTRATION), "an object {admin_token_file, wait_s}")
    return RegistrationSettings(**convert(field, doc, _REGISTRATION))


def _health(field: str, value: object) -> HealthSettings:
    kwargs = convert(field, _object(field, value, frozenset(_HEALTH), "an object"), _HEALTH)
    if "timeout_s" not in kwargs and "interval_s" in kwargs:
        kwargs["timeout_s"] = min(0.5, kwargs["interval_s"])
    return HealthSettings(**kwargs)


_DISCOVERY: Mapping[str, Converter[object]] = {
    "control_url": _str,
    "interval_s": as_number,
    "timeout_s": as_number,
}
_REGISTRATION: Mapping[str, Converter[object]] = {
    "admin_token_file": _abs_path,
    "wait_s": as_number,
}
_HEALTH: Mapping[str, Converter[object]] = {
    "interval_s": as_number,
    "timeout_s": as_number,
    "down_after": as_int,
    "up_after": as_int,
    "port": as_int,
    "path": _str,
}
_PROXY_KEYS = frozenset({"name", "underlay"})
# The keys with a default and no cross-field meaning at parse time.
_OPTIONAL: Mapping[str, Converter[object]] = {
    "vni": as_int,
    "keys_dir": _abs_path,
    "api_socket": _abs_path,
    "state_dir": _abs_path,
    "admin_port": as_int,
    "geneve_port": as_int,
    "sandbox_mtu": as_int,
    "tun": _str,
    "sandbox_netns_prefix": _str,
    "resolver": as_address,
    "fleet_ranges": _fleet_ranges,
    "flow_idle_s": as_number,
    "health": _health,
    "offload": as_bool,
    "datapath": _str,
}
_TOP_KEYS = frozenset(
    {"name", "underlay", "sandbox_cidr", "proxies", "discovery", "registration", *_OPTIONAL}
)


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate the agent's JSON configuration file."""
    return parse_config(read_json_file(path, MAX_CONFIG_BYTES))


def parse_config(obj: object) -> AgentConfig:
    """Validate a decoded JSON object and build an `AgentConfig`."""
    if not isinstance(obj, Mapping):
        raise ConfigError("$", "must be a JSON object")
    # With discovery the static list may be absent: the control plane's registry fills it.
    required = ("name", "underlay", "sandbox_cidr") + (() if "discovery" in obj else ("proxies",))
    doc = _object("", obj, _TOP_KEYS, "a JSON object", required)
    kwargs: dict[str, Any] = {
        "name": _str("name", doc["name"]),
        "underlay": as_address("underlay", doc["underlay"]),
        "sandbox_cidr": _sandbox_cidr("sandbox_cidr", doc["sandbox_cidr"]),
        "proxies": _proxies("proxies", doc.get("proxies", [])),
    }
    if "discovery" in doc:
        kwargs["discovery"] = _discovery("discovery", doc["discovery"])
    if kwargs["sandbox_cidr"] is None:
        kwargs["registration"] = _registration("registration", doc.get("registration", {}))
    elif "registration" in doc:
        raise ConfigError("registration", 'only with "sandbox_cidr": "auto"')
    kwargs.update(convert("", doc, _OPTIONAL))
    return AgentConfig(**kwargs)
