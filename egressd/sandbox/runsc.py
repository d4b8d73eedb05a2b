"""The I/O edge of the sandbox unit: launch a bundle with runsc, relay, clean up.

One launch is one process tree that egressd starts:

    setpriv --pdeathsig KILL      (runsc dies with us; its sandbox is --attached)
      unshare --mount --propagation private
        sh -c PRELUDE             (the /proc/sys work-around, see below)
          exec runsc --network=sandbox --ignore-cgroups run --bundle B ID

Debian's runsc 20221219 refuses `--network=sandbox` when
/proc/sys/net/core/rmem_default exists, which on 6.x kernels it does in every
network namespace (DESIGN.md, "gVisor on this kernel"). In a private mount
namespace the prelude parks the real /proc/sys aside, mounts a tmpfs over
/proc/sys and binds back only vm/, kernel/ and fs/, then execs runsc. Nothing
of this is visible outside that mount namespace, which ends with the sandbox.

The command's stdout and stderr reach the caller through pipes (gVisor writes
to a host regular file as if at offset 0, so files are never handed over).
runsc's own logs go to `LOG_ROOT/ID/` and never to the caller's stderr. When a
launch fails, runsc prints its one-line fatal message to the same stderr pipe
as the command's; the relay holds back a chunk that starts like that message
(`running container: `) until it knows: the launch failed (exit 128 and the
same error in runsc's log) and the chunk is dropped, because the error is
raised instead, or the chunk is delivered late but whole. The error becomes
`SandboxError`: `command_not_found` (no such file, not in the sandbox's PATH;
`sandbox run` exits 127 like a shell), `command_not_executable` (found but
cannot be executed; 126), otherwise `launch_failed`.

Whatever happens (exit, launch failure, timeout, cancellation, Ctrl-C), the
container is killed if still running, `runsc delete -force` removes its
state, and the bundle directory and runsc's log directory are removed (the
logs are kept with `keep_logs`). A clean-up that has begun completes even if
its caller is cancelled meanwhile (`finish`): a second signal cannot leave half
a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import shutil
import signal
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import structlog

from egressd.sandbox import SandboxError
from egressd.sandbox.bundle import CONFIG_NAME, check_sandbox_id, netns_path
from egressd.sandbox.rootfs import remove_bundle

log = structlog.get_logger("egressd.sandbox")

# $1: an empty directory to park the real /proc/sys on; $2: the prelude's log;
# the rest: the runsc command line. Its own errors go to the log (exit != 0),
# runsc gets the original stderr back.
PRELUDE = r"""
set -eu
aside=$1; log=$2; shift 2
exec 3>&2 2>>"$log"
mount --bind /proc/sys "$aside"
mount -t tmpfs -o mode=0555,size=64k,nosuid,nodev,noexec egressd-procsys /proc/sys
for d in vm kernel fs; do
    mkdir "/proc/sys/$d"
    mount --bind "$aside/$d" "/proc/sys/$d"
done
umount -l "$aside"
exec 2>&3 3>&-
exec "$@"
"""
# runsc exits with this when it fails itself (it then logs the error).
RUNSC_FATAL_EXIT = 128
KILL_GRACE_S = 5.0
RUNSC_COMMAND_TIMEOUT_S = 30.0
CHUNK = 64 * 1024
ASIDE_NAME = ".procsys"
# How runsc 20221219's `run` starts its one-line fatal message on stderr.
RUNSC_FATAL_PREFIX = b"running container: "
_NOT_IN_PATH = re.compile(
    r'error finding executable "(?P<cmd>[^"]*)" in PATH \[(?P<path>[^]]*)\]: (?P<err>.+)$'
)
_NOT_LOADED = re.compile(r"failed to load (?P<cmd>.*): (?P<err>[^:]+)$")
T = TypeVar("T")


def classify_launch_error(error: str) -> SandboxError:
    """runsc's launch error as a SandboxError whose reason says whose fault it is.

    `command_not_found` and `command_not_executable` are the caller's command
    (a shell's 127 and 126); anything else is `launch_failed` (egressd's side).
    """
    if match := _NOT_IN_PATH.search(error):
        cmd, path, err = match["cmd"], ":".join(match["path"].split()), match["err"]
        if "no such file" in err:
            detail = f"{cmd}: not found in the sandbox's PATH ({path})"
            return SandboxError("command_not_found", detail)
        return SandboxError("command_not_executable", f"{cmd}: {err} (PATH {path})")
    if match := _NOT_LOADED.search(error):
        cmd, err = match["cmd"], match["err"]
        if "no such file" in err:
            return SandboxError("command_not_found", f"{cmd}: no such file in the sandbox")
        return SandboxError("command_not_executable", f"{cmd}: cannot execute: {err}")
    return SandboxError("launch_failed", error)


async def finish(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end even if the caller is cancelled meanwhile; then re-raise
    the cancellation. For clean-up: a signal during it must not leave half of it undone.
    (asyncio.run cancels leftover tasks only after the main task is done.)"""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def _find(program: str, reason: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise SandboxError(reason, f"{program}: not found on PATH")
    return path


def _check_bundle(bundle_dir: Path, netns_name: str) -> None:
    """The bundle exists and runs in `netns_name`, which exists."""
    expected = str(netns_path(netns_name))
    try:
        config = json.loads((bundle_dir / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise SandboxError("bad_bundle", f"{bundle_dir / CONFIG_NAME}: {exc}") from exc
    namespaces = config.get("linux", {}).get("namespaces", [])
    paths = [ns.get("path") for ns in namespaces if ns.get("type") == "network"]
    if paths != [expected]:
        raise SandboxError("bad_bundle", f"network namespace is {paths}, expected [{expected}]")
    if not Path(expected).exists():
        raise SandboxError("netns_missing", f"{expected} does not exist")


def runsc_errors(log_file: Path) -> str | None:
    """The errors runsc logged to `--log` (JSON objects, not always one a line), joined."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return None
    decoder = json.JSONDecoder()
    errors: list[str] = []
    pos = 0
    while (start := text.find("{", pos)) != -1:
        try:
            entry, pos = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            errors.append(str(entry.get("msg", "")))
    return "; ".join(errors) if errors else None


class _Sink:
    """Writes to the caller's stream; once it fails, swallows the rest (never blocks the
    sandbox). With `hold`, a chunk that starts like runsc's fatal message waits until
    the next chunk or `release()`/`drop()`."""

    def __init__(self, sink: BinaryIO, *, hold: bytes | None = None) -> None:
        self.sink = sink
        self.hold = hold
        self.held: bytes | None = None
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        self.release()
        if self.hold is not None and chunk.startswith(self.hold):
            self.held = chunk
        else:
            self._write(chunk)

    def release(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            self._write(held)

    def drop(self, errors: str) -> bool:
        """Forget the held chunk if it is one of runsc's logged `errors`; True if dropped."""
        line = self.held.decode(errors="replace").strip() if self.held is not None else ""
        if line and "\n" not in line and line in errors:
            self.held = None
            return True
        return False

    def _write(self, chunk: bytes) -> None:
        if self.broken:
            return
        try:
            self.sink.write(chunk)
            self.sink.flush()
        except (OSError, ValueError):
            self.broken = True


async def _relay(reader: asyncio.StreamReader, sink: _Sink) -> None:
    """Copy until EOF (keeps reading after the sink fails, so the sandbox never blocks)."""
    while chunk := await reader.read(CHUNK):
        sink.feed(chunk)


@dataclass(slots=True)
class _Launch:
    """What one `run` has started so far, for its clean-up."""

    sandbox_id: str
    bundle_dir: Path
    started: bool = False
    proc: asyncio.subprocess.Process | None = None
    relays: list[asyncio.Task[None]] = field(default_factory=list)
    sinks: list[_Sink] = field(default_factory=list)


class SandboxLauncher:
    """Runs OCI bundles with runsc, one foreground `runsc run` per sandbox.

    `runsc_root` is runsc's state directory (`--root`); runsc's own logs go to
    `log_root/ID/` (default: `runsc_root/../logs/runsc`), removed with the
    sandbox unless `keep_logs`. `platform` is runsc's `--platform` (default:
    runsc's, ptrace in 20221219).
    """

    def __init__(
        self,
        runsc_root: Path,
        runsc_bin: str = "runsc",
        *,
        log_root: Path | None = None,
        kill_grace_s: float = KILL_GRACE_S,
        platform: str | None = None,
        keep_logs: bool = False,
    ) -> None:
        self.runsc_root = runsc_root
        self.keep_logs = keep_logs
        self.platform = platform
        self.runsc_bin = runsc_bin
        self.log_root = log_root if log_root is not None else runsc_root.parent / "logs" / "runsc"
        self.kill_grace_s = kill_grace_s

    def log_dir(self, sandbox_id: str) -> Path:
        return self.log_root / check_sandbox_id(sandbox_id)

    def _flags(self, runsc: str, logs: Path | None, command: str) -> list[str]:
        flags = [runsc, f"--root={self.runsc_root}", "--network=sandbox", "--ignore-cgroups"]
        if self.platform is not None:
            flags.append(f"--platform={self.platform}")
        if logs is not None:
            flags += [
                f"--log={logs / f'runsc-{command}.log'}",
                f"--debug-log={logs}/",
                f"--panic-log={logs / 'panic.log'}",
            ]
        return flags

    async def _runsc(self, logs: Path | None, command: str, *args: str) -> tuple[int, str]:
        """Run one short runsc command (kill, delete, list); (exit code, output)."""
        runsc = _find(self.runsc_bin, "runsc_missing")
        if logs is not None:
            logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *self._flags(runsc, logs, command),
            command,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), RUNSC_COMMAND_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return -1, f"runsc {command} timed out"
        return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")

    async def kill(self, sandbox_id: str, sig: str = "KILL") -> bool:
        """`runsc kill ID SIG`; False if there was nothing to signal."""
        rc, _ = await self._runsc(self.log_dir(sandbox_id), "kill", sandbox_id, sig)
        return rc == 0

    async def delete(self, sandbox_id: str) -> None:
        """`runsc delete -force ID`: removes the container and its state, if any."""
        rc, out = await self._runsc(self.log_dir(sandbox_id), "delete", "-force", sandbox_id)
        if rc != 0:
            raise SandboxError("cleanup_failed", f"runsc delete {sandbox_id}: {out.strip()}")

    async def list_ids(self) -> list[str]:
        """IDs of the containers runsc knows under `runsc_root`."""
        if not self.runsc_root.exists():
            return []
        rc, out = await self._runsc(None, "list", "-quiet")
        if rc != 0:
            raise SandboxError("runsc_failed", f"runsc list: {out.strip()}")
        return [line.strip() for line in out.splitlines() if line.strip()]

    async def run(
        self,
        sandbox_id: str,
        bundle_dir: Path,
        netns_name: str,
        *,
        stdout: BinaryIO,
        stderr: BinaryIO,
        timeout: float | None,
        stdin: BinaryIO | None = None,
    ) -> int:
        """Run the bundle's command in netns `netns_name`; its exit code.

        `stdin`: what the command reads (default: nothing, /dev/null), handed
        to runsc as is (`sandbox run -i` passes its own).

        The container and the bundle directory are removed afterwards in every
        case. Raises SandboxError: runsc_missing, bad_bundle, netns_missing,
        launch_failed, timeout, cleanup_failed (the last only when nothing
        else went wrong; otherwise cleanup failures are logged), and
        sandbox_exists when a live container holds this ID already: then
        nothing is touched, neither that container nor `bundle_dir`;
        command_not_found and command_not_executable when runsc could not
        start the command (see `classify_launch_error`).
        """
        check_sandbox_id(sandbox_id)
        await self._claim(sandbox_id)
        launch = _Launch(sandbox_id, bundle_dir)
        try:
            rc = await self._run(launch, netns_name, stdout, stderr, timeout, stdin)
        except BaseException:
            await finish(self._cleanup(launch, quiet=True))
            raise
        await finish(self._cleanup(launch, quiet=False))
        return rc

    async def _claim(self, sandbox_id: str) -> None:
        """Refuse an ID that a live container holds; remove a stopped leftover's state."""
        # runsc 20221219 keeps `ID_sandbox:SANDBOX.state` files in its root;
        # only then is the (slower) `runsc state` worth asking.
        if not any(self.runsc_root.glob(f"{glob.escape(sandbox_id)}_sandbox:*")):
            return
        rc, out = await self._runsc(None, "state", sandbox_id)
        if rc == 0:
            try:
                status = json.loads(out).get("status")
            except (ValueError, AttributeError):
                status = "unknown"
            if status != "stopped":
                raise SandboxError("sandbox_exists", f"container {sandbox_id} is {status}")
        await self.delete(sandbox_id)

    async def _run(
        self,
        launch: _Launch,
        netns_name: str,
        stdout: BinaryIO,
        stderr: BinaryIO,
        timeout: float | None,
        stdin: BinaryIO | None = None,
    ) -> int:
        sandbox_id, bundle_dir = launch.sandbox_id, launch.bundle_dir
        runsc = _find(self.runsc_bin, "runsc_missing")
        setpriv = _find("setpriv", "launch_failed")
        unshare = _find("unshare", "launch_failed")
        _check_bundle(bundle_dir, netns_name)
        logs = self.log_dir(sandbox_id)
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        prelude_log = logs / "prelude.log"
        prelude_log.write_bytes(b"")
        (logs / "runsc-run.log").unlink(missing_ok=True)
        self.runsc_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        aside = bundle_dir / ASIDE_NAME
        aside.mkdir(mode=0o700, exist_ok=True)
        argv = [
            setpriv,
            "--pdeathsig=KILL",
            "--",
            unshare,
            "--mount",
            "--propagation=private",
            "--",
            "/bin/sh",
            "-c",
            PRELUDE,
            "egressd-sandbox",
            str(aside),
            str(prelude_log),
            *self._flags(runsc, logs, "run"),
            "run",
            f"--bundle={bundle_dir.absolute()}",
            sandbox_id,
        ]
        launch.started = True
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError("launch_failed", f"{argv[0]}: {exc}") from exc
        launch.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        out_sink, err_sink = _Sink(stdout), _Sink(stderr, hold=RUNSC_FATAL_PREFIX)
        launch.sinks = [out_sink, err_sink]
        launch.relays = [
            asyncio.create_task(_relay(proc.stdout, out_sink), name=f"sandbox-{sandbox_id}-stdout"),
            asyncio.create_task(_relay(proc.stderr, err_sink), name=f"sandbox-{sandbox_id}-stderr"),
        ]
        try:
            async with asyncio.timeout(timeout):
                rc = await proc.wait()
        except TimeoutError as exc:
            raise SandboxError(
                "timeout", f"sandbox {sandbox_id} still running after {timeout:g} s; killed"
            ) from exc
        await self._drain(launch.relays)
        prelude_error = prelude_log.read_text(errors="replace").strip()
        if prelude_error:
            raise SandboxError("launch_failed", f"mount namespace set-up: {prelude_error}")
        if rc == RUNSC_FATAL_EXIT:
            error = runsc_errors(logs / "runsc-run.log")
            if error is not None:
                err_sink.drop(error)
                err_sink.release()
                raise classify_launch_error(error)
        err_sink.release()
        return rc

    def run_sync(
        self,
        sandbox_id: str,
        bundle_dir: Path,
        netns_name: str,
        *,
        stdout: BinaryIO,
        stderr: BinaryIO,
        timeout: float | None,
    ) -> int:
        """`run` in its own event loop (for the CLI); Ctrl-C cleans up, then raises."""
        return asyncio.run(
            self.run(
                sandbox_id, bundle_dir, netns_name, stdout=stdout, stderr=stderr, timeout=timeout
            )
        )

    async def _drain(self, relays: Sequence[asyncio.Task[None]]) -> None:
        """Let the relays reach EOF; cancel them if the pipes stay open too long."""
        if not relays:
            return
        _, pending = await asyncio.wait(relays, timeout=self.kill_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _stop(self, sandbox_id: str, proc: asyncio.subprocess.Process) -> None:
        """Kill the container, then the runsc process we started if it lingers.

        runsc's sandbox is `--attached` and runsc has a parent-death signal, so
        killing runsc's process group takes the whole tree down.
        """
        if await self.kill(sandbox_id):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.kill_grace_s)
                return
        if proc.returncode is not None:
            return
        log.warning("sandbox_force_kill", sandbox_id=sandbox_id, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    async def _cleanup(self, launch: _Launch, *, quiet: bool) -> None:
        failures: list[str] = []
        if launch.proc is not None and launch.proc.returncode is None:
            await self._stop(launch.sandbox_id, launch.proc)
        await self._drain(launch.relays)
        for sink in launch.sinks:
            sink.release()
        if launch.started:
            try:
                await self.delete(launch.sandbox_id)
            except SandboxError as exc:
                failures.append(exc.detail)
        try:
            remove_bundle(launch.bundle_dir)
        except SandboxError as exc:
            failures.append(exc.detail)
        if not self.keep_logs:
            # After `runsc delete`, which logs there too. One directory per sandbox
            # would otherwise pile up; the launch error, if any, is raised.
            shutil.rmtree(self.log_dir(launch.sandbox_id), ignore_errors=True)
        if failures:
            log.error("sandbox_cleanup_failed", sandbox_id=launch.sandbox_id, failures=failures)
            if not quiet:
                raise SandboxError("cleanup_failed", "; ".join(failures))
