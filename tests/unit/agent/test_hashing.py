"""Rendezvous hashing and outer source ports: stable, uniform, minimally disruptive."""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from egressd.agent.hashing import (
    SOURCE_PORT_MAX,
    SOURCE_PORT_MIN,
    FiveTuple,
    Rendezvous,
    flow_hash,
    flow_key,
    outer_source_port,
    pick_proxy,
    proxy_seed,
)

PROXIES = ("proxy1", "proxy2", "proxy3", "proxy4")


def flows(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        src = ipaddress.IPv4Address(0x64600100 + rng.randrange(2, 255))
        dst = ipaddress.IPv4Address(rng.getrandbits(32))
        out.append(flow_key(src, dst, 6, rng.randrange(32768, 61000), rng.choice((443, 80, 5432))))
    return out


def test_flow_key_layout() -> None:
    key = flow_key("100.96.1.2", "203.0.113.10", 6, 40000, 443)
    assert key == bytes([100, 96, 1, 2, 203, 0, 113, 10, 6]) + (40000).to_bytes(2, "big") + (
        443
    ).to_bytes(2, "big")
    ft = FiveTuple(
        ipaddress.IPv4Address("100.96.1.2"), ipaddress.IPv4Address("203.0.113.10"), 6, 40000, 443
    )
    assert ft.key == key
    assert outer_source_port(ft) == outer_source_port(key)


def test_golden_values() -> None:
    """Pinned outputs: a change here changes every deployed flow's path."""
    key = flow_key("100.96.1.2", "203.0.113.10", 6, 40000, 443)
    assert flow_hash(key) == GOLDEN_HASH
    assert outer_source_port(key) == GOLDEN_PORT
    assert Rendezvous(PROXIES).pick(flow_hash(key)) == GOLDEN_PROXY
    assert proxy_seed("proxy1") == 0xE385812B82ACDD34


GOLDEN_HASH = 0x80CE2D90F45ABA5A
GOLDEN_PORT = 64090
GOLDEN_PROXY = "proxy1"


def test_stable_per_flow() -> None:
    rz = Rendezvous(PROXIES)
    for key in flows(200):
        assert rz.pick_key(key) == rz.pick_key(bytes(key))
        assert outer_source_port(key) == outer_source_port(key)


def test_order_of_names_does_not_matter() -> None:
    a = Rendezvous(PROXIES)
    b = Rendezvous(reversed(PROXIES))
    for key in flows(500):
        assert a.pick_key(key) == b.pick_key(key)


def test_empty_set() -> None:
    rz = Rendezvous(())
    assert not rz
    assert rz.pick(12345) is None
    assert pick_proxy(flows(1)[0], []) is None


@pytest.mark.parametrize("n_proxies", [2, 3, 4, 7])
def test_uniform_over_10k_flows(n_proxies: int) -> None:
    names = [f"proxy{i}" for i in range(1, n_proxies + 1)]
    rz = Rendezvous(names)
    n = 10_000
    counts = collections.Counter(rz.pick_key(k) for k in flows(n))
    expected = n / n_proxies
    sigma = math.sqrt(n * (1 / n_proxies) * (1 - 1 / n_proxies))
    assert set(counts) == set(names)
    for name in names:
        assert abs(counts[name] - expected) < 5 * sigma, (name, counts)


def test_source_ports_spread_and_in_range() -> None:
    keys = flows(10_000)
    ports = [outer_source_port(k) for k in keys]
    assert all(SOURCE_PORT_MIN <= p <= SOURCE_PORT_MAX for p in ports)
    # 10k flows in 16384 ports: expected distinct ~ 16384 * (1 - e^(-10000/16384)) ~ 7,500.
    assert len(set(ports)) > 7000
    buckets = collections.Counter((p - SOURCE_PORT_MIN) // 1024 for p in ports)
    assert len(buckets) == 16
    assert max(buckets.values()) < 1.3 * 10_000 / 16


def test_minimal_disruption_on_removal() -> None:
    before = Rendezvous(PROXIES)
    after = Rendezvous([p for p in PROXIES if p != "proxy3"])
    moved = 0
    for key in flows(10_000):
        old, new = before.pick_key(key), after.pick_key(key)
        if old != "proxy3":
            assert new == old  # nobody else's flow moves
        else:
            moved += 1
            assert new != "proxy3"
    assert 2000 < moved < 3000  # about a quarter


def test_minimal_disruption_on_addition() -> None:
    before = Rendezvous(PROXIES[:3])
    after = Rendezvous(PROXIES)
    for key in flows(5_000):
        new = after.pick_key(key)
        assert new == before.pick_key(key) or new == "proxy4"


def test_seeds_differ() -> None:
    assert len({proxy_seed(p) for p in PROXIES}) == len(PROXIES)


def test_bad_key_length() -> None:
    with pytest.raises(ValueError):
        outer_source_port(b"short")


_CHILD = """
import json, sys
from egressd.agent.hashing import Rendezvous, outer_source_port
keys = [bytes.fromhex(k) for k in json.loads(sys.stdin.read())]
rz = Rendezvous(["proxy1", "proxy2", "proxy3", "proxy4"])
print(json.dumps([[rz.pick_key(k), outer_source_port(k)] for k in keys]))
"""


def test_deterministic_across_processes() -> None:
    """Another interpreter (other PYTHONHASHSEED) makes the same choices."""
    keys = flows(300, seed=7)
    rz = Rendezvous(PROXIES)
    here = [[rz.pick_key(k), outer_source_port(k)] for k in keys]
    for seed in ("1", "12345"):
        result = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=json.dumps([k.hex() for k in keys]),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            cwd=str(Path(__file__).resolve().parents[3]),
        )
        assert json.loads(result.stdout) == here
