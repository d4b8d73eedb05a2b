"""The control plane's HTTP API (aiohttp): signed job policies, public keys, registry.

Routes (JSON in and out; every error body is `{"error": TOKEN, ...}`):

| route | auth | what |
|---|---|---|
| `GET /v1/keys` | - | JWK set: the signing key's public key plus every trusted key (rotation) |
| `PUT /v1/jobs/{job_id}/policy` | admin | sign and store a job policy |
| `GET /v1/jobs/{job_id}/policy` | - | the job's current JWS (re-signed when it is getting old) |
| `DELETE /v1/jobs/{job_id}/policy` | admin | forget the job (204) |
| `PUT`/`GET`/`DELETE /v1/nodes/{name}`, `GET /v1/nodes` | PUT, DELETE | node registry |
| `PUT`/`GET`/`DELETE /v1/proxies/{name}`, `GET /v1/proxies` | PUT, DELETE | proxy registry |
| `GET /v1/watch?since=REV&timeout=S` | - | long-poll of changes (`egressd.control.watch`) |
| `GET /v1/jobs` | - | every job: id, account, digest, exp, nodes (`egressd.control.watch`) |
| `GET /v1/interception-ca.pem` | - | the TLS interception CA's certificate (`egressd.control.interception_ca`) |
| `/healthz`, `/readyz`, `/metrics` | - | see `egressd.admin` |

Authentication: mutating requests carry `Authorization: Bearer TOKEN`, the
admin token (compared with `hmac.compare_digest`); missing or wrong -> 401
`{"error": "unauthorized"}` with `WWW-Authenticate: Bearer ...`. The token is
checked before the path or body is looked at. Reads need no token: the
control plane listens only on the underlay (198.18.0.2), which sandboxes
cannot reach (tier 1 drops the underlay and control-plane ranges, tier 2
denies 198.18/15), and everything it serves is either public (keys, the
registry addresses) or useless without the private key (signed policies).

Policy PUT (decisions):

- The body is the policy payload without timestamps. `iat`, `nbf`, `exp` in
  the body -> 400 `invalid_policy` with that field: the control plane alone
  decides validity (`iat = nbf = now`, `exp = now + policy TTL`).
- `job_id` in the path must be a UUID (8-4-4-4-12 hex) else 400
  `invalid_job_id`; in the body it may be absent (filled from the path) or
  must name the same UUID, else 400 `invalid_policy` field `job_id`.
- The payload is validated with `egressd.policy.model.parse_policy`; a
  `PolicyError` -> 400 `{"error": "invalid_policy", "field": PATH, "detail": ...}`.
  What is signed is `policy_to_payload(parse_policy(...))`, the canonical form.
- Every node a policy names must be registered, else 422
  `{"error": "unknown_node", "field": "nodes[i]" (the first unknown),
  "detail": "no node 'node9' (known: node1, node2)", "unknown_nodes": [...],
  "known_nodes": [...]}` and nothing is stored: a typo in `nodes` would
  otherwise sign a policy that no sandbox can ever use (agents and proxies
  bind a job to the nodes it names). 422, not 409: the request is well-formed
  and conflicts with no record; what it refers to does not exist. Register
  nodes first (the topology, the compose fleet and the tests do). The check
  is at admission only: a GET re-signs a stored policy even after one of its
  nodes was deleted, and deleting a node does not touch the policies naming it
  (a node being replaced comes back under its name).
- Response (PUT and GET): `{"job_id", "jws", "digest" (hex of the 8-byte
  policy digest), "exp", "kid"}`.

Policy GET re-signs the stored payload with fresh timestamps, and persists
the result, when the stored JWS expires in less than half the TTL or was
signed by a key other than the current signing key (rotation). So a fetcher
always gets a policy valid for at least TTL/2.

Registry: names match `[a-z0-9][a-z0-9-]{0,62}` (else 400 `invalid_name`,
field `name`); bodies are strict (unknown fields rejected; 400 `invalid_node`
or `invalid_proxy` with the field). Addresses must not collide: an underlay
address belongs to one node or proxy, node sandbox CIDRs must not overlap
(proxies route return traffic by them), a proxy's egress address belongs to
one proxy; a collision -> 409 `{"error": "conflict", "field": ...}`. A PUT
of an existing name replaces it.

A node PUT may say `"sandbox_cidr": "auto"` (node agents on a DaemonSet do):
the control plane keeps the CIDR of the name's existing record, else takes
the lowest free block of its pool (`--sandbox-pool`, `--sandbox-prefix`;
`egressd.control.pool`), and answers the record as stored. No free block ->
409 `{"error": "sandbox_pool_exhausted", "field": "sandbox_cidr"}` and
nothing is stored. `node_registered` says where the CIDR came from
(`sandbox_cidr_from`: `request`, `pool` or `record`).

Other errors: unknown record or route -> 404 `{"error": "not_found"}`; body
not JSON (also NaN/Infinity or duplicate keys) or not an object -> 400
`{"error": "bad_json"}`; body over 64 KiB -> 413 `{"error": "too_large"}`; a
failed state write -> 500 `{"error": "storage_error"}` (and /readyz reports
`state_write_failed` until a write succeeds).

Each mutating request logs one structlog event (`policy_signed`,
`policy_deleted`, `node_registered`, `node_deleted`, `proxy_registered`,
`proxy_deleted`; `who: "admin"`), a GET-triggered re-sign logs
`policy_refreshed` (`who: "control"`), and a rejected token logs
`unauthorized`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from egressd import strictjson
from egressd.admin import add_admin_routes
from egressd.control.pool import PoolExhausted, SandboxPool, allocate
from egressd.control.records import (
    AutoNode,
    JobRecord,
    NodeRecord,
    ProxyRecord,
    RecordError,
    node_request_from_json,
    parse_job_id,
    parse_name,
    proxy_from_json,
)
from egressd.control.store import StateStore, StoreError
from egressd.control.watch import add_watch_routes
from egressd.policy.errors import JwsError, PolicyError
from egressd.policy.jws import policy_digest, sign_payload
from egressd.policy.keys import SigningKey, TrustedKeys, jwks
from egressd.policy.model import parse_policy, policy_to_payload

MAX_BODY_BYTES = 64 * 1024
TIMESTAMP_FIELDS = ("iat", "nbf", "exp")
WHO_ADMIN = "admin"
AUTH_REALM = 'Bearer realm="egressd-control"'

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("egressd.control")


class ApiError(Exception):
    """An error answer: HTTP status and a JSON body `{"error": token, ...}`."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        field: str | None = None,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, object] = {"error": error}
        if field is not None:
            self.body["field"] = field
        if detail is not None:
            self.body["detail"] = detail
        self.body.update(extra or {})
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


_HTTP_ERROR_TOKENS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class ControlMetrics:
    """The control plane's metrics, in a registry of its own (never the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "egressd_control_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "egressd_control_request_duration_seconds",
            "HTTP request handling time by route template",
            ["route"],
            registry=self.registry,
        )
        self.policies_signed = Counter(
            "egressd_control_policies_signed_total",
            "Job policies signed, by trigger (put: admin PUT; refresh: re-signed on GET)",
            ["trigger"],
            registry=self.registry,
        )
        self.records = Gauge(
            "egressd_control_records",
            "Records in the control plane's state, by kind",
            ["kind"],
            registry=self.registry,
        )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 413 over MAX_BODY_BYTES, 400 bad_json otherwise."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", detail=f"body over {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "too_large", detail=f"body over {MAX_BODY_BYTES} bytes") from exc
    try:
        obj = strictjson.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_json", detail=str(exc)) from exc
    if not isinstance(obj, dict):
        raise ApiError(400, "bad_json", detail="body must be a JSON object")
    return obj


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _path_name(request: web.Request) -> str:
    try:
        return parse_name(request.match_info["name"])
    except RecordError as exc:
        raise ApiError(400, "invalid_name", field="name", detail=exc.detail) from exc


def _path_job_id(request: web.Request) -> uuid.UUID:
    try:
        return parse_job_id(request.match_info["job_id"])
    except RecordError as exc:
        raise ApiError(400, "invalid_job_id", field="job_id", detail=exc.detail) from exc


def _policy_error_detail(exc: PolicyError) -> str:
    prefix = f"{exc.field}: "
    return exc.detail.removeprefix(prefix)


def _policy_answer(record: JobRecord) -> dict[str, Any]:
    return {
        "job_id": str(record.job_id),
        "jws": record.jws,
        "digest": policy_digest(record.jws).hex(),
        "exp": record.exp,
        "kid": record.kid,
    }


class ControlApi:
    """Request handlers and the state they share. Build with `build_app`."""

    def __init__(
        self,
        *,
        store: StateStore,
        signing_key: SigningKey,
        trusted: TrustedKeys,
        admin_token: str,
        policy_ttl_s: int,
        clock: Clock = time.time,
        metrics: ControlMetrics | None = None,
        sandbox_pool: SandboxPool | None = None,
    ) -> None:
        if not admin_token:
            raise ValueError("admin token must not be empty")
        self.store = store
        #: Set by the service once the CA exists (`egressd.control.interception_ca`).
        self.interception_ca_pem: bytes | None = None
        self.sandbox_pool = sandbox_pool if sandbox_pool is not None else SandboxPool()
        self.signing_key = signing_key
        published = dict(trusted.keys)
        published[signing_key.kid] = signing_key.public
        self.published = TrustedKeys(published)
        self._token = admin_token.encode()
        self.policy_ttl_s = policy_ttl_s
        self.clock = clock
        self.metrics = metrics if metrics is not None else ControlMetrics()
        self.key_ok = False
        self.write_failed = False
        self._lock = asyncio.Lock()
        for kind, collection in (
            ("jobs", store.jobs),
            ("nodes", store.nodes),
            ("proxies", store.proxies),
        ):
            self.metrics.records.labels(kind).set_function(collection.__len__)

    # --- lifecycle and readiness ------------------------------------------------------

    async def on_startup(self, _app: web.Application) -> None:
        if not self.store.loaded:
            await asyncio.to_thread(self.store.load)
        self.key_ok = self._key_self_test()

    def _key_self_test(self) -> bool:
        probe = b"egressd-control key self-test"
        try:
            self.signing_key.public.verify(self.signing_key.private.sign(probe), probe)
        except InvalidSignature:
            return False
        return True

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if not self.store.loaded:
            reasons.append("state_not_loaded")
        if not self.key_ok:
            reasons.append("signing_key_unusable")
        if self.write_failed:
            reasons.append("state_write_failed")
        return reasons

    # --- middleware -------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route_label(request)
        status = 500
        started = time.monotonic()
        try:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                token = _HTTP_ERROR_TOKENS.get(exc.status, exc.reason.lower().replace(" ", "_"))
                headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
                response = web.json_response({"error": token}, status=exc.status, headers=headers)
            status = response.status
            return response
        finally:
            self.metrics.requests.labels(route, request.method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            challenge = AUTH_REALM
        elif hmac.compare_digest(token.strip().encode(), self._token):
            return
        else:
            challenge = f'{AUTH_REALM}, error="invalid_token"'
        log.warning(
            "unauthorized",
            method=request.method,
            route=_route_label(request),
            remote=request.remote,
            token_present=bool(header),
        )
        raise ApiError(401, "unauthorized", headers={"WWW-Authenticate": challenge})

    async def _persist(self, write: Callable[[], object]) -> None:
        """Run a store write in a worker thread; the caller holds the lock."""
        try:
            await asyncio.to_thread(write)
        except StoreError as exc:
            self.write_failed = True
            log.error("storage_error", reason=exc.reason, detail=exc.detail)
            raise ApiError(500, "storage_error") from exc
        self.write_failed = False

    # --- keys -------------------------------------------------------------------------

    async def get_keys(self, _request: web.Request) -> web.Response:
        return web.json_response(jwks(self.published))

    async def get_interception_ca(self, _request: web.Request) -> web.Response:
        # Public, like the keys: sandboxes' trust stores are built from it.
        if self.interception_ca_pem is None:
            raise ApiError(404, "not_found")
        return web.Response(body=self.interception_ca_pem, content_type="application/x-pem-file")

    # --- policies ---------------------------------------------------------------------

    def _sign(self, job_id: uuid.UUID, spec: Mapping[str, Any], now: int) -> JobRecord:
        """Validate `spec` with fresh timestamps and sign it; raises PolicyError."""
        payload = dict(spec)
        payload["job_id"] = str(job_id)
        exp = now + self.policy_ttl_s
        payload.update(iat=now, nbf=now, exp=exp)
        policy = parse_policy(payload)
        signed = policy_to_payload(policy)
        jws = sign_payload(signed, self.signing_key)
        return JobRecord(
            job_id=job_id,
            payload=signed,
            jws=jws,
            kid=self.signing_key.kid,
            exp=exp,
        )

    async def put_policy(self, request: web.Request) -> web.Response:
        self._authorize(request)
        job_id = _path_job_id(request)
        body = await read_json_object(request)
        for name in TIMESTAMP_FIELDS:
            if name in body:
                raise ApiError(
                    400,
                    "invalid_policy",
                    field=name,
                    detail="set by the control plane; omit it",
                )
        if "job_id" in body:
            try:
                same = parse_job_id(body["job_id"]) == job_id
            except RecordError:
                same = False
            if not same:
                raise ApiError(
                    400,
                    "invalid_policy",
                    field="job_id",
                    detail="must equal the job id in the path (or be omitted)",
                )
        async with self._lock:
            try:
                record = self._sign(job_id, body, int(self.clock()))
            except PolicyError as exc:
                raise ApiError(
                    400, "invalid_policy", field=exc.field, detail=_policy_error_detail(exc)
                ) from exc
            except JwsError as exc:  # the signed token would exceed what verifiers accept
                raise ApiError(413, "too_large", detail=exc.detail) from exc
            self._require_known_nodes(record.payload.get("nodes", []))
            replaced = self.store.jobs.get(job_id) is not None
            await self._persist(lambda: self.store.put_job(record))
        self.metrics.policies_signed.labels("put").inc()
        nodes = list(record.payload.get("nodes", []))
        log.info(
            "policy_signed",
            who=WHO_ADMIN,
            job_id=str(job_id),
            account=record.payload.get("account"),
            mode=record.payload.get("mode"),
            nodes=nodes,
            kid=record.kid,
            digest=policy_digest(record.jws).hex(),
            exp=record.exp,
            replaced=replaced,
        )
        return web.json_response(_policy_answer(record))

    def _require_known_nodes(self, nodes: object) -> None:
        names = [n for n in nodes if isinstance(n, str)] if isinstance(nodes, list) else []
        unknown = [(i, n) for i, n in enumerate(names) if self.store.nodes.get(n) is None]
        if not unknown:
            return
        known = sorted(node.name for node in self.store.nodes)
        shown = ", ".join(repr(n) for _, n in unknown)
        raise ApiError(
            422,
            "unknown_node",
            field=f"nodes[{unknown[0][0]}]",
            detail=f"no node {shown} (known: {', '.join(known) or 'none'}); "
            "register nodes before naming them in a policy",
            extra={"unknown_nodes": [n for _, n in unknown], "known_nodes": known},
        )

    def _needs_refresh(self, record: JobRecord, now: int) -> bool:
        return record.exp - now < self.policy_ttl_s / 2 or record.kid != self.signing_key.kid

    async def get_policy(self, request: web.Request) -> web.Response:
        job_id = _path_job_id(request)
        record = self.store.jobs.get(job_id)
        if record is None:
            raise ApiError(404, "not_found")
        if self._needs_refresh(record, int(self.clock())):
            record = await self._refresh(job_id)
        return web.json_response(_policy_answer(record))

    async def _refresh(self, job_id: uuid.UUID) -> JobRecord:
        async with self._lock:
            record = self.store.jobs.get(job_id)
            if record is None:
                raise ApiError(404, "not_found")
            now = int(self.clock())
            if not self._needs_refresh(record, now):
                return record  # another request re-signed it while we waited
            spec = {k: v for k, v in record.payload.items() if k not in TIMESTAMP_FIELDS}
            try:
                fresh = self._sign(job_id, spec, now)
            except (PolicyError, JwsError) as exc:
                # Stored before a stricter validator: serve what we have; a
                # verifier rejects it once it expires (fail closed).
                log.error(
                    "policy_refresh_failed",
                    job_id=str(job_id),
                    reason=exc.reason,
                    detail=exc.detail,
                )
                return record
            await self._persist(lambda: self.store.put_job(fresh))
        self.metrics.policies_signed.labels("refresh").inc()
        log.info(
            "policy_refreshed",
            who="control",
            job_id=str(job_id),
            account=fresh.payload.get("account"),
            kid=fresh.kid,
            digest=policy_digest(fresh.jws).hex(),
            exp=fresh.exp,
            previous_exp=record.exp,
        )
        return fresh

    async def delete_policy(self, request: web.Request) -> web.Response:
        self._authorize(request)
        job_id = _path_job_id(request)
        async with self._lock:
            record = self.store.jobs.get(job_id)
            if record is None:
                raise ApiError(404, "not_found")
            await self._persist(lambda: self.store.jobs.delete(job_id))
        log.info(
            "policy_deleted",
            who=WHO_ADMIN,
            job_id=str(job_id),
            account=record.payload.get("account"),
        )
        return web.Response(status=204)

    # --- nodes and proxies ------------------------------------------------------------

    def _underlay_owner(self, address: object, *, kind: str, name: str) -> str | None:
        for node in self.store.nodes:
            if node.underlay == address and (kind, name) != ("node", node.name):
                return f"node {node.name}"
        for proxy in self.store.proxies:
            if proxy.underlay == address and (kind, name) != ("proxy", proxy.name):
                return f"proxy {proxy.name}"
        return None

    def _node_conflict(self, record: NodeRecord) -> tuple[str, str] | None:
        owner = self._underlay_owner(record.underlay, kind="node", name=record.name)
        if owner is not None:
            return "underlay", f"{record.underlay} is already {owner}'s underlay address"
        for node in self.store.nodes:
            if node.name != record.name and node.sandbox_cidr.overlaps(record.sandbox_cidr):
                return "sandbox_cidr", f"overlaps node {node.name}'s {node.sandbox_cidr}"
        return None

    def _proxy_conflict(self, record: ProxyRecord) -> tuple[str, str] | None:
        owner = self._underlay_owner(record.underlay, kind="proxy", name=record.name)
        if owner is not None:
            return "underlay", f"{record.underlay} is already {owner}'s underlay address"
        for proxy in self.store.proxies:
            if proxy.name != record.name and proxy.egress == record.egress:
                return "egress", f"{record.egress} is already proxy {proxy.name}'s egress address"
        return None

    async def put_node(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = _path_name(request)
        body = await read_json_object(request)
        try:
            parsed = node_request_from_json(name, body)
        except RecordError as exc:
            raise ApiError(400, "invalid_node", field=exc.field, detail=exc.detail) from exc
        source = "request"
        async with self._lock:
            if isinstance(parsed, AutoNode):
                # Under the lock: two nodes registering at once never get one block.
                try:
                    allocation = allocate(name, self.store.nodes, self.sandbox_pool)
                except PoolExhausted as exc:
                    log.warning("sandbox_pool_exhausted", name=name, detail=exc.detail)
                    raise ApiError(
                        409, exc.reason, field="sandbox_cidr", detail=exc.detail
                    ) from exc
                record = parsed.with_cidr(allocation.cidr)
                source = "record" if allocation.reused else "pool"
            else:
                record = parsed
            conflict = self._node_conflict(record)
            if conflict is not None:
                raise ApiError(409, "conflict", field=conflict[0], detail=conflict[1])
            created = self.store.nodes.get(name) is None
            await self._persist(lambda: self.store.put_node(record))
        log.info(
            "node_registered",
            who=WHO_ADMIN,
            created=created,
            sandbox_cidr_from=source,
            **record.to_json(),
        )
        return web.json_response(record.to_json())

    async def put_proxy(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = _path_name(request)
        body = await read_json_object(request)
        try:
            record = proxy_from_json(name, body)
        except RecordError as exc:
            raise ApiError(400, "invalid_proxy", field=exc.field, detail=exc.detail) from exc
        async with self._lock:
            conflict = self._proxy_conflict(record)
            if conflict is not None:
                raise ApiError(409, "conflict", field=conflict[0], detail=conflict[1])
            created = self.store.proxies.get(name) is None
            await self._persist(lambda: self.store.put_proxy(record))
        log.info("proxy_registered", who=WHO_ADMIN, created=created, **record.to_json())
        return web.json_response(record.to_json())

    async def get_node(self, request: web.Request) -> web.Response:
        record = self.store.nodes.get(_path_name(request))
        if record is None:
            raise ApiError(404, "not_found")
        return web.json_response(record.to_json())

    async def get_proxy(self, request: web.Request) -> web.Response:
        record = self.store.proxies.get(_path_name(request))
        if record is None:
            raise ApiError(404, "not_found")
        return web.json_response(record.to_json())

    async def list_nodes(self, _request: web.Request) -> web.Response:
        return web.json_response({"nodes": [n.to_json() for n in self.store.nodes]})

    async def list_proxies(self, _request: web.Request) -> web.Response:
        return web.json_response({"proxies": [p.to_json() for p in self.store.proxies]})

    async def delete_node(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = _path_name(request)
        async with self._lock:
            if self.store.nodes.get(name) is None:
                raise ApiError(404, "not_found")
            await self._persist(lambda: self.store.nodes.delete(name))
        log.info("node_deleted", who=WHO_ADMIN, name=name)
        return web.Response(status=204)

    async def delete_proxy(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = _path_name(request)
        async with self._lock:
            if self.store.proxies.get(name) is None:
                raise ApiError(404, "not_found")
            await self._persist(lambda: self.store.proxies.delete(name))
        log.info("proxy_deleted", who=WHO_ADMIN, name=name)
        return web.Response(status=204)


CONTROL_API: web.AppKey[ControlApi] = web.AppKey("control_api", ControlApi)


def build_app(api: ControlApi) -> web.Application:
    """The aiohttp application for `api`; loads the store on startup if needed."""
    app = web.Application(middlewares=[api.middleware], client_max_size=MAX_BODY_BYTES)
    app[CONTROL_API] = api
    app.on_startup.append(api.on_startup)
    r = app.router
    r.add_get("/v1/keys", api.get_keys, name="keys")
    r.add_get("/v1/interception-ca.pem", api.get_interception_ca, name="interception_ca")
    r.add_put("/v1/jobs/{job_id}/policy", api.put_policy, name="policy")
    r.add_get("/v1/jobs/{job_id}/policy", api.get_policy)
    r.add_delete("/v1/jobs/{job_id}/policy", api.delete_policy)
    r.add_get("/v1/nodes", api.list_nodes, name="nodes")
    r.add_put("/v1/nodes/{name}", api.put_node, name="node")
    r.add_get("/v1/nodes/{name}", api.get_node)
    r.add_delete("/v1/nodes/{name}", api.delete_node)
    r.add_get("/v1/proxies", api.list_proxies, name="proxies")
    r.add_put("/v1/proxies/{name}", api.put_proxy, name="proxy")
    r.add_get("/v1/proxies/{name}", api.get_proxy)
    r.add_delete("/v1/proxies/{name}", api.delete_proxy)
    add_admin_routes(app, api.metrics.registry, api.not_ready_reasons)
    add_watch_routes(app, api.store)  # GET /v1/watch (egressd.control.watch)
    return app
