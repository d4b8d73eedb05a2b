"""Audit events from the fleet's JSON logs: parse, filter, print (pure).

The fleet's daemons log JSON lines to ``RUN/logs/<member>.log``; among their
events, four are audit events (docs/audit.md describes every field):

* ``connection``, ``dns``, ``http_request`` from proxies (tier 2);
* ``tier1_denial`` from node agents (tier 1; always a deny).

`parse_line` turns one line into an `AuditEvent` (or None for anything else:
other events, non-JSON lines); `Filter` keeps the ones asked for;
`table` prints them in at most 100 columns; `to_json` is the ``--json`` form
(the logged fields, plus ``log``: the member whose log it came from).

Verdict filters: ``allow``, ``deny`` (everything refused: ``deny``, a DNS
``drop``, and tier 1), ``drop`` (only DNS datagrams not answered at all) and
``would_deny`` (report mode: allowed, but the policy would have denied it).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

AUDIT_EVENTS = ("connection", "dns", "http_request", "tier1_denial")
#: Short names for the table's WHERE column.
KIND = {"connection": "conn", "dns": "dns", "http_request": "http", "tier1_denial": "tier1"}
VERDICTS = ("allow", "deny", "drop", "would_deny")
WIDTH = 100

_RELATIVE = re.compile(r"([0-9]+)\s*(s|m|min|h|d)")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)


class AuditParseError(ValueError):
    """An argument (time, verdict) that cannot be understood."""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    time: dt.datetime
    log: str  # the member whose log it came from: proxy1, node1 ...
    event: str
    fields: Mapping[str, object]

    def get(self, key: str) -> object:
        return self.fields.get(key)

    @property
    def job_id(self) -> str | None:
        value = self.fields.get("job_id")
        return value if isinstance(value, str) else None

    @property
    def verdict(self) -> str:
        value = self.fields.get("verdict")
        if self.event == "tier1_denial" and not isinstance(value, str):
            return "deny"  # tier 1 only ever reports denials
        return value if isinstance(value, str) else "?"

    @property
    def shown_verdict(self) -> str:
        """``would_deny`` for a report-mode allow, else the verdict."""
        if self.fields.get("would_deny") is True and self.verdict == "allow":
            return "would_deny"
        return self.verdict

    @property
    def reason(self) -> str:
        value = self.fields.get("reason")
        return value if isinstance(value, str) else "-"

    @property
    def destination(self) -> str:
        """What was asked for: ``host:port`` (or ``dst:port``), a DNS ``qname qtype``."""
        host, dst, port = self.get("host"), self.get("dst"), self.get("port")
        if self.event == "dns":
            qtype = self.get("qtype")
            name = self.get("qname") or host or "?"
            return f"{name} {qtype}" if qtype else str(name)
        target = host if isinstance(host, str) and host else dst
        text = str(target) if target is not None else "?"
        if port is not None:
            text += f":{port}"
        proto = self.get("proto")
        if self.event == "tier1_denial" and isinstance(proto, str) and proto != "tcp":
            text += f"/{proto}"
        if self.event == "http_request":
            method, path = self.get("method"), self.get("path")
            if isinstance(method, str) and isinstance(path, str):
                text = f"{method} {text}{path}"
        return text

    def matches_verdict(self, wanted: str) -> bool:
        if wanted == "deny":
            return self.verdict in ("deny", "drop")
        if wanted == "would_deny":
            return self.shown_verdict == "would_deny"
        return self.verdict == wanted and self.shown_verdict == self.verdict


def parse_time(text: str, *, now: dt.datetime) -> dt.datetime:
    """An absolute ISO 8601 time (``2026-12-06T16:00:00Z``, a date, no zone = UTC)
    or a relative one (``90s``, ``15m``, ``2h``, ``1d`` ago)."""
    found = _RELATIVE.fullmatch(text.strip())
    if found:
        return now - dt.timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise AuditParseError(
            f"not a time: {text!r} (ISO 8601 like 2026-12-06T16:00:00Z, or 90s, 15m, 2h, 1d)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _event_time(value: object) -> dt.datetime:
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            return _EPOCH
        return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    return _EPOCH


def parse_line(line: str, log: str) -> AuditEvent | None:
    """The audit event on `line` of member `log`'s log, or None."""
    if '"event"' not in line:  # cheap: most lines of a busy log are audit lines anyway
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event") not in AUDIT_EVENTS:
        return None
    return AuditEvent(_event_time(obj.get("time")), log, str(obj["event"]), obj)


def parse_lines(lines: Iterable[str], log: str) -> list[AuditEvent]:
    return [e for e in (parse_line(line, log) for line in lines) if e is not None]


@dataclass(frozen=True, slots=True)
class Filter:
    job: str | None = None  # a job id or a prefix of one (case-insensitive)
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    verdict: str | None = None

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise AuditParseError(f"verdict must be one of {', '.join(VERDICTS)}")

    def __call__(self, event: AuditEvent) -> bool:
        if self.job is not None:
            job = event.job_id
            if job is None or not job.lower().startswith(self.job.lower()):
                return False
        if self.since is not None and event.time < self.since:
            return False
        if self.until is not None and event.time > self.until:
            return False
        return self.verdict is None or event.matches_verdict(self.verdict)


def select(events: Iterable[AuditEvent], keep: Filter) -> list[AuditEvent]:
    """The events `keep` accepts, oldest first (stable for equal times)."""
    return sorted((e for e in events if keep(e)), key=lambda e: e.time)


# --- output ---------------------------------------------------------------------------

_COLUMNS = (("TIME (UTC)", 14), ("WHERE", 13), ("JOB", 8), ("VERDICT", 10), ("REASON", 24))


def _fit(text: str, width: int, *, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text.ljust(width)
    return ("…" + text[-(width - 1) :]) if keep_end else (text[: width - 1] + "…")


def row(event: AuditEvent) -> list[str]:
    job = event.job_id or "-"
    return [
        event.time.astimezone(dt.UTC).strftime("%m-%d %H:%M:%S"),
        f"{event.log}:{KIND.get(event.event, event.event)}",
        job[:8],
        event.shown_verdict,
        event.reason,
        event.destination,
    ]


def table(events: Sequence[AuditEvent], width: int = WIDTH) -> str:
    """A fixed-width table, every line at most `width` columns; the destination
    column takes what is left and keeps its end (the port) when cut."""
    fixed = sum(w for _, w in _COLUMNS) + 2 * len(_COLUMNS)
    dest_width = max(8, width - fixed)
    header = [name for name, _ in _COLUMNS] + ["DESTINATION"]
    lines = []
    for cells in [header] + [row(e) for e in events]:
        parts = [_fit(cell, w) for cell, (_, w) in zip(cells, _COLUMNS, strict=False)]
        parts.append(_fit(cells[-1], dest_width, keep_end=True).rstrip())
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def to_json(event: AuditEvent) -> str:
    return json.dumps({"log": event.log, **event.fields}, sort_keys=False)
