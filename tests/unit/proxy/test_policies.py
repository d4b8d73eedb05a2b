"""The policy store and the node registry against a tiny fake control plane on 127.0.0.1.

The fake serves `GET /v1/jobs/{job_id}/policy` and `GET /v1/nodes` from
dicts the test fills, counts requests, can delay answers (single-flight) and
also publishes a JWK set with a key the proxy does *not* trust (to show that
the store never takes keys from the network).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from egressd.policy.jws import policy_digest
from egressd.policy.keys import generate_signing_key, write_key_dir
from egressd.proxy.context import PolicySource, PolicyUnavailable
from egressd.proxy.registry import NodeRegistry, parse_nodes
from tests.support.control import (
    JOB,
    KEY,
    OTHER,
    ROGUE,
    T0,
    TTL,
    Env,
    FakeControl,
    settle,
    token,
)


async def test_get_fetches_verifies_and_caches(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    jws = token()
    control.policies[str(JOB)] = jws
    env = Env(control, session)
    source: PolicySource = env.store
    assert env.store.cached(JOB) is None
    verified = await source.get(JOB)
    assert verified.policy.job_id == JOB
    assert verified.token == jws
    assert verified.digest == policy_digest(jws)
    assert verified.kid == KEY.kid
    assert env.store.cached(JOB) is verified
    assert await env.store.get(JOB) is verified
    assert control.hits[str(JOB)] == 1
    assert env.fetches("ok") == 1
    assert env.metrics.get_sample_value("egressd_policy_cache_entries") == 1


async def test_concurrent_gets_share_one_fetch(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    control.delay = 0.2
    env = Env(control, session)
    results = await asyncio.gather(*(env.store.get(JOB) for _ in range(20)))
    assert all(r is results[0] for r in results)
    assert control.hits[str(JOB)] == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    control.delay = 0.2
    env = Env(control, session)
    impatient = asyncio.create_task(env.store.get(JOB))
    patient = asyncio.create_task(env.store.get(JOB))
    await asyncio.sleep(0.05)
    impatient.cancel()
    assert (await patient).policy.job_id == JOB
    assert control.hits[str(JOB)] == 1


async def test_404_is_policy_missing_and_negative_cached(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    env = Env(control, session)
    for _ in range(3):
        with pytest.raises(PolicyUnavailable) as info:
            await env.store.get(JOB)
        assert info.value.reason == "policy_missing"
    assert control.hits[str(JOB)] == 1
    assert env.store.negative(JOB) == "policy_missing"
    env.mono.now += 2.5  # past the negative TTL
    assert env.store.negative(JOB) is None
    control.policies[str(JOB)] = token()
    assert (await env.store.get(JOB)).policy.job_id == JOB
    assert control.hits[str(JOB)] == 2
    assert env.fetches("policy_missing") == 1


@pytest.mark.parametrize("answer", [500, 503, b"not json", b'{"jws": 5}', b"[]"])
async def test_control_plane_errors_are_control_unreachable(
    control: FakeControl, session: aiohttp.ClientSession, answer: object
) -> None:
    control.policies[str(JOB)] = answer
    env = Env(control, session)
    with pytest.raises(PolicyUnavailable) as info:
        await env.store.get(JOB)
    assert info.value.reason == "control_unreachable"
    assert env.store.negative(JOB) == "control_unreachable"
    env.mono.now += 1.5  # the error TTL is shorter
    assert env.store.negative(JOB) is None


async def test_an_unreachable_control_plane(session: aiohttp.ClientSession) -> None:
    dead = FakeControl()
    await dead.start()
    url = dead.url
    await dead.stop()  # nothing listens there any more
    env = Env(dead, session, url=url)
    with pytest.raises(PolicyUnavailable) as info:
        await env.store.get(JOB)
    assert info.value.reason == "control_unreachable"


@pytest.mark.parametrize(
    ("make", "jws_reason"),
    [
        (lambda: token(key=ROGUE), "unknown_kid"),  # the key /v1/keys publishes is not trusted
        (
            lambda: token()[:-4] + ("AAAA" if not token().endswith("AAAA") else "BBBB"),
            "bad_signature",
        ),
        (lambda: token(iat=T0 - 2 * TTL), "expired"),
        (lambda: token(iat=T0 + 600), "not_yet_valid"),
        (lambda: token(OTHER), "wrong_job"),
        (lambda: "not.a.jws", "malformed"),
    ],
)
async def test_anything_unverifiable_fails_closed(
    control: FakeControl, session: aiohttp.ClientSession, make: Any, jws_reason: str
) -> None:
    control.policies[str(JOB)] = make()
    env = Env(control, session)
    with pytest.raises(PolicyUnavailable) as info:
        await env.store.get(JOB)
    assert info.value.reason == "policy_unverifiable"
    assert info.value.detail.startswith(jws_reason)
    assert env.store.cached(JOB) is None
    assert env.rejected(jws_reason) == 1
    assert env.fetches("policy_unverifiable") == 1


async def test_a_policy_inside_the_leeway_but_past_exp_is_expired(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token(
        iat=T0 - TTL - 10 + 1
    )  # exp = T0 - 9: within the 30 s leeway
    env = Env(control, session)
    with pytest.raises(PolicyUnavailable) as info:
        await env.store.get(JOB)
    assert info.value.reason == "policy_expired"


async def test_the_cache_ends_at_exp(control: FakeControl, session: aiohttp.ClientSession) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session, refresh_interval_s=1e9)
    first = await env.store.get(JOB)
    env.clock.now = T0 + TTL  # exactly exp
    assert env.store.cached(JOB) is None
    control.policies[str(JOB)] = token(iat=T0 + TTL - 5)
    second = await env.store.get(JOB)
    assert second.digest != first.digest
    assert control.hits[str(JOB)] == 2


async def test_refresh_ahead_of_expiry(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session)
    first = await env.store.get(JOB)
    env.clock.now = T0 + TTL * 0.5
    assert env.store.cached(JOB) is first
    await settle()
    assert control.hits[str(JOB)] == 1  # not due yet
    newer = token(iat=T0 + TTL * 0.75)
    control.policies[str(JOB)] = newer
    env.clock.now = T0 + TTL * 0.8
    env.mono.now += 10
    assert env.store.cached(JOB) is first  # still valid: served while the refresh runs
    await settle()
    assert control.hits[str(JOB)] == 2
    refreshed = env.store.cached(JOB)
    assert refreshed is not None and refreshed.token == newer


async def test_a_failed_refresh_keeps_the_valid_policy_but_a_404_revokes_it(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session)
    first = await env.store.get(JOB)
    control.policies[str(JOB)] = 500
    env.clock.now = T0 + TTL * 0.9
    env.mono.now += 10
    assert env.store.cached(JOB) is first
    await settle()
    assert env.store.cached(JOB) is first
    assert await env.store.get(JOB) is first
    control.policies[str(JOB)] = 404
    env.mono.now += 10
    env.store.request_refresh(JOB)
    await settle()
    assert env.store.cached(JOB) is None
    with pytest.raises(PolicyUnavailable, match="policy_missing"):
        await env.store.get(JOB)


async def test_request_refresh_is_rate_limited(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session, refresh_interval_s=5.0)
    await env.store.get(JOB)
    for _ in range(10):
        env.store.request_refresh(JOB)
        await settle()
    assert control.hits[str(JOB)] == 1  # the first fetch was the last attempt, < 5 s ago
    env.mono.now += 6
    for _ in range(10):
        env.store.request_refresh(JOB)
    await settle()
    assert control.hits[str(JOB)] == 2


async def test_an_unknown_kid_rereads_the_key_directory(
    control: FakeControl, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys_dir = tmp_path / "keys"
    write_key_dir(keys_dir, KEY)
    (keys_dir / "signing.key").unlink()  # a proxy holds public keys only
    rotated = generate_signing_key()
    control.policies[str(JOB)] = token(key=rotated)
    env = Env(control, session, keys_dir=keys_dir)
    with pytest.raises(PolicyUnavailable, match="unknown_kid"):
        await env.store.get(JOB)
    # The operator adds the new public key; the next fetch picks it up.
    write_key_dir(tmp_path / "rotated", rotated)
    (keys_dir / f"{rotated.kid}.jwk").write_bytes(
        (tmp_path / "rotated" / f"{rotated.kid}.jwk").read_bytes()
    )
    env.mono.now += 60
    verified = await env.store.get(JOB)
    assert verified.kid == rotated.kid


async def test_the_cache_is_bounded(control: FakeControl, session: aiohttp.ClientSession) -> None:
    jobs = [uuid.uuid4() for _ in range(5)]
    for job in jobs:
        control.policies[str(job)] = token(job)
    env = Env(control, session, max_jobs=3)
    for job in jobs:
        await env.store.get(job)
    assert env.store.cached(jobs[0]) is None
    assert env.store.cached(jobs[-1]) is not None
    assert env.metrics.get_sample_value("egressd_policy_cache_entries") == 3


async def test_close_cancels_fetches(control: FakeControl, session: aiohttp.ClientSession) -> None:
    control.policies[str(JOB)] = token()
    control.delay = 5
    env = Env(control, session)
    waiter = asyncio.create_task(env.store.get(JOB))
    await asyncio.sleep(0.05)
    await env.store.close()
    with pytest.raises((asyncio.CancelledError, PolicyUnavailable)):
        await waiter
    with pytest.raises(PolicyUnavailable, match="control_unreachable"):
        await env.store.get(OTHER)


# --- the node registry -----------------------------------------------------------------

NODES = {
    "nodes": [
        {"name": "node1", "underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"},
        {"name": "node2", "underlay": "198.18.0.12", "sandbox_cidr": "100.96.2.0/24"},
        {"name": "big", "underlay": "198.18.0.13", "sandbox_cidr": "100.97.0.0/16"},
    ]
}


def registry(
    control: FakeControl, session: aiohttp.ClientSession
) -> tuple[NodeRegistry, CollectorRegistry]:
    metrics = CollectorRegistry()
    return NodeRegistry(session, control.url, refresh_s=0.05, metrics=metrics), metrics


async def test_registry_lookups(control: FakeControl, session: aiohttp.ClientSession) -> None:
    control.nodes = NODES
    reg, metrics = registry(control, session)
    assert not reg.ready
    assert reg.node_by_underlay("198.18.0.11") is None
    assert await reg.refresh()
    assert reg.ready
    node1 = reg.node_by_underlay("198.18.0.11")
    assert node1 is not None and node1.name == "node1"
    assert reg.node_by_underlay(ipaddress.IPv4Address("198.18.0.12")).name == "node2"
    assert reg.node_by_underlay("198.18.0.99") is None
    # By the address's value too (the flow lookup's form): the same entries.
    assert reg.node_by_underlay(int(ipaddress.IPv4Address("198.18.0.11"))) is node1
    assert reg.node_by_underlay(ipaddress.IPv4Address("198.18.0.11")) is node1
    assert reg.node_by_underlay(ipaddress.IPv4Address("198.18.0.99")) is None
    assert reg.node_by_underlay(int(ipaddress.IPv4Address("198.18.0.99"))) is None
    # An IPv6 address whose value equals an underlay's is not that node.
    v6 = ipaddress.IPv6Address(int(ipaddress.IPv4Address("198.18.0.11")))
    assert reg.node_by_underlay(v6) is None
    assert reg.node_for_sandbox("100.96.1.77") is node1
    assert reg.node_for_sandbox(int(ipaddress.IPv4Address("100.96.2.1"))).name == "node2"
    assert reg.node_for_sandbox("100.97.200.1").name == "big"
    assert reg.node_for_sandbox("100.96.3.1") is None
    assert metrics.get_sample_value("egressd_registry_nodes") == 3


async def test_registry_keeps_the_last_good_view(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.nodes = NODES
    reg, metrics = registry(control, session)
    assert await reg.refresh()
    view = reg.view
    control.nodes = 503
    assert not await reg.refresh()
    control.nodes = {"nodes": "oops"}
    assert not await reg.refresh()
    assert reg.view is view
    assert reg.ready
    assert metrics.get_sample_value("egressd_registry_refresh_total", {"result": "http_error"}) == 1
    assert (
        metrics.get_sample_value("egressd_registry_refresh_total", {"result": "bad_response"}) == 1
    )
    await control.stop()
    assert not await reg.refresh()
    assert reg.view is view
    assert (
        metrics.get_sample_value("egressd_registry_refresh_total", {"result": "unreachable"}) == 1
    )


async def test_registry_task_follows_changes(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.nodes = {"nodes": NODES["nodes"][:1]}
    reg, _ = registry(control, session)
    task = reg.start()
    assert task.get_name() == "proxy-registry-refresh"
    try:
        for _ in range(100):
            if reg.ready:
                break
            await asyncio.sleep(0.01)
        assert reg.node_by_underlay("198.18.0.12") is None
        control.nodes = NODES
        for _ in range(100):
            if reg.node_by_underlay("198.18.0.12") is not None:
                break
            await asyncio.sleep(0.01)
        assert reg.node_by_underlay("198.18.0.12") is not None
    finally:
        await reg.close()
    assert task.done()


def test_bad_registry_entries_are_skipped_not_fatal() -> None:
    entries, problems = parse_nodes(
        {
            "nodes": [
                {"name": "node1", "underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"},
                {"name": "bad", "underlay": "nope", "sandbox_cidr": "100.96.9.0/24"},
                {"name": "overlap", "underlay": "198.18.0.14", "sandbox_cidr": "100.96.1.128/25"},
                {"name": "dup", "underlay": "198.18.0.11", "sandbox_cidr": "100.96.8.0/24"},
                {"name": "host-bits", "underlay": "198.18.0.15", "sandbox_cidr": "100.96.7.1/24"},
                "not an object",
            ]
        }
    )
    assert [e.name for e in entries] == ["node1"]
    assert len(problems) == 5
    assert json.dumps(problems)  # plain strings, loggable


async def test_a_policy_in_use_is_revalidated_and_a_deleted_job_revoked_soon(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    control.policies[str(JOB)] = token()
    env = Env(control, session, revalidate_s=5.0, refresh_interval_s=5.0)
    first = await env.store.get(JOB)
    control.policies[str(JOB)] = 404  # the job is deleted at the control plane
    env.mono.now += 1
    assert env.store.cached(JOB) is first  # not yet due: no fetch
    await settle()
    assert control.hits[str(JOB)] == 1
    env.mono.now += 5  # long before the policy's own refresh time (3/4 of its TTL)
    assert env.store.cached(JOB) is first  # still served while the revalidation runs
    await settle()
    assert control.hits[str(JOB)] == 2
    assert env.store.cached(JOB) is None
    with pytest.raises(PolicyUnavailable, match="policy_missing"):
        await env.store.get(JOB)


async def test_a_replaced_digest_has_a_grace_period_and_a_resigned_one_lives_to_its_exp(
    control: FakeControl, session: aiohttp.ClientSession
) -> None:
    first = token()
    control.policies[str(JOB)] = first
    env = Env(control, session, digest_grace_s=2.0)
    await env.store.get(JOB)
    old = policy_digest(first)
    assert env.store.digest_state(JOB, old) == "current"
    resigned = token(iat=T0 + 60)  # same content, new iat/exp: another digest
    control.policies[str(JOB)] = resigned
    env.clock.now = T0 + 61
    env.store.changed(JOB)
    await settle()
    assert env.store.digest_state(JOB, policy_digest(resigned)) == "current"
    assert env.store.digest_state(JOB, old) == "equivalent"
    replaced = token(iat=T0 + 100, nodes=("node1", "node2"))  # other content
    control.policies[str(JOB)] = replaced
    env.clock.now = T0 + 100
    env.store.changed(JOB)
    await settle()
    assert env.store.digest_state(JOB, policy_digest(replaced)) == "current"
    for digest in (old, policy_digest(resigned)):
        assert env.store.digest_state(JOB, digest) == "grace"
    env.clock.now = T0 + 102
    for digest in (old, policy_digest(resigned)):
        assert env.store.digest_state(JOB, digest) == "stale"
    assert env.store.digest_state(JOB, b"\x05" * 8) == "unknown"
    assert env.store.digest_state(OTHER, old) == "unknown"
