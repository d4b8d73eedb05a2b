"""The `control` verb of the `egressd` command.

    egressd control serve [--listen HOST:PORT] [--state-dir DIR] [--key FILE]
                          [--trusted-keys DIR] [--admin-token-file FILE]
                          [--policy-ttl SECONDS] [--port-file FILE]
                          [--sandbox-pool CIDR] [--sandbox-prefix N]

Defaults and their reasons are in `egressd.control.config`. Logs are JSON
lines on stderr. A bad option or a start-up failure (key, token file, state,
bind) is one line on stderr and exit code 2; SIGTERM/SIGINT stop it cleanly
with exit code 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from egressd import logs
from egressd.cliutil import CliError, integer
from egressd.control.config import (
    DEFAULT_ADMIN_TOKEN_FILE,
    DEFAULT_KEY_FILE,
    DEFAULT_LISTEN,
    DEFAULT_POLICY_TTL_S,
    DEFAULT_STATE_DIR,
    ConfigError,
    ControlConfig,
)
from egressd.control.pool import DEFAULT_NODE_PREFIX, DEFAULT_POOL


def register(sub: Any) -> None:
    """Add the `control` verb to the top-level subparsers `sub`."""
    control = sub.add_parser(
        "control", help="the control plane: signs policies, keeps the registry"
    )
    control_sub = control.add_subparsers(dest="control_command", required=True)
    serve = control_sub.add_parser("serve", help="run the control plane HTTP API")
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to bind, an IP literal (default {DEFAULT_LISTEN}; port 0: ephemeral)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"where jobs, nodes and proxies are kept (default {DEFAULT_STATE_DIR})",
    )
    serve.add_argument(
        "--key",
        type=Path,
        default=DEFAULT_KEY_FILE,
        metavar="FILE",
        help=f"Ed25519 signing key, PEM PKCS#8 (default {DEFAULT_KEY_FILE})",
    )
    serve.add_argument(
        "--trusted-keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="extra public keys to publish (*.jwk, jwks.json; default: the --key directory)",
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        default=DEFAULT_ADMIN_TOKEN_FILE,
        metavar="FILE",
        help=f"bearer token for mutating requests; created (0600) if missing "
        f"(default {DEFAULT_ADMIN_TOKEN_FILE})",
    )
    serve.add_argument(
        "--policy-ttl",
        type=integer,
        default=DEFAULT_POLICY_TTL_S,
        metavar="SECONDS",
        help=f"validity of a signed policy (default {DEFAULT_POLICY_TTL_S})",
    )
    serve.add_argument(
        "--port-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the bound port here once listening (removed on exit)",
    )
    serve.add_argument(
        "--sandbox-pool",
        default=str(DEFAULT_POOL),
        metavar="CIDR",
        help=f'sandbox CIDRs for nodes that register with "sandbox_cidr": "auto" '
        f"(default {DEFAULT_POOL})",
    )
    serve.add_argument(
        "--sandbox-prefix",
        type=integer,
        default=DEFAULT_NODE_PREFIX,
        metavar="N",
        help=f"prefix length of each node's block from the pool (default {DEFAULT_NODE_PREFIX})",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = ControlConfig.build(
            listen=args.listen,
            state_dir=args.state_dir,
            key_file=args.key,
            trusted_keys_dir=args.trusted_keys,
            admin_token_file=args.admin_token_file,
            policy_ttl_s=args.policy_ttl,
            port_file=args.port_file,
            sandbox_pool=args.sandbox_pool,
            sandbox_prefix=args.sandbox_prefix,
        )
    except ConfigError as exc:
        raise CliError(exc.detail) from exc
    logs.configure(json=True)
    from egressd.control import service  # aiohttp and uvloop only when serving

    return service.run(config)  # a start-up failure: one line from egressd.cli.main
