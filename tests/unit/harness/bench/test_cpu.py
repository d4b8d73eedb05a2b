"""The bench's CPU accounting from /proc (issue 10): parsing, process trees, samples."""

from __future__ import annotations

import os

import pytest

from egressd_harness.bench import cpu
from egressd_harness.bench.cpu import CpuSample, ProcStat, Snapshot, StatError, parse_stat

# A real /proc/PID/stat line (cat), fields 14..17 = utime stime cutime cstime.
CAT_STAT = (
    "20192 (cat) R 20189 20189 9155 0 -1 4194304 101 0 0 0 7 3 2 1 20 0 1 0 2276188 "
    "3133440 390 18446744073709551615 94089790136320 94089790156201 140723903213632 0 0 0 0 "
    "0 0 0 0 0 17 1 0 0 0 0 0\n"
)


def _stat(pid: int, ppid: int, utime: int, stime: int = 0, comm: str = "p") -> str:
    return f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 100 0 0\n"


def test_parse_stat_real_line() -> None:
    s = parse_stat(CAT_STAT)
    assert s == ProcStat(pid=20192, comm="cat", ppid=20189, utime=7, stime=3, cutime=2, cstime=1)
    assert s.ticks == 13


def test_parse_stat_comm_with_spaces_and_parentheses() -> None:
    s = parse_stat(_stat(42, 7, 5, 6, comm="a) (b c"))
    assert (s.pid, s.comm, s.ppid, s.utime, s.stime) == (42, "a) (b c", 7, 5, 6)


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "12 (x) S 1 2 3", "x (y) S 1 1 1 0 -1 0 0 0 0 0 1 2 3 4 20", "12 (x S 1 2"],
)
def test_parse_stat_rejects(text: str) -> None:
    with pytest.raises(StatError):
        parse_stat(text)


def test_parse_stat_of_this_process() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        s = parse_stat(f.read())
    assert s.pid == os.getpid() and s.ppid == os.getppid()


class FakeProc:
    """A /proc as a dict PID -> stat text; `gone` PIDs are listed but vanish when read."""

    def __init__(
        self, stats: dict[int, str], gone: tuple[int, ...] = (), machine: str | None = None
    ) -> None:
        self.stats = stats
        self.gone = gone
        self.machine_text = machine

    def pids(self) -> list[int]:
        return [*self.stats, *self.gone]

    def stat(self, pid: int) -> str | None:
        return None if pid in self.gone else self.stats[pid]

    def machine(self) -> str | None:
        return self.machine_text


def _tree() -> FakeProc:
    # 1 init; 10 squid -> 11 helper -> 12 grandchild; 20 proxy1; 30 proxy2; 40 unrelated.
    return FakeProc(
        {
            1: _stat(1, 0, 1000),
            10: _stat(10, 1, 100, 50),
            11: _stat(11, 10, 10, 5),
            12: _stat(12, 11, 1, 1),
            20: _stat(20, 1, 200, 100),
            30: _stat(30, 1, 300),
            31: "not a stat line",
            40: _stat(40, 1, 999),
        },
        gone=(50,),
    )


def test_tree_collects_descendants_only() -> None:
    trees = cpu.tree_stats([10], _tree())
    assert sorted(trees) == [10, 11, 12]


def test_descendants_skips_missing_roots() -> None:
    stats = [parse_stat(_stat(5, 1, 1))]
    assert cpu.descendants(stats, [99]) == {}


def test_snapshot_per_root_and_no_double_count() -> None:
    snap = cpu.snapshot({"squid": 10, "helper": 11, "proxy1": 20, "dead": 77}, _tree())
    # squid's tree counts its helper; the helper named again counts nothing twice.
    assert snap.ticks == {"squid": 167, "helper": 0, "proxy1": 300}
    assert snap.processes == 4


def test_sample_per_connection_and_per_mb() -> None:
    before = Snapshot({"proxy1": 100, "node1": 50}, 2)
    after = Snapshot({"proxy1": 350, "node1": 60, "late": 5}, 3)
    s = cpu.sample(before, after, hz=100, connections=10_000)
    assert s.seconds == {"proxy1": 2.5, "node1": 0.1}
    assert s.total_s == pytest.approx(2.6)
    assert s.us_per_connection == pytest.approx(260.0)
    assert s.ms_per_mb is None
    bulk = cpu.sample(before, after, hz=100, nbytes=200_000_000)
    assert bulk.ms_per_mb == pytest.approx(13.0)
    assert bulk.us_per_connection is None
    assert bulk.to_dict()["ms_per_mb"] == 13.0


def test_sample_never_negative() -> None:
    # A root that restarted between the snapshots (same name, fresh counters).
    s = cpu.sample(Snapshot({"proxy1": 500}, 1), Snapshot({"proxy1": 20}, 1), hz=100)
    assert s.seconds == {"proxy1": 0.0}


def test_live_snapshot_sees_this_process_burn_cpu() -> None:
    roots = {"me": os.getpid()}
    before = cpu.snapshot(roots)
    start = os.times()
    # Burn 0.3 s of CPU (not of wall time: the machine may be busy).
    while os.times().user + os.times().system - start.user - start.system < 0.3:
        assert os.times().elapsed - start.elapsed < 30
    after = cpu.snapshot(roots)
    sample = cpu.sample(before, after, hz=cpu.clock_ticks(), connections=1)
    assert 0.25 <= sample.total_s < 5
    assert CpuSample({"x": 0.5}, connections=1000).us_per_connection == pytest.approx(500)


# The first lines of a real /proc/stat: user nice system idle iowait irq softirq steal ...
PROC_STAT = (
    "cpu  4807 3 1710 90418 95 0 1036 7 0 0\ncpu0 2377 1 866 45219 46 0 544 3 0 0\nintr 1234 0 0\n"
)


def test_parse_machine_real_text() -> None:
    m = cpu.parse_machine(PROC_STAT)
    assert m == cpu.MachineTicks(busy=4807 + 3 + 1710 + 0 + 1036 + 7, softirq=1036)


@pytest.mark.parametrize(
    "text", ["", "cpu0 1 2 3 4 5 6 7 8\n", "cpu  1 2 3\n", "cpu  1 2 x 4 5 6 7 8 9\n"]
)
def test_parse_machine_rejects(text: str) -> None:
    with pytest.raises(StatError):
        cpu.parse_machine(text)


def test_snapshot_user_ticks_and_machine() -> None:
    tree = _tree()
    tree.machine_text = PROC_STAT
    snap = cpu.snapshot({"squid": 10, "proxy1": 20}, tree)
    assert snap.user_ticks == {"squid": 111, "proxy1": 200}
    assert snap.machine is not None and snap.machine.softirq == 1036
    # Unreadable or garbled /proc/stat: no machine figure, the rest as before.
    tree.machine_text = "garbage"
    assert cpu.snapshot({"squid": 10}, tree).machine is None
    tree.machine_text = None
    assert cpu.snapshot({"squid": 10}, tree).ticks == {"squid": 167}


def test_sample_user_share_and_machine_per_connection() -> None:
    before = Snapshot({"p": 100}, 1, {"p": 60}, cpu.MachineTicks(busy=1000, softirq=100))
    after = Snapshot({"p": 300}, 1, {"p": 210}, cpu.MachineTicks(busy=1500, softirq=180))
    s = cpu.sample(before, after, hz=100, connections=1000)
    assert s.user_seconds == {"p": 1.5}
    assert s.user_share == pytest.approx(0.75)
    assert s.machine_busy_s == pytest.approx(5.0)
    assert s.machine_softirq_s == pytest.approx(0.8)
    assert s.machine_us_per_connection == pytest.approx(5000.0)
    d = s.to_dict()
    assert d["cpu_user_s"] == {"p": 1.5}
    assert d["machine_us_per_connection"] == 5000.0
    # One side without /proc/stat: no machine figure rather than a wrong one.
    lone = cpu.sample(Snapshot({"p": 1}, 1), after, hz=100, connections=10)
    assert lone.machine_busy_s is None and lone.machine_us_per_connection is None
    assert lone.user_share is None


def test_live_machine_busy_covers_this_process() -> None:
    roots = {"me": os.getpid()}
    before = cpu.snapshot(roots)
    start = os.times()
    while os.times().user + os.times().system - start.user - start.system < 0.2:
        assert os.times().elapsed - start.elapsed < 30
        sum(i * i for i in range(20_000))  # user time, not the loop's own syscalls
    s = cpu.sample(before, cpu.snapshot(roots), hz=cpu.clock_ticks(), connections=1)
    assert s.machine_busy_s is not None and s.machine_busy_s >= s.total_s * 0.8
    assert s.user_share is not None and s.user_share > 0.5
