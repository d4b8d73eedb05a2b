"""Live policies on the node, without a kernel: the registration check against the control
plane, a job's change reprogramming tier 1 and the GENEVE digest, a delete withdrawing the
job's sandboxes, and the watch's queueing (`egressd.agent.policy_watch`)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from egressd.agent.policy_watch import (
    AgentPolicyWatch,
    ControlPolicies,
    ControlUnavailable,
)
from egressd.agent.sandboxes import AgentError, Sandbox, SandboxManager, verify_for_node
from egressd.agent.tier1 import Bucket
from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import load_trusted_keys
from egressd.policy.model import PortRange, parse_policy
from egressd.policy.model import same_content as same_policy
from tests.support.sandbox_manager import (
    JOB,
    KEY,
    OTHER_JOB,
    FakeListener,
    FakeTier1,
    make_manager,
    payload,
)


def test_same_policy_ignores_validity_times_only() -> None:
    base = parse_policy(payload())
    resigned = parse_policy(payload(iat=int(time.time()), exp=int(time.time()) + 60))
    assert same_policy(base, resigned)
    for change in (
        {"egress": [{"host": "api.allowed.test", "ports": [443, 8443]}]},
        {"nodes": ["node1", "node2"]},
        {"limits": {"dns_queries_per_s": 3}},
        {"account": "other"},
    ):
        assert not same_policy(base, parse_policy(payload(**change))), change


def add_sandbox(
    manager: SandboxManager,
    tier1: FakeTier1,
    listener: FakeListener,
    sandbox_id: str,
    ifindex: int,
    jws: str,
    job: uuid.UUID = JOB,
) -> Sandbox:
    sandbox = Sandbox(
        sandbox_id=sandbox_id,
        job_id=job,
        digest=policy_digest(jws),
        kid=KEY.kid,
        exp=0,
        ip=ipaddress.IPv4Address(f"100.96.1.{ifindex}"),
        gateway=ipaddress.IPv4Address("100.96.1.1"),
        prefixlen=24,
        netns=f"ns-{sandbox_id}",
        host_veth=f"sb{sandbox_id}",
        peer_veth="eth0",
        ifindex=ifindex,
        mac="02:00:00:00:00:01",
        tcp_ports=(PortRange(443, 443),),
        exemptions=(),
    )
    manager._sandboxes[sandbox_id] = sandbox
    tier1.entries[ifindex] = ((PortRange(443, 443),), (), None, None)
    listener.sandbox_added(sandbox)
    return sandbox


def test_registration_check_refuses_unheld_superseded_and_unreachable(
    keys_dir: Path, tmp_path: Path
) -> None:
    manager, _tier1, _listener, control = make_manager(keys_dir, tmp_path)
    trusted = load_trusted_keys(keys_dir)
    presented = sign_payload(payload(), KEY)
    verified = verify_for_node(presented, trusted, "node1")

    async def check() -> Any:
        return await manager._held_copy(control, verified, trusted)  # type: ignore[arg-type]

    with pytest.raises(AgentError) as err:
        asyncio.run(check())
    assert (err.value.reason, err.value.kind) == ("policy_not_held", "policy_rejected")
    assert "egressd job put POLICY.json" in err.value.detail

    control.tokens[JOB] = sign_payload(payload(egress=[{"host": "x.test", "ports": [443]}]), KEY)
    with pytest.raises(AgentError) as err:
        asyncio.run(check())
    assert err.value.reason == "policy_superseded"

    control.down = True
    with pytest.raises(AgentError) as err:
        asyncio.run(check())
    assert (err.value.reason, err.value.kind) == ("control_unreachable", "unavailable")

    # Held with the same content but re-signed later: accepted, and the held copy is used.
    control.down = False
    resigned = sign_payload(payload(iat=int(time.time()), exp=int(time.time()) + 7200), KEY)
    control.tokens[JOB] = resigned
    held = asyncio.run(check())
    assert held.digest == policy_digest(resigned) != verified.digest


def test_refresh_job_reprograms_tier1_and_digest_then_withdraws_on_delete(
    keys_dir: Path, tmp_path: Path
) -> None:
    manager, tier1, listener, control = make_manager(keys_dir, tmp_path)
    first = sign_payload(payload(), KEY)
    add_sandbox(manager, tier1, listener, "a", 11, first)
    add_sandbox(manager, tier1, listener, "b", 12, first)
    other = add_sandbox(manager, tier1, listener, "c", 13, first, job=OTHER_JOB)
    assert manager.jobs() == {JOB, OTHER_JOB}

    new = sign_payload(
        payload(
            egress=[{"host": "api.allowed.test", "ports": [443, 8000, 8001]}],
            limits={"dns_queries_per_s": 7, "max_new_connections_per_s": 3},
        ),
        KEY,
    )
    control.tokens[JOB] = new
    assert sorted(asyncio.run(manager.refresh_job(JOB))) == ["a", "b"]
    for sandbox_id, ifindex in (("a", 11), ("b", 12)):
        ports, _exempt, dns, syn = tier1.entries[ifindex]
        assert ports == (PortRange(443, 443), PortRange(8000, 8001))
        assert (dns, syn) == (Bucket.per_second(7), Bucket.per_second(3))
        assert listener.routes[sandbox_id] == policy_digest(new)
        sandbox = manager.get(sandbox_id)
        assert sandbox is not None and sandbox.tcp_ports == ports
        assert manager.state(sandbox_id) == "active"
    assert tier1.entries[13][0] == (PortRange(443, 443),)  # another job: untouched
    assert listener.routes["c"] == other.digest
    # The same digest again changes nothing.
    assert asyncio.run(manager.refresh_job(JOB)) == []

    del control.tokens[JOB]
    assert sorted(asyncio.run(manager.refresh_job(JOB))) == ["a", "b"]
    assert 11 not in tier1.entries and 12 not in tier1.entries and 13 in tier1.entries
    # The return route stays: the proxies' resets of the job's connections must arrive.
    assert listener.routes["a"] == listener.routes["b"] == policy_digest(new)
    assert manager.state("a") == manager.state("b") == "withdrawn"
    assert asyncio.run(manager.refresh_job(JOB)) == []  # withdrawn once, one event

    # Put again: the withdrawn sandboxes come back.
    control.tokens[JOB] = first
    assert sorted(asyncio.run(manager.refresh_job(JOB))) == ["a", "b"]
    assert 11 in tier1.entries and manager.state("a") == "active"

    # A policy that no longer names this node withdraws too; an unreachable control plane
    # changes nothing.
    control.tokens[JOB] = sign_payload(payload(nodes=["node2"]), KEY)
    control.down = True
    with pytest.raises(ControlUnavailable):
        asyncio.run(manager.refresh_job(JOB))
    assert 11 in tier1.entries
    control.down = False
    asyncio.run(manager.refresh_job(JOB))
    assert manager.state("a") == "withdrawn" and 11 not in tier1.entries
    assert manager._withdrawn["a"] == "job_not_bound_to_node"
    assert control.asked.count(OTHER_JOB) == 0


def test_watch_queues_jobs_here_and_discovery() -> None:
    async def go() -> None:
        control = ControlPolicies("http://198.18.0.2:8080", 2.0)
        control.session = aiohttp.ClientSession()
        refreshed: list[uuid.UUID] = []
        discovered: list[int] = []
        done = asyncio.Event()

        async def refresh_job(job_id: uuid.UUID) -> None:
            refreshed.append(job_id)
            if job_id == OTHER_JOB:
                raise ControlUnavailable("down")  # logged; the others still go
            done.set()

        async def refresh_discovery() -> None:
            discovered.append(1)

        watch = AgentPolicyWatch(
            control,
            jobs=lambda: {JOB, OTHER_JOB},
            refresh_job=refresh_job,
            refresh_discovery=refresh_discovery,
            metrics=CollectorRegistry(),
        )
        try:
            task = asyncio.create_task(watch._work())
            watch.apply([("job", str(uuid.uuid4()), "put"), ("job", "not-a-uuid", "put")], False)
            await asyncio.sleep(0.05)
            assert refreshed == [] and discovered == []
            watch.apply([("job", str(JOB), "delete"), ("proxy", "proxy1", "put")], False)
            await asyncio.wait_for(done.wait(), 2)
            assert refreshed == [JOB] and discovered == [1]
            done.clear()
            watch.apply([], True)  # resync: every job here, and discovery
            await asyncio.wait_for(done.wait(), 2)
            await asyncio.sleep(0.05)
            assert sorted(map(str, refreshed[1:])) == sorted([str(JOB), str(OTHER_JOB)])
            assert discovered == [1, 1]
            task.cancel()
        finally:
            await control.close()

    asyncio.run(go())
