"""`egressd demo`: `--offline` runs the in-process checks; without it, the namespaces backend
gets a fleet of the given run directory and prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd import cli
from egressd_harness.demo import netns, offline
from egressd_harness.topology.fleet import Fleet


def test_offline_checks_every_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--offline"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "16 of 16 outcomes as expected"
    assert not [line for line in out if line.endswith(" NO")]
    assert any("rejected:bad_signature" in line for line in out)


def test_offline_fails_on_an_unexpected_outcome(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = offline.Attempt("made up", "verified", "rejected:expired")
    monkeypatch.setattr(offline, "geneve_attempts", lambda: [wrong])
    assert cli.main(["demo", "--offline"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "12 of 13 outcomes as expected"


def test_the_fleet_demo_runs_on_the_named_run_dir_and_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[tuple[Fleet, bool]] = []

    def run_demo(fleet: Fleet, *, keep: bool = False) -> int:
        got.append((fleet, keep))
        return 7

    monkeypatch.setattr(netns, "run_demo", run_demo)
    assert cli.main(["demo", "--run-dir", str(tmp_path), "--prefix", "egd-x-", "--keep"]) == 7
    ((fleet, keep),) = got
    assert (fleet.run_dir, fleet.layout.prefix, keep) == (tmp_path, "egd-x-", True)
