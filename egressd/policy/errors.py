"""Errors of the policy subsystem; `reason` is what counters and logs use."""

from __future__ import annotations

from egressd.errors import EgressdError


class PolicyError(EgressdError):
    """A policy payload that does not validate; `field` is the JSON path that is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        super().__init__("invalid_policy", f"{field}: {detail}")


class JwsError(EgressdError):
    """A JWS that must not be acted on. Reasons are distinct per failure:
    malformed, alg_not_allowed, bad_typ, unknown_kid, bad_signature, expired,
    not_yet_valid, invalid_payload."""


class KeyFileError(EgressdError):
    """A key file or key directory that cannot be used (missing, unreadable, wrong type)."""
