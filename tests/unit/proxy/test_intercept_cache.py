"""The interceptor's memo of tier-2 results is keyed by the very policy object."""

from __future__ import annotations

import ipaddress

from egressd.proxy.intercept import _MISS, _DecisionCache
from tests.support.policies import make_policy

RANGES = (ipaddress.IPv4Network("198.18.0.0/15"),)


def test_hit_only_for_the_same_policy_and_fleet_ranges() -> None:
    cache = _DecisionCache()
    policy = make_policy()
    key = (ipaddress.IPv4Address("203.0.113.10"), 80)
    assert cache.get(policy, RANGES, key) is _MISS
    cache.put(policy, RANGES, key, None)
    assert cache.get(policy, RANGES, key) is None
    # An equal but refreshed policy is another object: no hit.
    assert cache.get(make_policy(), RANGES, key) is _MISS
    assert cache.get(policy, (ipaddress.IPv4Network("198.18.0.0/15"),), key) is _MISS
    assert cache.get(policy, RANGES, (key[0], 443)) is _MISS


def test_bounded() -> None:
    cache = _DecisionCache(limit=3)
    policy = make_policy()
    for port in range(10):
        cache.put(policy, RANGES, port, port)
        assert len(cache._entries) <= 3
    assert cache.get(policy, RANGES, 9) == 9
