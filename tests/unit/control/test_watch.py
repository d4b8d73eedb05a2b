"""The watch: revisions, the bounded change log, the long-poll route."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from egressd.control.app import ControlApi, build_app
from egressd.control.records import node_from_json
from egressd.control.store import Change, StateStore, StoreError
from egressd.control.watch import ChangeLog
from egressd.policy.keys import TrustedKeys, generate_signing_key

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"
POLICY = {
    "v": 1,
    "account": "acme",
    "nodes": ["node1"],
    "egress": [{"host": "a.test", "ports": [443]}],
}
NODE1 = {"underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"}


def change(rev: int, key: str = "n", op: str = "put") -> Change:
    return Change(rev, "node", key, op)


# --- ChangeLog (pure) ----------------------------------------------------------------------


def test_changes_after_a_revision_in_order() -> None:
    log = ChangeLog(10)
    for rev in (11, 12, 13):
        log.append(change(rev, f"n{rev}"))
    answer = log.since(11)
    assert not answer.resync
    assert answer.revision == 13
    assert [c.rev for c in answer.changes] == [12, 13]
    assert log.since(13).changes == ()
    assert log.since(10).changes == tuple(change(r, f"n{r}") for r in (11, 12, 13))


def test_resync_without_since_older_than_the_log_or_from_the_future() -> None:
    log = ChangeLog(10, size=3)
    assert log.since(None).resync and log.since(None).revision == 10
    assert log.since(9).resync  # before this process: the log does not cover it
    assert not log.since(10).resync
    for rev in range(11, 16):
        log.append(change(rev))
    assert log.since(11).resync  # 12 fell out of the 3-entry log
    assert [c.rev for c in log.since(12).changes] == [13, 14, 15]
    assert log.since(99).resync  # state restored from an older backup


def test_an_old_or_repeated_revision_is_ignored() -> None:
    log = ChangeLog(5)
    log.append(change(6))
    log.append(change(6, "again"))
    log.append(change(4))
    assert [c.key for c in log.since(5).changes] == ["n"]


async def test_wait_returns_on_a_change_or_after_the_timeout() -> None:
    log = ChangeLog(1)
    started = time.monotonic()
    empty = await log.wait(1, 0.2)
    assert empty.changes == () and not empty.resync
    assert time.monotonic() - started >= 0.19
    waiter = asyncio.create_task(log.wait(1, 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    await asyncio.to_thread(log.append, change(2))  # commits come from the writer thread
    answer = await asyncio.wait_for(waiter, 1.0)
    assert [c.rev for c in answer.changes] == [2]
    assert time.monotonic() - started < 0.5


# --- the store's revision ------------------------------------------------------------------


def test_every_write_takes_the_next_revision_durably(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.load()
    seen: list[Change] = []
    store.revisions.listeners.append(seen.append)
    node = node_from_json("node1", NODE1)
    store.put_node(node)
    store.put_node(node)
    assert store.nodes.delete("node1")
    assert not store.nodes.delete("node1")  # nothing deleted: no revision
    assert [(c.rev, c.kind, c.key, c.op) for c in seen] == [
        (1, "node", "node1", "put"),
        (2, "node", "node1", "put"),
        (3, "node", "node1", "delete"),
    ]
    again = StateStore(tmp_path)
    again.load()
    assert again.revision == 3
    again.put_node(node)
    assert again.revision == 4
    assert (tmp_path / "revision").read_text().strip() == "4"


def test_a_corrupt_revision_file_stops_load(tmp_path: Path) -> None:
    (tmp_path / "revision").write_text("nope\n")
    store = StateStore(tmp_path)
    with pytest.raises(StoreError) as caught:
        store.load()
    assert caught.value.reason == "corrupt_state"


# --- the route -----------------------------------------------------------------------------


async def test_watch_route_long_polls_and_resyncs(tmp_path: Path) -> None:
    def api() -> ControlApi:
        return ControlApi(
            store=StateStore(tmp_path / "state"),
            signing_key=generate_signing_key(),
            trusted=TrustedKeys({}),
            admin_token=TOKEN,
            policy_ttl_s=3600,
        )

    client = TestClient(TestServer(build_app(api())))
    await client.start_server()
    try:
        first = await (await client.get("/v1/watch")).json()
        assert first == {"revision": 0, "changes": [], "resync": True}
        pending = asyncio.create_task(client.get("/v1/watch?since=0&timeout=5"))
        await asyncio.sleep(0.1)
        assert (await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)).status == 200
        answer = await (await asyncio.wait_for(pending, 2.0)).json()
        assert answer == {
            "revision": 1,
            "changes": [{"rev": 1, "kind": "node", "key": "node1", "op": "put"}],
        }
        assert (await client.put(f"/v1/jobs/{JOB}/policy", json=POLICY, headers=AUTH)).status == 200
        assert (await client.delete(f"/v1/jobs/{JOB}/policy", headers=AUTH)).status == 204
        answer = await (await client.get("/v1/watch?since=1")).json()
        assert [(c["kind"], c["key"], c["op"]) for c in answer["changes"]] == [
            ("job", JOB, "put"),
            ("job", JOB, "delete"),
        ]
        quiet = await client.get("/v1/watch?since=3&timeout=0.1")
        assert (await quiet.json()) == {"revision": 3, "changes": []}
        bad = await client.get("/v1/watch?since=x")
        assert bad.status == 400
    finally:
        await client.close()

    # A restart: the revision carries on, an old revision is answered with a resync.
    client = TestClient(TestServer(build_app(api())))
    await client.start_server()
    try:
        answer = await (await client.get("/v1/watch?since=1")).json()
        assert answer == {"revision": 3, "changes": [], "resync": True}
        assert (await (await client.get("/v1/watch?since=3&timeout=0")).json())["changes"] == []
    finally:
        await client.close()
