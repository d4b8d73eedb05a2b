"""The client side of the control plane's watch (`egressd.control.watch`), shared by the
proxies (`egressd.proxy.watch`) and the node agents (`egressd.agent.policy_watch`).

`WatchStream.run` long-polls `GET {control_url}/v1/watch?since=REV` for ever:

* each good answer goes to `apply(changes, resync)`;
* an error (unreachable, HTTP status, bad body) marks the stream down
  (`on_state(False)`, logged once per outage) and retries after a jittered
  exponential backoff (`BACKOFF_MIN_S` doubling up to `BACKOFF_MAX_S`). The
  first request after an error (or at start) asks with `timeout=0`, and its
  answer is treated as a resync whatever it says: changes may have been
  missed while the stream was down, and that must not wait for the next change.

`parse_answer` and `backoff_delay` are pure.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import aiohttp
import structlog
from prometheus_client import Counter

POLL_TIMEOUT_S = 25.0
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_BODY_BYTES = 4 * 1024 * 1024
RESULTS = ("changes", "empty", "resync", "unreachable", "http_error", "bad_response")

Changes = list[tuple[str, str, str]]


class WatchError(Exception):
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


def parse_answer(body: object) -> tuple[int, Changes, bool]:
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
        if not (isinstance(kind, str) and isinstance(key, str) and isinstance(op, str)):
            raise WatchError("bad_response", "a change lacks kind, key or op")
        out.append((kind, key, op))
    return revision, out, body.get("resync") is True


def backoff_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff for the `attempt`-th consecutive failure (from 1)."""
    ceiling: float = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** max(0, attempt - 1))
    return BACKOFF_MIN_S / 2 + rng() * (ceiling - BACKOFF_MIN_S / 2)


async def read_json_body(response: aiohttp.ClientResponse, limit: int) -> object:
    """The response body decoded as JSON; ValueError when longer than `limit` or not JSON."""
    if (response.content_length or 0) > limit:
        raise ValueError(f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return json.loads(b"".join(chunks))


class WatchStream:
    """One subscription's long-poll loop (see the module docstring)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        control_url: str,
        *,
        apply: Callable[[Changes, bool], None],
        on_state: Callable[[bool], None] = lambda up: None,
        answers: Counter | None = None,
        logger: structlog.typing.FilteringBoundLogger | None = None,
        poll_timeout_s: float = POLL_TIMEOUT_S,
    ) -> None:
        self._session = session
        self.url = control_url.rstrip("/") + "/v1/watch"
        self._apply = apply
        self._on_state = on_state
        self._answers = answers
        self._log = logger if logger is not None else structlog.get_logger("egressd.watch")
        self.poll_timeout_s = poll_timeout_s
        self.revision: int | None = None
        self.up = False

    def _count(self, result: str) -> None:
        if self._answers is not None:
            self._answers.labels(result).inc()

    async def poll(self, wait: bool) -> tuple[int, Changes, bool]:
        params = {"timeout": str(self.poll_timeout_s if wait else 0)}
        if self.revision is not None:
            params["since"] = str(self.revision)
        timeout = aiohttp.ClientTimeout(total=self.poll_timeout_s + 5.0, sock_connect=2.0)
        try:
            async with self._session.get(self.url, params=params, timeout=timeout) as response:
                if response.status != 200:
                    raise WatchError("http_error", f"GET {self.url}: HTTP {response.status}")
                body = await read_json_body(response, MAX_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise WatchError("unreachable", f"GET {self.url}: {exc!r}") from exc
        except ValueError as exc:
            raise WatchError("bad_response", f"GET {self.url}: {exc}") from exc
        return parse_answer(body)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self._on_state(up)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                # After an error, ask without waiting: the resync must not wait for a change.
                revision, changes, resync = await self.poll(wait=self.up)
            except WatchError as exc:
                self._count(exc.result)
                failures += 1
                if self.up or failures == 1:
                    self._log.warning("watch_down", result=exc.result, detail=exc.detail)
                self._set_up(False)
                await asyncio.sleep(backoff_delay(failures))
                continue
            recovered = not self.up
            if recovered:
                self._log.info("watch_up", revision=revision, failures=failures, resync=True)
            failures = 0
            self._set_up(True)
            resync = resync or recovered
            self._count("resync" if resync else "changes" if changes else "empty")
            self.revision = revision
            self._apply(changes, resync)


__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "POLL_TIMEOUT_S",
    "RESULTS",
    "WatchError",
    "WatchStream",
    "backoff_delay",
    "parse_answer",
    "read_json_body",
]
