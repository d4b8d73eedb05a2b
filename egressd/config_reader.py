"""Reading configuration: the one `ConfigError` and the converters every daemon's config shares.

A converter is `as_x(field, value, ...) -> T`: a decoded JSON value (or a command-line
flag's string) in, a typed value out, or `ConfigError(field, detail)` naming the field:
a JSON path (``"proxies[1].underlay"``, ``"health.down_after"``, ``"$"`` for the whole
document) or a flag (``"--listen"``). Each config module declares its fields as a table of
converters (`egressd.proxy.config` is the model) and keeps its cross-field checks in its
dataclass's `__post_init__`.

Every error's reason is ``invalid_config`` and its detail ``"FIELD: what is wrong"``: one
line for the operator, the same shape for the proxy, the agent and the control plane.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from egressd import strictjson
from egressd.errors import EgressdError

T = TypeVar("T")
Converter = Callable[[str, object], T]

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network


class ConfigError(EgressdError):
    """A configuration that cannot be used; `field` names the first thing wrong."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.problem = detail  # the detail without the field, to re-word it
        super().__init__("invalid_config", f"{field}: {detail}")


def read_json_file(path: Path | str, max_bytes: int) -> object:
    """The decoded (strict) JSON document at `path`; ConfigError("$", ...) if unusable."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError("$", f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ConfigError("$", f"{path} is larger than {max_bytes} bytes")
    try:
        return strictjson.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise ConfigError("$", f"{path} is not JSON: {' '.join(str(exc).split())}") from exc


def child(field: str, key: str | int) -> str:
    """The JSON path of `key` inside `field` ("" is the document itself)."""
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def as_object(
    field: str,
    value: object,
    known: Collection[str],
    *,
    required: Collection[str] = (),
    what: str = "an object",
    unknown: str = "unknown field",
    missing: str = "required",
) -> Mapping[str, object]:
    """A JSON object with only `known` keys and every `required` one."""
    if not isinstance(value, Mapping):
        raise ConfigError(field or "$", f"must be {what}")
    for key in sorted(str(k) for k in value):
        if key not in known:
            raise ConfigError(child(field, key), unknown)
    for key in required:
        if key not in value:
            raise ConfigError(child(field, key), missing)
    return value


def convert(
    field: str, doc: Mapping[str, object], table: Mapping[str, Converter[object]]
) -> dict[str, Any]:
    """The keys of `doc` that `table` has a converter for, converted (keyword arguments)."""
    return {key: table[key](child(field, key), value) for key, value in doc.items() if key in table}


def as_list(
    field: str,
    value: object,
    item: Converter[T],
    *,
    what: str,
    nonempty: bool = False,
    distinct: bool = False,
) -> tuple[T, ...]:
    """A JSON array of `what`, each converted by `item` under `field[i]`."""
    if not isinstance(value, list) or (nonempty and not value):
        raise ConfigError(field, f"must be a {'non-empty ' if nonempty else ''}list of {what}")
    items = tuple(item(child(field, i), v) for i, v in enumerate(value))
    if distinct and len(set(items)) != len(items):
        raise ConfigError(field, "must be distinct")
    return items


def as_str(field: str, value: object, *, nonempty: bool = False) -> str:
    if not isinstance(value, str) or (nonempty and not value):
        raise ConfigError(field, f"must be a {'non-empty ' if nonempty else ''}string")
    return value


def as_one_of(field: str, value: object, choices: Collection[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        names = " or ".join(f'"{c}"' for c in choices)
        raise ConfigError(field, f"must be {names}, got {value!r}")
    return value


def as_bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, "must be true or false")
    return value


def as_int(field: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (never a bool), within lo..hi when given."""
    ranged = lo is not None and hi is not None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            field, f"must be an integer in {lo}..{hi}" if ranged else "must be an integer"
        )
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(field, f"must be an integer in {lo}..{hi}")
    return value


def as_number(
    field: str, value: object, lo: float | None = None, hi: float | None = None, *, unit: str = ""
) -> float:
    """An int or float (never a bool); with a range, finite and within lo..hi."""
    what = f"a number of {unit}" if unit else "a number"
    if lo is None or hi is None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(field, f"must be {what}")
        return float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ConfigError(field, f"must be {what} in {lo:g}..{hi:g}")
    return float(value)


def as_path(field: str, value: object, *, absolute: bool = False) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(field, "must be a non-empty path string")
    if absolute and not value.startswith("/"):
        raise ConfigError(field, "must be an absolute path")
    return Path(value)


def as_address(field: str, value: object) -> IPv4Address:
    if not isinstance(value, str):
        raise ConfigError(field, "must be an IPv4 address string")
    try:
        return IPv4Address(value)
    except ValueError:
        raise ConfigError(field, f"not an IPv4 address: {value!r}") from None


def as_network(field: str, value: object) -> IPv4Network:
    """A strict IPv4 CIDR ("a.b.c.d/n" with no host bits set)."""
    if not isinstance(value, str):
        raise ConfigError(field, "must be an IPv4 CIDR string (a.b.c.d/n)")
    if "/" not in value:
        # IPv4Network would take a bare address as a /32: say what is missing instead.
        raise ConfigError(
            field, f"not a strict IPv4 network: {value!r} needs a prefix length (a.b.c.d/n)"
        )
    try:
        return IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(field, f"not a strict IPv4 network: {exc}") from None
