"""The proxy's watch client: answers parsed strictly, backoff bounded, notices dispatched."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import CollectorRegistry

from egressd.proxy.watch import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    PolicyWatch,
    WatchError,
    backoff_delay,
    parse_answer,
)

JOB = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"


def test_parse_answer() -> None:
    body = {"revision": 7, "changes": [{"rev": 7, "kind": "job", "key": JOB, "op": "delete"}]}
    assert parse_answer(body) == (7, [("job", JOB, "delete")], False)
    assert parse_answer({"revision": 7, "changes": [], "resync": True}) == (7, [], True)
    bad: object
    for bad in (
        [],
        {"changes": []},
        {"revision": -1, "changes": []},
        {"revision": True, "changes": []},
        {"revision": 1},
        {"revision": 1, "changes": ["x"]},
        {"revision": 1, "changes": [{"kind": "job", "key": 5, "op": "put"}]},
    ):
        with pytest.raises(WatchError):
            parse_answer(bad)


def test_backoff_is_jittered_and_bounded() -> None:
    assert backoff_delay(1, lambda: 0.0) == BACKOFF_MIN_S / 2
    assert backoff_delay(1, lambda: 1.0) == BACKOFF_MIN_S
    assert backoff_delay(50, lambda: 1.0) == BACKOFF_MAX_S
    assert backoff_delay(3, lambda: 1.0) == BACKOFF_MIN_S * 4


class FakeStore:
    def __init__(self) -> None:
        self.watching = False
        self.changed_jobs: list[uuid.UUID] = []
        self.resyncs = 0

    def changed(self, job_id: uuid.UUID) -> None:
        self.changed_jobs.append(job_id)

    def resync(self) -> None:
        self.resyncs += 1


async def test_notices_go_to_the_store_and_the_registry() -> None:
    store = FakeStore()
    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)

    watch = PolicyWatch(
        None,  # type: ignore[arg-type]
        "http://x",
        store,  # type: ignore[arg-type]
        refresh_registry=refresh,
        metrics=CollectorRegistry(),
    )
    watch.apply(
        [("job", JOB, "put"), ("job", "not-a-uuid", "put"), ("node", "node1", "put")], False
    )
    await asyncio.sleep(0.01)
    assert store.changed_jobs == [uuid.UUID(JOB)]
    assert refreshed == [1]
    watch.apply([], True)
    await asyncio.sleep(0.01)
    assert store.resyncs == 1 and refreshed == [1, 1]
