"""egressd.proxy.digests: which GENEVE digests a proxy accepts after a replacement."""

from __future__ import annotations

import dataclasses
import uuid

from egressd.policy.model import Policy, parse_policy
from egressd.proxy.digests import (
    CURRENT,
    EQUIVALENT,
    GRACE,
    MAX_SUPERSEDED,
    STALE,
    UNKNOWN,
    Superseded,
    classify,
    same_content,
    supersede,
)

JOB = str(uuid.uuid4())
T0 = 1_800_000_000.0
A, B, C, D = (bytes([n]) * 8 for n in (1, 2, 3, 4))


def policy(hosts: list[str], iat: int = int(T0), ttl: int = 3600) -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": JOB,
            "account": "t",
            "nodes": ["node1"],
            "iat": iat,
            "nbf": iat,
            "exp": iat + ttl,
            "egress": [{"host": h, "ports": [443]} for h in hosts],
        }
    )


P1 = policy(["api.allowed.test"])
P2 = policy(["api.allowed.test", "other.allowed.test"])


def test_same_content_ignores_validity_times_only() -> None:
    assert same_content(P1, policy(["api.allowed.test"], iat=int(T0) + 900))
    assert not same_content(P1, P2)
    assert not same_content(P1, dataclasses.replace(P1, mode="report"))


def test_a_replaced_digest_is_accepted_for_the_grace_period_then_refused() -> None:
    older = supersede(
        {}, previous_digest=A, previous=P1, current_digest=B, current=P2, now=T0 + 10, grace_s=5.0
    )
    assert classify(B, B, older, T0 + 10) == CURRENT
    assert classify(A, B, older, T0 + 10) == GRACE
    assert classify(A, B, older, T0 + 14.99) == GRACE
    assert classify(A, B, older, T0 + 15) == STALE
    # Remembered (refused) until the old policy's own exp; after that it is no
    # longer a digest this proxy saw replaced.
    assert classify(A, B, older, T0 + 3599) == STALE
    assert classify(A, B, older, T0 + 3600) == UNKNOWN
    assert classify(C, B, older, T0 + 12) == UNKNOWN


def test_zero_grace_refuses_the_old_digest_at_once() -> None:
    older = supersede(
        {}, previous_digest=A, previous=P1, current_digest=B, current=P2, now=T0, grace_s=0.0
    )
    assert classify(A, B, older, T0) == STALE


def test_a_resigned_copy_keeps_the_earlier_digest_until_its_exp() -> None:
    resigned = policy(["api.allowed.test"], iat=int(T0) + 1800)
    older = supersede(
        {},
        previous_digest=A,
        previous=P1,
        current_digest=B,
        current=resigned,
        now=T0 + 1800,
        grace_s=5.0,
    )
    assert classify(A, B, older, T0 + 1900) == EQUIVALENT
    assert classify(A, B, older, T0 + 3599) == EQUIVALENT
    assert classify(A, B, older, T0 + 3600) == UNKNOWN


def test_a_content_change_after_a_resign_starts_the_grace_for_every_earlier_copy() -> None:
    resigned = policy(["api.allowed.test"], iat=int(T0) + 1800)
    older = supersede(
        {},
        previous_digest=A,
        previous=P1,
        current_digest=B,
        current=resigned,
        now=T0 + 1800,
        grace_s=5.0,
    )
    changed = policy(["evil.test"], iat=int(T0) + 2000)
    older = supersede(
        older,
        previous_digest=B,
        previous=resigned,
        current_digest=C,
        current=changed,
        now=T0 + 2000,
        grace_s=5.0,
    )
    for digest in (A, B):
        assert classify(digest, C, older, T0 + 2004) == GRACE
        assert classify(digest, C, older, T0 + 2005) == STALE


def test_a_digest_that_becomes_current_again_is_not_refused() -> None:
    older = supersede(
        {}, previous_digest=A, previous=P1, current_digest=B, current=P2, now=T0, grace_s=5.0
    )
    older = supersede(
        older, previous_digest=B, previous=P2, current_digest=A, current=P1, now=T0 + 1, grace_s=5.0
    )
    assert classify(A, A, older, T0 + 100) == CURRENT
    assert A not in older
    assert classify(B, A, older, T0 + 100) == STALE


def test_the_superseded_digests_of_a_job_are_bounded() -> None:
    older: dict[bytes, Superseded] = {}
    current, digest = P1, bytes(8)
    for i in range(1, 3 * MAX_SUPERSEDED):
        nxt = policy([f"h{i}.allowed.test"])
        new_digest = i.to_bytes(8, "big")
        older = supersede(
            older,
            previous_digest=digest,
            previous=current,
            current_digest=new_digest,
            current=nxt,
            now=T0 + i,
            grace_s=5.0,
        )
        current, digest = nxt, new_digest
    assert len(older) == MAX_SUPERSEDED
    # The most recent ones are kept.
    assert (3 * MAX_SUPERSEDED - 2).to_bytes(8, "big") in older
