"""The job policy: a frozen model of the signed payload, and its strict parser.

`parse_policy` turns a decoded JSON payload (see DESIGN.md, "Wire formats")
into a `Policy` or raises `PolicyError` whose ``field`` is the JSON path of
the first thing wrong (``"egress[1].ports[0]"``, ``"limits.bandwidth_bps"``,
``"job_id"``; ``"$"`` is the payload itself). `policy_to_payload` is its
inverse: ``parse_policy(policy_to_payload(p)) == p``.

Rules and the decisions behind them:

* ``v`` is checked before anything else (a future version may have other
  keys) and must be 1. Unknown keys are rejected everywhere (top level,
  ``limits``, each ``egress`` rule): a key this code does not understand might
  be a restriction it would silently ignore.
* ``bool`` is never an ``int`` (``true`` is not port 1), and floats are not
  integers even when whole (``443.0``).
* ``job_id`` is the canonical 8-4-4-4-12 hex form. Upper or mixed case is
  accepted (RFC 9562 says UUID text is case-insensitive on input) and the
  model keeps a `uuid.UUID`, so it is emitted lower case. Braces, ``urn:``
  prefixes, missing hyphens and the nil UUID are rejected.
* ``account`` is ``[A-Za-z0-9_.-]{1,64}``; ``nodes`` a non-empty list of
  distinct names ``[a-z0-9][a-z0-9-]{0,62}``.
* ``mode`` is ``"enforce"`` (the default) or ``"report"``; the matcher ignores
  it, the proxy applies it.
* ``iat``, ``nbf``, ``exp`` are integers in 0..253402300799 (year 9999).
  With ``require_timestamps`` (the default, for anything that will be acted
  on) all three are required; otherwise each may be absent, but never
  ``null``. ``exp`` must be after ``nbf`` and after ``iat`` when present.
* ``egress`` is required and may be empty (deny everything). Each rule has
  exactly one of ``host`` or ``cidr`` and optional ``ports``.
* ``host`` is an exact name or ``"*."`` + a name of at least two labels
  (``"*.test"``, ``"*.com"`` are too broad); it is stored normalised
  (`egressd.policy.names`). IP literals are rejected: use ``cidr``.
* ``cidr`` must contain a ``/`` and have its host bits zero
  (``"10.1.2.7/24"`` is rejected, not silently widened); zone ids are
  rejected. It is stored as an `ipaddress` network.
* ``ports`` is a non-empty list of ints 1..65535 or ``"lo-hi"`` strings with
  lo <= hi (no single ports as strings, no leading zeros); 443 when omitted.
  Order and duplicates are kept as given.
* A host rule may carry ``tls`` (`TLS_CHOICES`, ``"passthrough"`` by
  default) and ``http``: ``{"allow": [{"methods": [...], "paths": [...]}],
  "credentials": [...]}`` (DESIGN.md). ``allow`` is a non-empty list; each
  entry's ``methods`` are distinct upper-case tokens (methods are
  case-sensitive; ``CONNECT`` only where listed), its ``paths`` follow
  `egressd.policy.paths`. ``credentials`` (optional) name a header (a token,
  not one of `CREDENTIAL_FORBIDDEN_HEADERS`, each header once), a ``secret``
  (a file name in the proxy's secrets directory, `SECRET_NAME`), an optional
  ``format`` with exactly one ``{}`` and an optional ``placeholder``.
  ``"tls": "intercept"`` needs ``http`` (interception exists to decide
  requests). ``http`` without interception on a rule whose ports are all TLS
  ports (`TLS_PORTS`, the default 443 included) is rejected: the proxy could
  never see a request there to enforce it. Neither is allowed on a cidr rule.
* ``limits`` is optional; each of its four keys is optional and must be a
  positive int within `LIMIT_BOUNDS`.
* Size caps (`MAX_NODES`, `MAX_EGRESS_RULES`, `MAX_PORTS_PER_RULE`) bound the
  work a payload can cause and the size of the tier-1 maps.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import cast

from egressd.policy.errors import PolicyError
from egressd.policy.names import HostError, normalize_host_pattern
from egressd.policy.paths import PathPatternError, parse_path_pattern
from egressd.policy.times import iso

POLICY_VERSION = 1
MODES = ("enforce", "report")
DEFAULT_MODE = "enforce"
MIN_PORT = 1
MAX_PORT = 65535
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
MAX_NODES = 1024
MAX_EGRESS_RULES = 1024
MAX_PORTS_PER_RULE = 64

LIMIT_BOUNDS: Mapping[str, tuple[int, int]] = {
    "max_connections": (1, 65_536),
    "max_new_connections_per_s": (1, 100_000),
    "ports_per_destination": (1, 64_512),  # the unprivileged port range
    "bandwidth_bps": (1, 100_000_000_000),  # 100 Gbit/s
    "dns_queries_per_s": (1, 10_000),
}

#: A host rule's ``tls``: spliced as an opaque byte stream (``passthrough``)
#: or terminated by the proxy so that ``http`` can be enforced (``intercept``).
TLS_CHOICES = ("passthrough", "intercept")
DEFAULT_TLS = "passthrough"
TLS_INTERCEPT = "intercept"
#: Ports that carry TLS by convention: ``http`` on a rule with only these
#: ports needs ``"tls": "intercept"`` to be enforceable.
TLS_PORTS = frozenset({443, 465, 563, 636, 853, 989, 990, 992, 993, 994, 995, 8443})
MAX_HTTP_ALLOW = 64
MAX_HTTP_METHODS = 16
MAX_HTTP_PATHS = 64
MAX_CREDENTIALS = 8
#: A method: an upper-case RFC 9110 token (``GET``, ``PROPFIND``, ``M-SEARCH``).
HTTP_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,23}")
#: A header name: an RFC 9110 token.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
#: A secret's name: a file name in the proxy's secrets directory.
SECRET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: What a placeholder may be: printable ASCII without spaces, 8..256 long (a
#: short one would be found in unrelated requests).
PLACEHOLDER = re.compile(r"[!-~]{8,256}")
MAX_CREDENTIAL_FORMAT = 256
#: Headers a credential may not set: they frame or route the request.
CREDENTIAL_FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
        "expect",
    }
)

ROOT = "$"
_TOP_LEVEL_KEYS = frozenset(
    {"v", "job_id", "account", "nodes", "mode", "iat", "nbf", "exp", "egress", "limits"}
)
_RULE_KEYS = frozenset({"host", "cidr", "ports", "ech", "tls", "http"})
_HTTP_KEYS = frozenset({"allow", "credentials"})
_HTTP_ALLOW_KEYS = frozenset({"methods", "paths"})
_CREDENTIAL_KEYS = frozenset({"header", "secret", "format", "placeholder"})
#: What a host rule says of a TLS ClientHello carrying `encrypted_client_hello`
#: (its SNI is then a public front, not the destination): denied unless the
#: rule that allows the front says ``"ech": "allow"``.
ECH_CHOICES = ("deny", "allow")
DEFAULT_ECH = "deny"
_TIMESTAMPS = ("iat", "nbf", "exp")

_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NODE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_PORT_RANGE = re.compile(r"([1-9][0-9]{0,4})-([1-9][0-9]{0,4})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of TCP ports; a single port is ``PortRange(p, p)``."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not (_is_int(self.lo) and _is_int(self.hi)):
            raise PolicyError("ports", "port bounds must be integers")
        if not MIN_PORT <= self.lo <= self.hi <= MAX_PORT:
            raise PolicyError("ports", f"need {MIN_PORT} <= lo <= hi <= {MAX_PORT}, got {self}")

    def __contains__(self, port: object) -> bool:
        return _is_int(port) and self.lo <= port <= self.hi  # type: ignore[operator]

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


DEFAULT_PORTS = (PortRange(443, 443),)


def merge_port_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """`ranges` as sorted, disjoint ranges (adjacent ones joined)."""
    merged: list[list[int]] = []
    for lo, hi in sorted((r.lo, r.hi) for r in ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple(PortRange(lo, hi) for lo, hi in merged)


@dataclass(frozen=True, slots=True)
class HttpAllow:
    """Requests one entry of ``http.allow`` allows: any of `methods` on any of `paths`."""

    methods: tuple[str, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Credential:
    """A header the proxy sets on allowed requests from a secret only proxies hold."""

    header: str
    secret: str
    format: str | None = None
    placeholder: str | None = None


@dataclass(frozen=True, slots=True)
class HttpRules:
    """A host rule's ``http``: the requests it allows and the credentials it sets."""

    allow: tuple[HttpAllow, ...]
    credentials: tuple[Credential, ...] = ()


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One allow rule: a (normalised) host pattern or a network, and its ports."""

    host: str | None
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    ports: tuple[PortRange, ...] = DEFAULT_PORTS
    ech: str = DEFAULT_ECH
    tls: str = DEFAULT_TLS
    http: HttpRules | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.cidr is None):
            raise PolicyError("egress", "a rule has exactly one of host or cidr")
        if self.tls not in TLS_CHOICES:
            raise PolicyError("tls", f"must be one of {', '.join(TLS_CHOICES)}")
        if (self.tls != DEFAULT_TLS or self.http is not None) and self.host is None:
            raise PolicyError("http", "tls and http are for host rules only")
        if self.tls == TLS_INTERCEPT and self.http is None:
            raise PolicyError("tls", "intercept needs http rules")
        if self.ech not in ECH_CHOICES:
            raise PolicyError("ech", f"must be one of {', '.join(ECH_CHOICES)}")
        if self.ech != DEFAULT_ECH and self.host is None:
            raise PolicyError("ech", "only a host rule can allow ECH (a cidr rule allows any name)")
        if self.host is not None:
            try:
                normalised = normalize_host_pattern(self.host)
            except HostError as exc:
                raise PolicyError("host", exc.detail) from exc
            if normalised != self.host:
                raise PolicyError("host", f"{self.host!r} is not normalised ({normalised!r})")
        if self.cidr is not None and not isinstance(
            self.cidr, ipaddress.IPv4Network | ipaddress.IPv6Network
        ):
            raise PolicyError("cidr", "must be an ipaddress network")
        if not self.ports or not all(isinstance(p, PortRange) for p in self.ports):
            raise PolicyError("ports", "must be a non-empty tuple of PortRange")

    def allows_port(self, port: int) -> bool:
        return any(port in r for r in self.ports)

    @property
    def tls_only(self) -> bool:
        """Every port this rule allows is a conventional TLS port (`TLS_PORTS`)."""
        return all(
            r.hi - r.lo < 64 and all(p in TLS_PORTS for p in range(r.lo, r.hi + 1))
            for r in self.ports
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-job resource limits enforced by the proxy."""

    max_connections: int = 256
    max_new_connections_per_s: int = 200
    ports_per_destination: int = 512
    bandwidth_bps: int = 100_000_000
    #: DNS queries per second: per sandbox at tier 1 (eBPF) and per job at each
    #: proxy; a burst of one second's worth. 50/s covers a resolver's retries
    #: and a search list for dozens of names a second; a flood is ~100x that.
    dns_queries_per_s: int = 50

    def __post_init__(self) -> None:
        for name, (lo, hi) in LIMIT_BOUNDS.items():
            _check_bounded_int(getattr(self, name), f"limits.{name}", lo, hi)


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated job policy (the JWS payload)."""

    v: int
    job_id: uuid.UUID
    account: str
    nodes: tuple[str, ...]
    mode: str
    iat: int | None
    nbf: int | None
    exp: int | None
    egress: tuple[EgressRule, ...]
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.v != POLICY_VERSION:
            raise PolicyError("v", f"unsupported version {self.v!r}")
        if self.mode not in MODES:
            raise PolicyError("mode", f"must be one of {', '.join(MODES)}")
        if not self.nodes:
            raise PolicyError("nodes", "must not be empty")


# --- parsing --------------------------------------------------------------------------


def parse_policy(obj: object, *, require_timestamps: bool = True) -> Policy:
    """Validate a decoded JSON payload and build a `Policy`; raises `PolicyError`."""
    if not isinstance(obj, dict):
        raise PolicyError(ROOT, f"must be a JSON object, not {_json_type(obj)}")
    for key in obj:
        if not isinstance(key, str):
            raise PolicyError(repr(key), "keys must be strings")
    version = _require(obj, "v")
    if not _is_int(version) or version != POLICY_VERSION:
        raise PolicyError("v", f"unsupported version {version!r}, expected {POLICY_VERSION}")
    _reject_unknown(obj, _TOP_LEVEL_KEYS, prefix="")

    job_id = _parse_job_id(_require(obj, "job_id"))
    account = _require(obj, "account")
    if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
        raise PolicyError("account", "must be 1..64 characters of [A-Za-z0-9_.-]")
    nodes = _parse_nodes(_require(obj, "nodes"))
    mode = obj.get("mode", DEFAULT_MODE)
    if not isinstance(mode, str) or mode not in MODES:
        raise PolicyError("mode", f"must be one of {', '.join(MODES)}")

    stamps: dict[str, int | None] = {}
    for name in _TIMESTAMPS:
        if name in obj:
            stamps[name] = _check_bounded_int(obj[name], name, 0, MAX_TIMESTAMP)
        elif require_timestamps:
            raise PolicyError(name, "is required")
        else:
            stamps[name] = None
    iat, nbf, exp = stamps["iat"], stamps["nbf"], stamps["exp"]
    if exp is not None and nbf is not None and exp <= nbf:
        raise PolicyError("exp", f"must be after nbf ({iso(exp)} is not after {iso(nbf)})")
    if exp is not None and iat is not None and exp <= iat:
        raise PolicyError("exp", f"must be after iat ({iso(exp)} is not after {iso(iat)})")

    egress = _parse_egress(_require(obj, "egress"))
    limits = _parse_limits(obj["limits"]) if "limits" in obj else Limits()
    return Policy(
        v=POLICY_VERSION,
        job_id=job_id,
        account=account,
        nodes=nodes,
        mode=mode,
        iat=iat,
        nbf=nbf,
        exp=exp,
        egress=egress,
        limits=limits,
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _require(obj: dict[str, object], key: str, *, prefix: str = "") -> object:
    if key not in obj:
        raise PolicyError(prefix + key, "is required")
    return obj[key]


def _reject_unknown(obj: dict[str, object], known: frozenset[str], *, prefix: str) -> None:
    unknown = sorted(k for k in obj if k not in known)
    if unknown:
        raise PolicyError(prefix + unknown[0], "unknown key")


def _check_bounded_int(value: object, path: str, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise PolicyError(path, f"must be an integer, not {_json_type(value)}")
    value = cast(int, value)
    if not lo <= value <= hi:
        raise PolicyError(path, f"must be in {lo}..{hi}, got {value}")
    return value


def _parse_job_id(value: object) -> uuid.UUID:
    if not isinstance(value, str) or not _UUID_TEXT.fullmatch(value):
        raise PolicyError("job_id", "must be a UUID in 8-4-4-4-12 hex form")
    job_id = uuid.UUID(value)
    if job_id.int == 0:
        raise PolicyError("job_id", "must not be the nil UUID")
    return job_id


def _parse_nodes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise PolicyError("nodes", f"must be an array, not {_json_type(value)}")
    if not value:
        raise PolicyError("nodes", "must not be empty")
    if len(value) > MAX_NODES:
        raise PolicyError("nodes", f"more than {MAX_NODES} nodes")
    seen: set[str] = set()
    for index, node in enumerate(value):
        path = f"nodes[{index}]"
        if not isinstance(node, str) or not _NODE.fullmatch(node):
            raise PolicyError(path, "must match [a-z0-9][a-z0-9-]{0,62}")
        if node in seen:
            raise PolicyError(path, f"duplicate node {node!r}")
        seen.add(node)
    return tuple(value)


def _parse_egress(value: object) -> tuple[EgressRule, ...]:
    if not isinstance(value, list):
        raise PolicyError("egress", f"must be an array, not {_json_type(value)}")
    if len(value) > MAX_EGRESS_RULES:
        raise PolicyError("egress", f"more than {MAX_EGRESS_RULES} rules")
    return tuple(_parse_rule(item, f"egress[{index}]") for index, item in enumerate(value))


def _parse_rule(value: object, path: str) -> EgressRule:
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object, not {_json_type(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(f"{path}.{key!r}", "keys must be strings")
    _reject_unknown(value, _RULE_KEYS, prefix=f"{path}.")
    has_host, has_cidr = "host" in value, "cidr" in value
    if has_host == has_cidr:
        raise PolicyError(path, "needs exactly one of host or cidr")
    host: str | None = None
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    if has_host:
        host = _parse_host(value["host"], f"{path}.host")
    else:
        cidr = _parse_cidr(value["cidr"], f"{path}.cidr")
    ports = _parse_ports(value["ports"], f"{path}.ports") if "ports" in value else DEFAULT_PORTS
    ech = value.get("ech", DEFAULT_ECH)
    if not isinstance(ech, str) or ech not in ECH_CHOICES:
        raise PolicyError(f"{path}.ech", f"must be one of {', '.join(ECH_CHOICES)}")
    if ech != DEFAULT_ECH and cidr is not None:
        raise PolicyError(f"{path}.ech", "only a host rule can allow ECH")
    tls = value.get("tls", DEFAULT_TLS)
    if not isinstance(tls, str) or tls not in TLS_CHOICES:
        raise PolicyError(f"{path}.tls", f"must be one of {', '.join(TLS_CHOICES)}")
    if tls != DEFAULT_TLS and cidr is not None:
        raise PolicyError(f"{path}.tls", "only a host rule can be intercepted")
    http = _parse_http(value["http"], f"{path}.http") if "http" in value else None
    if http is not None and cidr is not None:
        raise PolicyError(f"{path}.http", "only a host rule can have http rules")
    if tls == TLS_INTERCEPT and http is None:
        raise PolicyError(
            f"{path}.tls", "intercept needs http rules (interception exists to decide requests)"
        )
    rule = EgressRule(host=host, cidr=cidr, ports=ports, ech=ech, tls=tls, http=http)
    if http is not None and tls != TLS_INTERCEPT and rule.tls_only:
        raise PolicyError(
            f"{path}.http",
            'on TLS port(s) only, http rules need "tls": "intercept": the proxy cannot '
            "see requests inside TLS it does not terminate, so they could never be enforced",
        )
    return rule


def _parse_http(value: object, path: str) -> HttpRules:
    _check_object(value, path)
    assert isinstance(value, dict)
    _reject_unknown(value, _HTTP_KEYS, prefix=f"{path}.")
    allow = _check_list(
        _require(value, "allow", prefix=f"{path}."),
        f"{path}.allow",
        MAX_HTTP_ALLOW,
        "a rule that allows no request should be removed",
    )
    entries = tuple(_parse_http_allow(item, f"{path}.allow[{i}]") for i, item in enumerate(allow))
    credentials: tuple[Credential, ...] = ()
    if "credentials" in value:
        items = _check_list(value["credentials"], f"{path}.credentials", MAX_CREDENTIALS, None)
        credentials = tuple(
            _parse_credential(item, f"{path}.credentials[{i}]") for i, item in enumerate(items)
        )
        seen: set[str] = set()
        for index, credential in enumerate(credentials):
            header = credential.header.lower()
            if header in seen:
                raise PolicyError(
                    f"{path}.credentials[{index}].header", f"duplicate header {credential.header!r}"
                )
            seen.add(header)
    return HttpRules(allow=entries, credentials=credentials)


def _parse_http_allow(value: object, path: str) -> HttpAllow:
    _check_object(value, path)
    assert isinstance(value, dict)
    _reject_unknown(value, _HTTP_ALLOW_KEYS, prefix=f"{path}.")
    methods = _check_list(
        _require(value, "methods", prefix=f"{path}."),
        f"{path}.methods",
        MAX_HTTP_METHODS,
        "list the methods to allow",
    )
    for index, method in enumerate(methods):
        where = f"{path}.methods[{index}]"
        if not isinstance(method, str) or not HTTP_METHOD.fullmatch(method):
            raise PolicyError(
                where, "must be an upper-case method name (methods are case-sensitive)"
            )
        if method in methods[:index]:
            raise PolicyError(where, f"duplicate method {method!r}")
    paths = _check_list(
        _require(value, "paths", prefix=f"{path}."),
        f"{path}.paths",
        MAX_HTTP_PATHS,
        "list the paths to allow ('/**' for any)",
    )
    for index, pattern in enumerate(paths):
        where = f"{path}.paths[{index}]"
        if not isinstance(pattern, str):
            raise PolicyError(where, f"must be a string, not {_json_type(pattern)}")
        try:
            parse_path_pattern(pattern)
        except PathPatternError as exc:
            raise PolicyError(where, str(exc)) from exc
        if pattern in paths[:index]:
            raise PolicyError(where, f"duplicate path {pattern!r}")
    # Every item was checked to be a str above.
    return HttpAllow(
        methods=tuple(cast("list[str]", methods)), paths=tuple(cast("list[str]", paths))
    )


def _parse_credential(value: object, path: str) -> Credential:
    _check_object(value, path)
    assert isinstance(value, dict)
    _reject_unknown(value, _CREDENTIAL_KEYS, prefix=f"{path}.")
    header = _require(value, "header", prefix=f"{path}.")
    if not isinstance(header, str) or not HEADER_NAME.fullmatch(header):
        raise PolicyError(f"{path}.header", "must be a header name (an RFC 9110 token)")
    if header.lower() in CREDENTIAL_FORBIDDEN_HEADERS:
        raise PolicyError(f"{path}.header", f"{header!r} frames or routes the request")
    secret = _require(value, "secret", prefix=f"{path}.")
    if not isinstance(secret, str) or not SECRET_NAME.fullmatch(secret):
        raise PolicyError(
            f"{path}.secret", "must be a secret's file name [A-Za-z0-9_][A-Za-z0-9_.-]*"
        )
    fmt = value.get("format")
    if "format" in value:
        if not isinstance(fmt, str) or fmt.count("{}") != 1 or len(fmt) > MAX_CREDENTIAL_FORMAT:
            raise PolicyError(f"{path}.format", "must be a string with exactly one '{}'")
        if not fmt.isascii() or not fmt.isprintable() or "{" in fmt.replace("{}", ""):
            raise PolicyError(f"{path}.format", "must be printable ASCII, no braces besides '{}'")
    placeholder = value.get("placeholder")
    if "placeholder" in value and (
        not isinstance(placeholder, str) or not PLACEHOLDER.fullmatch(placeholder)
    ):
        raise PolicyError(f"{path}.placeholder", "must be 8..256 printable ASCII characters")
    return Credential(header=header, secret=secret, format=fmt, placeholder=placeholder)


def _check_object(value: object, path: str) -> None:
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object, not {_json_type(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(f"{path}.{key!r}", "keys must be strings")


def _check_list(value: object, path: str, most: int, empty: str | None) -> list[object]:
    if not isinstance(value, list):
        raise PolicyError(path, f"must be an array, not {_json_type(value)}")
    if not value and empty is not None:
        raise PolicyError(path, f"must not be empty ({empty})")
    if len(value) > most:
        raise PolicyError(path, f"more than {most} entries")
    return value


def _parse_host(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, not {_json_type(value)}")
    try:
        return normalize_host_pattern(value)
    except HostError as exc:
        raise PolicyError(path, exc.detail) from exc


def _parse_cidr(value: object, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, not {_json_type(value)}")
    if "/" not in value:
        raise PolicyError(path, "must be a network with a prefix length, e.g. 203.0.113.64/28")
    if "%" in value:
        raise PolicyError(path, "zone ids are not allowed")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise PolicyError(path, str(exc)) from exc


def _parse_ports(value: object, path: str) -> tuple[PortRange, ...]:
    if not isinstance(value, list):
        raise PolicyError(path, f"must be an array, not {_json_type(value)}")
    if not value:
        raise PolicyError(path, "must not be empty (omit it for the default, 443)")
    if len(value) > MAX_PORTS_PER_RULE:
        raise PolicyError(path, f"more than {MAX_PORTS_PER_RULE} entries")
    return tuple(_parse_port(item, f"{path}[{index}]") for index, item in enumerate(value))


def _parse_port(value: object, path: str) -> PortRange:
    if _is_int(value):
        port = _check_bounded_int(value, path, MIN_PORT, MAX_PORT)
        return PortRange(port, port)
    if isinstance(value, str):
        found = _PORT_RANGE.fullmatch(value)
        if found is None:
            raise PolicyError(path, f"{value!r} is not a port range 'lo-hi'")
        lo, hi = int(found.group(1)), int(found.group(2))
        if not MIN_PORT <= lo <= hi <= MAX_PORT:
            raise PolicyError(path, f"need {MIN_PORT} <= lo <= hi <= {MAX_PORT}, got {value!r}")
        return PortRange(lo, hi)
    raise PolicyError(path, f"must be a port number or 'lo-hi' string, not {_json_type(value)}")


def _parse_limits(value: object) -> Limits:
    if not isinstance(value, dict):
        raise PolicyError("limits", f"must be an object, not {_json_type(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(f"limits.{key!r}", "keys must be strings")
    _reject_unknown(value, frozenset(LIMIT_BOUNDS), prefix="limits.")
    checked = {
        name: _check_bounded_int(value[name], f"limits.{name}", lo, hi)
        for name, (lo, hi) in LIMIT_BOUNDS.items()
        if name in value
    }
    return Limits(**checked)


# --- serialising ----------------------------------------------------------------------


def port_range_to_payload(ports: PortRange) -> int | str:
    return ports.lo if ports.lo == ports.hi else f"{ports.lo}-{ports.hi}"


def egress_rule_to_payload(rule: EgressRule) -> dict[str, object]:
    out: dict[str, object] = {}
    if rule.host is not None:
        out["host"] = rule.host
    else:
        assert rule.cidr is not None
        out["cidr"] = rule.cidr.with_prefixlen
    out["ports"] = [port_range_to_payload(p) for p in rule.ports]
    if rule.ech != DEFAULT_ECH:
        out["ech"] = rule.ech
    if rule.tls != DEFAULT_TLS:
        out["tls"] = rule.tls
    if rule.http is not None:
        out["http"] = http_rules_to_payload(rule.http)
    return out


def http_rules_to_payload(http: HttpRules) -> dict[str, object]:
    out: dict[str, object] = {
        "allow": [{"methods": list(a.methods), "paths": list(a.paths)} for a in http.allow]
    }
    if http.credentials:
        credentials: list[dict[str, str]] = []
        for credential in http.credentials:
            item = {"header": credential.header, "secret": credential.secret}
            if credential.format is not None:
                item["format"] = credential.format
            if credential.placeholder is not None:
                item["placeholder"] = credential.placeholder
            credentials.append(item)
        out["credentials"] = credentials
    return out


def policy_to_payload(policy: Policy) -> dict[str, object]:
    """The canonical JSON-able payload of `policy` (keys in DESIGN.md order)."""
    out: dict[str, object] = {
        "v": policy.v,
        "job_id": str(policy.job_id),
        "account": policy.account,
        "nodes": list(policy.nodes),
        "mode": policy.mode,
    }
    for name in _TIMESTAMPS:
        stamp = getattr(policy, name)
        if stamp is not None:
            out[name] = stamp
    out["egress"] = [egress_rule_to_payload(rule) for rule in policy.egress]
    out["limits"] = {name: getattr(policy.limits, name) for name in LIMIT_BOUNDS}
    return out


def same_content(a: Policy, b: Policy) -> bool:
    """Whether two policies say the same thing, validity times aside: a re-signed
    copy (new ``iat``/``nbf``/``exp``, so a new digest) is the same policy."""
    return replace(a, iat=None, nbf=None, exp=None) == replace(b, iat=None, nbf=None, exp=None)
