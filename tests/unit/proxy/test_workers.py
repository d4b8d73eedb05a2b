"""The pure parts of the proxy workers (`egressd.proxy.workers`, the `workers` config field,
the source-port slices of `egressd.limits.ports`): limit split, port slices, metrics summing,
the DNS hand-over's datagram, restart back-off, the `wrong_worker` guard."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from egressd.limits.ports import Destination, PortPoolConfig, SourcePortAllocator
from egressd.metrics_text import parse, series
from egressd.proxy import config as pc
from egressd.proxy.config import ConfigError, config_from_mapping, config_to_mapping
from egressd.proxy.context import PolicyUnavailable
from egressd.proxy.reuseport import worker_for
from egressd.proxy.workers import (
    WRONG_WORKER,
    WorkerPolicies,
    merge_pages,
    pack_steered,
    restart_delay,
    split_limit,
    unpack_steered,
    worker_limits,
)

IP = ipaddress.IPv4Address
BASE = {"name": "p", "underlay": "198.18.0.21", "egress": "203.0.113.21"}


def cfg(**kw: Any) -> pc.ProxyConfig:
    return config_from_mapping({**BASE, **kw})


# --- config --------------------------------------------------------------------------------


def test_workers_defaults_to_one_process_on_both_paths() -> None:
    assert cfg().worker_count == 1
    default = cfg(datapath="kernel", workers=pc.DEFAULT_KERNEL_WORKERS)
    assert cfg(datapath="kernel").worker_count == default.worker_count


def test_workers_auto_is_the_cpus_the_proxy_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(3)))
    assert cfg(datapath="kernel", workers="auto").worker_count == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(1000)))
    assert cfg(datapath="kernel", workers="auto", min_ports_per_job=1).worker_count == 256
    # No more than the source ports split into: 16384 ports / (64 x 5) per slice = 51.
    assert cfg(datapath="kernel", workers="auto").worker_count == 51


@pytest.mark.parametrize(
    ("value", "datapath"),
    [
        (0, "kernel"),
        (257, "kernel"),
        ("4", "kernel"),
        ("many", "kernel"),
        (True, "kernel"),
        (1.5, "kernel"),
        (2, "userspace"),
        ("auto", "userspace"),
    ],
)
def test_bad_workers_name_the_field(value: object, datapath: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(datapath=datapath, workers=value)
    assert err.value.detail.startswith("workers:")


def test_one_worker_is_valid_on_the_userspace_path() -> None:
    assert cfg(workers=1).worker_count == 1


def test_a_port_range_too_small_to_split_is_refused() -> None:
    # 8 ports split 4 ways: 2 each, below min_ports_per_job x (reserved_newcomers + 1) = 2 x 2.
    with pytest.raises(ConfigError) as err:
        cfg(
            datapath="kernel",
            workers=4,
            source_ports="20000-20007",
            min_ports_per_job=2,
            reserved_newcomers=1,
        )
    assert err.value.detail.startswith("workers: source_ports split 4 ways")
    cfg(
        datapath="kernel",
        workers=2,
        source_ports="20000-20007",
        min_ports_per_job=2,
        reserved_newcomers=1,
    )


def test_config_round_trips_through_its_mapping() -> None:
    full = cfg(
        datapath="kernel",
        workers="auto",
        egress_addresses=["203.0.113.21", "203.0.113.22"],
        source_ports="20000-29999",
        fleet_ranges=["198.18.0.0/24", "100.100.100.53/32"],
        interception_ca={"cert": "/c.pem", "key": "/k.pem"},
        state_dir="/run/x",
        bandwidth_bps=1000,
    )
    mapping = config_to_mapping(full)
    assert config_from_mapping(mapping) == full
    assert config_from_mapping(config_to_mapping(cfg())) == cfg()


# --- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "n", "share"), [(0, 4, 0), (1, 4, 1), (10, 3, 4), (9, 3, 3), (65536, 2, 32768)]
)
def test_split_limit_is_the_ceiling_share(value: int, n: int, share: int) -> None:
    assert split_limit(value, n) == share


def test_worker_limits_split_the_proxy_wide_ones_only() -> None:
    config = cfg(datapath="kernel", workers=3, max_connections=100, bandwidth_bps=1000)
    shares = []
    for index in range(3):
        limits = worker_limits(config, index)
        shares.append((limits.max_connections, limits.bandwidth_bps))
        assert (limits.port_pool.stride, limits.port_pool.offset) == (3, index)
        assert limits.timeouts == config.limits.timeouts
    assert shares == [(34, 334), (33, 333), (33, 333)]  # adding up to 100 and 1000 exactly
    one = cfg(datapath="kernel", workers=1, max_connections=100)
    assert worker_limits(one, 0) == one.limits


def test_port_slices_are_disjoint_and_cover_the_range() -> None:
    addresses = (IP("203.0.113.21"), IP("203.0.113.22"))
    whole = PortPoolConfig(addresses=addresses, first_port=20001, last_port=20010, min_per_job=0)
    pairs: set[tuple[IP, int]] = set()
    for offset in range(3):
        pool = PortPoolConfig(
            addresses=addresses,
            first_port=20001,
            last_port=20010,
            min_per_job=0,
            stride=3,
            offset=offset,
        )
        mine = [pool.candidate(i) for i in range(pool.capacity)]
        assert all(port % 3 == offset for _, port in mine)
        assert all(pool.index(a, p) == i for i, (a, p) in enumerate(mine))
        assert pairs.isdisjoint(mine)
        pairs |= set(mine)
        other = next(p for p in range(20001, 20011) if p % 3 != offset)
        assert pool.index(addresses[0], other) is None
    assert pairs == {whole.candidate(i) for i in range(whole.capacity)}


def test_min_ports_per_job_holds_within_a_slice() -> None:
    pool = PortPoolConfig(
        addresses=(IP("203.0.113.21"),),
        first_port=20000,
        last_port=20019,
        min_per_job=3,
        reserved_newcomers=1,
        reuse_delay_s=0,
        stride=2,
        offset=1,
    )
    assert pool.capacity == 10
    alloc = SourcePortAllocator(pool)
    dest = Destination(IP("198.51.100.1"), 443)
    greedy = []
    while not isinstance(lease := alloc.acquire("a", dest, max_per_job=100, now=0), str):
        greedy.append(lease)
    # 10 ports: the greedy job stops where one newcomer's minimum (3) stays free.
    assert len(greedy) == 7 and all(lease.port % 2 == 1 for lease in greedy)
    for _ in range(3):
        assert not isinstance(alloc.acquire("b", dest, max_per_job=100, now=0), str)


def test_a_slice_with_no_port_is_refused() -> None:
    with pytest.raises(ValueError, match="no port"):
        PortPoolConfig(addresses=(IP("203.0.113.21"),), first_port=20000, last_port=20000,
                       min_per_job=0, stride=2, offset=1)  # fmt: skip
    with pytest.raises(ValueError, match="offset"):
        PortPoolConfig(addresses=(IP("203.0.113.21"),), stride=2, offset=2)


# --- metrics -----------------------------------------------------------------------------------


def page(build: Any) -> str:
    registry = CollectorRegistry()
    build(registry)
    return generate_latest(registry).decode()


def worker_page(held: int, refused: int, nodes: int) -> str:
    def build(r: CollectorRegistry) -> None:
        Counter("egressd_limit_refusals", "r", ["job_id", "reason"], registry=r).labels(
            'j"1', "job_connection_limit"
        ).inc(refused)
        Gauge("egressd_connections_active", "a", registry=r).set(held)
        Gauge("egressd_registry_nodes", "n", registry=r).set(nodes)
        Histogram("egressd_t", "t", registry=r, buckets=(1.0,)).observe(held)

    return page(build)


def test_merge_sums_equal_series_and_keeps_the_supervisors_own_gauges() -> None:
    def own(r: CollectorRegistry) -> None:
        Gauge("egressd_registry_nodes", "n", registry=r).set(2)
        Counter("egressd_kernel_packets", "k", ["path"], registry=r).labels("fast").inc(7)
        Counter("egressd_limit_refusals", "r", ["job_id", "reason"], registry=r)

    merged = series(
        parse(merge_pages(page(own), [worker_page(3, 1, 9), worker_page(0, 4, 9)]).decode())
    )
    assert merged == {
        ("egressd_registry_nodes", ()): 2.0,  # the supervisor's, not 2 + 9 + 9
        ("egressd_kernel_packets_total", (("path", "fast"),)): 7.0,  # once
        (
            "egressd_limit_refusals_total",
            (("job_id", 'j"1'), ("reason", "job_connection_limit")),
        ): 5.0,
        ("egressd_connections_active", ()): 3.0,
        ("egressd_t_bucket", (("le", "1.0"),)): 1.0,
        ("egressd_t_bucket", (("le", "+Inf"),)): 2.0,
        ("egressd_t_count", ()): 2.0,
        ("egressd_t_sum", ()): 3.0,
    }


def test_merge_without_workers_is_the_supervisors_page() -> None:
    def own(r: CollectorRegistry) -> None:
        Counter("egressd_x", "x", ["a"], registry=r).labels("1").inc(2)

    text = page(own)
    assert series(parse(merge_pages(text, []).decode())) == series(parse(text))


# --- the DNS hand-over, restarts, the guard ----------------------------------------------------


def test_a_steered_query_round_trips() -> None:
    data = pack_steered(b"\x12\x34query", IP("100.96.1.5"), 40000, IP("100.100.100.53"))
    assert unpack_steered(data) == (b"\x12\x34query", IP("100.96.1.5"), 40000, IP("100.100.100.53"))
    assert unpack_steered(data[:9]) is None


def test_restart_delay_backs_off_a_crash_loop_only() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 5.0]


class _Store:
    def __init__(self) -> None:
        self.listeners: list[object] = []
        self.asked: list[uuid.UUID] = []

    async def get(self, job_id: uuid.UUID) -> str:
        self.asked.append(job_id)
        return "policy"


def test_another_workers_job_is_wrong_worker() -> None:
    jobs = [uuid.uuid5(uuid.NAMESPACE_URL, f"j{i}") for i in range(8)]
    mine = [j for j in jobs if worker_for(j, 2) == 1]
    theirs = [j for j in jobs if worker_for(j, 2) == 0]
    assert mine and theirs
    store = _Store()
    guard = WorkerPolicies(store, 1, 2)
    assert guard.listeners is store.listeners  # the rest is the store's
    for job in mine:
        assert asyncio.run(guard.get(job)) == "policy"
    for job in theirs:
        with pytest.raises(PolicyUnavailable) as err:
            asyncio.run(guard.get(job))
        assert err.value.reason == WRONG_WORKER
    assert store.asked == mine


def test_more_workers_than_max_connections_is_refused_and_auto_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every worker admits at least one connection: N workers over max_connections < N
    # would let the proxy hold more connections than its limit.
    with pytest.raises(ConfigError) as err:
        cfg(datapath="kernel", workers=4, max_connections=3)
    assert err.value.detail.startswith("workers:")
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    assert cfg(datapath="kernel", workers="auto", max_connections=3).worker_count == 3
