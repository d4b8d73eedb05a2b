"""`PUT /v1/nodes/{name}` with `"sandbox_cidr": "auto"`: the control plane allocates from its
pool (aiohttp TestServer on loopback), keeps the allocation in the node record across a
restart over the same state directory, and explicit CIDRs work as before. Also the
`--sandbox-pool`/`--sandbox-prefix` options."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from egressd.control.app import ControlApi, build_app
from egressd.control.config import ConfigError, ControlConfig
from egressd.control.pool import SandboxPool
from egressd.control.store import StateStore
from egressd.policy.keys import TrustedKeys, generate_signing_key

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[web.Request, web.Application]


class Plane:
    """Control plane apps over one state directory (a restart is a new app over it)."""

    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.key = generate_signing_key()
        self.clients: list[Client] = []

    async def start(self, pool: SandboxPool | None = None) -> Client:
        api = ControlApi(
            store=StateStore(self.state_dir),
            signing_key=self.key,
            trusted=TrustedKeys({}),
            admin_token=TOKEN,
            policy_ttl_s=3600,
            sandbox_pool=pool,
        )
        client: Client = TestClient(TestServer(build_app(api)))
        await client.start_server()
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    p = Plane(tmp_path)
    try:
        yield p
    finally:
        await p.close()


async def put_node(
    client: Client, name: str, underlay: str, cidr: str
) -> tuple[int, dict[str, Any]]:
    resp = await client.put(
        f"/v1/nodes/{name}", json={"underlay": underlay, "sandbox_cidr": cidr}, headers=AUTH
    )
    return resp.status, await resp.json()


async def test_auto_allocates_distinct_blocks_and_keeps_them_across_a_restart(
    plane: Plane,
) -> None:
    client = await plane.start()
    s1, a = await put_node(client, "worker-1", "10.0.0.1", "auto")
    s2, b = await put_node(client, "worker-2", "10.0.0.2", "auto")
    assert (s1, s2) == (200, 200)
    assert a == {"name": "worker-1", "underlay": "10.0.0.1", "sandbox_cidr": "100.96.0.0/24"}
    assert b["sandbox_cidr"] == "100.96.1.0/24"
    # Asking again (an agent restart, with a new underlay) gives the same block back.
    s3, again = await put_node(client, "worker-1", "10.0.0.9", "auto")
    assert s3 == 200 and again["sandbox_cidr"] == "100.96.0.0/24"
    assert again["underlay"] == "10.0.0.9"
    # On disk: the allocation is the node record, with a real CIDR.
    stored = json.loads((plane.state_dir / "nodes" / "worker-2.json").read_text())
    assert stored["sandbox_cidr"] == "100.96.1.0/24"

    restarted = await plane.start()
    _, after = await put_node(restarted, "worker-2", "10.0.0.2", "auto")
    assert after["sandbox_cidr"] == "100.96.1.0/24"
    _, third = await put_node(restarted, "worker-3", "10.0.0.3", "auto")
    assert third["sandbox_cidr"] == "100.96.2.0/24"
    listed = await (await restarted.get("/v1/nodes")).json()
    cidrs = [IPv4Network(n["sandbox_cidr"]) for n in listed["nodes"]]
    assert len(cidrs) == 3
    assert not any(x.overlaps(y) for i, x in enumerate(cidrs) for y in cidrs[i + 1 :])


async def test_explicit_cidrs_work_as_before_and_auto_avoids_them(plane: Plane) -> None:
    client = await plane.start()
    status, node1 = await put_node(client, "node1", "198.18.0.11", "100.96.0.0/24")
    assert status == 200 and node1["sandbox_cidr"] == "100.96.0.0/24"
    # An overlapping explicit CIDR is still a 409 conflict.
    status, body = await put_node(client, "node2", "198.18.0.12", "100.96.0.0/25")
    assert status == 409 and body["error"] == "conflict" and body["field"] == "sandbox_cidr"
    _, auto = await put_node(client, "k1", "10.0.0.1", "auto")
    assert auto["sandbox_cidr"] == "100.96.1.0/24"
    # A name pinned explicitly keeps its CIDR when it later asks for auto.
    _, pinned = await put_node(client, "node1", "198.18.0.11", "auto")
    assert pinned["sandbox_cidr"] == "100.96.0.0/24"
    # And an explicit PUT of an auto node replaces its CIDR, as any PUT does.
    _, moved = await put_node(client, "k1", "10.0.0.1", "100.96.7.0/24")
    assert moved["sandbox_cidr"] == "100.96.7.0/24"


async def test_exhausted_pool_is_409_and_stores_nothing(plane: Plane) -> None:
    client = await plane.start(SandboxPool(IPv4Network("100.96.8.0/23"), 24))
    for i in (1, 2):
        assert (await put_node(client, f"w{i}", f"10.0.0.{i}", "auto"))[0] == 200
    status, body = await put_node(client, "w3", "10.0.0.3", "auto")
    assert status == 409
    assert body["error"] == "sandbox_pool_exhausted" and body["field"] == "sandbox_cidr"
    assert "no free /24 in 100.96.8.0/23" in body["detail"]
    assert (await client.get("/v1/nodes/w3")).status == 404
    assert not (plane.state_dir / "nodes" / "w3.json").exists()
    # A node that holds a block still re-registers from a full pool.
    assert (await put_node(client, "w2", "10.0.0.2", "auto"))[1]["sandbox_cidr"] == (
        "100.96.9.0/24"
    )
    # Deleting a node frees its block.
    assert (await client.delete("/v1/nodes/w1", headers=AUTH)).status == 204
    status, body = await put_node(client, "w3", "10.0.0.3", "auto")
    assert status == 200 and body["sandbox_cidr"] == "100.96.8.0/24"


async def test_concurrent_auto_registrations_get_distinct_blocks(plane: Plane) -> None:
    client = await plane.start()
    answers = await asyncio.gather(
        *(put_node(client, f"w{i}", f"10.0.1.{i}", "auto") for i in range(1, 21))
    )
    assert all(status == 200 for status, _ in answers)
    cidrs = {body["sandbox_cidr"] for _, body in answers}
    assert cidrs == {f"100.96.{i}.0/24" for i in range(20)}


async def test_auto_needs_the_token_and_a_well_formed_body(plane: Plane) -> None:
    client = await plane.start()
    resp = await client.put("/v1/nodes/w1", json={"underlay": "10.0.0.1", "sandbox_cidr": "auto"})
    assert resp.status == 401
    for body, field in (
        ({"sandbox_cidr": "auto"}, "underlay"),
        ({"underlay": "10.0.0.1", "sandbox_cidr": "auto", "extra": 1}, "extra"),
        ({"underlay": "10.0.0.1", "sandbox_cidr": "AUTO"}, "sandbox_cidr"),
        ({"underlay": "10.0.0.1", "sandbox_cidr": "auto", "name": "w2"}, "name"),
    ):
        resp = await client.put("/v1/nodes/w1", json=body, headers=AUTH)
        got = await resp.json()
        assert (resp.status, got["error"], got["field"]) == (400, "invalid_node", field), got
    assert (await client.get("/v1/nodes")).status == 200
    assert (await (await client.get("/v1/nodes")).json())["nodes"] == []
    # An underlay that belongs to another node is a conflict, allocation or not.
    await put_node(client, "w1", "10.0.0.1", "auto")
    status, body = await put_node(client, "w2", "10.0.0.1", "auto")
    assert status == 409 and body["field"] == "underlay"


def test_control_config_takes_the_pool_options() -> None:
    config = ControlConfig.build(sandbox_pool="100.96.0.0/18", sandbox_prefix=26)
    assert config.sandbox_pool == SandboxPool(IPv4Network("100.96.0.0/18"), 26)
    assert ControlConfig.build().sandbox_pool == SandboxPool()
    for pool, prefix, words in (
        ("100.96.0.1/16", 24, "not a strict IPv4 network"),
        ("nope", 24, "not a strict IPv4 network"),
        ("100.96.0.0/12", 24, "resolver"),
        ("100.96.0.0/16", 30, "/16../29"),
        ("100.96.0.0/26", 24, "smaller than one /24"),
    ):
        with pytest.raises(ConfigError) as caught:
            ControlConfig.build(sandbox_pool=pool, sandbox_prefix=prefix)
        assert caught.value.detail.startswith("--sandbox-pool") and words in caught.value.detail
