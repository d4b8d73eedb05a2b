"""The control plane's watch: `GET /v1/watch?since=REV&timeout=S`, a long-poll of changes.

Every put or delete of a job policy, node or proxy takes the next revision
(`egressd.control.store`: durable, never goes backwards across a restart).
The last `LOG_SIZE` changes are kept in memory (`ChangeLog`). A watcher asks
for what happened after the revision it has seen:

* changes after `since` are in the log: answered at once,
  `{"revision": R, "changes": [{"rev", "kind", "key", "op"}, ...]}` (`kind`:
  job, node or proxy; `key`: the job id or name; `op`: put or delete);
* nothing after `since` yet: the answer waits until a change commits or
  `timeout` seconds pass (default 25, at most 60; then `changes` is empty);
* `since` absent, older than the log (the log is bounded, and empty after a
  restart) or newer than the current revision (the state was restored from an
  older backup): `{"revision": R, "resync": true, "changes": []}`, meaning
  "re-list everything you hold, then watch from R".

Why long-poll rather than server-sent events: every answer is one plain JSON
document that the proxies' existing aiohttp session, `curl` and the tests
read the same way; a lost connection costs one request; resumption is the
same request with the last revision. A change reaches a waiting watcher in
one round trip (milliseconds on the underlay).

`GET /v1/jobs` is the list a resyncing watcher (or `egressd job list`)
re-reads: `{"revision": R, "jobs": [{"job_id", "account", "digest", "exp",
"nodes"}, ...]}`, ordered by job id (no JWS: fetch one with its GET).

Only change *notices* travel on the watch; watchers fetch what changed with
the ordinary GETs, which keeps one path for trust (a proxy verifies the JWS
it fetched, as before). Reads need no token (see `egressd.control.app`).

`ChangeLog.since` is pure over the log's contents; waking waiters is the only
I/O, and commits may come from the store's writer thread
(`loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

from aiohttp import web

from egressd.control.store import Change, StateStore
from egressd.policy.jws import policy_digest

LOG_SIZE = 4096
DEFAULT_TIMEOUT_S = 25.0
MAX_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class WatchAnswer:
    revision: int
    changes: tuple[Change, ...]
    resync: bool

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "revision": self.revision,
            "changes": [c.to_json() for c in self.changes],
        }
        if self.resync:
            body["resync"] = True
        return body


class ChangeLog:
    """The last `size` changes and the current revision (thread-safe appends)."""

    def __init__(self, revision: int, size: int = LOG_SIZE) -> None:
        self._changes: collections.deque[Change] = collections.deque(maxlen=size)
        # The log covers every change after `_base` (nothing before the process started).
        self._base = revision
        self.revision = revision
        self._mutex = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def append(self, change: Change) -> None:
        with self._mutex:
            if change.rev <= self.revision:
                return  # never out of order: the store serialises writers
            if len(self._changes) == self._changes.maxlen:
                self._base = self._changes[0].rev
            self._changes.append(change)
            self.revision = change.rev
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(event.set)

    def since(self, since: int | None) -> WatchAnswer:
        """What a watcher that has seen `since` needs (pure over the log)."""
        with self._mutex:
            current = self.revision
            if since is None or since < self._base or since > current:
                return WatchAnswer(current, (), True)
            changes = tuple(c for c in self._changes if c.rev > since)
            return WatchAnswer(current, changes, False)

    async def wait(self, since: int | None, timeout_s: float) -> WatchAnswer:
        """`since(since)`, waiting up to `timeout_s` for a change when there is none yet."""
        answer = self.since(since)
        if answer.resync or answer.changes or timeout_s <= 0:
            return answer
        event = asyncio.Event()
        with self._mutex:
            if self.revision != answer.revision:
                return self.since(since)
            self._waiters.append((asyncio.get_running_loop(), event))
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            with self._mutex:
                self._waiters = [w for w in self._waiters if w[1] is not event]
        return self.since(since)


def _query_number(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw) if name == "timeout" else int(raw)
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=f'{{"error": "bad_query", "field": "{name}"}}', content_type="application/json"
        ) from exc
    if not 0 <= value < float("inf"):  # also NaN
        raise web.HTTPBadRequest(
            text=f'{{"error": "bad_query", "field": "{name}"}}', content_type="application/json"
        )
    return value


WATCH_LOG: web.AppKey[ChangeLog] = web.AppKey("watch_log", ChangeLog)


def add_watch_routes(app: web.Application, store: StateStore) -> ChangeLog:
    """Serve `GET /v1/watch` from a change log fed by `store`'s commits."""
    log = ChangeLog(store.revision)
    store.revisions.listeners.append(log.append)

    async def on_startup(_app: web.Application) -> None:
        # The store may be loaded after the app was built (its revision read then).
        with log._mutex:
            if not log._changes and log.revision < store.revision:
                log.revision = log._base = store.revision

    async def watch(request: web.Request) -> web.Response:
        since = _query_number(request, "since")
        timeout = _query_number(request, "timeout")
        timeout_s = DEFAULT_TIMEOUT_S if timeout is None else min(float(timeout), MAX_TIMEOUT_S)
        answer = await log.wait(None if since is None else int(since), timeout_s)
        return web.json_response(answer.to_json())

    async def list_jobs(_request: web.Request) -> web.Response:
        revision = store.revision
        jobs = [
            {
                "job_id": str(record.job_id),
                "account": record.payload.get("account"),
                "digest": policy_digest(record.jws).hex(),
                "exp": record.exp,
                "nodes": list(record.payload.get("nodes", [])),
            }
            for record in store.jobs
        ]
        return web.json_response({"revision": revision, "jobs": jobs})

    app[WATCH_LOG] = log
    app.on_startup.append(on_startup)
    app.router.add_get("/v1/watch", watch, name="watch")
    app.router.add_get("/v1/jobs", list_jobs, name="jobs")
    return log


__all__ = ["ChangeLog", "WatchAnswer", "add_watch_routes"]
