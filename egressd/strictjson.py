"""Strict JSON for everything egressd trusts: policies, keys, configs, API bodies.

Python's `json` quietly keeps the last of two duplicate members and accepts
NaN and Infinity. A policy or config read two ways (`{"mode": "report",
"mode": "enforce"}`) is a classic confused-deputy bug, so duplicates and
non-finite numbers are refused here, once, for every caller.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate member {name!r}")
        out[name] = value
    return out


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def loads(data: str | bytes) -> Any:
    """`json.loads` that refuses duplicate members and NaN/Infinity (ValueError).

    Bytes must be UTF-8 (UnicodeDecodeError, also a ValueError, otherwise).
    """
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
