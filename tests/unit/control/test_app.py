"""The control plane API through aiohttp's TestServer/TestClient (no sockets beyond loopback)."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egressd.control.app import MAX_BODY_BYTES, ControlApi, build_app
from egressd.control.store import StateStore, StoreError
from egressd.policy.jws import policy_digest, verify_policy
from egressd.policy.keys import SigningKey, TrustedKeys, generate_signing_key, trusted_from_jwks

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TTL = 3600
T0 = 1_795_392_000
JOB_ID = "2b5c1c64-7c1e-4a9a-9f55-1f0c5ac1d3e2"
POLICY_URL = f"/v1/jobs/{JOB_ID}/policy"

POLICY: dict[str, Any] = {
    "v": 1,
    "account": "acme",
    "nodes": ["node1"],
    "mode": "enforce",
    "egress": [
        {"host": "api.allowed.test", "ports": [443, 80]},
        {"host": "*.data.allowed.test", "ports": [443]},
        {"cidr": "203.0.113.64/28", "ports": [5432]},
    ],
    "limits": {
        "max_connections": 256,
        "max_new_connections_per_s": 200,
        "ports_per_destination": 512,
        "bandwidth_bps": 100000000,
    },
}
NODE1 = {"underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/24"}
NODE2 = {"underlay": "198.18.0.12", "sandbox_cidr": "100.96.2.0/24"}
PROXY1 = {"underlay": "198.18.0.21", "egress": "203.0.113.21"}
PROXY2 = {"underlay": "198.18.0.22", "egress": "203.0.113.22"}


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """Builds control plane apps over one state directory and serves them."""

    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.clock = FakeClock()
        self.key = generate_signing_key()
        self._clients: list[TestClient[web.Request, web.Application]] = []

    def api(self, key: SigningKey | None = None, trusted: TrustedKeys | None = None) -> ControlApi:
        return ControlApi(
            store=StateStore(self.state_dir),
            signing_key=key or self.key,
            trusted=trusted or TrustedKeys({}),
            admin_token=TOKEN,
            policy_ttl_s=TTL,
            clock=self.clock,
        )

    async def client(self, api: ControlApi) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = TestClient(TestServer(build_app(api)))
        await client.start_server()
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def api(harness: Harness) -> ControlApi:
    return harness.api()


@pytest.fixture
async def client(harness: Harness, api: ControlApi) -> TestClient[web.Request, web.Application]:
    return await harness.client(api)


Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def node1(client: Client) -> None:
    """node1 registered: a policy may name only registered nodes."""
    assert (await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)).status == 200


async def published_keys(client: Client) -> TrustedKeys:
    resp = await client.get("/v1/keys")
    assert resp.status == 200
    return trusted_from_jwks(await resp.json())


# --- keys -------------------------------------------------------------------------------


async def test_keys_publish_signing_key(client: Client, harness: Harness) -> None:
    trusted = await published_keys(client)
    assert list(trusted) == [harness.key.kid]


async def test_keys_publish_extra_trusted_keys_for_rotation(harness: Harness) -> None:
    old = generate_signing_key()
    client = await harness.client(harness.api(trusted=TrustedKeys.of(old.public)))
    trusted = await published_keys(client)
    assert set(trusted) == {harness.key.kid, old.kid}


# --- policies ---------------------------------------------------------------------------


@pytest.mark.usefixtures("node1")
async def test_put_policy_signs_with_server_timestamps(client: Client, harness: Harness) -> None:
    resp = await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert body["job_id"] == JOB_ID
    assert body["exp"] == T0 + TTL
    assert body["kid"] == harness.key.kid
    assert body["digest"] == policy_digest(body["jws"]).hex()
    assert len(bytes.fromhex(body["digest"])) == 8

    verified = verify_policy(body["jws"], await published_keys(client), now=T0)
    policy = verified.policy
    assert str(policy.job_id) == JOB_ID
    assert (policy.iat, policy.nbf, policy.exp) == (T0, T0, T0 + TTL)
    assert policy.account == "acme"
    assert verified.kid == harness.key.kid


@pytest.mark.usefixtures("node1")
async def test_signed_policy_verifies_with_pyjwt(client: Client) -> None:
    body = await (await client.put(POLICY_URL, json=POLICY, headers=AUTH)).json()
    jwk = (await (await client.get("/v1/keys")).json())["keys"][0]
    key = jwt.PyJWK(jwk)
    claims = jwt.decode(
        body["jws"],
        key.key,
        algorithms=["EdDSA"],
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims["job_id"] == JOB_ID
    assert claims["exp"] == T0 + TTL


@pytest.mark.usefixtures("node1")
async def test_get_policy_returns_what_put_stored(client: Client) -> None:
    put = await (await client.put(POLICY_URL, json=POLICY, headers=AUTH)).json()
    resp = await client.get(POLICY_URL)
    assert resp.status == 200
    assert await resp.json() == put


@pytest.mark.usefixtures("node1")
async def test_put_policy_accepts_matching_job_id_in_body(client: Client) -> None:
    body = dict(POLICY, job_id=JOB_ID.upper())
    resp = await client.put(POLICY_URL, json=body, headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["job_id"] == JOB_ID


@pytest.mark.usefixtures("node1")
async def test_put_policy_replaces_previous(client: Client, harness: Harness) -> None:
    await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    harness.clock.now += 10
    changed = dict(POLICY, account="other")
    second = await (await client.put(POLICY_URL, json=changed, headers=AUTH)).json()
    got = await (await client.get(POLICY_URL)).json()
    assert got == second
    verified = verify_policy(got["jws"], await published_keys(client), now=T0 + 10)
    assert verified.policy.account == "other"


def _with(path: str, value: Any) -> dict[str, Any]:
    """POLICY with the value at a dotted/indexed path replaced (value None deletes)."""
    body = copy.deepcopy(POLICY)
    parts = path.replace("[", ".").replace("]", "").split(".")
    node: Any = body
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_with("egress[0].ports[1]", 0), "egress[0].ports[1]"),
        (_with("egress[2].cidr", "203.0.113.65/28"), "egress[2].cidr"),
        (_with("egress[1].host", "*.test"), "egress[1].host"),
        (_with("account", "bad account"), "account"),
        (_with("nodes[0]", "Node_1"), "nodes[0]"),
        (_with("mode", "audit"), "mode"),
        (_with("v", 2), "v"),
        (_with("egress", None), "egress"),
        (_with("limits.max_connections", 0), "limits.max_connections"),
        (dict(POLICY, surprise=True), "surprise"),
        (dict(POLICY, iat=T0), "iat"),
        (dict(POLICY, nbf=T0), "nbf"),
        (dict(POLICY, exp=T0 + 60), "exp"),
        (dict(POLICY, job_id=str(uuid.uuid4())), "job_id"),
        (dict(POLICY, job_id=42), "job_id"),
    ],
)
async def test_put_invalid_policy_names_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    resp = await client.put(POLICY_URL, json=body, headers=AUTH)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "invalid_policy"
    assert answer["field"] == field
    assert answer["detail"]
    assert (await client.get(POLICY_URL)).status == 404


@pytest.mark.parametrize(
    "job_id",
    ["not-a-uuid", "2b5c1c647c1e4a9a9f551f0c5ac1d3e2", f"urn:uuid:{JOB_ID}", f"{JOB_ID}0"],
)
async def test_policy_path_needs_a_uuid(client: Client, job_id: str) -> None:
    for method in ("GET", "PUT"):
        resp = await client.request(method, f"/v1/jobs/{job_id}/policy", json=POLICY, headers=AUTH)
        assert resp.status == 400
        assert await resp.json() == {
            "error": "invalid_job_id",
            "field": "job_id",
            "detail": "must be a UUID in 8-4-4-4-12 hex form",
        }


async def test_nil_job_id_is_rejected_by_the_policy_model(client: Client) -> None:
    resp = await client.put(f"/v1/jobs/{uuid.UUID(int=0)}/policy", json=POLICY, headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["field"] == "job_id"


async def test_get_unknown_policy_is_404(client: Client) -> None:
    resp = await client.get(f"/v1/jobs/{uuid.uuid4()}/policy")
    assert resp.status == 404
    assert await resp.json() == {"error": "not_found"}


@pytest.mark.usefixtures("node1")
async def test_get_resigns_when_less_than_half_ttl_remains(
    client: Client, harness: Harness, api: ControlApi
) -> None:
    first = await (await client.put(POLICY_URL, json=POLICY, headers=AUTH)).json()

    harness.clock.now = T0 + TTL // 2  # exactly half left: still served as is
    same = await (await client.get(POLICY_URL)).json()
    assert same == first

    harness.clock.now = T0 + TTL // 2 + 1
    fresh = await (await client.get(POLICY_URL)).json()
    assert fresh["exp"] == harness.clock.now + TTL
    assert fresh["jws"] != first["jws"]
    assert fresh["digest"] == policy_digest(fresh["jws"]).hex()
    verified = verify_policy(fresh["jws"], await published_keys(client), now=harness.clock.now)
    assert verified.policy.iat == harness.clock.now
    original = verify_policy(first["jws"], await published_keys(client), now=T0)
    assert verified.policy.egress == original.policy.egress
    assert verified.policy.account == original.policy.account

    # persisted: the next GET and a reload of the state give the same token
    assert await (await client.get(POLICY_URL)).json() == fresh
    reloaded = StateStore(harness.state_dir)
    reloaded.load()
    record = reloaded.jobs.get(uuid.UUID(JOB_ID))
    assert record is not None and record.jws == fresh["jws"]
    assert (
        api.metrics.registry.get_sample_value(
            "egressd_control_policies_signed_total", {"trigger": "refresh"}
        )
        == 1.0
    )


@pytest.mark.usefixtures("node1")
async def test_get_resigns_an_expired_policy(client: Client, harness: Harness) -> None:
    await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    harness.clock.now = T0 + 10 * TTL
    fresh = await (await client.get(POLICY_URL)).json()
    assert fresh["exp"] == T0 + 11 * TTL
    verify_policy(fresh["jws"], await published_keys(client), now=harness.clock.now)


async def test_get_resigns_after_key_rotation(harness: Harness) -> None:
    old_key = harness.key
    old = await harness.client(harness.api())
    assert (await old.put("/v1/nodes/node1", json=NODE1, headers=AUTH)).status == 200
    first = await (await old.put(POLICY_URL, json=POLICY, headers=AUTH)).json()
    assert first["kid"] == old_key.kid

    new_key = generate_signing_key()
    rotated = await harness.client(harness.api(key=new_key, trusted=TrustedKeys.of(old_key.public)))
    keys = await published_keys(rotated)
    assert set(keys) == {old_key.kid, new_key.kid}
    fresh = await (await rotated.get(POLICY_URL)).json()
    assert fresh["kid"] == new_key.kid
    assert verify_policy(fresh["jws"], keys, now=T0).kid == new_key.kid


@pytest.mark.usefixtures("node1")
async def test_delete_policy(client: Client) -> None:
    await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    resp = await client.delete(POLICY_URL, headers=AUTH)
    assert resp.status == 204
    assert (await client.get(POLICY_URL)).status == 404
    assert (await client.delete(POLICY_URL, headers=AUTH)).status == 404


@pytest.mark.usefixtures("node1")
async def test_put_policy_naming_an_unknown_node_is_422(client: Client) -> None:
    await client.put("/v1/nodes/node2", json=NODE2, headers=AUTH)
    body = dict(POLICY, nodes=["node1", "node9", "node2", "nodex"])
    resp = await client.put(POLICY_URL, json=body, headers=AUTH)
    assert resp.status == 422
    assert await resp.json() == {
        "error": "unknown_node",
        "field": "nodes[1]",
        "detail": "no node 'node9', 'nodex' (known: node1, node2); "
        "register nodes before naming them in a policy",
        "unknown_nodes": ["node9", "nodex"],
        "known_nodes": ["node1", "node2"],
    }
    assert (await client.get(POLICY_URL)).status == 404  # nothing stored


async def test_put_policy_with_no_node_registered_is_422(client: Client) -> None:
    resp = await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    assert resp.status == 422
    answer = await resp.json()
    assert (answer["field"], answer["known_nodes"]) == ("nodes[0]", [])
    assert "(known: none)" in answer["detail"]


async def test_invalid_policy_is_400_before_unknown_nodes(client: Client) -> None:
    resp = await client.put(POLICY_URL, json=_with("mode", "audit"), headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["field"] == "mode"


@pytest.mark.usefixtures("node1")
async def test_a_stored_policy_outlives_its_node(client: Client, harness: Harness) -> None:
    await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    assert (await client.delete("/v1/nodes/node1", headers=AUTH)).status == 204
    harness.clock.now = T0 + TTL  # due for a re-sign: admission is not re-checked
    fresh = await client.get(POLICY_URL)
    assert fresh.status == 200
    assert (await fresh.json())["exp"] == T0 + 2 * TTL


# --- nodes and proxies ------------------------------------------------------------------


async def test_nodes_put_get_list(client: Client) -> None:
    resp = await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"name": "node1", **NODE1}
    await client.put("/v1/nodes/node2", json=NODE2, headers=AUTH)
    assert await (await client.get("/v1/nodes/node1")).json() == {"name": "node1", **NODE1}
    assert await (await client.get("/v1/nodes")).json() == {
        "nodes": [{"name": "node1", **NODE1}, {"name": "node2", **NODE2}]
    }


async def test_proxies_put_get_list(client: Client) -> None:
    resp = await client.put("/v1/proxies/proxy1", json=PROXY1, headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"name": "proxy1", **PROXY1}
    await client.put("/v1/proxies/proxy2", json=PROXY2, headers=AUTH)
    assert await (await client.get("/v1/proxies/proxy2")).json() == {"name": "proxy2", **PROXY2}
    assert await (await client.get("/v1/proxies")).json() == {
        "proxies": [{"name": "proxy1", **PROXY1}, {"name": "proxy2", **PROXY2}]
    }


async def test_put_node_replaces_same_name(client: Client) -> None:
    await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    moved = {"underlay": "198.18.0.31", "sandbox_cidr": "100.96.1.0/25"}
    assert (await client.put("/v1/nodes/node1", json=moved, headers=AUTH)).status == 200
    assert await (await client.get("/v1/nodes/node1")).json() == {"name": "node1", **moved}


async def test_empty_registry_lists(client: Client) -> None:
    assert await (await client.get("/v1/nodes")).json() == {"nodes": []}
    assert await (await client.get("/v1/proxies")).json() == {"proxies": []}


@pytest.mark.parametrize("name", ["Node1", "-node", "node_1", "a" * 64, "nöde"])
async def test_bad_names_are_400(client: Client, name: str) -> None:
    for url, body in ((f"/v1/nodes/{name}", NODE1), (f"/v1/proxies/{name}", PROXY1)):
        for method in ("PUT", "GET"):
            resp = await client.request(method, url, json=body, headers=AUTH)
            assert resp.status == 400, (method, url)
            answer = await resp.json()
            assert answer["error"] == "invalid_name"
            assert answer["field"] == "name"


async def test_longest_name_is_fine(client: Client) -> None:
    name = "a" + "-" * 62
    assert (await client.put(f"/v1/nodes/{name}", json=NODE1, headers=AUTH)).status == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"underlay": "198.18.0.300", "sandbox_cidr": "100.96.1.0/24"}, "underlay"),
        ({"underlay": "fd00::1", "sandbox_cidr": "100.96.1.0/24"}, "underlay"),
        ({"underlay": 3323068427, "sandbox_cidr": "100.96.1.0/24"}, "underlay"),
        ({"underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.1/24"}, "sandbox_cidr"),
        ({"underlay": "198.18.0.11", "sandbox_cidr": "100.96.0.0/15"}, "sandbox_cidr"),
        ({"underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0/31"}, "sandbox_cidr"),
        ({"underlay": "198.18.0.11", "sandbox_cidr": "100.96.1.0"}, "sandbox_cidr"),
        ({"underlay": "198.18.0.11", "sandbox_cidr": "fd00::/64"}, "sandbox_cidr"),
        ({"underlay": "198.18.0.11"}, "sandbox_cidr"),
        ({"sandbox_cidr": "100.96.1.0/24"}, "underlay"),
        ({**NODE1, "extra": 1}, "extra"),
        ({**NODE1, "name": "node2"}, "name"),
    ],
)
async def test_invalid_node_names_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    resp = await client.put("/v1/nodes/node1", json=body, headers=AUTH)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "invalid_node"
    assert answer["field"] == field
    assert (await client.get("/v1/nodes/node1")).status == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"underlay": "198.18.0", "egress": "203.0.113.21"}, "underlay"),
        ({"underlay": "198.18.0.21", "egress": "203.0.113.21/32"}, "egress"),
        ({"underlay": "198.18.0.21"}, "egress"),
        ({**PROXY1, "weight": 2}, "weight"),
    ],
)
async def test_invalid_proxy_names_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    resp = await client.put("/v1/proxies/proxy1", json=body, headers=AUTH)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"] == "invalid_proxy"
    assert answer["field"] == field


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/v1/nodes/node2", {**NODE2, "underlay": "198.18.0.11"}, "underlay"),
        ("/v1/nodes/node2", {**NODE2, "sandbox_cidr": "100.96.0.0/16"}, "sandbox_cidr"),
        ("/v1/nodes/node2", {**NODE2, "underlay": "198.18.0.21"}, "underlay"),
        ("/v1/proxies/proxy2", {"underlay": "198.18.0.11", "egress": "203.0.113.22"}, "underlay"),
        ("/v1/proxies/proxy2", {"underlay": "198.18.0.22", "egress": "203.0.113.21"}, "egress"),
    ],
)
async def test_address_collisions_are_409(
    client: Client, url: str, body: dict[str, Any], field: str
) -> None:
    assert (await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)).status == 200
    assert (await client.put("/v1/proxies/proxy1", json=PROXY1, headers=AUTH)).status == 200
    resp = await client.put(url, json=body, headers=AUTH)
    assert resp.status == 409
    answer = await resp.json()
    assert answer["error"] == "conflict"
    assert answer["field"] == field
    assert (await client.get(url)).status == 404


async def test_delete_node_and_proxy(client: Client) -> None:
    await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    await client.put("/v1/proxies/proxy1", json=PROXY1, headers=AUTH)
    assert (await client.delete("/v1/nodes/node1", headers=AUTH)).status == 204
    assert (await client.delete("/v1/proxies/proxy1", headers=AUTH)).status == 204
    assert (await client.get("/v1/nodes/node1")).status == 404
    assert (await client.get("/v1/proxies/proxy1")).status == 404
    assert (await client.delete("/v1/nodes/node1", headers=AUTH)).status == 404


@pytest.mark.parametrize("url", ["/v1/nodes/ghost", "/v1/proxies/ghost", "/v1/nothing", "/"])
async def test_unknown_is_404_json(client: Client, url: str) -> None:
    resp = await client.get(url)
    assert resp.status == 404
    assert await resp.json() == {"error": "not_found"}


async def test_wrong_method_is_405_json(client: Client) -> None:
    resp = await client.post("/v1/nodes/node1", json=NODE1, headers=AUTH)
    assert resp.status == 405
    assert await resp.json() == {"error": "method_not_allowed"}
    assert "PUT" in resp.headers["Allow"]


# --- authentication ---------------------------------------------------------------------

INVALID_TOKEN = 'Bearer realm="egressd-control", error="invalid_token"'
MUTATIONS = [
    ("PUT", POLICY_URL, POLICY),
    ("DELETE", POLICY_URL, None),
    ("PUT", "/v1/nodes/node1", NODE1),
    ("DELETE", "/v1/nodes/node1", None),
    ("PUT", "/v1/proxies/proxy1", PROXY1),
    ("DELETE", "/v1/proxies/proxy1", None),
]


@pytest.mark.parametrize(("method", "url", "body"), MUTATIONS)
@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ({}, 'Bearer realm="egressd-control"'),
        ({"Authorization": "Bearer wrong-token"}, INVALID_TOKEN),
        ({"Authorization": f"Bearer {TOKEN}x"}, INVALID_TOKEN),
        ({"Authorization": f"Basic {TOKEN}"}, 'Bearer realm="egressd-control"'),
        ({"Authorization": "Bearer "}, 'Bearer realm="egressd-control"'),
    ],
)
async def test_mutations_need_the_admin_token(
    client: Client,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    challenge: str,
) -> None:
    resp = await client.request(method, url, json=body, headers=headers)
    assert resp.status == 401
    assert await resp.json() == {"error": "unauthorized"}
    assert resp.headers["WWW-Authenticate"] == challenge
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_token_is_checked_before_the_body(client: Client) -> None:
    resp = await client.put("/v1/nodes/NOT_VALID", data=b"{not json")
    assert resp.status == 401
    resp = await client.put(POLICY_URL, data=b"x" * (MAX_BODY_BYTES + 1))
    assert resp.status == 401


async def test_unauthorized_attempt_is_logged(client: Client) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.put("/v1/nodes/node1", json=NODE1, headers={"Authorization": "Bearer nope"})
    events = [e for e in logs if e["event"] == "unauthorized"]
    assert len(events) == 1
    assert events[0]["route"] == "/v1/nodes/{name}"
    assert "nope" not in json.dumps(events[0])


async def test_scheme_is_case_insensitive(client: Client) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}
    resp = await client.put("/v1/nodes/node1", json=NODE1, headers=headers)
    assert resp.status == 200


@pytest.mark.usefixtures("node1")
async def test_reads_need_no_token(client: Client) -> None:
    await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    urls = ("/v1/keys", POLICY_URL, "/v1/nodes", "/v1/proxies", "/healthz", "/readyz", "/metrics")
    for url in urls:
        assert (await client.get(url)).status == 200, url


# --- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b'"a string"',
        b"null",
        b'{"underlay": NaN}',
        b'{"underlay": "198.18.0.11", "underlay": "198.18.0.12", "sandbox_cidr": "100.96.1.0/24"}',
        b"\xff\xfe{}",
        b"[" * 60_000,
    ],
)
@pytest.mark.parametrize("url", [POLICY_URL, "/v1/nodes/node1", "/v1/proxies/proxy1"])
async def test_bad_json_is_400(client: Client, raw: bytes, url: str) -> None:
    resp = await client.put(url, data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "bad_json"


async def test_body_over_64k_is_413(client: Client) -> None:
    big = json.dumps({**POLICY, "account": "a" * MAX_BODY_BYTES}).encode()
    resp = await client.put(POLICY_URL, data=big, headers=AUTH)
    assert resp.status == 413
    assert (await resp.json())["error"] == "too_large"


async def test_chunked_body_over_64k_is_413(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * (MAX_BODY_BYTES // 4)
        yield b"{}"

    resp = await client.put("/v1/nodes/node1", data=chunks(), headers=AUTH)
    assert resp.status == 413
    assert (await resp.json())["error"] == "too_large"


async def test_body_of_exactly_64k_is_read(client: Client) -> None:
    raw = json.dumps(NODE1).encode()
    raw = raw + b" " * (MAX_BODY_BYTES - len(raw))
    assert len(raw) == MAX_BODY_BYTES
    assert (await client.put("/v1/nodes/node1", data=raw, headers=AUTH)).status == 200


# --- logs -------------------------------------------------------------------------------


async def test_one_log_event_per_mutation(client: Client, harness: Harness) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
        await client.put("/v1/proxies/proxy1", json=PROXY1, headers=AUTH)
        policy = dict(POLICY, nodes=["node1"])
        body = await (await client.put(POLICY_URL, json=policy, headers=AUTH)).json()
        await client.get(POLICY_URL)
        await client.delete("/v1/proxies/proxy1", headers=AUTH)
    assert [e["event"] for e in logs] == [
        "node_registered",
        "proxy_registered",
        "policy_signed",
        "proxy_deleted",
    ]
    node, proxy, signed, deleted = logs
    assert node["who"] == "admin" and node["name"] == "node1" and node["created"] is True
    assert proxy["who"] == "admin" and proxy["name"] == "proxy1"
    assert signed["who"] == "admin"
    assert signed["job_id"] == JOB_ID
    assert signed["account"] == "acme"
    assert signed["digest"] == body["digest"]
    assert signed["kid"] == harness.key.kid
    assert signed["nodes"] == ["node1"]
    assert deleted["name"] == "proxy1"


# --- admin routes -----------------------------------------------------------------------


async def test_healthz_and_readyz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready"}


async def test_not_ready_until_started(harness: Harness) -> None:
    api = harness.api()
    assert api.not_ready_reasons() == ["state_not_loaded", "signing_key_unusable"]
    client = await harness.client(api)  # on_startup loads the state, tests the key
    assert api.not_ready_reasons() == []
    assert (await client.get("/readyz")).status == 200


async def test_state_write_failure_is_500_and_not_ready(
    client: Client, api: ControlApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(record: object) -> None:
        raise StoreError("state_write_failed", api.store.root, "disk full")

    monkeypatch.setattr(api.store, "put_node", broken)
    resp = await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    assert resp.status == 500
    assert await resp.json() == {"error": "storage_error"}
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"status": "not_ready", "reasons": ["state_write_failed"]}

    monkeypatch.undo()
    assert (await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_metrics(client: Client, api: ControlApi) -> None:
    await client.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    await client.put(POLICY_URL, json=POLICY, headers=AUTH)
    await client.put(POLICY_URL, json=POLICY)
    await client.get("/v1/nowhere")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'egressd_control_policies_signed_total{trigger="put"} 1.0' in text
    policy_route = 'method="PUT",route="/v1/jobs/{job_id}/policy"'
    assert f'egressd_control_requests_total{{{policy_route},status="200"}} 1.0' in text
    assert f'egressd_control_requests_total{{{policy_route},status="401"}} 1.0' in text
    assert 'egressd_control_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'egressd_control_records{kind="jobs"} 1.0' in text
    assert 'egressd_control_records{kind="nodes"} 1.0' in text
    assert 'egressd_control_records{kind="proxies"} 0.0' in text


async def test_each_app_has_its_own_registry(harness: Harness) -> None:
    a, b = harness.api(), harness.api()
    ca, cb = await harness.client(a), await harness.client(b)
    await ca.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    labels = {"route": "/v1/nodes/{name}", "method": "PUT", "status": "200"}
    assert a.metrics.registry.get_sample_value("egressd_control_requests_total", labels) == 1.0
    assert b.metrics.registry.get_sample_value("egressd_control_requests_total", labels) is None
    assert (await cb.get("/healthz")).status == 200


# --- state across restarts --------------------------------------------------------------


async def test_state_survives_a_new_app(harness: Harness) -> None:
    first = await harness.client(harness.api())
    await first.put("/v1/nodes/node1", json=NODE1, headers=AUTH)
    put = await (await first.put(POLICY_URL, json=POLICY, headers=AUTH)).json()
    await first.put("/v1/proxies/proxy1", json=PROXY1, headers=AUTH)

    second = await harness.client(harness.api())
    assert await (await second.get(POLICY_URL)).json() == put
    assert await (await second.get("/v1/nodes/node1")).json() == {"name": "node1", **NODE1}
    proxies = await (await second.get("/v1/proxies")).json()
    assert proxies == {"proxies": [{"name": "proxy1", **PROXY1}]}


def test_empty_admin_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ControlApi(
            store=StateStore(tmp_path),
            signing_key=SigningKey.from_private(Ed25519PrivateKey.generate()),
            trusted=TrustedKeys({}),
            admin_token="",
            policy_ttl_s=TTL,
        )
