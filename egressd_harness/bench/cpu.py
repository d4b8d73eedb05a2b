"""CPU time of a path's processes, from /proc (issue 10): per connection and per MB.

A path names its root processes (the proxies and the agent for egressd, Squid
for Squid); every measure snapshots the CPU time of those roots and of all
their descendants before and after, and the difference divided by the work
done (connections, MB) is the cost. Rates move with the machine's load; the
CPU a connection costs moves much less.

The time of one process is utime + stime + cutime + cstime from
`/proc/PID/stat` (all its threads): a child that exits between the two
snapshots moves its time into its parent's cutime/cstime when it is reaped,
so the sum over the live tree counts it once. Not counted: kernel work done
in softirq context on behalf of another process (packet forwarding, tc/eBPF
programs, the netfilter redirect), which is charged to whichever process the
CPU happened to run, often the load generator or ksoftirqd.

So that the figure is read for what it is, each sample also says how much of
the path's time was user time (utime + cutime: the daemons' own code, Python
for egressd) and what the whole machine spent meanwhile, from the first line
of `/proc/stat`: busy (everything but idle and iowait, every process and the
softirq time charged to none) and softirq alone. The machine's busy time per
connection is what sets the rate on a saturated box: it holds the load
generator, the server and the kernel's packet work of every path alike, and
whatever else the machine runs meanwhile (read it from a quiet machine only).

Pure: `parse_stat`, `parse_machine`, `descendants`, `CpuSample`; I/O:
`ProcReader`, `snapshot` (the reader can be a fake).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

MB = 1_000_000


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What the bench needs from one /proc/PID/stat line; times in clock ticks."""

    pid: int
    comm: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        return self.utime + self.stime + self.cutime + self.cstime

    @property
    def user_ticks(self) -> int:
        return self.utime + self.cutime


@dataclass(frozen=True, slots=True)
class MachineTicks:
    """The whole machine's CPU time from `/proc/stat`'s ``cpu`` line, in clock ticks."""

    busy: int  # user + nice + system + irq + softirq + steal
    softirq: int


class StatError(ValueError):
    """A /proc/PID/stat text that does not parse."""


def parse_stat(text: str) -> ProcStat:
    """Parse `/proc/PID/stat` (`comm` may hold spaces and parentheses: split at the last ')')."""
    head, sep, tail = text.rpartition(")")
    pid_text, open_paren, comm = head.partition(" (")
    fields = tail.split()
    # After comm: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    if not sep or not open_paren or len(fields) < 15:
        raise StatError(f"not a /proc/PID/stat line: {text[:80]!r}")
    try:
        return ProcStat(
            pid=int(pid_text),
            comm=comm,
            ppid=int(fields[1]),
            utime=int(fields[11]),
            stime=int(fields[12]),
            cutime=int(fields[13]),
            cstime=int(fields[14]),
        )
    except ValueError as exc:
        raise StatError(f"not a /proc/PID/stat line: {text[:80]!r}") from exc


def parse_machine(text: str) -> MachineTicks:
    """The ``cpu`` line of `/proc/stat`: user nice system idle iowait irq softirq steal ..."""
    first = text.split("\n", 1)[0].split()
    if len(first) < 9 or first[0] != "cpu":
        raise StatError(f"not a /proc/stat cpu line: {text[:80]!r}")
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    except ValueError as exc:
        raise StatError(f"not a /proc/stat cpu line: {text[:80]!r}") from exc
    return MachineTicks(user + nice + system + irq + softirq + steal, softirq)


def descendants(stats: Iterable[ProcStat], roots: Iterable[int]) -> dict[int, ProcStat]:
    """The roots that exist and every process below them, by PID."""
    by_pid = {s.pid: s for s in stats}
    children: dict[int, list[int]] = {}
    for s in by_pid.values():
        children.setdefault(s.ppid, []).append(s.pid)
    out: dict[int, ProcStat] = {}
    todo = [pid for pid in roots if pid in by_pid]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = by_pid[pid]
        todo += children.get(pid, [])
    return out


class ProcReader(Protocol):
    def pids(self) -> list[int]: ...

    def stat(self, pid: int) -> str | None:
        """The text of /proc/PID/stat; None if the process is gone."""
        ...

    def machine(self) -> str | None:
        """The text of /proc/stat; None if it cannot be read."""
        ...


class LiveProc:
    """The host's /proc."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def pids(self) -> list[int]:
        return [int(e) for e in os.listdir(self.root) if e.isdigit()]

    def stat(self, pid: int) -> str | None:
        try:
            return (self.root / str(pid) / "stat").read_text()
        except OSError:
            return None

    def machine(self) -> str | None:
        try:
            return (self.root / "stat").read_text()
        except OSError:
            return None


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def tree_stats(roots: Iterable[int], reader: ProcReader) -> dict[int, ProcStat]:
    """The processes of the trees under `roots`, read once (one pass over /proc)."""
    stats = []
    for pid in reader.pids():
        text = reader.stat(pid)
        if text is None:
            continue  # exited between the listing and the read
        try:
            stats.append(parse_stat(text))
        except StatError:
            continue
    return descendants(stats, roots)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """CPU ticks per named root (its whole tree) at one moment, of which user
    ticks, and the whole machine's (None when /proc/stat could not be read)."""

    ticks: Mapping[str, int]
    processes: int
    user_ticks: Mapping[str, int] = field(default_factory=dict)
    machine: MachineTicks | None = None


def snapshot(roots: Mapping[str, int], reader: ProcReader | None = None) -> Snapshot:
    """The CPU ticks of each named root's tree (`{"proxy1": pid, ...}`)."""
    reader = reader if reader is not None else LiveProc()
    trees = tree_stats(roots.values(), reader)
    # Attribute each process to its root; a root nested in another's tree counts once.
    ticks: dict[str, int] = {}
    user: dict[str, int] = {}
    seen: set[int] = set()
    for name, root in roots.items():
        if root not in trees:
            continue  # gone: no figure rather than a wrong one
        mine = descendants(trees.values(), [root])
        fresh = {pid: s for pid, s in mine.items() if pid not in seen}
        seen |= fresh.keys()
        ticks[name] = sum(s.ticks for s in fresh.values())
        user[name] = sum(s.user_ticks for s in fresh.values())
    return Snapshot(ticks, len(trees), user, _machine(reader))


def _machine(reader: ProcReader) -> MachineTicks | None:
    text = reader.machine()
    if text is None:
        return None
    try:
        return parse_machine(text)
    except StatError:
        return None


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU time the path's processes spent on one measure, and the work it did."""

    seconds: Mapping[str, float]  # per root (its tree), utime+stime
    connections: int = 0
    nbytes: int = 0
    user_seconds: Mapping[str, float] = field(default_factory=dict)  # utime, of `seconds`
    machine_busy_s: float | None = None  # the whole machine, softirq included
    machine_softirq_s: float | None = None

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def us_per_connection(self) -> float | None:
        return self.total_s * 1e6 / self.connections if self.connections > 0 else None

    @property
    def ms_per_mb(self) -> float | None:
        return self.total_s * 1e3 / (self.nbytes / MB) if self.nbytes > 0 else None

    @property
    def user_share(self) -> float | None:
        """The path's user time over its CPU time (None without either)."""
        total = self.total_s
        return sum(self.user_seconds.values()) / total if self.user_seconds and total > 0 else None

    @property
    def machine_us_per_connection(self) -> float | None:
        busy = self.machine_busy_s
        return busy * 1e6 / self.connections if busy is not None and self.connections > 0 else None

    def to_dict(self) -> dict[str, Any]:
        per_conn, per_mb = self.us_per_connection, self.ms_per_mb
        machine = self.machine_us_per_connection
        return {
            "cpu_s": {name: round(s, 3) for name, s in self.seconds.items()},
            "cpu_total_s": round(self.total_s, 3),
            "cpu_user_s": {name: round(s, 3) for name, s in self.user_seconds.items()},
            "connections": self.connections,
            "bytes": self.nbytes,
            "us_per_connection": round(per_conn, 2) if per_conn is not None else None,
            "ms_per_mb": round(per_mb, 3) if per_mb is not None else None,
            "machine_busy_s": _round3(self.machine_busy_s),
            "machine_softirq_s": _round3(self.machine_softirq_s),
            "machine_us_per_connection": round(machine, 2) if machine is not None else None,
        }


def _round3(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def sample(
    before: Snapshot,
    after: Snapshot,
    *,
    hz: int,
    connections: int = 0,
    nbytes: int = 0,
) -> CpuSample:
    """The CPU spent between two snapshots (roots present in both), in seconds."""
    seconds = {
        name: max(0, after.ticks[name] - ticks) / hz
        for name, ticks in before.ticks.items()
        if name in after.ticks
    }
    user = {
        name: max(0, after.user_ticks[name] - ticks) / hz
        for name, ticks in before.user_ticks.items()
        if name in after.user_ticks and name in seconds
    }
    busy = softirq = None
    if before.machine is not None and after.machine is not None:
        busy = max(0, after.machine.busy - before.machine.busy) / hz
        softirq = max(0, after.machine.softirq - before.machine.softirq) / hz
    return CpuSample(
        seconds,
        connections=connections,
        nbytes=nbytes,
        user_seconds=user,
        machine_busy_s=busy,
        machine_softirq_s=softirq,
    )
