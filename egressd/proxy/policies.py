"""Verified job policies for the proxy: fetched from the control plane, verified here.

`PolicyStore` implements `egressd.proxy.context.PolicySource` (`await get(job_id)`)
and gives the packet path a synchronous `cached(job_id)`.

Trust: the JWS is fetched from `GET {control_url}/v1/jobs/{job_id}/policy`
over plain HTTP, and verified with the public keys loaded from the local
`keys_dir` only. Keys are never taken from the network (not from the control
plane's `/v1/keys`, not from the token's headers); the network path can only
make a policy unavailable, never make a forged one acceptable. On an
`unknown_kid` the key directory is re-read (at most every
`KEY_RELOAD_INTERVAL_S`) so that an operator can add a rotated key without a
restart.

Fail closed, with the reasons of `PolicyUnavailable`:

| what happened | reason | negative-cached for |
|---|---|---|
| HTTP 404 from the control plane | `policy_missing` | `missing_ttl_s` (2 s) |
| connect error, timeout, other HTTP status, bad body | `control_unreachable` | `error_ttl_s` (1 s) |
| any `JwsError`, or a policy for another job id | `policy_unverifiable` | `missing_ttl_s` |
| verified, but `exp` already passed (within the JWS leeway) | `policy_expired` | `error_ttl_s` |

Caching: a verified policy is used until its `exp` (not `exp + leeway`: the
leeway absorbs clock skew at verification time, it does not extend a
policy's life here). It is refreshed ahead of expiry, at 3/4 of its validity
window: the control plane re-signs a policy that has less than half its TTL
left, so the refresh gets a fresh token long before the old one ends. A
failed background refresh keeps the cached policy until its `exp`; a 404
during refresh evicts it at once (the job is gone).

Revocation: a job deleted at the control plane must stop getting new
connections long before its policy expires. A policy in use is therefore
revalidated with the control plane every `revalidate_s` (5 s) in the
background; the 404 of a deleted job evicts it, so new connections are
denied (`policy_missing`) within about `revalidate_s` plus one fetch. The
cached policy keeps serving while a revalidation is in flight, and when the
control plane is unreachable (availability over revocation for that window;
the policy's own `exp` still bounds it). Refreshes are
single-flight per job (one fetch in flight; every waiter shares it) and
rate-limited (`refresh_interval_s` between attempts for one job).

Live policies (`egressd.proxy.watch`): while the proxy is subscribed to the
control plane's watch (`watching` True), the periodic revalidation is off:
a change notice for a job calls `changed(job_id)`, which refetches the
policy at once (no rate limit; a fetch already in flight is followed by a
fresh one, so a notice is never answered by a read from before it), and a
resync calls `resync()` (every cached job refetched, negative entries
dropped). When the watch is down, revalidation every `revalidate_s` comes
back as the fallback. `listeners` are called as `(job_id, previous,
current)` when a cached policy is replaced by one with another digest
(`current` the new one) or revoked by a 404 (`current` None):
`egressd.proxy.live` re-decides the job's open connections.

Digests: a replaced policy's digest stays accepted in GENEVE datagrams for
`digest_grace_s` (5 s; proxy config `digest_grace_s`) when the content
changed, and until its own `exp` when the replacement is a re-signed copy of
the same content; then datagrams with it are dropped (`stale_digest`):
`digest_state` and `egressd.proxy.digests`.

Bounds: at most `max_jobs` cached policies and as many negative entries;
past that the oldest is evicted (jobs come from GENEVE datagrams of
registered nodes, but a compromised node could still spray job ids).

Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from egressd.control.watch_client import read_json_body
from egressd.policy.errors import JwsError, KeyFileError
from egressd.policy.jws import DEFAULT_LEEWAY_S, VerifiedPolicy, verify_policy
from egressd.policy.keys import TrustedKeys, load_trusted_keys
from egressd.proxy.context import PolicyUnavailable
from egressd.proxy.digests import DEFAULT_GRACE_S, UNKNOWN, Superseded, classify, supersede

FETCH_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 256 * 1024
KEY_RELOAD_INTERVAL_S = 10.0
REFRESH_FRACTION = 0.75

FETCH_RESULTS = (
    "ok",
    "policy_missing",
    "control_unreachable",
    "policy_unverifiable",
    "policy_expired",
)
REJECT_REASONS = (
    "malformed",
    "alg_not_allowed",
    "bad_typ",
    "unknown_kid",
    "bad_signature",
    "invalid_payload",
    "not_yet_valid",
    "expired",
    "wrong_job",
)

log = structlog.get_logger("egressd.proxy.policies")


@dataclass(slots=True)
class _Cached:
    verified: VerifiedPolicy
    usable_until: float  # wall clock: the policy's exp
    refresh_at: float  # wall clock
    checked_at: float  # monotonic: last time the control plane confirmed it
    # Digests this policy replaced (egressd.proxy.digests): grace, then refused.
    older: dict[bytes, Superseded]


@dataclass(slots=True)
class _Negative:
    reason: str
    detail: str
    until: float  # monotonic


class PolicyStore:
    """Fetch, verify, cache job policies (see the module docstring)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        control_url: str,
        trusted: TrustedKeys,
        *,
        metrics: CollectorRegistry,
        keys_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        leeway_s: int = DEFAULT_LEEWAY_S,
        missing_ttl_s: float = 2.0,
        error_ttl_s: float = 1.0,
        refresh_interval_s: float = 5.0,
        revalidate_s: float = 5.0,
        max_jobs: int = 65_536,
        digest_grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self._session = session
        self._digest_grace_s = digest_grace_s
        self._base = control_url.rstrip("/")
        self._trusted = trusted
        self._keys_dir = keys_dir
        self._clock = clock
        self._monotonic = monotonic
        self._leeway_s = leeway_s
        self._missing_ttl_s = missing_ttl_s
        self._error_ttl_s = error_ttl_s
        self._refresh_interval_s = refresh_interval_s
        self._revalidate_s = revalidate_s
        self._max_jobs = max_jobs
        self._cache: OrderedDict[uuid.UUID, _Cached] = OrderedDict()
        self._negative: OrderedDict[uuid.UUID, _Negative] = OrderedDict()
        self._inflight: dict[uuid.UUID, asyncio.Task[VerifiedPolicy]] = {}
        self._last_attempt: dict[uuid.UUID, float] = {}
        self._last_key_reload = float("-inf")
        self._closed = False
        #: True while the watch stream is up (periodic revalidation is then off).
        self.watching = False
        self.listeners: list[
            Callable[[uuid.UUID, VerifiedPolicy | None, VerifiedPolicy | None], None]
        ] = []
        self._refetch: set[uuid.UUID] = set()
        self._fetches = Counter(
            "egressd_policy_fetch_total",
            "Policy fetches from the control plane, by result",
            ["result"],
            registry=metrics,
        )
        for result in FETCH_RESULTS:
            self._fetches.labels(result)
        self._rejected = Counter(
            "egressd_policy_rejected_total",
            "Fetched policies that failed verification, by JWS reason",
            ["reason"],
            registry=metrics,
        )
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        Gauge(
            "egressd_policy_cache_entries", "Verified policies in the cache", registry=metrics
        ).set_function(lambda: len(self._cache))

    # --- the packet path -----------------------------------------------------------

    def cached(self, job_id: uuid.UUID) -> VerifiedPolicy | None:
        """The cached, unexpired policy, or None; schedules a refresh when one is due."""
        entry = self._cache.get(job_id)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.usable_until:
            del self._cache[job_id]
            return None
        if now >= entry.refresh_at or (
            not self.watching and self._monotonic() - entry.checked_at >= self._revalidate_s
        ):
            self._background_refresh(job_id)
        return entry.verified

    def digest_state(self, job_id: uuid.UUID, digest: bytes) -> str:
        """How the job's cached policy regards a GENEVE digest (`egressd.proxy.digests`)."""
        entry = self._cache.get(job_id)
        if entry is None:
            return UNKNOWN
        return classify(digest, entry.verified.digest, entry.older, self._clock())

    def negative(self, job_id: uuid.UUID) -> str | None:
        """The reason of a live negative-cache entry for the job, else None."""
        entry = self._negative.get(job_id)
        if entry is None:
            return None
        if self._monotonic() >= entry.until:
            del self._negative[job_id]
            return None
        return entry.reason

    def request_refresh(self, job_id: uuid.UUID) -> None:
        """Refetch the job's policy soon (rate-limited), e.g. on a digest mismatch."""
        self._background_refresh(job_id)

    def changed(self, job_id: uuid.UUID) -> None:
        """The control plane says the job's policy changed: refetch now if it is in use."""
        had_negative = self._negative.pop(job_id, None) is not None
        if job_id in self._inflight:
            self._refetch.add(job_id)
        elif job_id in self._cache:
            with contextlib.suppress(RuntimeError, PolicyUnavailable):
                self._fetch_task(job_id)
        elif had_negative:
            log.debug("policy_negative_dropped", job_id=str(job_id))

    def resync(self) -> None:
        """Revalidate every cached policy now (the watch may have missed changes)."""
        self._negative.clear()
        for job_id in list(self._cache):
            self.changed(job_id)

    def jobs(self) -> list[uuid.UUID]:
        """The jobs whose policies are cached."""
        return list(self._cache)

    def holds(self, job_id: uuid.UUID) -> bool:
        """True while an unexpired policy of the job is cached; unlike `cached`,
        no refresh is scheduled (`egressd.proxy.job_metrics` asks about jobs
        that may be long gone)."""
        entry = self._cache.get(job_id)
        return entry is not None and self._clock() < entry.usable_until

    def _notify(
        self, job_id: uuid.UUID, previous: VerifiedPolicy | None, current: VerifiedPolicy | None
    ) -> None:
        for listener in list(self.listeners):
            try:
                listener(job_id, previous, current)
            except Exception:  # a listener's bug must not break the policy store
                log.exception("policy_listener_failed", job_id=str(job_id))

    # --- PolicySource --------------------------------------------------------------

    async def get(self, job_id: uuid.UUID) -> VerifiedPolicy:
        """A verified, unexpired policy for the job, or PolicyUnavailable."""
        verified = self.cached(job_id)
        if verified is not None:
            return verified
        negative = self._negative.get(job_id)
        if negative is not None and self._monotonic() < negative.until:
            raise PolicyUnavailable(negative.reason, negative.detail)
        return await asyncio.shield(self._fetch_task(job_id))

    # --- fetching ------------------------------------------------------------------

    def _fetch_task(self, job_id: uuid.UUID) -> asyncio.Task[VerifiedPolicy]:
        task = self._inflight.get(job_id)
        if task is None:
            if self._closed:
                raise PolicyUnavailable("control_unreachable", "the policy store is closed")
            self._last_attempt[job_id] = self._monotonic()
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_store(job_id), name=f"proxy-policy-fetch-{job_id}"
            )
            self._inflight[job_id] = task
            task.add_done_callback(lambda t: self._fetch_done(job_id, t))
        return task

    def _fetch_done(self, job_id: uuid.UUID, task: asyncio.Task[VerifiedPolicy]) -> None:
        if self._inflight.get(job_id) is task:
            del self._inflight[job_id]
        if not task.cancelled():
            task.exception()  # retrieved here: background refreshes have no awaiter
        if job_id in self._refetch and not self._closed:
            # A change notice came while this fetch was in flight: read again.
            self._refetch.discard(job_id)
            with contextlib.suppress(RuntimeError, PolicyUnavailable):
                self._fetch_task(job_id)

    def _background_refresh(self, job_id: uuid.UUID) -> None:
        if job_id in self._inflight or self._closed:
            return
        last = self._last_attempt.get(job_id)
        if last is not None and self._monotonic() - last < self._refresh_interval_s:
            return
        try:
            self._fetch_task(job_id)
        except RuntimeError:  # no running loop (a synchronous caller in a test)
            return

    async def _fetch_and_store(self, job_id: uuid.UUID) -> VerifiedPolicy:
        try:
            token = await self._fetch_token(job_id)
            verified = await self._verify(job_id, token)
        except PolicyUnavailable as exc:
            self._fetches.labels(exc.reason).inc()
            self._remember_failure(job_id, exc)
            raise
        self._fetches.labels("ok").inc()
        self._store(job_id, verified)
        return verified

    async def _fetch_token(self, job_id: uuid.UUID) -> str:
        url = f"{self._base}/v1/jobs/{job_id}/policy"
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        try:
            async with self._session.get(url, timeout=timeout) as response:
                if response.status == 404:
                    raise PolicyUnavailable(
                        "policy_missing", f"control plane has no policy for {job_id}"
                    )
                if response.status != 200:
                    raise PolicyUnavailable(
                        "control_unreachable", f"GET {url}: HTTP {response.status}"
                    )
                body = await read_json_body(response, MAX_BODY_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PolicyUnavailable("control_unreachable", f"GET {url}: {exc!r}") from exc
        except ValueError as exc:
            raise PolicyUnavailable("control_unreachable", f"GET {url}: bad body: {exc}") from exc
        token = body.get("jws") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise PolicyUnavailable("control_unreachable", f"GET {url}: answer has no 'jws' string")
        return token

    async def _verify(self, job_id: uuid.UUID, token: str) -> VerifiedPolicy:
        try:
            verified = self._verify_once(token)
        except JwsError as exc:
            if exc.reason != "unknown_kid" or not await self._reload_keys():
                raise self._unverifiable(exc.reason, exc.detail) from exc
            try:
                verified = self._verify_once(token)
            except JwsError as again:
                raise self._unverifiable(again.reason, again.detail) from again
        if verified.policy.job_id != job_id:
            raise self._unverifiable(
                "wrong_job", f"asked for {job_id}, got a policy for {verified.policy.job_id}"
            )
        exp = verified.policy.exp
        if exp is None or self._clock() >= exp:
            raise PolicyUnavailable("policy_expired", f"policy for {job_id} expired at {exp}")
        return verified

    def _verify_once(self, token: str) -> VerifiedPolicy:
        return verify_policy(token, self._trusted, now=self._clock(), leeway_s=self._leeway_s)

    def _unverifiable(self, jws_reason: str, detail: str) -> PolicyUnavailable:
        self._rejected.labels(jws_reason).inc()
        return PolicyUnavailable("policy_unverifiable", f"{jws_reason}: {detail}")

    async def _reload_keys(self) -> bool:
        """Re-read keys_dir (rate-limited); True when the trusted set changed."""
        if self._keys_dir is None:
            return False
        now = self._monotonic()
        if now - self._last_key_reload < KEY_RELOAD_INTERVAL_S:
            return False
        self._last_key_reload = now
        try:
            trusted = await asyncio.to_thread(load_trusted_keys, self._keys_dir)
        except KeyFileError as exc:
            log.warning("trusted_keys_reload_failed", reason=exc.reason, detail=exc.detail)
            return False
        if set(trusted.keys) == set(self._trusted.keys):
            return False
        log.info("trusted_keys_reloaded", kids=sorted(trusted.keys))
        self._trusted = trusted
        return True

    # --- cache bookkeeping ---------------------------------------------------------

    def _store(self, job_id: uuid.UUID, verified: VerifiedPolicy) -> None:
        policy = verified.policy
        exp = float(policy.exp if policy.exp is not None else 0)
        start = float(policy.nbf if policy.nbf is not None else self._clock())
        refresh_at = start + (exp - start) * REFRESH_FRACTION
        previous = self._cache.pop(job_id, None)
        older: dict[bytes, Superseded] = {}
        if previous is not None:
            older = supersede(
                previous.older,
                previous_digest=previous.verified.digest,
                previous=previous.verified.policy,
                current_digest=verified.digest,
                current=policy,
                now=self._clock(),
                grace_s=self._digest_grace_s,
            )
        self._cache[job_id] = _Cached(
            verified,
            usable_until=exp,
            refresh_at=refresh_at,
            checked_at=self._monotonic(),
            older=older,
        )
        self._negative.pop(job_id, None)
        while len(self._cache) > self._max_jobs:
            self._cache.popitem(last=False)
        if previous is not None and previous.verified.digest != verified.digest:
            self._notify(job_id, previous.verified, verified)
        if previous is None or previous.verified.digest != verified.digest:
            log.info(
                "policy_verified",
                job_id=str(job_id),
                kid=verified.kid,
                digest=verified.digest.hex(),
                exp=policy.exp,
                nodes=list(policy.nodes),
                mode=policy.mode,
            )

    def _remember_failure(self, job_id: uuid.UUID, exc: PolicyUnavailable) -> None:
        if exc.reason == "policy_missing":
            # The control plane says the job does not exist (any more): revoke.
            revoked = self._cache.pop(job_id, None)
            if revoked is not None:
                self._notify(job_id, revoked.verified, None)
        elif job_id in self._cache:
            # A still-valid cached policy outlives a failed refresh.
            log.warning(
                "policy_refresh_failed", job_id=str(job_id), reason=exc.reason, detail=exc.detail
            )
            return
        ttl = (
            self._missing_ttl_s
            if exc.reason in ("policy_missing", "policy_unverifiable")
            else self._error_ttl_s
        )
        self._negative.pop(job_id, None)
        self._negative[job_id] = _Negative(exc.reason, exc.detail, self._monotonic() + ttl)
        while len(self._negative) > self._max_jobs:
            self._negative.popitem(last=False)
        while len(self._last_attempt) > 2 * self._max_jobs:
            self._last_attempt.pop(next(iter(self._last_attempt)))
        log.warning("policy_unavailable", job_id=str(job_id), reason=exc.reason, detail=exc.detail)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, PolicyUnavailable):
                await task
