"""The root of egressd's error tree.

Every subsystem raises its own subclass; `reason` is a short snake_case token
that counters and logs use verbatim, `detail` is for humans.
"""

from __future__ import annotations


class EgressdError(Exception):
    """Base of all errors egressd raises on purpose."""

    reason: str = "error"

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
