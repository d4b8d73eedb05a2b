"""`egressd sandbox run --node NODE --policy FILE.jws [--mount SRC:DST] -- CMD ...`

Registers the sandbox with the node's agent (which verifies the policy, makes
the sandbox's namespace and veth, and programs tier 1), runs CMD in a gVisor
sandbox on that veth, relays its output, and unregisters, also when the
command fails or the user presses Ctrl-C. The exit code is the command's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path, PurePosixPath

from egressd.agent.client import AgentClient, AgentClientError
from egressd.errors import EgressdError
from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import BindMount, SandboxPaths
from egressd.sandbox.rootfs import write_bundle
from egressd.sandbox.runsc import SandboxLauncher
from egressd.topology.layout import DEFAULT_RUN_DIR


def _cli_error(detail: str) -> Exception:
    from egressd.cli import CliError

    return CliError(detail)


def _mounts(texts: list[str], run_dir: Path) -> list[BindMount]:
    mounts = []
    for text in texts:
        mount = BindMount.parse(text, cwd=PurePosixPath(os.getcwd()))
        source = Path(mount.source).resolve()
        # The run directory holds the signing key and admin token: never into a sandbox.
        if source == run_dir.resolve() or run_dir.resolve() in source.parents or source in run_dir.resolve().parents:
            raise SandboxError("bad_mount", f"{text!r}: the run directory may not be mounted")
        mounts.append(mount)
    return mounts


async def run_sandbox(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    token = Path(args.policy).read_text().strip()
    sandbox_id = args.id or f"sbx-{uuid.uuid4().hex[:12]}"
    paths = SandboxPaths(run_dir, sandbox_id)
    mounts = _mounts(args.mount, run_dir)
    ca_pem = (run_dir / "ca" / "ca.pem").read_bytes() if (run_dir / "ca" / "ca.pem").exists() else None
    socket_path = run_dir / "agents" / f"{args.node}.sock"
    async with AgentClient(socket_path) as agent:
        info = await agent.register(sandbox_id, token)
        try:
            write_bundle(
                paths.bundle_dir,
                args=args.command,
                netns_name=info.netns,
                mounts=mounts,
                extra_ca_pem=ca_pem,
            )
            launcher = SandboxLauncher(paths.runsc_root)
            return await launcher.run(
                sandbox_id,
                paths.bundle_dir,
                info.netns,
                stdout=sys.stdout.buffer,
                stderr=sys.stderr.buffer,
                timeout=args.timeout,
            )
        finally:
            # Also on Ctrl-C: asyncio.run cancels this task once, and the
            # finally block's own await still runs to completion.
            await agent.unregister(sandbox_id)


def _run(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        raise _cli_error("sandbox run: a command is required after --")
    try:
        return asyncio.run(run_sandbox(args))
    except AgentClientError as exc:
        raise _cli_error(f"sandbox rejected by {args.node}'s agent: {exc.reason}: {exc.detail}") from exc
    except OSError as exc:
        raise _cli_error(f"sandbox run: {exc}") from exc
    except EgressdError as exc:
        raise _cli_error(f"sandbox run: {exc.reason}: {exc.detail}") from exc


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("sandbox", help="run a command in a gVisor sandbox on a node")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="register with the node's agent and run CMD in runsc")
    run.add_argument("--node", required=True, help="node whose agent hosts the sandbox")
    run.add_argument("--policy", required=True, help="the job's signed policy (JWS file)")
    run.add_argument("--mount", action="append", default=[], metavar="SRC:DST",
                     help="read-only bind mount (repeatable)")
    run.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    run.add_argument("--id", default=None, help="sandbox id (default: random)")
    run.add_argument("--timeout", type=_positive, default=None, help="seconds before the sandbox is killed")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(handler=_run)
