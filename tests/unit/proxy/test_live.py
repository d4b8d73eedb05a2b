"""Open connections follow the policy: the pure re-decision and the reset bookkeeping."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from typing import Any

from egressd.policy.model import Policy, parse_policy
from egressd.proxy.live import (
    POLICY_CHANGED,
    POLICY_EXPIRED,
    POLICY_REVOKED,
    LiveConnections,
    Recorded,
    redecide,
)

JOB = uuid.UUID("2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2")
API = A("203.0.113.10")
DB = A("203.0.113.100")
FLEET = (N("198.18.0.0/24"), N("100.96.0.0/16"))


def policy(
    egress: Sequence[Mapping[str, object]],
    *,
    mode: str = "enforce",
    nodes: tuple[str, ...] = ("node1",),
    exp: int | None = None,
    bandwidth: int | None = None,
) -> Policy:
    payload: dict[str, Any] = {
        "v": 1,
        "job_id": str(JOB),
        "account": "acme",
        "nodes": list(nodes),
        "mode": mode,
        "egress": egress,
    }
    if exp is not None:
        payload.update(iat=exp - 100, nbf=exp - 100, exp=exp)
    if bandwidth is not None:
        payload["limits"] = {"bandwidth_bps": bandwidth}
    return parse_policy(payload, require_timestamps=False)


HOST_API = {"host": "api.allowed.test", "ports": [443, 80]}
CIDR_DB = {"cidr": "203.0.113.96/28", "ports": [5432]}
# The proxy resolved the SNI itself to check it names this address (recorded).
TLS_API = Recorded(
    API, 443, "node1", protocol="tls", sni="api.allowed.test", proxy_ips=frozenset({API})
)
BY_CIDR = Recorded(DB, 5432, "node1")
LEARNED = Recorded(API, 443, "node1", learned=frozenset({"api.allowed.test"}))


def test_a_deleted_policy_revokes_everything() -> None:
    assert redecide(None, TLS_API) == POLICY_REVOKED
    assert redecide(None, BY_CIDR) == POLICY_REVOKED


def test_the_same_policy_keeps_every_connection() -> None:
    p = policy([HOST_API, CIDR_DB])
    for rec in (TLS_API, BY_CIDR, LEARNED):
        assert redecide(p, rec, fleet_ranges=FLEET) is None


def test_a_replacement_without_the_host_ends_only_that_connection() -> None:
    p = policy([CIDR_DB])
    assert redecide(p, TLS_API, fleet_ranges=FLEET) == POLICY_CHANGED
    assert redecide(p, LEARNED, fleet_ranges=FLEET) == POLICY_CHANGED
    assert redecide(p, BY_CIDR, fleet_ranges=FLEET) is None


def test_a_port_removed_or_a_node_dropped_is_a_change() -> None:
    only_80 = policy([{"host": "api.allowed.test", "ports": [80]}])
    assert redecide(only_80, TLS_API, fleet_ranges=FLEET) == POLICY_CHANGED
    elsewhere = policy([HOST_API], nodes=("node2",))
    assert redecide(elsewhere, TLS_API, fleet_ranges=FLEET) == POLICY_CHANGED


def test_report_mode_never_resets() -> None:
    p = policy([], mode="report")
    assert redecide(p, TLS_API, fleet_ranges=FLEET) is None


def test_the_sni_decides_not_the_learned_names() -> None:
    # The client said evil.test: a policy that allows api.allowed.test does not keep it.
    rec = Recorded(
        API, 443, "node1", protocol="tls", sni="evil.test", learned=frozenset({"api.allowed.test"})
    )
    assert redecide(policy([HOST_API]), rec, fleet_ranges=FLEET) == POLICY_CHANGED


# --- LiveConnections -------------------------------------------------------------------------


@dataclass
class Stats:
    end: str | None = None


@dataclass
class Verified:
    policy: Policy


async def _held(
    live: LiveConnections, rec: Recorded, p: Policy, stats: Stats, retuned: list[Policy]
) -> None:
    with live.track(JOB, rec, stats, p, retuned.append):
        await asyncio.sleep(30)


async def test_a_change_cancels_only_what_it_no_longer_allows_and_retunes_the_rest() -> None:
    live = LiveConnections(lookup=lambda _j: None, fleet_ranges=lambda: FLEET)
    old = policy([HOST_API, CIDR_DB])
    s_api, s_db = Stats(), Stats()
    retuned: list[Policy] = []
    t_api = asyncio.create_task(_held(live, TLS_API, old, s_api, retuned))
    t_db = asyncio.create_task(_held(live, BY_CIDR, old, s_db, retuned))
    await asyncio.sleep(0.01)
    assert live.count(JOB) == 2
    new = policy([CIDR_DB], bandwidth=1_000_000)
    live.policy_changed(JOB, Verified(old), Verified(new))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert t_api.cancelled() and s_api.end == POLICY_CHANGED
    assert not t_db.done() and s_db.end is None
    assert retuned == [new]
    live.policy_changed(JOB, Verified(new), None)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert t_db.cancelled() and s_db.end == POLICY_REVOKED
    assert live.count() == 0
    live.close()


async def test_expiry_resets_unless_a_later_policy_is_held() -> None:
    now = time.time()
    short = policy([HOST_API], exp=int(now) + 1)
    held: dict[str, Any] = {"v": None}
    live = LiveConnections(lookup=lambda _j: held["v"], fleet_ranges=lambda: FLEET)
    s1 = Stats()
    started = time.monotonic()
    t1 = asyncio.create_task(_held(live, TLS_API, short, s1, []))
    await asyncio.wait({t1}, timeout=3.0)
    assert t1.cancelled() and s1.end == POLICY_EXPIRED
    assert time.monotonic() - started < 2.2

    # Renewed before exp (the proxy fetched a fresh token): kept, timer moved on.
    short = policy([HOST_API], exp=int(time.time()) + 1)
    held["v"] = Verified(policy([HOST_API], exp=int(time.time()) + 60))
    s2 = Stats()
    t2 = asyncio.create_task(_held(live, TLS_API, short, s2, []))
    await asyncio.sleep(2.2)
    assert not t2.done() and s2.end is None
    t2.cancel()
    live.close()


async def test_track_registers_the_given_task_and_always_unregisters() -> None:
    live = LiveConnections(lookup=lambda _j: None, fleet_ranges=lambda: FLEET)
    p = policy([HOST_API, CIDR_DB], exp=int(time.time()) + 3600)
    held = asyncio.get_running_loop().create_task(asyncio.sleep(30))
    stats = Stats()
    with live.track(JOB, TLS_API, stats, p, task=held):  # not the current task
        with live.track(JOB, BY_CIDR, Stats(), p):
            assert live.count(JOB) == 2
            timer = live._jobs[JOB].timer
            assert timer is not None  # the policy's exp is watched while connections are open
        assert live.count(JOB) == 1 and live._jobs[JOB].timer is timer  # one job, one timer
        live.policy_changed(JOB, Verified(p), None)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert held.cancelled() and stats.end == POLICY_REVOKED
    assert live.count() == 0 and JOB not in live._jobs
    assert timer.cancelled()
    try:
        with live.track(JOB, BY_CIDR, Stats(), p):
            raise RuntimeError("the relay failed")
    except RuntimeError:
        pass
    assert live.count() == 0 and JOB not in live._jobs
    live.close()
