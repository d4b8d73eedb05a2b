"""Tier-1 denials as audit events: the agent's reader of the t1_events ring buffer.

bpf/tier1.c reports each denial of a registered sandbox's frame to t1_events,
at most `EVENT_BUCKET` a second per sandbox, the rest counted in the next
event's ``suppressed``. `Tier1EventReader` runs one named asyncio task
(``tier1-events``) that waits for the ring's fd to poll readable, drains it,
and logs one ``tier1_denial`` line per record (warning level, logger
``egressd.agent.audit``) beside the proxies' ``connection`` and ``dns`` audit
events, with the same field names (`egressd.proxy.audit`):

    job_id, sandbox_id, node, source, dst, port, proto, verdict ("deny"),
    reason (the tier-1 counter reason), action ("rst": tier 1 answered the SYN
    with a RST; "drop"), suppressed (this sandbox's denials not logged since its
    previous event), and ``time`` (added by the log set-up, `egressd.logs`:
    records are drained as they come, within milliseconds of the frame).

A record whose veth no longer has a sandbox (unregistered while the record
waited) is logged with ``sandbox_id`` and ``job_id`` null.

`denial_event` is pure; the reader is the I/O edge. Nothing raises out of
the task: a bad record is logged (``tier1_event_bad``) and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import structlog

from egressd.agent.ringbuf import RingBuffer
from egressd.agent.tier1_maps import Tier1Error, Tier1Event, unpack_event
from egressd.proxy.audit import (
    DST,
    JOB_ID,
    NODE,
    PORT,
    REASON,
    SOURCE,
    VERDICT,
    VERDICT_DENY,
)

if TYPE_CHECKING:
    from egressd.agent.sandboxes import Sandbox

EVENT_NAME: Final = "tier1_denial"
SANDBOX_ID: Final = "sandbox_id"
PROTO: Final = "proto"
ACTION: Final = "action"
SUPPRESSED: Final = "suppressed"
ACTION_RST: Final = "rst"
ACTION_DROP: Final = "drop"
#: Safety net: drain at least this often even if a wakeup were missed.
POLL_INTERVAL_S: Final = 1.0

log = structlog.get_logger("egressd.agent.tier1_events")


def denial_event(event: Tier1Event, sandbox: Sandbox | None, node: str) -> dict[str, object]:
    """The ``tier1_denial`` fields for one ring-buffer record."""
    return {
        JOB_ID: None if sandbox is None else str(sandbox.job_id),
        SANDBOX_ID: None if sandbox is None else sandbox.sandbox_id,
        NODE: node,
        SOURCE: None if sandbox is None else str(sandbox.ip),
        DST: None if event.dst is None else str(event.dst),
        PORT: event.port if event.proto_name in ("tcp", "udp") else None,
        PROTO: event.proto_name,
        VERDICT: VERDICT_DENY,
        REASON: event.reason.value,
        ACTION: ACTION_RST if event.rst else ACTION_DROP,
        SUPPRESSED: event.suppressed,
    }


class Tier1EventReader:
    """Drains `ring` on the event loop and logs each denial (see the module doc)."""

    def __init__(
        self,
        ring: RingBuffer,
        sandbox_for: Callable[[int], Sandbox | None],
        node: str,
        *,
        logger: Any = None,
    ) -> None:
        self._ring = ring
        self._sandbox_for = sandbox_for
        self._node = node
        self._log = (
            logger
            if logger is not None
            else structlog.get_logger("egressd.agent.audit").bind(component="agent")
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.logged = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._ring.fd, self._wake.set)
        self._loop = loop
        self._task = asyncio.create_task(self._run(), name="tier1-events")

    async def stop(self) -> None:
        """Stop reading, log what is still in the ring, close it. Idempotent."""
        if self._loop is not None:
            self._loop.remove_reader(self._ring.fd)
            self._loop = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.drain()
        self._ring.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
            self._wake.clear()
            self.drain()

    def drain(self) -> int:
        """Log every record waiting in the ring; how many were logged."""
        try:
            records = self._ring.drain()
        except OSError as exc:
            log.warning("tier1_events_read_failed", error=str(exc))
            return 0
        if not records:
            return 0
        done = 0
        for raw in records:
            try:
                event = unpack_event(raw)
            except Tier1Error as exc:
                log.warning("tier1_event_bad", reason=exc.reason, detail=exc.detail)
                continue
            fields = denial_event(event, self._sandbox_for(event.ifindex), self._node)
            self._log.warning(EVENT_NAME, **fields)
            done += 1
        self.logged += done
        return done
