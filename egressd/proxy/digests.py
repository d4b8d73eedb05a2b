"""Which policy digests a proxy accepts for a job: the current one, and a replaced one
for a short grace period. Pure functions over plain data; the clock is an argument.

The GENEVE job option carries the digest of the policy the node enforces
(DESIGN.md, wire formats). When the control plane replaces a job's policy,
nodes and proxies learn it at slightly different moments, so for a moment a
node may still send the old digest to a proxy that already holds the new
policy. The proxy enforces its own verified policy whatever the digest says;
the digest tells it whether the node has caught up:

| the datagram's digest | verdict | what the proxy does |
|---|---|---|
| the cached policy's | `CURRENT` | accept |
| one the cached policy replaced with other content, less than `grace_s` ago | `GRACE` | accept, count (`egressd_geneve_digest_grace_total`) |
| the same, `grace_s` or more ago | `STALE` | drop (`stale_digest`) |
| one the cached policy replaced with the same content (a re-signed copy: new `iat`/`exp`) | `EQUIVALENT` | accept until that copy's own `exp` |
| none of these | `UNKNOWN` | accept, count (`egressd_geneve_digest_mismatch_total`), refetch the policy |

`UNKNOWN` is accepted because a node may be *ahead* of the proxy (it learnt
the new policy first), or hold a re-signed copy of the policy this proxy
never saw (the control plane re-signs on a read once less than half the TTL
is left; a proxy that started caching the job after that knows only the newer
copy). Only digests this proxy itself saw replaced are ever refused, so the
grace period is a promise about the transition a proxy witnessed: a node that
has not followed a replacement within `grace_s` (its agent is down, cut off
from the control plane, or lying) has its old-digest traffic dropped.

`Superseded` entries are kept per job (at most `MAX_SUPERSEDED`, oldest
forgotten first) until the later of the grace deadline and the replaced
policy's own `exp`: after that the old token is expired and no honest node
sends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from egressd.policy.model import Policy, same_content

DEFAULT_GRACE_S = 5.0
MAX_SUPERSEDED = 8

CURRENT = "current"
GRACE = "grace"
STALE = "stale"
EQUIVALENT = "equivalent"
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Superseded:
    """A digest the job's cached policy replaced."""

    accept_until: float  # wall clock: accepted (grace or equivalent) before this
    keep_until: float  # wall clock: remembered (so refused, not unknown) before this
    equivalent: bool  # the replacement had the same content (a re-signed copy)


def supersede(
    older: Mapping[bytes, Superseded],
    *,
    previous_digest: bytes,
    previous: Policy,
    current_digest: bytes,
    current: Policy,
    now: float,
    grace_s: float,
) -> dict[bytes, Superseded]:
    """The superseded digests after `previous` was replaced by `current` at `now`."""
    previous_exp = float(previous.exp) if previous.exp is not None else now
    out = {d: s for d, s in older.items() if s.keep_until > now and d != current_digest}
    if previous_digest != current_digest:
        if same_content(previous, current):
            entry = Superseded(previous_exp, previous_exp, equivalent=True)
        else:
            until = now + grace_s
            entry = Superseded(until, max(until, previous_exp), equivalent=False)
            # Earlier copies of the replaced content are replaced with it.
            for digest, kept in list(out.items()):
                if kept.equivalent:
                    out[digest] = Superseded(
                        min(kept.accept_until, until), max(until, kept.keep_until), False
                    )
        out.pop(previous_digest, None)
        out[previous_digest] = entry
    while len(out) > MAX_SUPERSEDED:
        out.pop(next(iter(out)))
    return out


def classify(
    digest: bytes, current_digest: bytes, older: Mapping[bytes, Superseded], now: float
) -> str:
    """CURRENT, GRACE, STALE, EQUIVALENT or UNKNOWN (see the module docstring)."""
    if digest == current_digest:
        return CURRENT
    entry = older.get(digest)
    if entry is None or now >= entry.keep_until:
        return UNKNOWN
    if now < entry.accept_until:
        return EQUIVALENT if entry.equivalent else GRACE
    return STALE


__all__ = [
    "CURRENT",
    "DEFAULT_GRACE_S",
    "EQUIVALENT",
    "GRACE",
    "MAX_SUPERSEDED",
    "STALE",
    "UNKNOWN",
    "Superseded",
    "classify",
    "same_content",
    "supersede",
]
