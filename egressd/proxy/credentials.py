"""Credentials the sandbox never sees (pure): the headers the proxy sets on a
request, and the requests that would carry a credential where it does not belong.

A rule's ``http.credentials`` (`egressd.policy.model.Credential`) name a
header and a secret that only proxies hold (`egressd.proxy.secrets`). The
gate (`egressd.proxy.http_gate`) calls `RequestCredentials.prepare` for each
request it is about to send upstream, and feeds the request's body to the
`BodyScanner` it returns. Secrets come from a `Lookup` (name -> value or
None), so everything here is tested without files.

Injection, on each request the deciding rule allows (its "home" rule):

* every credential of that rule sets its header, overwriting whatever the
  client sent under that name (every line of it; the credential's line goes
  last in the head): the value is ``format`` with the secret in place of
  ``{}``, or the bare secret;
* with a ``placeholder``: where the client's header of that name contains the
  placeholder, the placeholder is replaced by the bare secret and the rest of
  the client's value is kept (an SDK that sends ``Bearer <placeholder>``);
  otherwise the header is set as above. A placeholder elsewhere (another
  header, the target, the body) is left as it is: it is no secret;
* a secret that is unavailable denies the request (``credential_unavailable``):
  a request never goes out without the credential its rule sets.

Exfiltration: a request whose deciding rule is not a home of a credential
(the rules listing it) must not carry it. Its markers are its placeholder,
``egressd:<secret name>`` for every secret of the job's credentials (what a
UDF told "use egressd:NAME" would write), and the secret's value when the
proxy has it and it is at least `MIN_VALUE_MATCH` long (a value echoed back
to the sandbox by its own API and replayed). A marker anywhere in the
request head (request line, any header, the percent-decoded target too) or
body (decoded from chunked, trailers included) denies the request as
``credential_exfiltration``. A longer marker that does belong there and
starts at the same place (``egressd:tok-2`` on tok-2's host) covers a
shorter one (``egressd:tok``).

What this does not catch, by design: a marker split across requests,
encoded (base64, reversed, ...) or sent where the proxy does not read
(spliced TLS, other protocols, a cidr rule's connections, after a CONNECT
or Upgrade): it is a tripwire for a UDF that has been told or tricked into
using a credential elsewhere, not a guarantee. The guarantee is that the
sandbox never holds a secret. The body is scanned as it streams: each chunk
with the previous chunk's last bytes (markers across chunk boundaries are
found), costing one substring search per marker and chunk; the chunk that
completes a marker never goes upstream, though the marker's first bytes
may have in an earlier chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from egressd.policy.model import EgressRule, Policy
from egressd.proxy import tier2

CREDENTIAL_EXFILTRATION = "credential_exfiltration"
CREDENTIAL_UNAVAILABLE = "credential_unavailable"
#: ``egressd:`` + a secret's name is a placeholder for it wherever it is sent.
MARKER_PREFIX = "egressd:"
#: Secret values shorter than this are not searched for (they would match
#: unrelated requests); the placeholders are still.
MIN_VALUE_MATCH = 8
PLACEHOLDER = "placeholder"
VALUE = "value"
IN_HEAD = "head"
IN_BODY = "body"

#: A secret's current value by name, None when it is unavailable.
Lookup = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class Marker:
    """Bytes that stand for a secret, and the rules whose requests may carry them."""

    text: bytes
    secret: str
    kind: str  # PLACEHOLDER or VALUE
    homes: frozenset[int]  # id() of rules of the policy


@dataclass(frozen=True, slots=True)
class CredentialIndex:
    """What a policy's credentials mean for its requests."""

    markers: tuple[Marker, ...]  # the placeholders (values are added per request)
    secrets: Mapping[str, frozenset[int]]  # secret name -> its home rules


def build_index(policy: Policy) -> CredentialIndex | None:
    """The index of `policy`'s credentials; None when it has none."""
    placeholders: dict[bytes, tuple[str, set[int]]] = {}
    secrets: dict[str, set[int]] = {}
    for rule in policy.egress:
        if rule.http is None:
            continue
        for credential in rule.http.credentials:
            secrets.setdefault(credential.secret, set()).add(id(rule))
            texts = [MARKER_PREFIX + credential.secret]
            if credential.placeholder is not None:
                texts.append(credential.placeholder)
            for text in texts:
                entry = placeholders.setdefault(text.encode(), (credential.secret, set()))
                entry[1].add(id(rule))
    if not secrets:
        return None
    markers = tuple(
        Marker(text, secret, PLACEHOLDER, frozenset(homes))
        for text, (secret, homes) in placeholders.items()
    )
    return CredentialIndex(markers, {name: frozenset(h) for name, h in secrets.items()})


def with_values(index: CredentialIndex, lookup: Lookup) -> tuple[Marker, ...]:
    """The index's markers plus the secrets' current values (long enough ones)."""
    values = []
    for name, homes in index.secrets.items():
        value = lookup(name)
        if value is not None and len(value) >= MIN_VALUE_MATCH:
            values.append(Marker(value.encode(), name, VALUE, homes))
    return index.markers + tuple(values) if values else index.markers


def find_foreign(
    markers: Sequence[Marker], rule: EgressRule | None, data: bytes | bytearray
) -> Marker | None:
    """The first marker in `data` that does not belong on a request `rule` decided."""
    home = id(rule) if rule is not None else None
    for marker in markers:
        if home in marker.homes:
            continue
        at = data.find(marker.text)
        while at >= 0:
            if not _covered(markers, home, data, at, marker):
                return marker
            at = data.find(marker.text, at + 1)
    return None


def _covered(
    markers: Sequence[Marker], home: int | None, data: bytes | bytearray, at: int, marker: Marker
) -> bool:
    return any(
        home in other.homes
        and len(other.text) > len(marker.text)
        and data.startswith(other.text, at)
        for other in markers
    )


def head_text(head: bytes, target: bytes) -> bytes:
    """What a head is searched in: the head as sent, then its target percent-decoded."""
    return head + b"\n" + unquote_to_bytes(target)


@dataclass(frozen=True, slots=True)
class Missing:
    """A secret a credential needs that is unavailable."""

    secret: str


def credential_headers(
    rule: EgressRule | None, client_headers: Iterable[tuple[bytes, bytes]], lookup: Lookup
) -> tuple[tuple[bytes, bytes], ...] | Missing:
    """The header lines `rule`'s credentials set, given the client's headers
    (lower-case names, as h11 gives them); or the first unavailable secret."""
    if rule is None or rule.http is None or not rule.http.credentials:
        return ()
    client = list(client_headers)
    out: list[tuple[bytes, bytes]] = []
    for credential in rule.http.credentials:
        secret = lookup(credential.secret)
        if secret is None:
            return Missing(credential.secret)
        value = None
        if credential.placeholder is not None:
            name = credential.header.lower().encode()
            placeholder = credential.placeholder.encode()
            for client_name, client_value in client:
                if client_name == name and placeholder in client_value:
                    value = client_value.replace(placeholder, secret.encode())
                    break
        if value is None:
            fmt = credential.format
            value = (secret if fmt is None else fmt.replace("{}", secret, 1)).encode()
        out.append((credential.header.encode(), value))
    return tuple(out)


def rewrite_head(head: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """`head` (a request head as `sniff` accepts it: CRLF lines, no obs-fold,
    no space before a colon) without any line of `headers`' names, and with
    `headers` appended; everything else (framing included) byte for byte."""
    if not headers:
        return head
    end = head.index(b"\r\n\r\n")
    lines = head[:end].split(b"\r\n")
    names = {name.lower() for name, _ in headers}
    kept = [lines[0]]
    kept += [line for line in lines[1:] if line.split(b":", 1)[0].lower() not in names]
    kept += [name + b": " + value for name, value in headers]
    return b"\r\n".join(kept) + head[end:]


@dataclass(slots=True)
class Prepared:
    """What the gate sends for one request, or why it must not.

    `reason` set: the request is denied (`report`: report mode, it goes on
    flagged, unchanged); `credential` says which secret, for the audit event.
    """

    head: bytes
    injected: tuple[str, ...] = ()
    reason: str | None = None
    report: bool = False
    credential: dict[str, str] | None = None
    scanner: BodyScanner | None = None


class BodyScanner:
    """Finds foreign markers in a request body fed chunk by chunk (decoded)."""

    __slots__ = ("_keep", "_markers", "_rule", "_tail")

    def __init__(self, markers: Sequence[Marker], rule: EgressRule | None) -> None:
        self._markers = markers
        self._rule = rule
        self._keep = max(len(m.text) for m in markers) - 1
        self._tail = b""

    def feed(self, data: bytes | bytearray) -> Marker | None:
        if not data:
            return None
        window = self._tail + bytes(data)
        found = find_foreign(self._markers, self._rule, window)
        self._tail = window[-self._keep :] if self._keep else b""
        return found


def exfiltration(marker: Marker, where: str) -> dict[str, str]:
    """The audit event's ``credential`` for an exfiltration (no value, ever)."""
    return {"secret": marker.secret, "kind": marker.kind, "in": where}


@dataclass(slots=True)
class RequestCredentials:
    """One policy's credentials, for the requests of one connection."""

    policy: Policy
    index: CredentialIndex
    lookup: Lookup
    report: bool = field(init=False)

    def __post_init__(self) -> None:
        self.report = self.policy.mode == tier2.MODE_REPORT

    @classmethod
    def of(cls, policy: Policy, lookup: Lookup) -> RequestCredentials | None:
        """None for a policy without credentials (nothing to do, nothing to scan)."""
        index = index_for(policy)
        return None if index is None else cls(policy, index, lookup)

    def prepare(
        self,
        rule: EgressRule | None,
        head: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
    ) -> Prepared:
        """For a request that goes upstream (allowed, or report mode) and that
        `rule` decided: its head with the credentials set, or a denial."""
        markers = with_values(self.index, self.lookup)
        found = find_foreign(markers, rule, head_text(head, target))
        if found is not None:
            return Prepared(
                head,
                reason=CREDENTIAL_EXFILTRATION,
                report=self.report,
                credential=exfiltration(found, IN_HEAD),
            )
        lines = credential_headers(rule, headers, self.lookup)
        if isinstance(lines, Missing):
            return Prepared(
                head,
                reason=CREDENTIAL_UNAVAILABLE,
                report=self.report,
                credential={"secret": lines.secret},
            )
        return Prepared(
            rewrite_head(head, lines),
            injected=tuple(name.decode("ascii") for name, _ in lines),
            scanner=self._scanner(markers, rule),
        )

    def _scanner(self, markers: Sequence[Marker], rule: EgressRule | None) -> BodyScanner | None:
        # None when every marker belongs on this request: nothing to look for.
        home = id(rule) if rule is not None else None
        if all(home in m.homes for m in markers):
            return None
        return BodyScanner(markers, rule)


# One index per policy object (a new policy is a new object): built once, not
# per connection. Bounded: emptied when full.
_INDEXES: dict[int, tuple[Policy, CredentialIndex | None]] = {}
_MAX_INDEXES = 1024


def index_for(policy: Policy) -> CredentialIndex | None:
    """`build_index`, memoised per policy object."""
    hit = _INDEXES.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    index = build_index(policy)
    if len(_INDEXES) >= _MAX_INDEXES:
        _INDEXES.clear()
    _INDEXES[id(policy)] = (policy, index)
    return index
