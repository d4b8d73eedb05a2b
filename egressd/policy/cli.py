"""The `keys` and `policy` verbs of the `egressd` command.

    egressd keys generate --out DIR
    egressd policy sign --key FILE [--ttl SECONDS] POLICY.json
    egressd policy verify --keys DIR [--leeway SECONDS] JWS_FILE
    egressd policy check [--control URL | --no-control] [--prefix P] FILE
    egressd policy schema

`policy check` lists every problem of a policy (JSON payload or JWS) at once,
one `FIELD: problem` line each on stdout, notes on stderr; exit 0 clean, 1
problems, 2 usage (see `egressd.policy.check`). It asks the control plane for
its nodes: `--control URL`, else the local fleet's (in `{prefix}ctl`); a fleet
that is not up is a note, an explicit URL that does not answer exits 2.
`policy sign` refuses a policy whose `exp` has passed. Times in messages are
ISO 8601 UTC with a relative phrase (`expired 2026-12-06T16:00:00Z, 2 h ago`).

Results go to stdout (a kid, a token, a payload), nothing else does. Every
failure is a `CliError` with one line of detail, which `egressd.cli.main` prints as
`egressd: error: ...` with exit code 2. A rejected token reads
`policy rejected: <reason>: <detail>`, `<reason>` being the `JwsError` token
that metrics and logs use. `-` as POLICY.json or JWS_FILE reads stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from egressd.cliutil import CliError, non_negative_int, one_line, positive_int
from egressd.policy import times
from egressd.policy.errors import JwsError, KeyFileError, PolicyError
from egressd.policy.jws import DEFAULT_LEEWAY_S, MAX_TOKEN_BYTES, sign_policy, verify_policy
from egressd.policy.keys import (
    generate_signing_key,
    load_signing_key,
    load_trusted_keys,
    write_key_dir,
)
from egressd.policy.model import parse_policy, policy_to_payload

DEFAULT_TTL_S = 3600
#: Largest policy JSON file `policy sign` reads.
MAX_POLICY_FILE_BYTES = 64 * 1024


def register(sub: Any) -> None:
    """Add the `keys` and `policy` verbs to the top-level subparsers `sub`."""
    keys = sub.add_parser("keys", help="Ed25519 keys that sign job policies")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="{generate}")
    generate = keys_sub.add_parser(
        "generate", help="create a signing key and its public JWK; prints the kid"
    )
    generate.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="key directory: writes DIR/signing.key (0600) and DIR/<kid>.jwk; "
        "refuses to overwrite an existing signing.key",
    )
    generate.set_defaults(handler=_keys_generate)

    policy = sub.add_parser("policy", help="sign, verify and check job policies (JWS, EdDSA)")
    policy_sub = policy.add_subparsers(
        dest="policy_command", required=True, metavar="{sign,verify,check,schema}"
    )
    sign = policy_sub.add_parser("sign", help="sign a policy JSON; prints the JWS")
    sign.add_argument("--key", type=Path, required=True, metavar="FILE", help="signing.key")
    sign.add_argument(
        "--ttl",
        type=positive_int,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help=f"validity when the policy has no exp (default {DEFAULT_TTL_S})",
    )
    sign.add_argument("policy", metavar="POLICY.json", help="policy payload ('-' for stdin)")
    sign.set_defaults(handler=_policy_sign)

    verify = policy_sub.add_parser("verify", help="verify a JWS; prints its policy JSON")
    verify.add_argument(
        "--keys",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory of trusted public keys (*.jwk, jwks.json)",
    )
    verify.add_argument(
        "--leeway",
        type=non_negative_int,
        default=DEFAULT_LEEWAY_S,
        metavar="SECONDS",
        help=f"clock skew tolerated at nbf and exp (default {DEFAULT_LEEWAY_S})",
    )
    verify.add_argument("token", metavar="JWS_FILE", help="the JWS ('-' for stdin)")
    verify.set_defaults(handler=_policy_verify)

    check = policy_sub.add_parser(
        "check", help="list every problem of a policy (JSON or JWS); exit 1 if any"
    )
    where = check.add_mutually_exclusive_group()
    where.add_argument(
        "--control",
        metavar="URL",
        default=None,
        help="control plane whose nodes the policy must name (default: the local fleet's)",
    )
    where.add_argument(
        "--no-control", action="store_true", help="do not check nodes against a control plane"
    )
    check.add_argument(
        "--prefix", default="egd-", help="the local fleet's namespace prefix (default egd-)"
    )
    check.add_argument("policy", metavar="FILE", help="policy JSON or JWS ('-' for stdin)")
    check.set_defaults(handler=_policy_check)

    schema = policy_sub.add_parser("schema", help="print the policy's JSON Schema")
    schema.set_defaults(handler=_policy_schema)


def _read_input(name: str, what: str, limit: int) -> bytes:
    try:
        if name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(name, "rb") as fh:
                data = fh.read(limit + 1)
    except FileNotFoundError:
        raise CliError(f"{what} {name}: no such file") from None
    except OSError as exc:
        raise CliError(one_line(f"{what} {name}: {exc.strerror or exc}")) from exc
    if len(data) > limit:
        raise CliError(f"{what} {name}: larger than {limit} bytes")
    return data


def _keys_generate(args: argparse.Namespace) -> int:
    key = generate_signing_key()
    try:
        write_key_dir(args.out, key)
    except KeyFileError as exc:
        raise CliError(one_line(f"keys: {exc}")) from exc
    print(key.kid)
    return 0


def _with_default_times(payload: dict[str, Any], ttl: int, now: int) -> dict[str, Any]:
    """iat and nbf default to now, exp to nbf + ttl; values given are kept
    (and validated by parse_policy)."""
    out = dict(payload)
    out.setdefault("iat", now)
    out.setdefault("nbf", now)
    nbf = out["nbf"]
    if "exp" not in out and isinstance(nbf, int) and not isinstance(nbf, bool):
        out["exp"] = nbf + ttl
    return out


def _policy_sign(args: argparse.Namespace) -> int:
    raw = _read_input(args.policy, "policy", MAX_POLICY_FILE_BYTES)
    try:
        payload = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # also UnicodeDecodeError
        raise CliError(one_line(f"policy {args.policy} is not JSON: {exc}")) from exc
    try:
        key = load_signing_key(args.key)
    except KeyFileError as exc:
        raise CliError(one_line(f"keys: {exc}")) from exc
    now = int(time.time())
    if isinstance(payload, dict):  # otherwise parse_policy names the problem ("$")
        payload = _with_default_times(payload, args.ttl, now)
        exp = payload.get("exp")
        if isinstance(exp, int) and not isinstance(exp, bool) and exp <= now:
            raise CliError(
                f"invalid policy: exp: expired {times.when(exp, now)}; "
                "refusing to sign an expired policy"
            )
    try:
        policy = parse_policy(payload, require_timestamps=True)
    except PolicyError as exc:
        raise CliError(one_line(f"invalid policy: {exc.detail}")) from exc
    try:
        token = sign_policy(policy, key)
    except JwsError as exc:
        raise CliError(one_line(f"cannot sign: {exc}")) from exc
    print(token)
    return 0


def _policy_verify(args: argparse.Namespace) -> int:
    # Room for a trailing newline and a little whitespace around a maximal token.
    raw = _read_input(args.token, "token", MAX_TOKEN_BYTES + 64)
    try:
        trusted = load_trusted_keys(args.keys)
    except KeyFileError as exc:
        raise CliError(one_line(f"keys: {exc}")) from exc
    try:
        verified = verify_policy(raw, trusted, leeway_s=args.leeway)
    except JwsError as exc:
        raise CliError(one_line(f"policy rejected: {exc.reason}: {exc.detail}")) from exc
    print(json.dumps(policy_to_payload(verified.policy), indent=2, sort_keys=True))
    return 0


def _known_nodes(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    """The control plane's node names, or None and a note saying why not."""
    if args.no_control:
        return None, None
    from egressd.control.nodes import NodesUnavailable, fetch_node_names

    # The local fleet (topology up) is harness: asked only when no --control URL is given.
    from egressd_harness.topology.nodes import fleet_node_names

    if args.control is not None:
        try:
            return fetch_node_names(args.control), None
        except NodesUnavailable as exc:
            raise CliError(f"control plane {args.control}: {exc.detail}") from exc
    try:
        return fleet_node_names(args.prefix), None
    except NodesUnavailable as exc:
        return None, (
            f"nodes not checked: {exc.detail}; is the fleet up? (egressd topology up), "
            "or pass --control URL"
        )


def _policy_check(args: argparse.Namespace) -> int:
    from egressd.policy.check import check_document

    raw = _read_input(args.policy, "policy", MAX_TOKEN_BYTES + 64)
    known, why_not = _known_nodes(args)
    report = check_document(raw, now=time.time(), known_nodes=known)
    for problem in report.problems:
        print(problem)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if why_not:
        print(f"note: {why_not}", file=sys.stderr)
    count = len(report.problems)
    summary = "ok" if not count else f"{count} problem{'s' if count != 1 else ''}"
    print(f"{args.policy}: {summary}", file=sys.stderr)
    return 1 if count else 0


def _policy_schema(_args: argparse.Namespace) -> int:
    from egressd.policy.schema import schema_text

    sys.stdout.write(schema_text())
    return 0
