"""The proxy's subscription to the control plane's watch (`egressd.control.watch`).

One named task (`proxy-watch`) long-polls `GET {control_url}/v1/watch?since=REV`:

* a `job` change calls `PolicyStore.changed(job_id)`: a policy in use is
  refetched at once (a 404 revokes it, a new digest replaces it; either way
  `egressd.proxy.live` re-decides the job's open connections);
* a `node` or `proxy` change triggers one registry refresh (`NodeRegistry.refresh`);
* `resync` (first answer, a revision older than the control plane's log, a
  control plane restarted or restored) revalidates every cached policy and
  refreshes the registry;
* an error (unreachable, HTTP status, bad body) turns `PolicyStore.watching`
  off, so the periodic revalidation and registry polling carry on as the
  fallback, and retries after a jittered exponential backoff
  (`BACKOFF_MIN_S` doubling up to `BACKOFF_MAX_S`). The first request after
  an error (or at start) asks with `timeout=0`, and its answer is treated as
  a resync whatever it says: changes may have been missed while the stream
  was down, and that must not wait for the next change.

While the control plane is down the proxy keeps enforcing the policies it
holds until their `exp` and refuses jobs it does not know (`PolicyStore`:
`control_unreachable`), as before.

The long-poll loop itself (poll, backoff, resync after an error) is
`egressd.control.watch_client.WatchStream`, shared with the node agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from egressd.control.watch_client import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    MAX_BODY_BYTES,
    POLL_TIMEOUT_S,
    RESULTS,
    WatchError,
    WatchStream,
    backoff_delay,
    parse_answer,
)
from egressd.proxy.policies import PolicyStore

log = structlog.get_logger("egressd.proxy.watch")


class PolicyWatch:
    """The subscription task (see the module docstring)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        control_url: str,
        policies: PolicyStore,
        *,
        refresh_registry: Callable[[], Awaitable[object]],
        metrics: CollectorRegistry,
        poll_timeout_s: float = POLL_TIMEOUT_S,
    ) -> None:
        self._policies = policies
        self._refresh_registry = refresh_registry
        self._task: asyncio.Task[None] | None = None
        self._registry_task: asyncio.Task[object] | None = None
        self._registry_again = False
        self._answers = Counter(
            "egressd_watch_answers_total",
            "Watch answers from the control plane, by result",
            ["result"],
            registry=metrics,
        )
        for result in RESULTS:
            self._answers.labels(result)
        self._stream = WatchStream(
            session,
            control_url,
            apply=self.apply,
            on_state=self._on_state,
            answers=self._answers,
            logger=log,
            poll_timeout_s=poll_timeout_s,
        )
        self._changes = Counter(
            "egressd_watch_changes_total",
            "Change notices received, by kind",
            ["kind"],
            registry=metrics,
        )
        Gauge(
            "egressd_watch_up",
            "1 while the watch stream answers (else polling)",
            registry=metrics,
        ).set_function(lambda: 1.0 if policies.watching else 0.0)

    @property
    def revision(self) -> int | None:
        return self._stream.revision

    def _on_state(self, up: bool) -> None:
        self._policies.watching = up

    def apply(self, changes: list[tuple[str, str, str]], resync: bool) -> None:
        """Act on one answer's notices (the fetches run in the background)."""
        if resync:
            self._policies.resync()
            self._registry_changed()
            return
        registry = False
        for kind, key, _op in changes:
            self._changes.labels(kind).inc()
            if kind == "job":
                try:
                    job_id = uuid.UUID(key)
                except ValueError:
                    continue
                self._policies.changed(job_id)
            elif kind in ("node", "proxy"):
                registry = True
        if registry:
            self._registry_changed()

    def _registry_changed(self) -> None:
        if self._registry_task is not None and not self._registry_task.done():
            self._registry_again = True
            return
        self._registry_task = asyncio.get_running_loop().create_task(
            self._registry_refresh(), name="proxy-watch-registry"
        )

    async def _registry_refresh(self) -> object:
        while True:
            self._registry_again = False
            await self._refresh_registry()
            if not self._registry_again:
                return None

    async def _run(self) -> None:
        await self._stream.run()

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="proxy-watch")
        return self._task

    async def close(self) -> None:
        for task in (self._task, self._registry_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._registry_task = None
        self._stream.up = False  # a restart asks at once, as after an error
        self._policies.watching = False


# Re-exported: the proxy's tests and callers know them from here.
__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "MAX_BODY_BYTES",
    "PolicyWatch",
    "WatchError",
    "backoff_delay",
    "parse_answer",
]
