"""Fixtures shared by the agent's unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd.policy.keys import write_key_dir
from tests.support.sandbox_manager import KEY


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    write_key_dir(tmp_path / "keys", KEY)
    return tmp_path / "keys"
