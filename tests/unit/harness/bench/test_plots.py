"""`egressd bench`'s PNG: drawn from a recorded report (a real run's JSON), and
what it draws is what the report says."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from egressd import cli
from egressd_harness import plotting
from egressd_harness.bench import plots

RECORDED = Path(__file__).parent / "testdata" / "data_path.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def doc() -> dict[str, Any]:
    return json.loads(RECORDED.read_text())


def _decoded(path: Path) -> tuple[int, int]:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_render_writes_a_png_of_the_report(doc: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "data_path.json"
    (png,) = plots.write(doc, out)
    assert png == tmp_path / "data_path.png"
    width, height = _decoded(png)
    assert width > 600 and height > 250
    assert png.stat().st_size < 150_000


def test_bars_are_the_reports_medians_and_samples(doc: dict[str, Any], tmp_path: Path) -> None:
    drawn = plots.render(doc, tmp_path / "b.png")
    paths = doc["paths"]
    assert [b.label for b in drawn.conn_per_s] == ["kernel", "squid", "egressd"]
    for bar in drawn.conn_per_s:
        assert bar.value == paths[bar.label]["median"]["conn_per_s"]
        assert bar.samples == tuple(
            s["requests_per_s"] for s in paths[bar.label]["samples"]["connrate"]
        )
        assert len(bar.samples) == doc["meta"]["options"]["repeat"]
    for bar in drawn.bulk_mb_s:
        assert bar.value == paths[bar.label]["median"]["bulk_mb_s"]
        assert [round(s, 1) for s in bar.samples] == [
            s["mb_per_s"] for s in paths[bar.label]["samples"]["bulk"]
        ]
    assert drawn.conn_per_s[0].ratio == 1.0
    for bar in drawn.conn_per_s[1:]:
        assert bar.ratio == doc["vs_kernel"][bar.label]["conn_ratio"]
    assert [b.label for b in drawn.added_p50_us] == ["squid", "egressd"]
    kernel = paths["kernel"]["samples"]["latency"]
    for p50, p99 in zip(drawn.added_p50_us, drawn.added_p99_us, strict=True):
        assert p50.value == doc["vs_kernel"][p50.label]["added_p50_us"]
        assert p99.value == doc["vs_kernel"][p99.label]["added_p99_us"]
        ours = paths[p50.label]["samples"]["latency"]
        assert p50.samples == tuple(
            round(a["percentiles_us"]["p50"] - b["percentiles_us"]["p50"], 1)
            for a, b in zip(ours, kernel, strict=True)
        )
    assert drawn.errors == {}


def test_a_failed_path_has_no_bars_and_is_named(doc: dict[str, Any], tmp_path: Path) -> None:
    broken = copy.deepcopy(doc)
    broken["paths"]["squid"]["error"] = "setup_failed: squid did not start"
    broken["vs_kernel"].pop("squid")
    drawn = plots.render(broken, tmp_path / "b.png")
    assert [b.label for b in drawn.conn_per_s] == ["kernel", "egressd"]
    assert [b.label for b in drawn.added_p99_us] == ["egressd"]
    assert drawn.errors == {"squid": "setup_failed: squid did not start"}
    _decoded(tmp_path / "b.png")


def test_a_report_without_paths_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plotting.write_beside(plots.write, {"schema": "x"}, tmp_path / "x.json") == []
    err = capsys.readouterr().err
    assert err.startswith("egressd: plots not written:") and len(err.strip().splitlines()) == 1


def test_missing_matplotlib_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plotting, "available", lambda: False)
    assert cli.main(["bench", "--out", "/tmp/never.json"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"egressd: error: {plotting.MISSING}"


def test_no_plots_flag() -> None:
    assert cli.build_parser().parse_args(["bench", "--no-plots"]).no_plots is True
    assert cli.build_parser().parse_args(["bench"]).no_plots is False


def test_the_cli_does_not_import_matplotlib() -> None:
    code = (
        "import sys; from egressd import cli; cli.build_parser(); "
        "import egressd_harness.bench.plots, egressd_harness.loadtest.plots; "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
