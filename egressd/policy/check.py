"""`egressd policy check`: every problem of a policy at once, each naming its field.

`check_payload` is pure (the clock and the control plane's node list are
arguments) and returns a `Report`: ``problems`` (the policy is wrong or does
not do what it says; exit 1) and ``notes`` (worth knowing, not wrong).

What it finds, beyond what `parse_policy` refuses:

* Schema/model errors, collected: each top-level field, each rule, each port
  entry and each limit is checked on its own with the model's own parsers, so
  a payload with five mistakes gets five lines, not one per attempt. Whatever
  the collection misses, `parse_policy` still catches (it runs last, as the
  authority).
* Times in the past: ``exp`` at or before now is ``expired <ISO>, 2 h ago``
  (reported instead of "must be after nbf" when it is both); ``nbf`` in the
  future is a note.
* Nodes the control plane does not know (when its node list is given).
* Rules that can never decide anything:

  - a rule whose every name (or address) and port is already matched by
    earlier rules (rules are tried in order and the first match decides, so
    it is dead; with ``"ech": "allow"`` behind an earlier rule, the earlier
    rule's ``ech`` is what applies);
  - a ``cidr`` rule entirely inside an always-denied range that no policy
    can open (loopback, 0/8, multicast, 240/4, the IPv6 forms embedding IPv4);
  - an IPv6 ``cidr`` rule (the fleet carries IPv4 only: tier 1 drops IPv6);
  - a port entry already covered by an earlier entry of the same rule.

A cidr rule inside an earlier, wider one is not dead when it lies inside an
overridable always-denied range that the wider one does not (``10.1.0.0/16``
after ``0.0.0.0/0``): only the narrow one opens those addresses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from egressd import strictjson
from egressd.policy import model
from egressd.policy.addresses import ALWAYS_DENIED, DeniedMatch, IPNetwork, subnet_of
from egressd.policy.errors import PolicyError
from egressd.policy.jws import ALG, TYP
from egressd.policy.keys import b64url_decode
from egressd.policy.model import EgressRule, Policy, PortRange, merge_port_ranges
from egressd.policy.names import host_matches, is_wildcard
from egressd.policy.times import when

#: The always-denied ranges that a cidr rule can never open, and those it can.
NEVER_OPEN: tuple[tuple[IPNetwork, str], ...] = tuple(
    (net, reason) for net, reason in ALWAYS_DENIED if not DeniedMatch(net, reason).overridable
)
OVERRIDABLE: tuple[IPNetwork, ...] = tuple(
    net for net, reason in ALWAYS_DENIED if DeniedMatch(net, reason).overridable
)


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(slots=True)
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    policy: Policy | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def note(self, path: str, message: str) -> None:
        self.notes.append(Problem(path, message))

    def attempt(self, fn: Callable[[], object]) -> object | None:
        """Run one of the model's parsers; record its PolicyError, if any."""
        try:
            return fn()
        except PolicyError as exc:
            self.add(exc.field, _detail(exc))
            return None


def _detail(exc: PolicyError) -> str:
    prefix = f"{exc.field}: "
    return exc.detail.removeprefix(prefix)


def check_payload(
    obj: object,
    *,
    now: float,
    known_nodes: Collection[str] | None = None,
    require_timestamps: bool = False,
) -> Report:
    """Check a decoded policy payload; see the module docstring."""
    report = Report()
    if not isinstance(obj, dict):
        report.add(model.ROOT, f"must be a JSON object, not {model._json_type(obj)}")
        return report
    version = obj.get("v")
    if "v" not in obj:
        report.add("v", "is required")
        return report
    if not model._is_int(version) or version != model.POLICY_VERSION:
        # Another version may have other keys: nothing else can be judged.
        report.add("v", f"unsupported version {version!r}, expected {model.POLICY_VERSION}")
        return report
    for key in sorted(k for k in obj if k not in model._TOP_LEVEL_KEYS):
        report.add(str(key), f"unknown key (known: {', '.join(sorted(model._TOP_LEVEL_KEYS))})")

    _required(report, obj, "job_id", model._parse_job_id)
    _required(report, obj, "account", _account)
    if "nodes" not in obj:
        report.add("nodes", "is required")
    else:
        _nodes(report, obj["nodes"])
    if "mode" in obj:
        mode = obj["mode"]
        if not isinstance(mode, str) or mode not in model.MODES:
            report.add("mode", f"must be one of {', '.join(model.MODES)}")
    _timestamps(report, obj, now=now, require=require_timestamps)
    rules: list[tuple[int, EgressRule]] = []
    if "egress" not in obj:
        report.add("egress", "is required (an empty list denies everything)")
    else:
        rules = _egress(report, obj["egress"])
    if "limits" in obj:
        _limits(report, obj["limits"])

    nodes = obj.get("nodes")
    nodes_ok = isinstance(nodes, list) and not any(
        p.field == "nodes" or p.field.startswith("nodes[") for p in report.problems
    )
    if known_nodes is not None and nodes_ok:
        report.problems.extend(unknown_nodes(nodes, known_nodes))  # type: ignore[arg-type]
    # Rules that parse on their own are judged even when others do not.
    report.problems.extend(dead_rules_of(rules))
    if report.problems:
        return report
    try:
        policy = model.parse_policy(obj, require_timestamps=require_timestamps)
    except PolicyError as exc:  # what the collection above does not know about
        report.add(exc.field, _detail(exc))
        return report
    report.policy = policy
    if not policy.egress:
        report.note("egress", "empty: every connection and DNS name is denied")
    if policy.mode == "report":
        report.note("mode", "report: tier 2 allows what it would deny and logs would_deny")
    return report


# --- collecting field by field ---------------------------------------------------------


def _required(
    report: Report, obj: dict[str, object], key: str, parse: Callable[[object], object]
) -> None:
    if key not in obj:
        report.add(key, "is required")
    else:
        report.attempt(lambda: parse(obj[key]))


def _account(value: object) -> str:
    if not isinstance(value, str) or not model._ACCOUNT.fullmatch(value):
        raise PolicyError("account", "must be 1..64 characters of [A-Za-z0-9_.-]")
    return value


def _nodes(report: Report, value: object) -> None:
    if not isinstance(value, list):
        report.add("nodes", f"must be an array, not {model._json_type(value)}")
        return
    if not value:
        report.add("nodes", "must not be empty")
    if len(value) > model.MAX_NODES:
        report.add("nodes", f"more than {model.MAX_NODES} nodes")
    seen: set[str] = set()
    for index, node in enumerate(value):
        path = f"nodes[{index}]"
        if not isinstance(node, str) or not model._NODE.fullmatch(node):
            report.add(path, "must match [a-z0-9][a-z0-9-]{0,62}")
        elif node in seen:
            report.add(path, f"duplicate node {node!r}")
        else:
            seen.add(node)


def _timestamps(report: Report, obj: dict[str, object], *, now: float, require: bool) -> None:
    stamps: dict[str, int] = {}
    for name in model._TIMESTAMPS:
        if name not in obj:
            if require:
                report.add(name, "is required")
            continue
        value = report.attempt(
            functools.partial(model._check_bounded_int, obj[name], name, 0, model.MAX_TIMESTAMP)
        )
        if isinstance(value, int):
            stamps[name] = value
    exp, nbf, iat = stamps.get("exp"), stamps.get("nbf"), stamps.get("iat")
    if exp is not None and exp <= now:
        # The real problem, even when exp is also not after nbf or iat.
        report.add("exp", f"expired {when(exp, now)}")
    elif exp is not None:
        for other, value in (("nbf", nbf), ("iat", iat)):
            if value is not None and exp <= value:
                report.add(
                    "exp",
                    f"must be after {other} ({when(exp, now)} is not after {when(value, now)})",
                )
                break
    if nbf is not None and nbf > now:
        report.note("nbf", f"not valid before {when(nbf, now)}")


def _egress(report: Report, value: object) -> list[tuple[int, EgressRule]]:
    """Collect each rule's problems; the rules that parse, with their index."""
    if not isinstance(value, list):
        report.add("egress", f"must be an array, not {model._json_type(value)}")
        return []
    if len(value) > model.MAX_EGRESS_RULES:
        report.add("egress", f"more than {model.MAX_EGRESS_RULES} rules")
    parsed = []
    for index, rule in enumerate(value):
        before = len(report.problems)
        _rule(report, rule, f"egress[{index}]")
        if len(report.problems) == before:
            try:
                parsed.append((index, model._parse_rule(rule, f"egress[{index}]")))
            except PolicyError as exc:  # what _rule does not know about
                report.add(exc.field, _detail(exc))
    return parsed


def _rule(report: Report, value: object, path: str) -> None:
    if not isinstance(value, dict):
        report.add(path, f"must be an object, not {model._json_type(value)}")
        return
    for key in sorted(k for k in value if k not in model._RULE_KEYS):
        report.add(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(model._RULE_KEYS))})")
    has_host, has_cidr = "host" in value, "cidr" in value
    if has_host == has_cidr:
        report.add(path, "needs exactly one of host or cidr")
    if has_host:
        report.attempt(lambda: model._parse_host(value["host"], f"{path}.host"))
    if has_cidr:
        report.attempt(lambda: model._parse_cidr(value["cidr"], f"{path}.cidr"))
    if "ports" in value:
        ports = value["ports"]
        if not isinstance(ports, list):
            report.add(f"{path}.ports", f"must be an array, not {model._json_type(ports)}")
        elif not ports:
            report.add(f"{path}.ports", "must not be empty (omit it for the default, 443)")
        else:
            if len(ports) > model.MAX_PORTS_PER_RULE:
                report.add(f"{path}.ports", f"more than {model.MAX_PORTS_PER_RULE} entries")
            for index, item in enumerate(ports):
                report.attempt(functools.partial(model._parse_port, item, f"{path}.ports[{index}]"))
    if "ech" in value:
        ech = value["ech"]
        if not isinstance(ech, str) or ech not in model.ECH_CHOICES:
            report.add(f"{path}.ech", f"must be one of {', '.join(model.ECH_CHOICES)}")
        elif ech != model.DEFAULT_ECH and has_cidr and not has_host:
            report.add(f"{path}.ech", "only a host rule can allow ECH")


def _limits(report: Report, value: object) -> None:
    if not isinstance(value, dict):
        report.add("limits", f"must be an object, not {model._json_type(value)}")
        return
    for key in sorted(k for k in value if k not in model.LIMIT_BOUNDS):
        report.add(f"limits.{key}", f"unknown key (known: {', '.join(model.LIMIT_BOUNDS)})")
    for name, (lo, hi) in model.LIMIT_BOUNDS.items():
        if name in value:
            report.attempt(
                functools.partial(model._check_bounded_int, value[name], f"limits.{name}", lo, hi)
            )


# --- what a valid policy still gets wrong -----------------------------------------------


def unknown_nodes(nodes: Sequence[str], known: Collection[str]) -> list[Problem]:
    known_text = ", ".join(sorted(known)) or "none"
    return [
        Problem(f"nodes[{index}]", f"no node {node!r} at the control plane (known: {known_text})")
        for index, node in enumerate(nodes)
        if node not in known
    ]


def covered(ports: Sequence[PortRange], cover: Sequence[PortRange]) -> bool:
    """Whether every port of `ports` lies in some range of `cover`."""
    merged = merge_port_ranges(cover)
    return all(any(m.lo <= p.lo and p.hi <= m.hi for m in merged) for p in ports)


def _names_cover(earlier: str, later: str) -> bool:
    """Whether host pattern `earlier` matches every name `later` matches."""
    if earlier == later:
        return True
    return not is_wildcard(later) and host_matches(earlier, later)


def _opens_same(earlier: IPNetwork, later: IPNetwork) -> bool:
    """Whether cidr `earlier` allows every address that cidr `later` allows."""
    if earlier.version != later.version or not subnet_of(later, earlier):
        return False
    # Addresses of an overridable denied range open only for a rule inside it.
    return all(
        subnet_of(earlier, net)
        for net in OVERRIDABLE
        if net.version == later.version and subnet_of(later, net)
    )


def _extras(rule: EgressRule) -> list[str]:
    """What a rule carries besides "allow": the first matching rule's applies."""
    out = []
    if rule.ech != model.DEFAULT_ECH:
        out.append(f'"ech": "{rule.ech}"')
    if rule.tls != model.DEFAULT_TLS:
        out.append(f'"tls": "{rule.tls}"')
    if rule.http is not None:
        out.append('"http" rules')
    return out


def _target(rule: EgressRule) -> str:
    return rule.host if rule.host is not None else str(rule.cidr)


def dead_rules(policy: Policy) -> list[Problem]:
    """Rules and port entries that never decide anything; see the module docstring."""
    return dead_rules_of(list(enumerate(policy.egress)))


def dead_rules_of(rules: Sequence[tuple[int, EgressRule]]) -> list[Problem]:
    """`dead_rules` over (index in egress, rule) pairs, in policy order."""
    out: list[Problem] = []
    for position, (index, rule) in enumerate(rules):
        path = f"egress[{index}]"
        for k, entry in enumerate(rule.ports):
            if k and covered((entry,), rule.ports[:k]):
                single = [m for m in range(k) if covered((entry,), (rule.ports[m],))]
                where = f"ports[{single[0]}]" if single else "the entries before it"
                out.append(Problem(f"{path}.ports[{k}]", f"{entry} is already covered by {where}"))
        if rule.cidr is not None:
            net = rule.cidr
            if net.version == 6:
                out.append(
                    Problem(
                        f"{path}.cidr",
                        f"{net} never matches: the fleet carries IPv4 only (tier 1 drops IPv6)",
                    )
                )
                continue
            inside = next(
                ((d, r) for d, r in NEVER_OPEN if d.version == net.version and net.subnet_of(d)),
                None,
            )
            if inside is not None:
                out.append(
                    Problem(
                        f"{path}.cidr",
                        f"{net} lies inside {inside[0]} ({inside[1]}), which no policy can open",
                    )
                )
                continue
        shadows = [
            (j, other)
            for j, other in rules[:position]
            if (
                rule.host is not None
                and other.host is not None
                and _names_cover(other.host, rule.host)
            )
            or (
                rule.cidr is not None
                and other.cidr is not None
                and _opens_same(other.cidr, rule.cidr)
            )
        ]
        if shadows and covered(rule.ports, [p for _, other in shadows for p in other.ports]):
            j, first = shadows[0]
            if first == rule:
                message = f"duplicate of egress[{j}]"
            else:
                names = ", ".join(f"egress[{m}] ({_target(o)})" for m, o in shadows)
                verb = "matches" if len(shadows) == 1 else "match"
                message = f"never decides: {names} already {verb} all its destinations and ports"
            extras = _extras(rule)
            if extras and first != rule:
                verb = "applies" if len(extras) == 1 else "apply"
                message += f"; its {' and '.join(extras)} never {verb}"
            out.append(Problem(path, message))
    return out


# --- a file: a JSON payload or a JWS ---------------------------------------------------


def check_document(raw: bytes, *, now: float, known_nodes: Collection[str] | None = None) -> Report:
    """Check a policy file's content: a JSON payload (as `policy sign` and the
    control plane's PUT take it: timestamps optional) or a JWS compact token
    (its payload decoded, timestamps required; the signature is NOT verified
    here: `egressd policy verify --keys DIR` does that)."""
    text = raw.decode("utf-8", errors="replace").strip()
    if text.startswith("{") or not text:
        try:
            obj = strictjson.loads(raw)
        except (ValueError, RecursionError) as exc:
            report = Report()
            report.add(model.ROOT, f"not JSON: {' '.join(str(exc).split())}")
            return report
        return check_payload(obj, now=now, known_nodes=known_nodes)
    return _check_token(text, now=now, known_nodes=known_nodes)


def _check_token(text: str, *, now: float, known_nodes: Collection[str] | None) -> Report:
    report = Report()
    parts = text.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        report.add(model.ROOT, "neither a JSON object nor a JWS (header.payload.signature)")
        return report
    try:
        header = strictjson.loads(b64url_decode(parts[0]))
        payload = strictjson.loads(b64url_decode(parts[1]))
    except (ValueError, RecursionError) as exc:
        report.add(model.ROOT, f"JWS: {' '.join(str(exc).split())}")
        return report
    if not isinstance(header, dict):
        report.add("header", "must be a JSON object")
        return report
    if header.get("alg") != ALG:
        report.add("header.alg", f"{header.get('alg')!r} is not allowed, only {ALG!r}")
    if "typ" in header and str(header["typ"]).lower().removeprefix("application/") != TYP:
        report.add("header.typ", f"{header['typ']!r} is not {TYP!r}")
    result = check_payload(payload, now=now, known_nodes=known_nodes, require_timestamps=True)
    result.problems[:0] = report.problems
    result.note("signature", "not verified here (egressd policy verify --keys DIR does)")
    return result
