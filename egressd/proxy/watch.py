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
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from egressd.proxy.policies import PolicyStore
from egressd.proxy.registry import read_json_body

POLL_TIMEOUT_S = 25.0
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_BODY_BYTES = 4 * 1024 * 1024

log = structlog.get_logger("egressd.proxy.watch")


class WatchError(Exception):
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


def parse_answer(body: object) -> tuple[int, list[tuple[str, str, str]], bool]:
    """(revision, [(kind, key, op)], resync) of one watch answer; WatchError if malformed."""
    if not isinstance(body, dict):
        raise WatchError("bad_response", "not a JSON object")
    revision = body.get("revision")
    changes = body.get("changes")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise WatchError("bad_response", "no revision")
    if not isinstance(changes, list):
        raise WatchError("bad_response", "no changes list")
    out = []
    for change in changes:
        if not isinstance(change, dict):
            raise WatchError("bad_response", "a change is not an object")
        kind, key, op = change.get("kind"), change.get("key"), change.get("op")
        if not all(isinstance(v, str) for v in (kind, key, op)):
            raise WatchError("bad_response", "a change lacks kind, key or op")
        out.append((kind, key, op))
    return revision, out, body.get("resync") is True


def backoff_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff for the `attempt`-th consecutive failure (from 1)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** max(0, attempt - 1))
    return BACKOFF_MIN_S / 2 + rng() * (ceiling - BACKOFF_MIN_S / 2)


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
        self._session = session
        self._url = control_url.rstrip("/") + "/v1/watch"
        self._policies = policies
        self._refresh_registry = refresh_registry
        self._poll_timeout_s = poll_timeout_s
        self.revision: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._registry_task: asyncio.Task[object] | None = None
        self._registry_again = False
        self._answers = Counter(
            "egressd_watch_answers_total",
            "Watch answers from the control plane, by result",
            ["result"],
            registry=metrics,
        )
        for result in ("changes", "empty", "resync", "unreachable", "http_error", "bad_response"):
            self._answers.labels(result)
        self._changes = Counter(
            "egressd_watch_changes_total", "Change notices received, by kind", ["kind"],
            registry=metrics,
        )
        Gauge(
            "egressd_watch_up", "1 while the watch stream answers (else polling)",
            registry=metrics,
        ).set_function(lambda: 1.0 if policies.watching else 0.0)

    async def _poll(self, wait: bool) -> tuple[int, list[tuple[str, str, str]], bool]:
        params = {"timeout": str(self._poll_timeout_s if wait else 0)}
        if self.revision is not None:
            params["since"] = str(self.revision)
        timeout = aiohttp.ClientTimeout(total=self._poll_timeout_s + 5.0, sock_connect=2.0)
        try:
            async with self._session.get(self._url, params=params, timeout=timeout) as response:
                if response.status != 200:
                    raise WatchError("http_error", f"GET {self._url}: HTTP {response.status}")
                body = await read_json_body(response, MAX_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise WatchError("unreachable", f"GET {self._url}: {exc!r}") from exc
        except ValueError as exc:
            raise WatchError("bad_response", f"GET {self._url}: {exc}") from exc
        return parse_answer(body)

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
        failures = 0
        while True:
            try:
                # After an error, ask without waiting: the resync must not wait for a change.
                revision, changes, resync = await self._poll(wait=self._policies.watching)
            except WatchError as exc:
                self._answers.labels(exc.result).inc()
                failures += 1
                if self._policies.watching or failures == 1:
                    log.warning("watch_down", result=exc.result, detail=exc.detail)
                self._policies.watching = False
                await asyncio.sleep(backoff_delay(failures))
                continue
            recovered = not self._policies.watching
            if recovered:
                log.info("watch_up", revision=revision, failures=failures, resync=True)
            failures = 0
            self._policies.watching = True
            resync = resync or recovered
            self._answers.labels("resync" if resync else "changes" if changes else "empty").inc()
            self.revision = revision
            self.apply(changes, resync)

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
        self._policies.watching = False


__all__ = ["PolicyWatch", "WatchError", "backoff_delay", "parse_answer"]
