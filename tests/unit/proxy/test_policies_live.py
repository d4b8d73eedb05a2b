"""The policy store under the watch: `changed`, `resync`, listeners, no revalidation while watching."""

from __future__ import annotations

import aiohttp

from egressd.policy.jws import VerifiedPolicy
from tests.support.control import (
    JOB,
    T0,
    Env,
    FakeControl,
    settle,
    token,
)


async def test_a_change_notice_refetches_at_once_and_tells_listeners(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session)
    seen: list[tuple[str | None, str | None]] = []

    def listener(_job: object, prev: VerifiedPolicy | None, cur: VerifiedPolicy | None) -> None:
        seen.append((None if prev is None else prev.token, None if cur is None else cur.token))

    env.store.listeners.append(listener)
    first = await env.store.get(JOB)
    # A replacement: the notice bypasses the refresh rate limit (no time passed).
    second_jws = token(iat=T0 + 1)
    control.policies[str(JOB)] = second_jws
    env.store.changed(JOB)
    await settle()
    assert (cached := env.store.cached(JOB)) is not None and cached.token == second_jws
    assert seen == [(first.token, second_jws)]
    # A delete: the 404 evicts it and the listeners hear `None`.
    del control.policies[str(JOB)]
    env.store.changed(JOB)
    await settle()
    assert env.store.cached(JOB) is None
    assert seen[-1] == (second_jws, None)
    assert env.store.negative(JOB) == "policy_missing"


async def test_no_periodic_revalidation_while_watching_and_resync_refetches(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session, revalidate_s=5.0, refresh_interval_s=0.0)
    await env.store.get(JOB)
    env.store.watching = True
    env.mono.now += 60
    env.store.cached(JOB)
    await settle()
    assert control.hits[str(JOB)] == 1  # the watch tells us; no polling
    env.store.resync()
    await settle()
    assert control.hits[str(JOB)] == 2
    env.store.watching = False  # the stream is down: polling is the fallback again
    env.mono.now += 60
    env.store.cached(JOB)
    await settle()
    assert control.hits[str(JOB)] == 3


async def test_a_notice_during_a_fetch_is_followed_by_another_fetch(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session)
    await env.store.get(JOB)
    control.delay = 0.05
    env.store.changed(JOB)
    env.store.changed(JOB)  # arrives while the first refetch is in flight
    for _ in range(30):
        await settle()
        if control.hits[str(JOB)] >= 3:
            break
    assert control.hits[str(JOB)] == 3
