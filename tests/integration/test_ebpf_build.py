"""`egressd.ebpf.build`: clang into a cache, errors with their reason (shared by agent and proxy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd.agent.tier1 import DEFAULT_SOURCE
from egressd.ebpf.build import EbpfError, build_object


def test_build_object_caches_and_reports_errors(tmp_path: Path) -> None:
    obj = build_object(DEFAULT_SOURCE, tmp_path)
    mtime = obj.stat().st_mtime_ns
    assert build_object(DEFAULT_SOURCE, tmp_path) == obj
    assert obj.stat().st_mtime_ns == mtime
    bad = tmp_path / "bad.c"
    bad.write_text("int broken( {\n")
    with pytest.raises(EbpfError) as info:
        build_object(bad, tmp_path)
    assert info.value.reason == "build_failed"
    assert "bad.c" in info.value.detail
    assert not list(tmp_path.glob(".bad.*"))
    with pytest.raises(EbpfError) as info:
        build_object(tmp_path / "missing.c", tmp_path)
    assert info.value.reason == "build_failed"
