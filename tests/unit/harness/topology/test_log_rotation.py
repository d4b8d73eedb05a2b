"""A daemon's log is one file per run: each start moves the last run aside, a few are kept."""

from __future__ import annotations

from pathlib import Path

from egressd_harness.topology import procs


def _runs(log: Path) -> list[str]:
    files = [log, *(log.with_name(f"{log.name}.{n}") for n in range(1, 10))]
    return [f.read_text() if f.exists() else "-" for f in files]


def test_each_start_moves_the_last_run_aside_and_keeps_a_few(tmp_path: Path) -> None:
    log = tmp_path / "proxy1.log"
    for run in range(1, 6):
        procs.rotate_log(log, keep=3)
        log.write_text(f"run{run}\n")
    assert _runs(log)[:5] == ["run5\n", "run4\n", "run3\n", "run2\n", "-"]
    assert not log.with_name("proxy1.log.4").exists()


def test_nothing_to_rotate(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    procs.rotate_log(log)
    assert list(tmp_path.iterdir()) == []
    log.write_text("")
    procs.rotate_log(log)  # an empty log (a daemon that printed nothing) is no run to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.log"]


def test_keep_zero_starts_afresh(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("old\n")
    procs.rotate_log(log, keep=0)
    assert list(tmp_path.iterdir()) == []
