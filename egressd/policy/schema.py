"""The policy payload's JSON Schema (draft 2020-12), generated from the model.

`build_schema` derives every bound, choice and default from the constants of
`egressd.policy.model` (`LIMIT_BOUNDS`, `MODES`, `ECH_CHOICES`, port bounds,
size caps, `Limits` defaults), so the schema cannot drift from the parser;
``egressd/policy/schema.json`` is its output, and a unit test keeps the two
equal. Regenerate with::

    python -m egressd.policy.schema > egressd/policy/schema.json

The schema is for editors and other tools; `parse_policy` stays the
authority. What JSON Schema cannot say (all of it refused by the parser):

* ``exp`` after ``nbf`` and ``iat`` (a relation between fields);
* a whole-valued float is not an integer (JSON Schema's ``integer`` accepts
  ``443.0``; the parser does not);
* a ``cidr`` with host bits set (``10.1.2.7/24``) and a port range with
  lo > hi (``"10-5"``);
* ``http`` on a rule whose ports are all TLS ports without
  ``"tls": "intercept"``, a duplicate credential header, and path patterns
  beyond their characters (``//``, ``..``, ``**`` not at the end);
* host names only partly: the pattern refuses what can never be a name
  (other ASCII punctuation, ``*`` anywhere but a leading ``*.``, a wildcard
  over one label, empty or over-long ASCII labels, ASCII labels with a hyphen
  at either end, a numeric last label);
  IDNA mapping of non-ASCII names is the parser's.

Timestamps are optional here, as in the payloads people write (`policy sign`
and the control plane set them); ``build_schema(require_timestamps=True)``
is the variant for a signed payload.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

from egressd.policy import model
from egressd.policy.names import MAX_LABEL_LENGTH
from egressd.policy.paths import MAX_PATH_PATTERN

SCHEMA_ID = "https://egressd.invalid/schemas/policy-v1.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# End of input in both ECMA 262 and Python regexes: Python's `$` also matches
# before a final newline, which would let "acme\n" through.
_END = r"(?![\s\S])"
# Port numbers 1..65535 without leading zeros.
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4_NET = rf"{_OCTET}(?:\.{_OCTET}){{3}}/(?:3[0-2]|[12]?[0-9])"
_IPV6_NET = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9])"
# Label separators that UTS #46 maps to ".", and a label's characters: anything
# but ASCII other than letters, digits and "-" (non-ASCII is left to IDNA).
_DOT = r"[.\u3002\uff0e\uff61]"
_CHAR = r"[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f\u3002\uff0e\uff61]"
_HOST = rf"^(?:\*\.{_CHAR}+(?:{_DOT}{_CHAR}+)+|{_CHAR}+(?:{_DOT}{_CHAR}+)*){_DOT}?{_END}"
# A last label of digits or 0x-hex reads as an IPv4 address; an ASCII label
# over 63 characters stays over 63 after lower-casing.
_NUMERIC_LAST = r"(?:^|[.])(?:[0-9]+|0[xX][0-9A-Fa-f]*)[.]?$"
_LONG_LABEL = rf"(?:^|[.])[A-Za-z0-9-]{{{MAX_LABEL_LENGTH + 1},}}(?:[.]|$)"
# An ASCII label that starts or ends with a hyphen is not LDH.
_HYPHEN_EDGE = r"(?:^|[.])(?:-[A-Za-z0-9-]*|[A-Za-z0-9-]*-)(?:[.]|$)"


def _anchored(pattern: re.Pattern[str]) -> str:
    return f"^(?:{pattern.pattern}){_END}"


def _any_case(word: str) -> str:
    """`word` in any letter case, without inline flags (ECMA 262 has none)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)


# Printable ASCII without braces: a credential format's text around its "{}".
_FORMAT_CHAR = r"[\x20-\x7a\x7c\x7e]"
# What a path pattern is made of (a superset: segments are checked by the parser).
_PATH = rf"^/[A-Za-z0-9\-._~!$&'()+,;=:@*/]*{_END}"


def _http_schema() -> dict[str, Any]:
    forbidden = "|".join(_any_case(h) for h in sorted(model.CREDENTIAL_FORBIDDEN_HEADERS))
    allow = {
        "type": "object",
        "additionalProperties": False,
        "required": ["methods", "paths"],
        "properties": {
            "methods": {
                "type": "array",
                "minItems": 1,
                "maxItems": model.MAX_HTTP_METHODS,
                "uniqueItems": True,
                "items": {"type": "string", "pattern": _anchored(model.HTTP_METHOD)},
                "description": "Upper-case method names (case-sensitive).",
            },
            "paths": {
                "type": "array",
                "minItems": 1,
                "maxItems": model.MAX_HTTP_PATHS,
                "uniqueItems": True,
                "items": {"type": "string", "maxLength": MAX_PATH_PATTERN, "pattern": _PATH},
                "description": "Path patterns: literal segments, '*' (one segment), "
                "a trailing '/**' (any rest).",
            },
        },
    }
    credential = {
        "type": "object",
        "additionalProperties": False,
        "required": ["header", "secret"],
        "properties": {
            "header": {
                "type": "string",
                "pattern": _anchored(model.HEADER_NAME),
                "not": {"pattern": f"^(?:{forbidden}){_END}"},
            },
            "secret": {"type": "string", "pattern": _anchored(model.SECRET_NAME)},
            "format": {
                "type": "string",
                "maxLength": model.MAX_CREDENTIAL_FORMAT,
                "pattern": rf"^{_FORMAT_CHAR}*\{{\}}{_FORMAT_CHAR}*{_END}",
            },
            "placeholder": {"type": "string", "pattern": _anchored(model.PLACEHOLDER)},
        },
    }
    return {
        "type": "object",
        "description": "Requests this host rule allows (decided one by one) and the "
        "credentials the proxy sets on them.",
        "additionalProperties": False,
        "required": ["allow"],
        "properties": {
            "allow": {
                "type": "array",
                "minItems": 1,
                "maxItems": model.MAX_HTTP_ALLOW,
                "items": allow,
            },
            "credentials": {
                "type": "array",
                "maxItems": model.MAX_CREDENTIALS,
                "items": credential,
            },
        },
    }


def _limits_schema() -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(model.Limits)}
    props = {
        name: {
            "type": "integer",
            "minimum": lo,
            "maximum": hi,
            "default": defaults[name],
        }
        for name, (lo, hi) in model.LIMIT_BOUNDS.items()
    }
    return {
        "type": "object",
        "description": "Per-job limits; each key optional (its default applies).",
        "additionalProperties": False,
        "properties": props,
    }


def _rule_schema() -> dict[str, Any]:
    port = {
        "oneOf": [
            {"type": "integer", "minimum": model.MIN_PORT, "maximum": model.MAX_PORT},
            {
                "type": "string",
                "pattern": rf"^{_PORT}-{_PORT}{_END}",
                "description": "an inclusive range 'lo-hi', lo <= hi",
            },
        ]
    }
    return {
        "type": "object",
        "description": "One allow rule: exactly one of host or cidr, and its TCP ports.",
        "additionalProperties": False,
        "properties": {
            "host": {
                "type": "string",
                "description": "An exact name, or '*.' + a name of at least two labels "
                "(matches exactly one more label).",
                "minLength": 1,
                "maxLength": 1024,
                "pattern": _HOST,
                "not": {
                    "anyOf": [{"pattern": p} for p in (_NUMERIC_LAST, _LONG_LABEL, _HYPHEN_EDGE)]
                },
            },
            "cidr": {
                "type": "string",
                "description": "A network with its prefix length and host bits zero.",
                "pattern": rf"^(?:{_IPV4_NET}|{_IPV6_NET}){_END}",
            },
            "ports": {
                "type": "array",
                "description": "Ports and 'lo-hi' ranges; [443] when omitted.",
                "minItems": 1,
                "maxItems": model.MAX_PORTS_PER_RULE,
                "items": port,
                "default": [p.lo for p in model.DEFAULT_PORTS],
            },
            "ech": {
                "enum": list(model.ECH_CHOICES),
                "default": model.DEFAULT_ECH,
                "description": "Whether a TLS ClientHello with encrypted_client_hello may "
                "use this rule's name as its outer SNI (host rules only).",
            },
            "tls": {
                "enum": list(model.TLS_CHOICES),
                "default": model.DEFAULT_TLS,
                "description": "Splice TLS as it is, or terminate it so that http rules "
                "can decide each request (host rules only; intercept needs http).",
            },
            "http": _http_schema(),
        },
        "oneOf": [{"required": ["host"]}, {"required": ["cidr"]}],
        "allOf": [
            {
                # ech, tls and http are for host rules
                "if": {"required": ["cidr"]},
                "then": {
                    "properties": {
                        "ech": {"const": model.DEFAULT_ECH},
                        "tls": {"const": model.DEFAULT_TLS},
                    },
                    "not": {"required": ["http"]},
                },
            },
            {
                "if": {"required": ["tls"], "properties": {"tls": {"const": model.TLS_INTERCEPT}}},
                "then": {"required": ["http"]},
            },
        ],
    }


def build_schema(*, require_timestamps: bool = False) -> dict[str, Any]:
    """The JSON Schema of a policy payload; see the module docstring."""
    stamp = {
        "type": "integer",
        "minimum": 0,
        "maximum": model.MAX_TIMESTAMP,
        "description": "Unix time in seconds (UTC).",
    }
    required = ["v", "job_id", "account", "nodes", "egress"]
    if require_timestamps:
        required += list(model._TIMESTAMPS)
    return {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": "egressd job policy (payload of the signed JWS), version 1",
        "description": "Generated from egressd/policy/model.py by egressd/policy/schema.py; "
        "see docs/policy.md. The parser (egressd policy check) is the authority.",
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": {
            "v": {"const": model.POLICY_VERSION},
            "job_id": {
                "type": "string",
                "description": "UUID in 8-4-4-4-12 hex form, not the nil UUID.",
                "minLength": 36,
                "maxLength": 36,
                "pattern": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                rf"[0-9a-fA-F]{{12}}{_END}",
                "not": {"pattern": r"^[0-]+$"},
            },
            "account": {"type": "string", "pattern": rf"^[A-Za-z0-9_.-]{{1,64}}{_END}"},
            "nodes": {
                "type": "array",
                "description": "Nodes that may run the job; the control plane must know each.",
                "minItems": 1,
                "maxItems": model.MAX_NODES,
                "uniqueItems": True,
                "items": {"type": "string", "pattern": rf"^[a-z0-9][a-z0-9-]{{0,62}}{_END}"},
            },
            "mode": {"enum": list(model.MODES), "default": model.DEFAULT_MODE},
            "iat": stamp,
            "nbf": stamp,
            "exp": stamp,
            "egress": {
                "type": "array",
                "description": "Allow rules, tried in order; empty denies everything.",
                "maxItems": model.MAX_EGRESS_RULES,
                "items": _rule_schema(),
            },
            "limits": _limits_schema(),
        },
    }


def schema_text(*, require_timestamps: bool = False) -> str:
    """`build_schema` as the committed file's text (2-space indent, trailing newline)."""
    return (
        json.dumps(build_schema(require_timestamps=require_timestamps), indent=2, ensure_ascii=True)
        + "\n"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(schema_text())
