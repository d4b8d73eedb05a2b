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
from urllib.parse import urlsplit

from egressd import strictjson
from egressd.errors import EgressdError
from egressd.topology import layout

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DEFAULT_AGENTS_DIR = layout.DEFAULT_RUN_DIR / "agents"
DEFAULT_KEYS_DIR = layout.DEFAULT_RUN_DIR / "keys"
DEFAULT_SANDBOX_NETNS_PREFIX = "egd-sbx-"
DEFAULT_ADMIN_TOKEN_FILE = layout.DEFAULT_RUN_DIR / "admin-token"
SANDBOX_CIDR_AUTO = "auto"
MAX_CONFIG_BYTES = 1 << 20

_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_NETNS_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class ConfigError(EgressdError):
    """A configuration file that cannot be used; `field` names what is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        super().__init__("invalid_config", f"{field}: {detail}")


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


_TOP_KEYS = frozenset(
    {
        "name",
        "underlay",
        "sandbox_cidr",
        "vni",
        "proxies",
        "keys_dir",
        "api_socket",
        "admin_port",
        "geneve_port",
        "tun",
        "resolver",
        "fleet_ranges",
        "state_dir",
        "sandbox_netns_prefix",
        "sandbox_mtu",
        "health",
        "flow_idle_s",
        "offload",
        "discovery",
        "registration",
    }
)
_HEALTH_KEYS = frozenset({"interval_s", "timeout_s", "down_after", "up_after", "port", "path"})
_PROXY_KEYS = frozenset({"name", "underlay"})
_DISCOVERY_KEYS = frozenset({"control_url", "interval_s", "timeout_s"})
_REGISTRATION_KEYS = frozenset({"admin_token_file", "wait_s"})


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate the agent's JSON configuration file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("$", f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("$", f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        obj = strictjson.loads(data)
    except ValueError as exc:
        raise ConfigError("$", f"{path} is not JSON: {exc}") from exc
    return parse_config(obj)


def parse_config(obj: object) -> AgentConfig:
    """Validate a decoded JSON object and build an `AgentConfig`."""
    if not isinstance(obj, dict):
        raise ConfigError("$", "must be a JSON object")
    _reject_unknown(obj, _TOP_KEYS, "")
    kwargs: dict[str, object] = {
        "name": _str(_require(obj, "name"), "name"),
        "underlay": _addr(_require(obj, "underlay"), "underlay"),
        "sandbox_cidr": _sandbox_cidr(_require(obj, "sandbox_cidr")),
        # With discovery the static list may be absent: the control plane's registry fills it.
        "proxies": _proxies(
            _require(obj, "proxies") if "discovery" not in obj else obj.get("proxies", [])
        ),
    }
    if "discovery" in obj:
        kwargs["discovery"] = _discovery(obj["discovery"])
    if kwargs["sandbox_cidr"] is None:
        kwargs["registration"] = _registration(obj.get("registration", {}))
    elif "registration" in obj:
        raise ConfigError("registration", 'only with "sandbox_cidr": "auto"')
    if "vni" in obj:
        kwargs["vni"] = _int(obj["vni"], "vni")
    for key in ("keys_dir", "api_socket", "state_dir"):
        if key in obj:
            kwargs[key] = _path(obj[key], key)
    for key in ("admin_port", "geneve_port", "sandbox_mtu"):
        if key in obj:
            kwargs[key] = _int(obj[key], key)
    for key in ("tun", "sandbox_netns_prefix"):
        if key in obj:
            kwargs[key] = _str(obj[key], key)
    if "resolver" in obj:
        kwargs["resolver"] = _addr(obj["resolver"], "resolver")
    if "fleet_ranges" in obj:
        ranges = obj["fleet_ranges"]
        if not isinstance(ranges, list):
            raise ConfigError("fleet_ranges", "must be an array of CIDRs")
        kwargs["fleet_ranges"] = tuple(
            _net(item, f"fleet_ranges[{i}]") for i, item in enumerate(ranges)
        )
    if "flow_idle_s" in obj:
        kwargs["flow_idle_s"] = _number(obj["flow_idle_s"], "flow_idle_s")
    if "health" in obj:
        kwargs["health"] = _health(obj["health"])
    if "offload" in obj:
        if not isinstance(obj["offload"], bool):
            raise ConfigError("offload", "must be true or false")
        kwargs["offload"] = obj["offload"]
    return AgentConfig(**kwargs)  # type: ignore[arg-type]


def _reject_unknown(obj: Mapping[str, object], known: frozenset[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in known)
    if unknown:
        raise ConfigError(prefix + unknown[0], "unknown key")


def _require(obj: Mapping[str, object], key: str, prefix: str = "") -> object:
    if key not in obj:
        raise ConfigError(prefix + key, "is required")
    return obj[key]


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, "must be a non-empty string")
    return value


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(where, "must be an integer")
    return value


def _number(value: object, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(where, "must be a number")
    return float(value)


def _path(value: object, where: str) -> Path:
    text = _str(value, where)
    if not text.startswith("/"):
        raise ConfigError(where, "must be an absolute path")
    return Path(text)


def _addr(value: object, where: str) -> IPv4Address:
    try:
        return IPv4Address(_str(value, where))
    except ValueError as exc:
        raise ConfigError(where, f"not an IPv4 address: {value!r}") from exc


def _net(value: object, where: str) -> IPv4Network:
    text = _str(value, where)
    if "/" not in text:
        raise ConfigError(where, f"not a CIDR (needs a prefix length): {text!r}")
    try:
        return IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(where, f"not an IPv4 network: {exc}") from exc


def _sandbox_cidr(value: object) -> IPv4Network | None:
    if value == SANDBOX_CIDR_AUTO:
        return None
    try:
        return _net(value, "sandbox_cidr")
    except ConfigError as exc:
        raise ConfigError("sandbox_cidr", f'{exc.detail.split(": ", 1)[1]} (or "auto")') from exc


def _registration(value: object) -> RegistrationSettings:
    if not isinstance(value, dict):
        raise ConfigError("registration", "must be an object {admin_token_file, wait_s}")
    _reject_unknown(value, _REGISTRATION_KEYS, "registration.")
    kwargs: dict[str, object] = {}
    if "admin_token_file" in value:
        kwargs["admin_token_file"] = _path(
            value["admin_token_file"], "registration.admin_token_file"
        )
    if "wait_s" in value:
        kwargs["wait_s"] = _number(value["wait_s"], "registration.wait_s")
    return RegistrationSettings(**kwargs)  # type: ignore[arg-type]


def _proxies(value: object) -> tuple[ProxyEndpoint, ...]:
    if not isinstance(value, list):
        raise ConfigError("proxies", "must be an array of {name, underlay}")
    out = []
    for i, item in enumerate(value):
        where = f"proxies[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, "must be an object {name, underlay}")
        _reject_unknown(item, _PROXY_KEYS, where + ".")
        name = _str(_require(item, "name", where + "."), where + ".name")
        if not _NAME.fullmatch(name):
            raise ConfigError(where + ".name", "must match [a-z0-9][a-z0-9-]{0,62}")
        underlay = _addr(_require(item, "underlay", where + "."), where + ".underlay")
        out.append(ProxyEndpoint(name, underlay))
    return tuple(out)


def _discovery(value: object) -> DiscoverySettings:
    if not isinstance(value, dict):
        raise ConfigError("discovery", "must be an object {control_url, interval_s, timeout_s}")
    _reject_unknown(value, _DISCOVERY_KEYS, "discovery.")
    kwargs: dict[str, object] = {
        "control_url": _str(_require(value, "control_url", "discovery."), "discovery.control_url")
    }
    for key in ("interval_s", "timeout_s"):
        if key in value:
            kwargs[key] = _number(value[key], f"discovery.{key}")
    return DiscoverySettings(**kwargs)  # type: ignore[arg-type]


def _health(value: object) -> HealthSettings:
    if not isinstance(value, dict):
        raise ConfigError("health", "must be an object")
    _reject_unknown(value, _HEALTH_KEYS, "health.")
    kwargs: dict[str, object] = {}
    for key in ("interval_s", "timeout_s"):
        if key in value:
            kwargs[key] = _number(value[key], f"health.{key}")
    for key in ("down_after", "up_after", "port"):
        if key in value:
            kwargs[key] = _int(value[key], f"health.{key}")
    if "path" in value:
        kwargs["path"] = _str(value["path"], "health.path")
    if "timeout_s" not in kwargs and "interval_s" in kwargs:
        kwargs["timeout_s"] = min(0.5, float(kwargs["interval_s"]))  # type: ignore[arg-type]
    return HealthSettings(**kwargs)  # type: ignore[arg-type]
