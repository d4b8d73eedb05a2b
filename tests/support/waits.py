"""Polling until the kernel, a daemon or a file shows what a test waits for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


# `check` is called with no arguments; `...` lets a caller bind loop variables as defaults.
def wait_for(check: Callable[..., T], timeout: float, what: str, interval: float = 0.1) -> T:
    """`check()`'s first truthy value; AssertionError naming `what` once `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def when(value: Any, pred: Callable[[Any], bool]) -> Any:
    """`value` if `pred(value)`, else None (for `wait_for`)."""
    return value if pred(value) else None
