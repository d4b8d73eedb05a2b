"""Who launched each sandbox, and whether it still runs: the agent reaps orphans.

A sandbox lives as long as the process that registered it (the launcher,
`egressd sandbox run`, or a load generator). When that process dies without
unregistering (SIGKILL, OOM, a crash), the agent unregisters the sandbox
itself (log event `sandbox_reaped`, reason `launcher_gone`): its namespace,
veth and tier-1 entry go; runsc died with the launcher (parent-death signal).

How the agent knows the launcher:

- its PID comes from the API's Unix socket, `SO_PEERCRED`: what the kernel
  recorded at `connect()`, nothing the client claims;
- the agent opens a pidfd for it while the registering request is still
  being served (the client waits for the answer, so it is alive), and a pidfd
  names that one process: a recycled PID can never pass for it;
- every `REAP_INTERVAL_S` the service polls the pidfds; a readable pidfd is a
  process that has exited.

Chosen over a PID checked with kill(0) (recycled PIDs) and over a connection
held open by the launcher (it closes also when the agent's HTTP server drops
idle connections, and every registrant would need a second protocol). A
registrant outside the agent's PID namespace (a container without a shared
PID namespace) reads as PID 0: its sandboxes are not watched (logged as
`launcher_not_watched`) and live until unregistered, as before.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from typing import Any

import structlog

log = structlog.get_logger("egressd.agent.launchers")

REAP_INTERVAL_S = 1.0
_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_pid(sock: Any) -> int | None:
    """The PID of the process at the other end of a connected Unix socket; None if the
    kernel cannot name it (another PID namespace) or this is no Unix socket."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return None
    pid, _uid, _gid = _UCRED.unpack(raw)
    return pid if pid > 0 else None


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


class Launchers:
    """sandbox id -> pidfd of its launcher. Not thread-safe: the event loop's thread only."""

    def __init__(self) -> None:
        self._pidfds: dict[str, tuple[int, int]] = {}  # id -> (pid, pidfd)

    def __len__(self) -> int:
        return len(self._pidfds)

    def open(self, pid: int | None) -> int | None:
        """A pidfd for `pid`, or None (no PID, or the process is gone already)."""
        if pid is None:
            return None
        try:
            return os.pidfd_open(pid)
        except OSError as exc:
            log.warning("launcher_not_watched", pid=pid, error=exc.strerror or str(exc))
            return None

    def watch(self, sandbox_id: str, pid: int | None, pidfd: int | None) -> None:
        """From now on, `sandbox_id` belongs to the process behind `pidfd` (None: nobody)."""
        self.forget(sandbox_id)
        if pidfd is None:
            log.warning("launcher_not_watched", sandbox_id=sandbox_id, pid=pid)
            return
        self._pidfds[sandbox_id] = (pid or 0, pidfd)

    def pid(self, sandbox_id: str) -> int | None:
        entry = self._pidfds.get(sandbox_id)
        return entry[0] if entry is not None else None

    def forget(self, sandbox_id: str) -> None:
        entry = self._pidfds.pop(sandbox_id, None)
        if entry is not None:
            with contextlib.suppress(OSError):
                os.close(entry[1])

    def gone(self) -> list[tuple[str, int]]:
        """(sandbox id, pid) of every sandbox whose launcher has exited."""
        return [(sid, pid) for sid, (pid, fd) in list(self._pidfds.items()) if _exited(fd)]

    def close(self) -> None:
        for sandbox_id in list(self._pidfds):
            self.forget(sandbox_id)
