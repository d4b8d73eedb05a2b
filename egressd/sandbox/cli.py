"""`egressd sandbox run --node NODE --policy FILE.jws [--mount SRC:DST] [-i] [--platform P] -- CMD`

Registers the sandbox with the node's agent (which verifies the policy, makes
the sandbox's namespace and veth, and programs tier 1), runs CMD in a gVisor
sandbox on that veth, relays its output, and unregisters, also when the
command fails or the run is stopped.

Exit codes follow `docker run`:

| code | meaning |
|---|---|
| 125 | egressd or the agent failed (argument, mount, policy, node, launch, `--timeout`) |
| 126 | the command was found but cannot be executed (not executable, a directory) |
| 127 | the command was not found (no such file, not in the sandbox's PATH) |
| 128+N | `sandbox run` was stopped by signal N (INT 130, TERM 143, HUP 129), after clean-up |
| any other | the command's own exit code |

As with docker, a command that exits 125, 126 or 127 itself is
indistinguishable by the code alone; egressd's own failures (and only those)
print one line on stderr starting `egressd: error: sandbox run:`.

SIGINT, SIGTERM and SIGHUP all clean up the same way: the sandbox is killed,
its runsc state, bundle and logs are removed, it is unregistered (which
removes its namespace), then `sandbox run` exits 128+N. A launcher that dies
without clean-up (SIGKILL) is noticed by the agent, which unregisters the
sandbox (`egressd.agent.launchers`); runsc dies with it (parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import sys
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar

from egressd.agent.client import AgentClient, AgentClientError, AgentUnreachable, SandboxInfo
from egressd.cliutil import OneLineParser
from egressd.errors import EgressdError
from egressd.layout import DEFAULT_RUN_DIR
from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import SANDBOX_UID, BindMount, SandboxPaths, sandbox_can_read
from egressd.sandbox.rootfs import write_bundle
from egressd.sandbox.runsc import SandboxLauncher, finish

T = TypeVar("T")

EXIT_EGRESSD = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PREFIX = "egressd: error: sandbox run: "
# The runsc platform when `--platform` is not given (a host's configuration:
# `--platform=kvm` hangs on hosts without nested virtualisation).
PLATFORM_ENV = "EGRESSD_RUNSC_PLATFORM"


# --- pure -------------------------------------------------------------------------


def exit_code(exc: BaseException) -> int:
    """The `docker run` exit code of a failure of `sandbox run` (never the command's)."""
    if isinstance(exc, SandboxError):
        if exc.reason == "command_not_found":
            return EXIT_NOT_FOUND
        if exc.reason == "command_not_executable":
            return EXIT_CANNOT_INVOKE
    return EXIT_EGRESSD


def no_node_message(node: str, known: Iterable[str], run_dir: Path) -> str:
    others = sorted(k for k in known if k != node)
    hint = "" if run_dir == DEFAULT_RUN_DIR else f" --run-dir {run_dir}"
    return (
        f"no node {node!r} (known: {', '.join(others) or 'none'}); "
        f"is the fleet up? egressd topology up{hint}"
    )


def unreadable_mount_message(text: str, mode: int, uid: int, gid: int) -> str:
    return (
        f"--mount {text}: the sandbox user (uid {SANDBOX_UID}) cannot read it "
        f"(mode {mode & 0o7777:04o}, owner {uid}:{gid}); e.g. chmod o+rX it"
    )


def stopped_message(signum: int, cleanup_error: str | None) -> str:
    name = signal.Signals(signum).name
    if cleanup_error is None:
        return f"stopped by {name}; the sandbox was removed"
    return f"stopped by {name}; clean-up: {cleanup_error}"


# --- I/O ----------------------------------------------------------------------------


class RunParser(OneLineParser):
    """`sandbox run`'s own argument errors are egressd's failure: 125, like docker run."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_EGRESSD, f"{PREFIX}{message}\n")


def _mounts(texts: list[str], run_dir: Path) -> list[BindMount]:
    mounts = []
    for text in texts:
        mount = BindMount.parse(text, cwd=PurePosixPath(os.getcwd()))
        source = Path(mount.source).resolve()
        # The run directory holds the signing key and admin token: never into a sandbox.
        if (
            source == run_dir.resolve()
            or run_dir.resolve() in source.parents
            or source in run_dir.resolve().parents
        ):
            raise SandboxError("bad_mount", f"{text!r}: the run directory may not be mounted")
        try:
            st = source.stat()
        except OSError as exc:
            raise SandboxError("bad_mount", f"--mount {text}: {exc.strerror or exc}") from exc
        # Checked here, before anything is made: inside, it would be an EACCES in the UDF.
        if not sandbox_can_read(st.st_mode, st.st_uid, st.st_gid):
            raise SandboxError(
                "mount_unreadable", unreadable_mount_message(text, st.st_mode, st.st_uid, st.st_gid)
            )
        mounts.append(mount)
    return mounts


def known_nodes(run_dir: Path) -> list[str]:
    """Nodes whose agent socket exists in the run directory."""
    try:
        return sorted(p.stem for p in (run_dir / "agents").glob("*.sock"))
    except OSError:
        return []


def _is_absent(exc: BaseException) -> bool:
    """The socket does not exist or nobody listens: the node is not up (vs. a slow agent)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _register(
    agent: AgentClient, args: argparse.Namespace, sandbox_id: str, token: str
) -> SandboxInfo:
    run_dir = Path(args.run_dir)
    if not Path(agent.socket_path).exists():
        raise SandboxError("no_node", no_node_message(args.node, known_nodes(run_dir), run_dir))
    try:
        return await agent.register(sandbox_id, token)
    except AgentUnreachable as exc:
        if _is_absent(exc):
            raise SandboxError(
                "no_node", no_node_message(args.node, known_nodes(run_dir), run_dir)
            ) from exc
        raise
    except asyncio.CancelledError:
        # The agent completes a registration whose client went away: undo it.
        await finish(_unregister_quietly(agent, sandbox_id))
        raise


async def _unregister_quietly(agent: AgentClient, sandbox_id: str) -> None:
    with contextlib.suppress(AgentClientError):
        await agent.unregister(sandbox_id)


#: CA certificates a sandbox trusts besides the host's: the test internet's CA
#: and the fleet's TLS interception CA (`egressd_harness.topology.interception`).
EXTRA_CA_FILES = ("ca.pem", "interception-ca.pem")


def extra_ca_pem(run_dir: Path) -> bytes | None:
    """The extra CA certificates found in `run_dir/ca`, concatenated (None: none)."""
    found = [run_dir / "ca" / name for name in EXTRA_CA_FILES]
    parts = [p.read_bytes() for p in found if p.exists()]
    if not parts:
        return None
    return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)


async def run_sandbox(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    sandbox_id = args.id or f"sbx-{uuid.uuid4().hex[:12]}"
    paths = SandboxPaths(run_dir, sandbox_id)
    mounts = _mounts(args.mount, run_dir)
    try:
        token = Path(args.policy).read_text().strip()
    except OSError as exc:
        raise SandboxError(
            "bad_policy_file", f"--policy {args.policy}: {exc.strerror or exc}"
        ) from exc
    ca_pem = extra_ca_pem(run_dir)
    socket_path = run_dir / "agents" / f"{args.node}.sock"
    async with AgentClient(socket_path) as agent:
        info = await _register(agent, args, sandbox_id, token)
        try:
            write_bundle(
                paths.bundle_dir,
                args=args.command,
                netns_name=info.netns,
                mounts=mounts,
                extra_ca_pem=ca_pem,
            )
            launcher = SandboxLauncher(
                paths.runsc_root,
                log_root=paths.log_root,
                keep_logs=args.keep_logs,
                platform=args.platform,
            )
            return await launcher.run(
                sandbox_id,
                paths.bundle_dir,
                info.netns,
                stdin=sys.stdin.buffer if args.interactive else None,
                stdout=sys.stdout.buffer,
                stderr=sys.stderr.buffer,
                timeout=args.timeout,
            )
        finally:
            # Also when stopped: `finish` lets the unregistration complete.
            await finish(agent.unregister(sandbox_id))


async def stoppable(
    coro: Coroutine[Any, Any, T], received: list[int], signals: Sequence[int] = STOP_SIGNALS
) -> T:
    """Await `coro`; the first of `signals` cancels it (its clean-up runs) and is
    appended to `received`; later ones are ignored while the clean-up runs.

    A plain `signal.signal` handler that checks the PID, as in `egressd.signals`
    (never the loop's wakeup fd, which forked helpers inherit).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    owner = os.getpid()

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != owner or received:
            return
        received.append(signum)
        loop.call_soon_threadsafe(task.cancel)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        return await task
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(line: str) -> None:
    try:  # after SIGHUP the terminal may be gone: the exit code still tells
        sys.stdout.flush()
        print(f"{PREFIX}{' '.join(line.split())}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _describe(exc: BaseException, node: str) -> str:
    if isinstance(exc, AgentUnreachable):
        return f"{node}'s agent is unreachable: {exc.detail}"
    if isinstance(exc, AgentClientError):
        return f"sandbox rejected by {node}'s agent: {exc.reason}: {exc.detail}"
    if isinstance(exc, EgressdError):
        if exc.reason == "no_node":
            return exc.detail
        return f"{exc.reason}: {exc.detail}"
    return str(exc)


def _run(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        _say("a command is required after --")
        return EXIT_EGRESSD
    received: list[int] = []
    error: str | None = None
    try:
        return asyncio.run(stoppable(run_sandbox(args), received))
    except asyncio.CancelledError:
        if not received:
            raise
    except (EgressdError, OSError) as exc:
        error = _describe(exc, args.node)
        if not received:
            _say(error)
            return exit_code(exc)
    _say(stopped_message(received[0], error))
    return 128 + received[0]


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("sandbox", help="run a command in a gVisor sandbox on a node")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=RunParser)
    run = verbs.add_parser("run", help="register with the node's agent and run CMD in runsc")
    run.add_argument("--node", required=True, help="node whose agent hosts the sandbox")
    run.add_argument("--policy", required=True, help="the job's signed policy (JWS file)")
    run.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SRC:DST",
        help="read-only bind mount (repeatable); uid 65534 must be able to read SRC",
    )
    run.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    run.add_argument("--id", default=None, help="sandbox id (default: random)")
    run.add_argument(
        "--timeout", type=_positive, default=None, help="seconds before the sandbox is killed"
    )
    run.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep runsc's logs in RUN/logs/runsc/ID/ (default: removed with the sandbox)",
    )
    run.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="pass stdin to the command (default: /dev/null, as docker run without -i)",
    )
    run.add_argument(
        "--platform",
        default=os.environ.get(PLATFORM_ENV) or None,
        help=f"runsc's --platform (ptrace, kvm, ...; default ${PLATFORM_ENV}, else runsc's own: "
        "ptrace in Debian's 20221219)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(handler=_run)
