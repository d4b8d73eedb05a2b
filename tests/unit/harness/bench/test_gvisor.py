"""The gVisor row's pieces that run without a sandbox: its command protocol and runner."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egressd_harness.bench import gvisor
from egressd_harness.bench.load import LoadError, Target, run_bulk, run_client


def test_parse_getent() -> None:
    text = (
        "203.0.113.10    STREAM api.allowed.test\n"
        "203.0.113.10    DGRAM  \n"
        "203.0.113.11    RAW    \n"
        "\n"
    )
    assert gvisor.parse_getent(text) == [
        ipaddress.IPv4Address("203.0.113.10"),
        ipaddress.IPv4Address("203.0.113.11"),
    ]
    assert gvisor.parse_getent("") == []
    assert gvisor.parse_getent("nonsense here\n") == []


def test_parse_answer() -> None:
    done = gvisor.parse_answer(b'{"rc": 3, "out": "o", "err": "e"}')
    assert (done.returncode, done.stdout, done.stderr) == (3, "o", "e")
    for bad in (b"", b"{", b'{"rc": 1}', b'"x"', b'{"rc": "x", "out": "", "err": ""}'):
        with pytest.raises(LoadError) as info:
            gvisor.parse_answer(bad)
        assert info.value.reason == "gvisor_protocol"


def test_server_protocol_with_a_real_process() -> None:
    """SERVER as the sandbox runs it (here on the host): one answer a line, EOF ends it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", gvisor.SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    reader = gvisor._LineReader(proc.stdout)
    try:
        assert reader.readline(10) == b'{"ready": true}'
        requests = [
            (["sh", "-c", "echo out; echo err >&2; exit 4"], 5.0),
            (["sleep", "5"], 0.2),
            (["/nonexistent/cmd"], 5.0),
        ]
        for argv, timeout in requests:
            proc.stdin.write(gvisor.request_line(argv, timeout))
        proc.stdin.flush()
        answers = [reader.readline(10) for _ in requests]
        assert all(a is not None for a in answers)
        first, slow, missing = (gvisor.parse_answer(a or b"") for a in answers)
        assert (first.returncode, first.stdout, first.stderr) == (4, "out\n", "err\n")
        assert slow.returncode == -1 and "timeout" in slow.stderr
        assert missing.returncode == -2
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_line_reader_deadline_and_eof() -> None:
    r, w = os.pipe()
    with os.fdopen(r, "rb", buffering=0) as pipe:
        reader = gvisor._LineReader(pipe)
        assert reader.readline(0.1) is None  # nothing yet: the deadline, not a block
        os.write(w, b"a\nb")
        assert reader.readline(1) == b"a"
        assert reader.readline(0.1) is None  # half a line
        os.write(w, b"c\n")
        assert reader.readline(1) == b"bc"
        os.close(w)
        assert reader.readline(1) is None  # EOF


def test_load_commands_go_through_the_runner() -> None:
    seen: list[tuple[list[str], float]] = []

    def runner(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        seen.append((argv, timeout))
        return subprocess.CompletedProcess(argv, 0, "200 1000 0.5 0.01\n", "")

    target = Target("label-only", ipaddress.IPv4Address("203.0.113.10"), 80, "x", runner=runner)
    result = run_bulk(target, 1000, max_time_s=20)
    assert result.nbytes == 1000 and result.seconds == 0.5
    assert seen[0][0][0] == "curl" and seen[0][1] == 30
    assert run_client(target, ["true"], 1.0).returncode == 0


def test_platform_is_on_the_launch_command() -> None:
    class _Layout:
        run_dir = "/run/x"

    class _Fleet:
        layout = _Layout()
        run_dir = "/run/x"

    path = gvisor.GvisorPath(_Fleet(), platform="kvm")  # type: ignore[arg-type]
    argv = path._argv(Path("/tmp/p.jws"))
    assert argv[argv.index("--platform") + 1] == "kvm"
    assert argv[argv.index("--run-dir") + 1] == "/run/x"
    assert argv[argv.index("--") + 1 :][:2] == ["python3", "-c"]
    assert "--platform=kvm" in path.description
