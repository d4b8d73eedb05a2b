"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.support.root import unmet

# The e2e suite fails instead (its `fleet` fixture): `make test` must not pass without it.
E2E = Path(__file__).parent / "e2e"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a `root` test whose needs (root, then its marker's tools) this machine lacks."""
    marks = list(item.iter_markers("root"))
    if not marks or E2E in item.path.parents:
        return
    reason = unmet(need for mark in marks for need in mark.args)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """A test that runs `egressd.cli.main` configures structlog to print to the
    stderr that pytest captured for that test; the next test must not log to it
    once it is closed."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
