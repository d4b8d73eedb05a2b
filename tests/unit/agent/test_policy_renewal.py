"""Renewal of a sandbox's held policy ahead of its exp (`egressd.agent.policy_watch`):
when it is due, whether a fetched copy is the same content, and what the sandbox manager
does with each answer, without a kernel or a network."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from egressd.agent import policy_watch as pw
from egressd.agent.policy_watch import (
    CHANGED,
    RESIGNED,
    SAME_COPY,
    AgentPolicyWatch,
    ControlPolicies,
    ControlUnavailable,
    compare_copies,
    renew_at,
    renewal_due,
    retry_delay,
)
from egressd.agent.sandboxes import Sandbox, SandboxManager
from egressd.agent.tier1 import Bucket
from egressd.policy.jws import policy_digest, sign_payload, verify_policy
from egressd.policy.keys import generate_signing_key, load_trusted_keys
from egressd.policy.model import PortRange, parse_policy
from tests.support.sandbox_manager import (
    JOB,
    KEY,
    OTHER_JOB,
    FakeListener,
    FakeTier1,
    make_manager,
    payload,
)

# --- pure decisions -------------------------------------------------------------------


def test_renew_at_is_two_thirds_into_the_copy_and_past_the_control_planes_threshold() -> None:
    assert renew_at(1000, 4600) == pytest.approx(3400.0)
    # The control plane re-signs on a read once less than half the TTL is left: a renewal
    # at renew_at must get a new copy, and still leave time to retry before exp.
    for ttl in (60, 61, 300, 3600, 7 * 24 * 3600):
        at = renew_at(10_000, 10_000 + ttl)
        assert at is not None
        left = 10_000 + ttl - at
        assert 0 < left < ttl / 2, ttl
        assert left >= ttl / 3 - 1e-6, ttl
    assert renew_at(None, None) is None
    assert renew_at(5, None) is None
    assert renew_at(None, 500) == 500.0  # lifetime unknown: at exp (the leeway is left)
    assert renew_at(600, 500) == 500.0


def test_retry_delay_doubles_from_one_second_up_to_a_minute() -> None:
    assert [retry_delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10_000) == 60
    assert retry_delay(0) == 1


def test_renewal_due_waits_for_the_due_time_and_a_retry_time() -> None:
    assert not renewal_due(100.0, None, 99.9)
    assert renewal_due(100.0, None, 100.0)
    assert not renewal_due(100.0, 105.0, 104.0)
    assert renewal_due(100.0, 105.0, 105.0)
    assert not renewal_due(100.0, 90.0, 95.0)  # a retry time never brings the due time forward


def test_compare_copies_same_resigned_changed() -> None:
    now = int(time.time())
    held = parse_policy(payload())
    resigned = parse_policy(payload(iat=now + 100, nbf=now + 100, exp=now + 3700))
    other = parse_policy(payload(egress=[{"host": "api.allowed.test", "ports": [443, 80]}]))
    assert compare_copies(b"a" * 8, held, b"a" * 8, resigned) == SAME_COPY
    assert compare_copies(b"a" * 8, held, b"b" * 8, resigned) == RESIGNED
    assert compare_copies(b"a" * 8, held, b"b" * 8, other) == CHANGED
    for field, value in (
        ("nodes", ["node1", "node2"]),
        ("mode", "report"),
        ("limits", {"bandwidth_bps": 1000}),
        ("account", "other"),
    ):
        changed = parse_policy(payload(**{field: value}))
        assert compare_copies(b"a" * 8, held, b"b" * 8, changed) == CHANGED, field
    # Content unknown: treated as a change (applying one is always safe).
    assert compare_copies(b"a" * 8, None, b"b" * 8, resigned) == CHANGED


# --- the sandbox manager --------------------------------------------------------------


def held_sandbox(
    manager: SandboxManager,
    tier1: FakeTier1,
    listener: FakeListener,
    sandbox_id: str,
    ifindex: int,
    jws: str,
    job: uuid.UUID = JOB,
) -> Sandbox:
    """A registered sandbox running on `jws` (as `_setup` records it), tier 1 programmed."""
    verified = verify_policy(jws, load_trusted_keys(manager.config.keys_dir))
    sandbox = Sandbox(
        sandbox_id=sandbox_id,
        job_id=job,
        digest=verified.digest,
        kid=verified.kid,
        exp=int(verified.policy.exp or 0),
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
        policy=verified.policy,
    )
    manager._sandboxes[sandbox_id] = sandbox
    # A marker entry: a renewal must not rewrite it (that would refill the buckets).
    tier1.entries[ifindex] = ("programmed-at-registration",)
    listener.sandbox_added(sandbox)
    return sandbox


def stamped(start: int, ttl: int = 60, **over: Any) -> dict[str, Any]:
    return payload(iat=start, nbf=start, exp=start + ttl, **over)


def tamper(token: str) -> str:
    """The same token with its payload's exp pushed back (the signature no longer fits)."""
    header, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["exp"] += 3600
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{sig}"


def test_renew_job_moves_digest_of_a_resigned_copy_without_touching_tier1(
    keys_dir: Path, tmp_path: Path
) -> None:
    manager, tier1, listener, control = make_manager(keys_dir, tmp_path)
    now = int(time.time())
    first = sign_payload(stamped(now - 45), KEY)
    held_sandbox(manager, tier1, listener, "a", 11, first)
    held_sandbox(manager, tier1, listener, "b", 12, first)
    held_sandbox(manager, tier1, listener, "c", 13, first, job=OTHER_JOB)
    assert manager.renewals() == {JOB: pytest.approx(now - 5), OTHER_JOB: pytest.approx(now - 5)}

    # Not re-signed yet: nothing changes (retried later by the watch).
    control.tokens[JOB] = first
    assert asyncio.run(manager.renew_job(JOB)) == pw.NOT_RESIGNED
    assert listener.routes["a"] == policy_digest(first)

    second = sign_payload(stamped(now), KEY)
    control.tokens[JOB] = second
    assert asyncio.run(manager.renew_job(JOB)) == pw.RENEWED
    for sandbox_id in ("a", "b"):
        sandbox = manager.get(sandbox_id)
        assert sandbox is not None
        assert sandbox.digest == listener.routes[sandbox_id] == policy_digest(second)
        assert sandbox.exp == now + 60 and sandbox.policy is not None
        assert manager.state(sandbox_id) == "active"
    assert tier1.entries[11] == tier1.entries[12] == ("programmed-at-registration",)
    assert listener.routes["c"] == policy_digest(first)  # another job: untouched
    assert manager.renewals()[JOB] == pytest.approx(now + 40)
    assert control.asked.count(OTHER_JOB) == 0

    # Held for another content: applied as a change (tier 1 reprogrammed).
    changed = sign_payload(
        stamped(
            now,
            egress=[{"host": "api.allowed.test", "ports": [8443]}],
            limits={"dns_queries_per_s": 2},
        ),
        KEY,
    )
    control.tokens[JOB] = changed
    assert asyncio.run(manager.renew_job(JOB)) == pw.RENEW_CHANGED
    ports, _exempt, dns, _syn = tier1.entries.get(11, ())
    assert (ports, dns) == ((PortRange(8443, 8443),), Bucket.per_second(2))
    assert listener.routes["a"] == policy_digest(changed)

    # Deleted at the control plane: withdrawn like a delete from the watch, and no
    # longer renewed (a new put comes through the watch).
    del control.tokens[JOB]
    assert asyncio.run(manager.renew_job(JOB)) == pw.RENEW_DELETED
    assert manager.state("a") == manager.state("b") == "withdrawn"
    assert JOB not in manager.renewals()
    assert asyncio.run(manager.renew_job(JOB)) == pw.NO_SANDBOX


def test_renew_job_keeps_the_held_copy_when_the_answer_does_not_verify(
    keys_dir: Path, tmp_path: Path
) -> None:
    manager, tier1, listener, control = make_manager(keys_dir, tmp_path)
    now = int(time.time())
    first = sign_payload(stamped(now - 45), KEY)
    held_sandbox(manager, tier1, listener, "a", 11, first)
    rejected = {
        "unknown_kid": sign_payload(stamped(now), generate_signing_key()),
        "bad_signature": tamper(sign_payload(stamped(now), KEY)),
        "job_not_bound_to_node": sign_payload(stamped(now, nodes=["node2"]), KEY),
        "wrong_job": sign_payload(stamped(now, job_id=str(OTHER_JOB)), KEY),
        "expired": sign_payload(stamped(now - 200), KEY),
    }
    for reason, token in rejected.items():
        control.tokens[JOB] = token
        assert asyncio.run(manager.renew_job(JOB)) == pw.RENEW_REJECTED, reason
        sandbox = manager.get("a")
        assert sandbox is not None and sandbox.digest == policy_digest(first), reason
        assert manager.state("a") == "active", reason
        assert listener.routes["a"] == policy_digest(first)
        assert tier1.entries[11] == ("programmed-at-registration",)

    control.down = True
    with pytest.raises(ControlUnavailable):
        asyncio.run(manager.renew_job(JOB))
    assert manager.state("a") == "active" and listener.routes["a"] == policy_digest(first)


def test_an_expired_sandbox_comes_back_with_a_renewed_copy(keys_dir: Path, tmp_path: Path) -> None:
    """The control plane was down past exp: the expiry path withdrew the sandbox; the
    renewal that finally succeeds reprograms tier 1 and the route."""
    manager, tier1, listener, control = make_manager(keys_dir, tmp_path)
    now = int(time.time())
    first = sign_payload(stamped(now - 50), KEY)
    held_sandbox(manager, tier1, listener, "a", 11, first)
    manager.clock = lambda: time.time() + 60  # first's exp + leeway has passed
    assert asyncio.run(manager.expire()) == ["a"]
    assert (
        manager.state("a") == "expired" and 11 not in tier1.entries and "a" not in listener.routes
    )
    manager.clock = time.time
    control.tokens[JOB] = sign_payload(stamped(now), KEY)
    assert asyncio.run(manager.renew_job(JOB)) == pw.RENEWED
    assert manager.state("a") == "active"
    assert tier1.entries[11][0] == (PortRange(443, 443),)
    assert listener.routes["a"] == policy_digest(control.tokens[JOB])


def test_a_resign_seen_through_the_watch_does_not_refill_tier1_buckets(
    keys_dir: Path, tmp_path: Path
) -> None:
    manager, tier1, listener, control = make_manager(keys_dir, tmp_path)
    now = int(time.time())
    held_sandbox(manager, tier1, listener, "a", 11, sign_payload(stamped(now - 45), KEY))
    control.tokens[JOB] = sign_payload(stamped(now), KEY)  # a proxy's read re-signed it
    assert asyncio.run(manager.refresh_job(JOB)) == ["a"]
    assert listener.routes["a"] == policy_digest(control.tokens[JOB])
    assert tier1.entries[11] == ("programmed-at-registration",)


# --- the watch's renewal loop ---------------------------------------------------------


class FakeRenewer:
    def __init__(self) -> None:
        self.due: dict[uuid.UUID, float] = {}
        self.answers: dict[uuid.UUID, list[Any]] = {}
        self.calls: list[uuid.UUID] = []

    def renewals(self) -> dict[uuid.UUID, float]:
        return dict(self.due)

    async def renew_job(self, job_id: uuid.UUID) -> str:
        self.calls.append(job_id)
        answer = self.answers[job_id].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)


def test_the_watch_renews_due_jobs_and_backs_off_on_failures() -> None:
    async def go() -> None:
        control = ControlPolicies("http://198.18.0.2:8080", 2.0)
        control.session = aiohttp.ClientSession()
        clock = [1000.0]
        renewer = FakeRenewer()
        metrics = CollectorRegistry()
        watch = AgentPolicyWatch(
            control,
            jobs=set,
            refresh_job=lambda _j: asyncio.sleep(0),
            refresh_discovery=None,
            metrics=metrics,
            renewer=renewer,
            clock=lambda: clock[0],
        )

        def counted(result: str) -> float:
            value = metrics.get_sample_value(
                "egressd_agent_policy_renewals_total", {"result": result}
            )
            return value or 0.0

        try:
            renewer.due = {JOB: 1010.0, OTHER_JOB: 2000.0}
            assert await watch.renew_due() == {}  # nothing due yet
            clock[0] = 1010.0
            renewer.answers[JOB] = [
                ControlUnavailable("connection refused"),
                pw.NOT_RESIGNED,
                pw.RENEW_REJECTED,
                pw.RENEWED,
            ]
            assert await watch.renew_due() == {JOB: "control_unreachable"}
            # Backoff: 1 s, then 2 s, then 4 s between attempts.
            clock[0] = 1010.5
            assert await watch.renew_due() == {}
            clock[0] = 1011.0
            assert await watch.renew_due() == {JOB: pw.NOT_RESIGNED}
            clock[0] = 1012.9
            assert await watch.renew_due() == {}
            clock[0] = 1013.0
            assert await watch.renew_due() == {JOB: pw.RENEW_REJECTED}
            clock[0] = 1016.9
            assert await watch.renew_due() == {}
            clock[0] = 1017.0
            assert await watch.renew_due() == {JOB: pw.RENEWED}
            renewer.due[JOB] = 1057.0  # the new copy's renew_at
            clock[0] = 1018.0
            assert await watch.renew_due() == {}
            assert renewer.calls == [JOB] * 4
            for result in ("control_unreachable", pw.NOT_RESIGNED, pw.RENEW_REJECTED, pw.RENEWED):
                assert counted(result) == 1, result

            # A failure, then the held copy changes through the watch: the backoff restarts.
            clock[0] = 1057.0
            renewer.answers[JOB] = [RuntimeError("boom"), pw.RENEWED]
            assert await watch.renew_due() == {JOB: "error"}
            renewer.due[JOB] = 1058.5
            clock[0] = 1058.5
            assert await watch.renew_due() == {JOB: pw.RENEWED}
            # A job that left the node is forgotten; the other job in turn.
            renewer.due = {OTHER_JOB: 2000.0}
            clock[0] = 2000.0
            renewer.answers[OTHER_JOB] = [pw.RENEWED]
            assert await watch.renew_due() == {OTHER_JOB: pw.RENEWED}
            assert watch._retry == {}
        finally:
            await control.close()

    asyncio.run(go())
