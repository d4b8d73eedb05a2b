"""Live policies on the node: the agent follows the control plane's job policies.

With a control plane configured (`discovery.control_url`), the agent:

* checks every registration against the control plane (`ControlPolicies.held`,
  used by `SandboxManager`): the JWS presented must be one the control plane
  holds. A 404 refuses with ``policy_not_held``, a held policy whose content
  (`same_policy`: everything but ``iat``/``nbf``/``exp``) differs with
  ``policy_superseded``, an unreachable control plane or a bad answer with
  ``control_unreachable`` (fail closed: the agent cannot tell a deleted job
  from a live one). The digest alone is not compared: the control plane
  re-signs a policy on GET once less than half its TTL remains, so two
  honest copies of one policy may differ in ``iat``/``exp`` and digest. The
  sandbox then runs on the control plane's copy (its digest goes in the
  GENEVE option, so the proxies see the digest they fetch themselves);
* subscribes to the watch (`AgentPolicyWatch`, task ``agent-watch``; the
  long-poll client is `egressd.control.watch_client.WatchStream`, shared with
  the proxies): a ``job`` notice for a job with sandboxes here refetches the
  job's policy (task ``agent-watch-jobs``, one job at a time) and hands it to
  `SandboxManager.refresh_job`: reprogrammed tier 1 (ports, exemptions,
  DNS/SYN buckets) and data path (GENEVE digest) for every sandbox of the
  job, or on a 404 its sandboxes withdrawn from tier 1 (their frames drop as
  ``no_policy``). ``node``/``proxy`` notices refresh proxy discovery.
  ``resync`` (first answer, after an outage, a restarted control plane)
  refetches every job with sandboxes here and refreshes discovery.

While the watch is down the agent keeps what it has: sandboxes keep their
last verified policy until its ``exp`` (`SandboxManager.expire`), as before.
An agent without a control plane (static proxies only) neither checks nor
watches.

`same_policy` is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter

from egressd.control.watch_client import (
    RESULTS,
    WatchStream,
    read_json_body,
)
from egressd.policy.model import Policy

log = structlog.get_logger("egressd.agent.policy_watch")

MAX_BODY_BYTES = 1024 * 1024


class ControlUnavailable(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def same_policy(a: Policy, b: Policy) -> bool:
    """Whether two policies say the same thing (validity times aside)."""
    times = {"iat": None, "nbf": None, "exp": None}
    return dataclasses.replace(a, **times) == dataclasses.replace(b, **times)


class ControlPolicies:
    """Reads of `GET {control_url}/v1/jobs/{job_id}/policy` (no token: reads are open)."""

    def __init__(self, control_url: str, timeout_s: float) -> None:
        self.base = control_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(2.0, timeout_s))
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=self._timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def held(self, job_id: uuid.UUID) -> str | None:
        """The JWS the control plane holds for `job_id`, None on a 404; ControlUnavailable."""
        if self.session is None:
            raise ControlUnavailable("the agent's control plane client is not started")
        url = f"{self.base}/v1/jobs/{job_id}/policy"
        try:
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise ControlUnavailable(f"GET {url}: HTTP {response.status}")
                body = await read_json_body(response, MAX_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ControlUnavailable(f"GET {url}: {exc!r}") from exc
        except ValueError as exc:
            raise ControlUnavailable(f"GET {url}: {exc}") from exc
        token = body.get("jws") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ControlUnavailable(f"GET {url}: answer has no 'jws' string")
        return token


class AgentPolicyWatch:
    """The agent's subscription (see the module docstring)."""

    def __init__(
        self,
        control: ControlPolicies,
        *,
        jobs: Callable[[], set[uuid.UUID]],
        refresh_job: Callable[[uuid.UUID], Awaitable[object]],
        refresh_discovery: Callable[[], Awaitable[object]] | None,
        metrics: CollectorRegistry,
        poll_timeout_s: float = 25.0,
    ) -> None:
        assert control.session is not None, "control.start() first"
        self._control = control
        self._jobs = jobs
        self._refresh_job = refresh_job
        self._refresh_discovery = refresh_discovery
        self._pending: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._discovery_wanted = False
        self._tasks: list[asyncio.Task[None]] = []
        answers = Counter(
            "egressd_agent_watch_answers_total",
            "Watch answers from the control plane, by result",
            ["result"],
            registry=metrics,
        )
        for result in RESULTS:
            answers.labels(result)
        self.stream = WatchStream(
            control.session, control.base, apply=self.apply, answers=answers, logger=log,
            poll_timeout_s=poll_timeout_s,
        )  # fmt: skip

    def apply(self, changes: list[tuple[str, str, str]], resync: bool) -> None:
        """Queue the work one answer asks for (done by the `agent-watch-jobs` task)."""
        here = self._jobs()
        if resync:
            self._pending |= here
            self._discovery_wanted = self._refresh_discovery is not None
        for kind, key, _op in changes:
            if kind == "job":
                with contextlib.suppress(ValueError):
                    job_id = uuid.UUID(key)
                    if job_id in here:
                        self._pending.add(job_id)
            elif kind in ("node", "proxy") and self._refresh_discovery is not None:
                self._discovery_wanted = True
        if self._pending or self._discovery_wanted:
            self._wake.set()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._discovery_wanted and self._refresh_discovery is not None:
                self._discovery_wanted = False
                await self._refresh_discovery()
            while self._pending:
                job_id = self._pending.pop()
                try:
                    await self._refresh_job(job_id)
                except Exception as exc:  # noqa: BLE001 - one job must not stop the others
                    log.error("job_policy_update_failed", job_id=str(job_id), error=repr(exc))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.stream.run(), name="agent-watch"),
            loop.create_task(self._work(), name="agent-watch-jobs"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


__all__ = ["AgentPolicyWatch", "ControlPolicies", "ControlUnavailable", "same_policy"]
