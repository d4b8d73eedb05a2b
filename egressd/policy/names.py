"""Host names as egressd compares them: one canonical form, one matching rule.

Every name that reaches a decision (a policy's host rule, a TLS SNI, an HTTP
Host header, a DNS question) goes through `normalize_host` first, so the
comparison itself is plain string equality.

The canonical form:

* lower case, at most ONE trailing dot removed (``"api.test."`` and
  ``"api.test"`` are the same name; ``"api.test.."`` is an empty label);
* internationalised labels mapped with UTS #46 (non-transitional, STD3 rules)
  and converted to Punycode with the ``idna`` package
  (``"Bücher.test"`` -> ``"xn--bcher-kva.test"``); a label already in
  ``xn--`` form must decode and re-encode to itself;
* every label is LDH (letters, digits, hyphen; no hyphen first or last),
  1..63 characters; the whole name at most 253 characters.

Decisions worth knowing:

* Plain ASCII labels are checked against LDH only, not against the IDNA2008
  label rules: IDNA2008 forbids ``--`` in the 3rd and 4th positions of any
  label, and real host names such as ``r3---sn-abc.googlevideo.com`` have
  exactly that. Only non-ASCII and ``xn--`` labels go through ``idna``.
* IP literals are not names: ``"1.2.3.4"``, ``"::1"`` and ``"[::1]"`` are
  rejected, and so is any name whose last label is all digits or a ``0x`` hex
  number (``"127.1"``, ``"foo.0x7f"``): resolvers and URL parsers read those
  as IPv4 addresses, which would let a "name" smuggle an address past the
  address rules.
* Underscores are not LDH and are rejected (host names, not DNS owner names).
* Single-label names (``"localhost"``) are valid names; what they resolve to
  is still classified by `egressd.policy.addresses`.

Wildcards exist only in policy host rules (`normalize_host_pattern`): a
leading ``"*."`` followed by a name of at least two labels (``"*.test"`` or
``"*.com"`` would cover a whole top-level domain, so they are rejected), and it
matches exactly one extra label (`host_matches`).
"""

from __future__ import annotations

import ipaddress
import re

import idna

from egressd.errors import EgressdError

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
WILDCARD_PREFIX = "*."
MIN_WILDCARD_SUFFIX_LABELS = 2

# Anything longer than this cannot map down to a valid name without being
# mostly characters that UTS #46 ignores; refuse it before doing work on it.
_MAX_INPUT_LENGTH = 1024

_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_ACE_PREFIX = "xn--"


class HostError(EgressdError):
    """A host name that cannot be normalised; `detail` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_host", detail)


def normalize_host(name: str) -> str:
    """Return the canonical (lower-case Punycode, no trailing dot) form of `name`.

    Raises `HostError` for anything that is not a valid host name, including IP
    address literals.
    """
    if not isinstance(name, str):
        raise HostError(f"host must be a string, not {type(name).__name__}")
    if len(name) > _MAX_INPUT_LENGTH:
        raise HostError(f"host is longer than {_MAX_INPUT_LENGTH} characters")
    _reject_ip_literal(name)
    if name.isascii():
        mapped = name.lower()
    else:
        try:
            mapped = idna.uts46_remap(name, std3_rules=True, transitional=False)
        except (idna.IDNAError, ValueError) as exc:
            raise HostError(f"{name!r}: {exc}") from exc
    # UTS #46 maps the ideographic full stop and friends to ".", so strip the
    # one trailing dot only after mapping.
    mapped = mapped.removesuffix(".")
    if not mapped:
        raise HostError("host is empty")
    labels = [_normalize_label(label, name) for label in mapped.split(".")]
    result = ".".join(labels)
    if len(result) > MAX_NAME_LENGTH:
        raise HostError(f"{name!r}: longer than {MAX_NAME_LENGTH} characters")
    _reject_ip_literal(result)
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise HostError(f"{name!r}: a numeric last label reads as an IPv4 address")
    return result


def normalize_host_pattern(pattern: str) -> str:
    """Normalise a policy host rule: an exact name, or ``"*."`` + a name of >= 2 labels."""
    if not isinstance(pattern, str):
        raise HostError(f"host must be a string, not {type(pattern).__name__}")
    if pattern.startswith(WILDCARD_PREFIX):
        suffix = pattern[len(WILDCARD_PREFIX) :]
        if "*" in suffix:
            raise HostError(f"{pattern!r}: '*' is allowed only as the whole first label")
        base = normalize_host(suffix)
        if base.count(".") + 1 < MIN_WILDCARD_SUFFIX_LABELS:
            raise HostError(
                f"{pattern!r}: a wildcard needs at least {MIN_WILDCARD_SUFFIX_LABELS} labels "
                "after '*.' (it would cover a whole top-level domain)"
            )
        result = WILDCARD_PREFIX + base
        if len(result) > MAX_NAME_LENGTH:
            raise HostError(f"{pattern!r}: longer than {MAX_NAME_LENGTH} characters")
        return result
    if "*" in pattern:
        raise HostError(f"{pattern!r}: '*' is allowed only as a leading '*.'")
    return normalize_host(pattern)


def is_wildcard(pattern: str) -> bool:
    """True for a (normalised) wildcard host rule."""
    return pattern.startswith(WILDCARD_PREFIX)


def host_matches(pattern: str, host: str) -> bool:
    """Whether normalised `host` matches normalised rule `pattern`.

    Exact names match themselves only; ``"*.a.b"`` matches exactly one extra
    label: ``"x.a.b"``, not ``"a.b"`` and not ``"y.x.a.b"``.
    """
    if not pattern.startswith(WILDCARD_PREFIX):
        return pattern == host
    suffix = pattern[1:]  # ".a.b"
    if len(host) <= len(suffix) or not host.endswith(suffix):
        return False
    first = host[: -len(suffix)]
    return "." not in first and "*" not in first


def _normalize_label(label: str, original: str) -> str:
    if not label:
        raise HostError(f"{original!r}: empty label")
    if not label.isascii():
        try:
            label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, ValueError) as exc:
            raise HostError(f"{original!r}: {exc}") from exc
    elif label.startswith(_ACE_PREFIX):
        try:
            roundtrip = idna.alabel(idna.ulabel(label)).decode("ascii")
        except (idna.IDNAError, ValueError) as exc:
            raise HostError(f"{original!r}: invalid Punycode label {label!r}: {exc}") from exc
        if roundtrip != label:
            raise HostError(f"{original!r}: Punycode label {label!r} is not canonical")
    if len(label) > MAX_LABEL_LENGTH:
        raise HostError(f"{original!r}: label longer than {MAX_LABEL_LENGTH} characters")
    if not _LDH_LABEL.fullmatch(label):
        raise HostError(f"{original!r}: label {label!r} is not letters, digits and hyphens")
    return label


def _reject_ip_literal(text: str) -> None:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if candidate.endswith(".") and not candidate.endswith(".."):
        candidate = candidate[:-1]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return
    raise HostError(f"{text!r} is an IP address literal, not a host name")
