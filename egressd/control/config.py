"""`egressd control serve` configuration: parsed and validated once, then frozen.

Defaults follow DESIGN.md's run directory (`/run/egressd`):

| option | default |
|---|---|
| `--listen` | `198.18.0.2:8080` (the control plane's underlay address) |
| `--state-dir` | `/run/egressd/control` |
| `--key` | `/run/egressd/keys/signing.key` |
| `--trusted-keys` | the directory holding `--key` (where `write_key_dir` puts `<kid>.jwk`) |
| `--admin-token-file` | `/run/egressd/admin-token` (generated, mode 0600, if missing) |
| `--policy-ttl` | 3600 seconds |
| `--sandbox-pool` | `100.96.0.0/16` (the fleet's sandbox supernet): where `"sandbox_cidr": "auto"` nodes get theirs |
| `--sandbox-prefix` | 24: the size of each node's block (256 nodes in the default pool) |

`--listen` takes an IP literal, `HOST:PORT` or `[V6]:PORT`; port 0 binds an
ephemeral port (tests), which `--port-file` reports.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from egressd.config_reader import ConfigError as ConfigError  # re-exported
from egressd.config_reader import as_int, as_network
from egressd.control.pool import DEFAULT_NODE_PREFIX, DEFAULT_POOL, SandboxPool

DEFAULT_LISTEN = "198.18.0.2:8080"
DEFAULT_RUN_DIR = Path("/run/egressd")
DEFAULT_STATE_DIR = DEFAULT_RUN_DIR / "control"
DEFAULT_KEY_FILE = DEFAULT_RUN_DIR / "keys" / "signing.key"
DEFAULT_ADMIN_TOKEN_FILE = DEFAULT_RUN_DIR / "admin-token"
DEFAULT_POLICY_TTL_S = 3600
# A policy must outlive the verifiers' clock leeway (30 s) by a margin, and a
# signed policy should not be usable for longer than a week.
MIN_POLICY_TTL_S = 60
MAX_POLICY_TTL_S = 7 * 24 * 3600


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` with HOST an IP literal -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ConfigError("--listen", f"{value!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError("--listen", f"{value!r}: not an IPv6 address: {host!r}") from exc
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise ConfigError(
                "--listen", f"{value!r}: host must be an IPv4 address or [IPv6] literal"
            ) from exc
    if not port_s.isascii() or not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError("--listen", f"{value!r}: port must be 0..65535")
    return host, int(port_s)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Everything `egressd control serve` needs; invalid values raise ConfigError."""

    host: str
    port: int
    state_dir: Path
    key_file: Path
    trusted_keys_dir: Path
    admin_token_file: Path
    policy_ttl_s: int = DEFAULT_POLICY_TTL_S
    port_file: Path | None = None
    sandbox_pool: SandboxPool = field(default_factory=SandboxPool)

    def __post_init__(self) -> None:
        parse_listen(self.listen)
        as_int("--policy-ttl", self.policy_ttl_s, MIN_POLICY_TTL_S, MAX_POLICY_TTL_S)

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def build(
        cls,
        *,
        listen: str = DEFAULT_LISTEN,
        state_dir: Path = DEFAULT_STATE_DIR,
        key_file: Path = DEFAULT_KEY_FILE,
        trusted_keys_dir: Path | None = None,
        admin_token_file: Path = DEFAULT_ADMIN_TOKEN_FILE,
        policy_ttl_s: int = DEFAULT_POLICY_TTL_S,
        port_file: Path | None = None,
        sandbox_pool: str = str(DEFAULT_POOL),
        sandbox_prefix: int = DEFAULT_NODE_PREFIX,
    ) -> ControlConfig:
        host, port = parse_listen(listen)
        pool = parse_sandbox_pool(sandbox_pool, sandbox_prefix)
        return cls(
            host=host,
            port=port,
            state_dir=state_dir,
            key_file=key_file,
            trusted_keys_dir=trusted_keys_dir if trusted_keys_dir is not None else key_file.parent,
            admin_token_file=admin_token_file,
            policy_ttl_s=policy_ttl_s,
            port_file=port_file,
            sandbox_pool=pool,
        )


def parse_sandbox_pool(network: str, prefixlen: int) -> SandboxPool:
    """`--sandbox-pool CIDR` and `--sandbox-prefix N` -> SandboxPool; ConfigError if unusable."""
    net = as_network("--sandbox-pool", network)
    try:
        return SandboxPool(net, prefixlen)
    except ValueError as exc:
        raise ConfigError(
            "--sandbox-pool", f"{network} with --sandbox-prefix {prefixlen}: {exc}"
        ) from exc
