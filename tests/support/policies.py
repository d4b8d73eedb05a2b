"""Policies for tests that need a parsed one, not its text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from egressd.policy.model import Policy, parse_policy


def make_policy(
    mode: str = "enforce", extra: Sequence[Mapping[str, object]] | None = None
) -> Policy:
    return parse_policy(
        {
            "v": 1,
            "job_id": "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2",
            "account": "acme",
            "nodes": ["node1"],
            "mode": mode,
            "egress": [
                {"host": "api.allowed.test", "ports": [443, 80]},
                {"host": "*.data.allowed.test", "ports": [443]},
                {"cidr": "203.0.113.96/28", "ports": [5432]},
                {"cidr": "10.1.2.0/24", "ports": [8080]},
                *(extra or []),
            ],
        },
        require_timestamps=False,
    )
