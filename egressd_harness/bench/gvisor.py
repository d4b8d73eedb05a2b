"""The bench's gVisor row (issue 10): the egressd path with the client inside runsc.

The `egressd` row runs wrk and curl as plain processes in the sandbox's
namespace: it measures the network path. This row runs them where a UDF runs,
in a gVisor sandbox started by `egressd sandbox run --platform P` (runsc
`--network=sandbox`), so runsc's netstack and its syscall interception are in
the figures:

    wrk/curl (in runsc) -> gVisor netstack -> veth -> tier 1 -> GENEVE -> proxy -> relay

One sandbox serves every measure of the row: its command is a small Python
loop (`SERVER`) that reads one JSON request a line on stdin (`argv`,
`timeout`), runs the command inside the sandbox and answers one JSON line on
stdout (`rc`, `out`, `err`). The sandbox asks the proxy's DNS for the site
itself (`getent ahostsv4`, through its resolv.conf), as a UDF would.

Bounded in time: every command has a timeout inside the sandbox and a deadline
outside (`COMMAND_GRACE_S` more); past it the sandbox is stopped and the row's
later measures fail at once; `sandbox run --timeout` caps the sandbox's life.

The platform (`--gvisor-platform`, default `DEFAULT_PLATFORM`) is printed with
the row: Debian's runsc 20221219 has ptrace (every syscall a round trip
through the sentry, ~86 us here) and kvm, which hangs on this VM.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

import structlog

from egressd_harness.bench.load import LoadError, Target, get_status
from egressd_harness.bench.paths import SITE, EgressdPath, PathError
from egressd_harness.bench.report import EGRESSD_GVISOR
from egressd_harness.topology.fleet import Fleet, FleetError
from egressd_harness.topology.probe import ProbeError

IPv4Address = ipaddress.IPv4Address

log = structlog.get_logger("egressd_harness.bench")

DEFAULT_PLATFORM = "ptrace"
PLATFORMS = ("ptrace", "kvm", "systrap")
READY_TIMEOUT_S = 60.0  # runsc's start under ptrace takes seconds
COMMAND_GRACE_S = 15.0
SANDBOX_LIFETIME_S = 3600.0
STOP_TIMEOUT_S = 20.0
CHECK_TIMEOUT_S = 30.0

# Runs inside the sandbox (the fleet's Python is mounted there). One request a
# line, one answer a line; EOF on stdin ends it, and with it the sandbox.
SERVER = r"""
import json, subprocess, sys
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        done = subprocess.run(req["argv"], capture_output=True, text=True, timeout=req["timeout"])
        ans = {"rc": done.returncode, "out": done.stdout, "err": done.stderr}
    except subprocess.TimeoutExpired:
        ans = {"rc": -1, "out": "", "err": "timeout after %ss" % req["timeout"]}
    except OSError as exc:
        ans = {"rc": -2, "out": "", "err": str(exc)}
    print(json.dumps(ans), flush=True)
"""


def request_line(argv: list[str], timeout: float) -> bytes:
    return (json.dumps({"argv": argv, "timeout": timeout}) + "\n").encode()


def parse_answer(line: bytes) -> subprocess.CompletedProcess[str]:
    """The server's answer line as a CompletedProcess; LoadError if it is not one."""
    try:
        doc = json.loads(line)
        rc, out, err = int(doc["rc"]), str(doc["out"]), str(doc["err"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadError("gvisor_protocol", f"unexpected answer {line[:200]!r}") from exc
    return subprocess.CompletedProcess([], rc, out, err)


def parse_getent(text: str) -> list[IPv4Address]:
    """The addresses of `getent ahostsv4 NAME` output, in order, once each."""
    out: list[IPv4Address] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        with contextlib.suppress(ValueError):
            address = IPv4Address(fields[0])
            if address not in out:
                out.append(address)
    return out


class _LineReader:
    """Lines from a pipe, each within a deadline (select + os.read: never blocks past it)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.fd = pipe.fileno()
        self.buf = b""

    def readline(self, timeout_s: float) -> bytes | None:
        """One line without its newline; None at the deadline or EOF."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


class GvisorPath(EgressdPath):
    """The egressd path with wrk and curl inside a runsc sandbox (`egressd sandbox run`)."""

    name = EGRESSD_GVISOR

    def __init__(
        self, fleet: Fleet, *, node: str = "node1", platform: str = DEFAULT_PLATFORM
    ) -> None:
        super().__init__(fleet, node=node)
        self.platform = platform
        self.description = (
            f"egressd-gvisor: wrk/curl in runsc (--platform={platform}, --network=sandbox) "
            "-> gVisor netstack -> tier 1 -> GENEVE -> proxy"
        )
        self.sandbox_id = f"bench-gv-{uuid.uuid4().hex[:10]}"
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: _LineReader | None = None
        self._address: IPv4Address | None = None

    # --- the sandbox ---------------------------------------------------------------

    def setup(self) -> Target:
        try:
            jws = self.fleet.sign_policy(self.policy(str(uuid.uuid4())))
        except (FleetError, ProbeError) as exc:
            raise PathError("policy_not_signed", f"{exc.reason}: {exc.detail}") from exc
        self.workdir = Path(tempfile.mkdtemp(prefix="egressd-bench-gvisor-"))
        policy = self.workdir / "policy.jws"
        policy.write_text(jws + "\n")
        self._start(policy)
        target = self._resolve()
        self._check(target)
        return target

    def _argv(self, policy: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "egressd",
            "sandbox",
            "run",
            "--node",
            self.node,
            "--policy",
            str(policy),
            "--run-dir",
            str(self.fleet.run_dir),
            "--id",
            self.sandbox_id,
            "--platform",
            self.platform,
            "--interactive",
            "--timeout",
            f"{SANDBOX_LIFETIME_S:.0f}",
            "--",
            "python3",
            "-c",
            SERVER,
        ]

    def _start(self, policy: Path) -> None:
        assert self.workdir is not None
        err = open(self.workdir / "sandbox.err", "wb")  # noqa: SIM115 - the child owns it
        with err:
            self._proc = subprocess.Popen(
                self._argv(policy),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        assert self._proc.stdout is not None
        self._reader = _LineReader(self._proc.stdout)
        line = self._reader.readline(READY_TIMEOUT_S)
        if line is None or b'"ready"' not in line:
            self._stop()
            raise PathError("gvisor_not_ready", f"sandbox did not start: {self.log_tail()}")
        log.info("gvisor_sandbox_started", sandbox_id=self.sandbox_id, platform=self.platform)

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the sandbox; the `Target.runner` of this row."""
        proc, reader = self._proc, self._reader
        if proc is None or reader is None or proc.poll() is not None or proc.stdin is None:
            raise LoadError("gvisor_gone", f"the sandbox is not running: {self.log_tail()}")
        try:
            proc.stdin.write(request_line(argv, timeout))
            proc.stdin.flush()
        except OSError as exc:
            raise LoadError("gvisor_gone", f"{exc}: {self.log_tail()}") from exc
        line = reader.readline(timeout + COMMAND_GRACE_S)
        if line is None:
            # Late or dead: stop it, so that nothing of this run outlives its deadline.
            self._stop()
            raise LoadError("gvisor_timeout", f"{argv[0]}: no answer within {timeout}s")
        done = parse_answer(line)
        return subprocess.CompletedProcess(argv, done.returncode, done.stdout, done.stderr)

    def _resolve(self) -> Target:
        """`getent ahostsv4 SITE` in the sandbox: its netstack asks the proxy's DNS."""
        try:
            done = self.run(["getent", "ahostsv4", SITE], 10.0)
        except LoadError as exc:
            raise PathError("sandbox_dns_failed", f"{exc.reason}: {exc.detail}") from exc
        answers = parse_getent(done.stdout)
        if done.returncode != 0 or not answers:
            raise PathError("sandbox_dns_failed", f"getent exit {done.returncode}: {done.stderr}")
        expected = self.fleet.layout.site(SITE).address
        self._address = expected if expected in answers else answers[0]
        return self._target(self.sandbox_id, self._address)

    def _target(self, netns: str, address: IPv4Address) -> Target:
        # `netns` is only a label here: every command goes through `run`.
        return Target(netns, address, 80, SITE, runner=self.run)

    def _check(self, target: Target) -> None:
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        last = "no attempt"
        while time.monotonic() < deadline:
            try:
                status = get_status(target, max_time_s=5.0)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except LoadError as exc:
                last = f"{exc.reason}: {exc.detail}"
                if exc.reason.startswith("gvisor_"):
                    break
            time.sleep(0.5)
        raise PathError("path_not_working", f"GET / from the gVisor sandbox: {last}")

    def refresh(self) -> None:
        with contextlib.suppress(PathError):
            self._resolve()

    def processes(self) -> dict[str, int]:
        # No idle measure on this row (the holder is a host process); CPU: `cpu_roots`.
        return {}

    def log_tail(self, lines: int = 5) -> str:
        if self.workdir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.workdir / "sandbox.err").read_text(errors="replace")
            return " | ".join(text.splitlines()[-lines:])
        return ""

    def _stop(self) -> None:
        """End the sandbox: EOF first (it exits and unregisters), then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        self._reader = None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()
        log.info("gvisor_sandbox_stopped", sandbox_id=self.sandbox_id, rc=proc.returncode)

    def teardown(self) -> None:
        self._stop()
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        # `sandbox run` unregistered (also on SIGTERM); after a SIGKILL the agent reaps it.
