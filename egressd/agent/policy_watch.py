"""Live policies on the node: the agent follows the control plane's job policies.

With a control plane configured (`discovery.control_url`), the agent:

* checks every registration against the control plane (`ControlPolicies.held`,
  used by `SandboxManager`): the JWS presented must be one the control plane
  holds. A 404 refuses with ``policy_not_held``, a held policy whose content
  (`egressd.policy.model.same_content`: everything but ``iat``/``nbf``/``exp``) differs with
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

Renewal (task ``agent-policy-renew``, with a `Renewer`: the sandbox manager):
the control plane re-signs a policy only when someone reads it with less
than half its TTL left, and a re-sign of the same content is not something
the agent would otherwise ask for, so a sandbox's held copy would run out at
its first ``exp`` however long the job runs. The agent therefore reads the
job's policy itself once `renew_at` (2/3 of the held copy's ``nbf``..``exp``:
later than the control plane's half-TTL threshold, so the read gets a
re-signed copy, and a third of the TTL before ``exp`` to retry in) has
passed. The answer is verified like any policy (keys, validity, this node,
the job); a copy of the same content (`compare_copies`) only moves the
sandboxes' held copy and GENEVE digest (proxies accept both digests as
equivalent: `egressd.proxy.digests`), another content is applied as a
change, a 404 withdraws like a delete. An unreachable control plane, a copy
that does not verify (kept: the old copy until its ``exp``, logged) or one
that was not re-signed yet are retried after `retry_delay` (1 s doubling to
60 s); counted in ``egressd_agent_policy_renewals_total{result}``.

`compare_copies`, `renew_at`, `retry_delay` and `renewal_due` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter

from egressd.control.watch_client import (
    RESULTS,
    WatchStream,
    read_json_body,
)
from egressd.policy.model import Policy, same_content

log = structlog.get_logger("egressd.agent.policy_watch")

MAX_BODY_BYTES = 1024 * 1024
RENEW_FRACTION = 2 / 3
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
RENEW_TICK_S = 1.0

# compare_copies
SAME_COPY = "same_copy"
RESIGNED = "resigned"
CHANGED = "changed"

# Results of one renewal (`Renewer.renew_job`, and the watch's own two).
RENEWED = "renewed"  # a re-signed copy of the same content: digests moved
RENEW_CHANGED = "changed"  # another content: applied like a change from the watch
NOT_RESIGNED = "not_resigned"  # the control plane answered the copy held here
RENEW_DELETED = "deleted"  # 404: the job's sandboxes withdrawn
RENEW_REJECTED = "rejected"  # the answer did not verify here: the held copy is kept
NO_SANDBOX = "no_sandbox"
RENEW_RESULTS = (
    RENEWED,
    RENEW_CHANGED,
    NOT_RESIGNED,
    RENEW_DELETED,
    RENEW_REJECTED,
    NO_SANDBOX,
    "control_unreachable",
    "error",
)
RENEW_DONE = (RENEWED, RENEW_CHANGED, RENEW_DELETED, NO_SANDBOX)


class ControlUnavailable(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def compare_copies(
    held_digest: bytes, held: Policy | None, fresh_digest: bytes, fresh: Policy
) -> str:
    """SAME_COPY (the token held), RESIGNED (same content, new iat/nbf/exp) or CHANGED.

    A held copy whose content is unknown (None) counts as changed: applying a
    change is always safe, only a bit more work.
    """
    if held_digest == fresh_digest:
        return SAME_COPY
    if held is not None and same_content(held, fresh):
        return RESIGNED
    return CHANGED


def renew_at(nbf: int | None, exp: int | None, fraction: float = RENEW_FRACTION) -> float | None:
    """When a held copy valid from `nbf` to `exp` is renewed (None: it never expires).

    Without a usable `nbf` the lifetime is unknown: renew at `exp` (the
    verification leeway still leaves time before the sandbox is withdrawn).
    """
    if exp is None:
        return None
    if nbf is None or nbf >= exp:
        return float(exp)
    return nbf + (exp - nbf) * fraction


def retry_delay(failures: int) -> float:
    """Seconds before the next attempt after `failures` failed ones in a row (>= 1)."""
    return min(RETRY_MAX_S, RETRY_MIN_S * 2.0 ** max(0, min(failures - 1, 16)))


def renewal_due(at: float, retry_at: float | None, now: float) -> bool:
    """Whether a job whose held copy is due at `at` is renewed now (after a failure,
    not before `retry_at`)."""
    return now >= at and (retry_at is None or now >= retry_at)


class Renewer(Protocol):
    """What renewal needs from the sandbox manager (`SandboxManager`)."""

    def renewals(self) -> dict[uuid.UUID, float]:
        """For each job with a live sandbox here: when its held copy is due (`renew_at`)."""
        ...

    async def renew_job(self, job_id: uuid.UUID) -> str:
        """One renewal: a RENEW_RESULTS token; raises ControlUnavailable."""
        ...


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
        renewer: Renewer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert control.session is not None, "control.start() first"
        self._control = control
        self._jobs = jobs
        self._refresh_job = refresh_job
        self._refresh_discovery = refresh_discovery
        self._renewer = renewer
        self._clock = clock
        # Jobs whose last renewal failed: job -> (due time it was for, failures, retry at).
        self._retry: dict[uuid.UUID, tuple[float, int, float]] = {}
        self._pending: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._discovery_wanted = False
        self._tasks: list[asyncio.Task[None]] = []
        self._renewals = Counter(
            "egressd_agent_policy_renewals_total",
            "Renewals of held job policies ahead of their exp, by result",
            ["result"],
            registry=metrics,
        )
        for result in RENEW_RESULTS:
            self._renewals.labels(result)
        answers = Counter(
            "egressd_agent_watch_answers_total",
            "Watch answers from the control plane, by result",
            ["result"],
            registry=metrics,
        )
        for result in RESULTS:
            answers.labels(result)
        self.stream = WatchStream(
            control.session,
            control.base,
            apply=self.apply,
            answers=answers,
            logger=log,
            poll_timeout_s=poll_timeout_s,
        )

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

    async def renew_due(self) -> dict[uuid.UUID, str]:
        """Renew every job that is due now (one at a time); the result of each."""
        if self._renewer is None:
            return {}
        due_at = self._renewer.renewals()
        for job_id in [j for j in self._retry if j not in due_at]:
            del self._retry[job_id]  # no live sandbox of it here any more
        results: dict[uuid.UUID, str] = {}
        for job_id, at in sorted(due_at.items(), key=lambda item: item[1]):
            retry = self._retry.get(job_id)
            if retry is not None and retry[0] != at:
                retry = None  # the held copy changed since (the watch): start afresh
                del self._retry[job_id]
            if not renewal_due(at, retry[2] if retry else None, self._clock()):
                continue
            detail = ""
            try:
                result = await self._renewer.renew_job(job_id)
            except ControlUnavailable as exc:
                result, detail = "control_unreachable", exc.detail
            except Exception as exc:  # noqa: BLE001 - one job must not stop the others
                result, detail = "error", repr(exc)
            self._renewals.labels(result if result in RENEW_RESULTS else "error").inc()
            results[job_id] = result
            if result in RENEW_DONE:
                self._retry.pop(job_id, None)
                continue
            failures = (retry[1] if retry else 0) + 1
            delay = retry_delay(failures)
            self._retry[job_id] = (at, failures, self._clock() + delay)
            log.warning(
                "job_policy_renewal_failed",
                job_id=str(job_id),
                result=result,
                detail=detail,
                failures=failures,
                retry_in_s=delay,
            )
        return results

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_TICK_S)
            try:
                await self.renew_due()
            except Exception as exc:  # noqa: BLE001 - renewal must outlive a bad tick
                log.error("job_policy_renewal_failed", error=repr(exc))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.stream.run(), name="agent-watch"),
            loop.create_task(self._work(), name="agent-watch-jobs"),
        ]
        if self._renewer is not None:
            self._tasks.append(loop.create_task(self._renew_loop(), name="agent-policy-renew"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


__all__ = [
    "AgentPolicyWatch",
    "ControlPolicies",
    "ControlUnavailable",
    "Renewer",
    "compare_copies",
    "renew_at",
    "renewal_due",
    "retry_delay",
]
