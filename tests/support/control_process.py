"""`egressd control serve` as a real process: its command line (one for every test that starts
the control plane, in a namespace or on loopback), and one process on loopback with its files.
The `paths` and `spawn` fixtures are in tests/integration/conftest.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

JOB_ID = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"
NODE1 = {"underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"}
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def control_argv(
    listen: str, *extra: str, state: Path, key: Path, token: Path, port_file: Path | None = None
) -> list[str]:
    """`egressd control serve` on `listen` with its state, signing key and admin token files;
    it writes its port to `port_file`, if given, once it listens."""
    return [
        sys.executable,
        "-m",
        "egressd",
        "control",
        "serve",
        "--listen",
        listen,
        "--state-dir",
        str(state),
        "--key",
        str(key),
        "--admin-token-file",
        str(token),
        *(["--port-file", str(port_file)] if port_file is not None else []),
        *extra,
    ]


@dataclass
class Paths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def token(self) -> Path:
        return self.root / "admin-token"

    @property
    def port_file(self) -> Path:
        return self.root / "port"


class ControlProcess:
    """One `egressd control serve` subprocess; its stderr goes to a file."""

    def __init__(self, paths: Paths, *extra: str) -> None:
        self.paths = paths
        self.stderr_path = paths.root / f"stderr-{time.monotonic_ns()}.log"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            control_argv(
                "127.0.0.1:0",
                *extra,
                state=paths.state,
                key=paths.keys / "signing.key",
                token=paths.token,
                port_file=paths.port_file,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        self.port = 0
        self.base = ""

    def wait_listening(self) -> None:
        self.port = self._wait_for_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"control plane exited {self.proc.returncode}: {self.stderr()}")
            try:
                text = self.paths.port_file.read_text()
            except FileNotFoundError:
                time.sleep(0.05)
                continue
            if text.endswith("\n"):
                return int(text)
        pytest.fail(f"control plane did not write {self.paths.port_file}: {self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._stderr.close()


def start(spawn: list[ControlProcess], paths: Paths) -> ControlProcess:
    proc = ControlProcess(paths)
    spawn.append(proc)  # recorded before waiting, so a failed start is still killed
    proc.wait_listening()
    return proc
