"""Network namespaces for root tests: names no other run uses."""

from __future__ import annotations

import secrets

from egressd.net import netns as kn


def fresh_prefix(stem: str = "egd-t") -> str:
    """A topology prefix (`egd-t3fa9c1-`) that no existing namespace starts with.

    Tests use their own stem (`egd-t`, `egd-o`) so a leftover namespace tells whose it was;
    the fleet's `egd-` names and the e2e suite's `egd-e2e-` are never taken.
    """
    taken = kn.list_netns(stem)
    while True:
        prefix = f"{stem}{secrets.token_hex(3)}-"
        if not any(name.startswith(prefix) for name in taken):
            return prefix
