"""`egressd loadtest`'s PNGs: drawn from recorded reports (real runs' JSON), and
what they draw is what the report says."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from egressd import cli
from egressd_harness import plotting
from egressd_harness.loadtest import plots

TESTDATA = Path(__file__).parent / "testdata"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recorded(name: str) -> dict[str, Any]:
    return json.loads((TESTDATA / f"{name}.json").read_text())


@pytest.fixture
def port_exhaustion() -> dict[str, Any]:
    return _recorded("port-exhaustion")


def _decoded(path: Path) -> tuple[int, int]:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert path.stat().st_size < 150_000
    return width, height


def test_write_puts_two_pngs_beside_the_json(
    port_exhaustion: dict[str, Any], tmp_path: Path
) -> None:
    pngs = plots.write(port_exhaustion, tmp_path / "run.json")
    assert pngs == [tmp_path / "run-latency.png", tmp_path / "run-throughput.png"]
    for png in pngs:
        width, height = _decoded(png)
        assert width > 600 and height > 300


def test_latency_lines_are_the_victims_per_second_series(
    port_exhaustion: dict[str, Any], tmp_path: Path
) -> None:
    drawn = plots.render_latency(port_exhaustion, tmp_path / "l.png")
    assert list(drawn) == ["victim"]  # the attacker has no latency series
    rows = port_exhaustion["observed"]["summaries"]["victim"]["latency_per_second"]
    t0 = port_exhaustion["observed"]["schedule_t0"]
    p50, p99 = drawn["victim"]
    assert p50.y == tuple(r["p50_ms"] for r in rows)
    assert p99.y == tuple(r["p99_ms"] for r in rows)
    assert p50.x == pytest.approx([r["t"] + 0.5 - t0 for r in rows], abs=1e-3)
    # The series covers the windows: requests in every second of the schedule.
    end = port_exhaustion["scenario"]["windows"][-1]["end"]
    assert min(p50.x) < 0 < end - 2 < max(p50.x)
    # Every request the victim made is in the series (it sends none after the schedule).
    assert sum(r["n"] for r in rows) == port_exhaustion["observed"]["totals"]["victim"]["requests"]


def test_throughput_panels_are_each_jobs_series(
    port_exhaustion: dict[str, Any], tmp_path: Path
) -> None:
    panels = plots.render_throughput(port_exhaustion, tmp_path / "t.png")
    assert [(p.role, p.unit) for p in panels] == [
        ("attacker", "connections held"),
        ("victim", "requests/s"),
    ]
    summaries = port_exhaustion["observed"]["summaries"]
    held = summaries["attacker"]["attacker"]["held_series"]
    (line,) = panels[0].lines
    assert line.y == tuple(float(n) for _, n in held)
    assert max(line.y) == summaries["attacker"]["attacker"]["held_max"]
    requests = panels[1].lines[0]
    rows = summaries["victim"]["latency_per_second"]
    assert sum(requests.y) == sum(r["n"] for r in rows)
    # Every second from the first to the last is drawn, zero where none started.
    assert len(requests.x) == rows[-1]["t"] - rows[0]["t"] + 1
    assert [ln.label for ln in panels[1].lines] == ["requests/s"]  # no failures in this run


def test_failures_get_their_own_line(port_exhaustion: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(port_exhaustion)
    rows = doc["observed"]["summaries"]["victim"]["latency_per_second"]
    rows[5]["failed"] = 3
    panels = plots.render_throughput(doc, tmp_path / "t.png")
    failed = panels[1].lines[1]
    assert failed.label == "failed/s" and sum(failed.y) == 3


def test_the_hog_in_megabytes_per_second(tmp_path: Path) -> None:
    doc = _recorded("bandwidth")
    panels = plots.render_throughput(doc, tmp_path / "t.png")
    _decoded(tmp_path / "t.png")
    assert [(p.role, p.unit) for p in panels] == [("hog", "MB/s"), ("steady", "requests/s")]
    per_s = doc["observed"]["summaries"]["hog"]["hog"]["bytes_per_second"]
    assert sum(panels[0].lines[0].y) == pytest.approx(sum(per_s.values()) / 1e6)
    assert list(plots.render_latency(doc, tmp_path / "l.png")) == ["steady"]


def test_a_flood_attacker_is_its_mean_rate_over_its_spans(
    port_exhaustion: dict[str, Any], tmp_path: Path
) -> None:
    doc = copy.deepcopy(port_exhaustion)
    t0 = doc["observed"]["schedule_t0"]
    spans = [[t0 + 6.2, t0 + 12.3], [t0 + 19.5, t0 + 25.6]]
    doc["observed"]["summaries"]["attacker"] = {"kind": "dns", "sent_per_s": 4998.7, "spans": spans}
    panels = plots.render_throughput(doc, tmp_path / "t.png")
    assert panels[0].unit == "packets/s"
    assert [ln.x for ln in panels[0].lines] == [(6.2, 12.3), (19.5, 25.6)]
    assert all(ln.y == (4998.7, 4998.7) for ln in panels[0].lines)


def test_windows_come_from_the_scenario(port_exhaustion: dict[str, Any]) -> None:
    spans = plots.windows(port_exhaustion)
    assert [p for _, _, p in spans] == ["baseline", "stress", "settle"] * 3
    assert spans[0][0] == 0.0 and spans[-1][1] == port_exhaustion["scenario"]["duration_s"]


def test_a_report_without_series_still_draws(
    port_exhaustion: dict[str, Any], tmp_path: Path
) -> None:
    doc = copy.deepcopy(port_exhaustion)
    doc["observed"]["summaries"] = {}
    assert plots.render_latency(doc, tmp_path / "l.png") == {}
    assert plots.render_throughput(doc, tmp_path / "t.png") == []
    _decoded(tmp_path / "l.png")
    _decoded(tmp_path / "t.png")


def test_a_malformed_report_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plotting.write_beside(plots.write, {"scenario": {}}, tmp_path / "x.json") == []
    err = capsys.readouterr().err
    assert err.startswith("egressd: plots not written:") and len(err.strip().splitlines()) == 1


def test_missing_matplotlib_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plotting, "available", lambda: False)
    assert cli.main(["loadtest", "steady", "--duration", "20", "--out", "/tmp/never.json"]) == 2
    assert capsys.readouterr().err.strip() == f"egressd: error: {plotting.MISSING}"


def test_no_plots_flag() -> None:
    args = cli.build_parser().parse_args(["loadtest", "steady", "--duration", "20", "--no-plots"])
    assert args.no_plots is True
