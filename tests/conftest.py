"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """A test that runs `egressd.cli.main` configures structlog to print to the
    stderr that pytest captured for that test; the next test must not log to it
    once it is closed."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
