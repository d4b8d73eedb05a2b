"""The agent reaps a sandbox whose launcher died: a real agent (`egressd agent serve`,
see test_agent.py) and real registrant processes, killed or exiting without unregistering."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from egressd.net import netns
from tests.support.agent_fleet import Fleet
from tests.support.root import AGENT_NEEDS
from tests.support.waits import wait_for

pytestmark = pytest.mark.root(*AGENT_NEEDS)


@pytest.fixture(scope="module")
def fleet(agent_fleet: Fleet) -> Fleet:
    return agent_fleet


REAP_BOUND_S = 3.0
# Registers SANDBOX_ID with the JWS on stdin, prints "up", then sleeps or exits.
REGISTRANT = r"""
import asyncio, sys, time
from egressd.agent.client import AgentClient
socket_path, sandbox_id, then = sys.argv[1:4]
async def go():
    async with AgentClient(socket_path) as agent:
        await agent.register(sandbox_id, sys.stdin.read().strip())
asyncio.run(go())
print("up", flush=True)
if then == "sleep":
    time.sleep(120)
"""


def _registrant(fleet: Fleet, sandbox_id: str, then: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", REGISTRANT, str(fleet.api_socket), sandbox_id, then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(fleet.policy() + "\n")
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "up", proc.stderr.read() if proc.stderr else ""
    return proc


def _ids(fleet: Fleet) -> list[str]:
    return [s.sandbox_id for s in fleet.list()]


def test_a_killed_launchers_sandbox_is_reaped(fleet: Fleet) -> None:
    proc = _registrant(fleet, "sbx-orphan", "sleep")
    try:
        info = next(s for s in fleet.list() if s.sandbox_id == "sbx-orphan")
        time.sleep(1.5)  # a live launcher keeps its sandbox across reaper rounds
        assert "sbx-orphan" in _ids(fleet)
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        wait_for(lambda: "sbx-orphan" not in _ids(fleet), REAP_BOUND_S, "sandbox reaped")
        print(f"reaped after {time.monotonic() - killed:.2f} s")
        assert not netns.netns_exists(info.netns)
        assert '"sandbox_reaped"' in fleet.agent_stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_launcher_that_exits_without_unregistering_is_reaped(fleet: Fleet) -> None:
    proc = _registrant(fleet, "sbx-forgotten", "exit")
    proc.wait(timeout=10)
    wait_for(lambda: "sbx-forgotten" not in _ids(fleet), REAP_BOUND_S, "sandbox reaped")


def test_a_sandbox_registered_by_a_live_process_stays(fleet: Fleet) -> None:
    fleet.register("sbx-kept", fleet.policy())  # this test process is the launcher
    time.sleep(2.5)
    assert "sbx-kept" in _ids(fleet)
    fleet.unregister("sbx-kept")
    assert "sbx-kept" not in _ids(fleet)
