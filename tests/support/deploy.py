"""Shared by the deploy tests: the repository's deploy files, loaded as plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    """deploy/compose.yaml as YAML (anchors and `<<` merges resolved), no interpolation."""
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def image_name(image: str) -> str:
    """`registry/path/name:tag` -> `name` (compose's `egressd:${EGRESSD_TAG:-latest}` too)."""
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]
