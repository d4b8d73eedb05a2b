"""The control plane's records: registered nodes and proxies, and signed job policies.

Each record is a frozen value with a strict parser (`*_from_json`) used both for
request bodies and for the files the store reads back, so what is on disk has
passed the same checks as what came over the API. A parser raises
`RecordError` whose `field` names the offending key.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from egressd.errors import EgressdError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
JOB_ID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)

SANDBOX_PREFIX_MIN = 16
SANDBOX_PREFIX_MAX = 30


class RecordError(EgressdError):
    """A record (request body or stored file) that does not validate."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        super().__init__("invalid_record", detail)


def parse_name(value: object, *, field: str = "name") -> str:
    """A node or proxy name: `[a-z0-9][a-z0-9-]{0,62}`."""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise RecordError(field, "must match [a-z0-9][a-z0-9-]{0,62}")
    return value


def parse_job_id(value: object, *, field: str = "job_id") -> uuid.UUID:
    """A job id in the canonical 8-4-4-4-12 hex form (any case; normalised to lower)."""
    if not isinstance(value, str) or JOB_ID_RE.fullmatch(value) is None:
        raise RecordError(field, "must be a UUID in 8-4-4-4-12 hex form")
    return uuid.UUID(value)


def _ipv4_address(obj: Mapping[str, Any], field: str) -> ipaddress.IPv4Address:
    value = obj.get(field)
    if not isinstance(value, str):
        raise RecordError(field, "must be an IPv4 address string")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise RecordError(field, f"not an IPv4 address: {value!r}") from exc


def _check_keys(
    obj: object, required: frozenset[str], optional: frozenset[str]
) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise RecordError("", "must be a JSON object")
    for key in obj:
        if key not in required and key not in optional:
            raise RecordError(str(key), "unknown field")
    for key in sorted(required):
        if key not in obj:
            raise RecordError(key, "required")
    return obj


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node agent: where it sends GENEVE from and which sandbox addresses it owns."""

    name: str
    underlay: ipaddress.IPv4Address
    sandbox_cidr: ipaddress.IPv4Network

    def __post_init__(self) -> None:
        parse_name(self.name)
        prefix = self.sandbox_cidr.prefixlen
        if not SANDBOX_PREFIX_MIN <= prefix <= SANDBOX_PREFIX_MAX:
            raise RecordError(
                "sandbox_cidr",
                f"prefix length must be {SANDBOX_PREFIX_MIN}..{SANDBOX_PREFIX_MAX}, got /{prefix}",
            )

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "underlay": str(self.underlay),
            "sandbox_cidr": str(self.sandbox_cidr),
        }


_NODE_FIELDS = frozenset({"underlay", "sandbox_cidr"})


@dataclass(frozen=True, slots=True)
class AutoNode:
    """A node PUT with `"sandbox_cidr": "auto"`: the control plane picks the CIDR from
    its pool (`egressd.control.pool`). Only a request: a stored record always has one."""

    name: str
    underlay: ipaddress.IPv4Address

    def with_cidr(self, cidr: ipaddress.IPv4Network) -> NodeRecord:
        return NodeRecord(name=self.name, underlay=self.underlay, sandbox_cidr=cidr)


SANDBOX_CIDR_AUTO = "auto"


def node_request_from_json(name: str, obj: object) -> NodeRecord | AutoNode:
    """Parse a node PUT body: like `node_from_json`, and `"sandbox_cidr": "auto"` too."""
    if isinstance(obj, Mapping) and obj.get("sandbox_cidr") == SANDBOX_CIDR_AUTO:
        body = _check_keys(obj, _NODE_FIELDS, frozenset({"name"}))
        if "name" in body and body["name"] != name:
            raise RecordError("name", "does not match the name in the path")
        return AutoNode(name=parse_name(name), underlay=_ipv4_address(body, "underlay"))
    return node_from_json(name, obj)


def node_from_json(name: str, obj: object) -> NodeRecord:
    """Parse a node body (`name` optional in it, but equal to the path's if present)."""
    body = _check_keys(obj, _NODE_FIELDS, frozenset({"name"}))
    if "name" in body and body["name"] != name:
        raise RecordError("name", "does not match the name in the path")
    underlay = _ipv4_address(body, "underlay")
    cidr = body["sandbox_cidr"]
    if not isinstance(cidr, str):
        raise RecordError("sandbox_cidr", "must be an IPv4 network string")
    try:
        network = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        raise RecordError("sandbox_cidr", f"not a strict IPv4 network: {exc}") from exc
    return NodeRecord(name=parse_name(name), underlay=underlay, sandbox_cidr=network)


@dataclass(frozen=True, slots=True)
class ProxyRecord:
    """An egress proxy: its underlay (GENEVE) address and its egress (internet) address."""

    name: str
    underlay: ipaddress.IPv4Address
    egress: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        parse_name(self.name)

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "underlay": str(self.underlay), "egress": str(self.egress)}


_PROXY_FIELDS = frozenset({"underlay", "egress"})


def proxy_from_json(name: str, obj: object) -> ProxyRecord:
    """Parse a proxy body (`name` optional in it, but equal to the path's if present)."""
    body = _check_keys(obj, _PROXY_FIELDS, frozenset({"name"}))
    if "name" in body and body["name"] != name:
        raise RecordError("name", "does not match the name in the path")
    return ProxyRecord(
        name=parse_name(name),
        underlay=_ipv4_address(body, "underlay"),
        egress=_ipv4_address(body, "egress"),
    )


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job's current signed policy: the payload as signed and its JWS.

    `payload` carries the timestamps of `jws`; re-signing replaces iat/nbf/exp
    and keeps every other field.
    """

    job_id: uuid.UUID
    payload: Mapping[str, Any]
    jws: str
    kid: str
    exp: int

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "payload": dict(self.payload),
            "jws": self.jws,
            "kid": self.kid,
            "exp": self.exp,
        }


def job_from_json(obj: object) -> JobRecord:
    """Parse a stored job record (only the store writes these; checks are structural)."""
    body = _check_keys(obj, frozenset({"job_id", "payload", "jws", "kid", "exp"}), frozenset())
    job_id = parse_job_id(body["job_id"])
    payload = body["payload"]
    if not isinstance(payload, dict):
        raise RecordError("payload", "must be an object")
    if payload.get("job_id") != str(job_id):
        raise RecordError("payload.job_id", "does not match job_id")
    jws, kid, exp = body["jws"], body["kid"], body["exp"]
    if not isinstance(jws, str) or jws.count(".") != 2:
        raise RecordError("jws", "must be a JWS compact string")
    if not isinstance(kid, str) or not kid:
        raise RecordError("kid", "must be a non-empty string")
    if isinstance(exp, bool) or not isinstance(exp, int) or payload.get("exp") != exp:
        raise RecordError("exp", "must be an integer equal to payload.exp")
    return JobRecord(job_id=job_id, payload=payload, jws=jws, kid=kid, exp=exp)
